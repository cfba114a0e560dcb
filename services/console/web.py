"""What every console page shares: sessions and sign-in, rendering, errors as messages.

A failed call shows on the page, never as a crash: field violations at their fields (each
page's own handler puts them there), a refused key (UNAUTHENTICATED) sends the user to sign
in again, PERMISSION_DENIED says what the key may not do, and anything else is a message
with the service's words. Page handlers run inside `Web.page`, which gives them the
request's session (a new one gets its cookie) and turns those errors into pages.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import jinja2
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)

from loraforge.client.client import ClientError
from loraforge.services.console import events
from loraforge.services.console.backend import Backend
from loraforge.services.console.config import ConsoleConfig
from loraforge.services.console.sessions import COOKIE, Session, Sessions
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb

log = logging.getLogger("loraforge.console")

Handler = Callable[[Request, "Ctx"], Awaitable[Response]]
PAGE_ROWS = 50  # rejected rows per page of an upload report
PREVIEW_ROWS = 10
HISTOGRAM_SAMPLE = 1000
HISTOGRAM_BINS = 12
FINAL_STATES = {"TRAINED", "FAILED", "CANCELLED"}
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_of(err: ClientError) -> int:
    """The HTTP status of a failed call. RESOURCE_EXHAUSTED is never 429 here: with no
    reason of ours it is gRPC's refusal of a message too large (the request's own 400),
    with one a limit the operator sets (503)."""
    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 503 if err.reason else 400
    return STATUS.get(err.code, 500)


def package_dir(name: str) -> Path:
    return Path(str(resources.files("loraforge.services.console") / name))


@dataclass
class Ctx:
    """What a request runs with: its session (new ones get a cookie) and the user's key."""

    session: Session
    new: bool

    @property
    def key(self) -> str:
        return self.session.api_key


def error_text(err: ClientError) -> str:
    """A failed call in words a user can act on."""
    if err.code == grpc.StatusCode.PERMISSION_DENIED:
        return f"Your API key may not do this: {err.message}"
    if err.code == grpc.StatusCode.UNAVAILABLE:
        return f"A service is not reachable right now ({err.message}); try again once it is up."
    if err.code == grpc.StatusCode.NOT_FOUND:
        return f"Not found: {err.message}"
    return err.message


def run_state(mv: tpb.ModelVersion) -> str:
    return events.state_name(mv.state)


def eta_text(mv: tpb.ModelVersion) -> str:
    if run_state(mv) != "TRAINING" or not mv.progress.HasField("eta"):
        return ""
    return clock(mv.progress.eta.ToTimedelta().total_seconds())


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def percent_done(mv: tpb.ModelVersion) -> int:
    if run_state(mv) == "TRAINED":
        return 100
    total = mv.progress.total_steps
    return int(100 * mv.progress.step / total) if total else 0


def evaluation_state(state: int) -> str:
    return epb.EvaluationState.Name(state).removeprefix("EVALUATION_STATE_")  # type: ignore[arg-type]


def short_name(name: str) -> str:
    """`apps/a/models/m/versions/v` -> `m/v`; `apps/a/datasets/d/versions/v` -> `d/v`."""
    parts = name.split("/")
    return "/".join(parts[3::2]) if len(parts) >= 4 else name


class Web:
    """What every page shares: sessions, sign-in, rendering, errors as messages."""

    def __init__(self, config: ConsoleConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.auth = config.auth == "on"
        self.sessions = Sessions(config.session_idle_seconds, config.max_sessions)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(package_dir("templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["short"] = short_name
        self.env.filters["state"] = run_state
        self.env.filters["eta"] = eta_text
        self.env.filters["percent"] = percent_done
        self.env.filters["quote"] = lambda s: urllib.parse.quote(str(s), safe="")

    # ----- plumbing ---------------------------------------------------------------------

    def _session(self, request: Request) -> Ctx:
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            return Ctx(session, False)
        return Ctx(self.sessions.create(), True)

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.id,
            httponly=True,
            samesite="strict",
            secure=self.config.secure_cookies,
            path="/",
        )

    @staticmethod
    def _same_origin(request: Request) -> bool:
        """A form post from another site is refused (the cookie's SameSite=Strict is the
        first guard; this is the second, for browsers that send an Origin)."""
        origin = request.headers.get("origin")
        if not origin or origin == "null":
            return origin is None
        return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")

    def page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            ctx = self._session(request)
            if request.method == "POST" and not self._same_origin(request):
                response: Response = PlainTextResponse("cross-site request refused", 403)
            elif self.auth and not ctx.key:
                response = self._to_login(request, "")
            else:
                try:
                    response = await handler(request, ctx)
                except ClientError as err:
                    response = self._failed(request, ctx, err)
            if ctx.new:
                self._set_cookie(response, ctx.session)
            return response

        return wrapped

    def _to_login(self, request: Request, why: str) -> Response:
        """Sign in first: pages are redirected (back to where they were, after), streams
        answer 401 with the sign-in address for their script to follow."""
        path = request.url.path
        streamed = path.endswith(("/events", "/stream"))
        query = {"next": path if request.method == "GET" and not streamed else "/"}
        if why:
            query["why"] = why
        url = "/login?" + urllib.parse.urlencode(query)
        if streamed:
            return JSONResponse({"error": "sign in again", "login": url}, 401)
        return RedirectResponse(url, 303)

    def _failed(self, request: Request, ctx: Ctx, err: ClientError) -> Response:
        if err.code == grpc.StatusCode.UNAUTHENTICATED:
            ctx.session.api_key = ""
            if self.auth or ctx.key:
                return self._to_login(request, "expired")
            return self.render(
                request,
                ctx,
                "error.html",
                status=401,
                title="Sign in needed",
                message=f"The services ask for an API key: {err.message}",
                login=True,
            )
        status = status_of(err)
        if status == 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, err)
        return self.render(
            request,
            ctx,
            "error.html",
            status=status,
            title={403: "Not allowed", 404: "Not found", 503: "Service unavailable"}.get(
                status, "Something went wrong"
            ),
            message=error_text(err),
            login=False,
        )

    def render(
        self, request: Request, ctx: Ctx, template_file: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        app = request.path_params.get("app", "")
        html = self.env.get_template(template_file).render(
            auth=self.auth,
            signed_in=bool(ctx.key),
            app_id=app,
            path=request.url.path,
            notice=request.query_params.get("notice", ""),
            **values,
        )
        return HTMLResponse(html, status_code=status)

    @staticmethod
    def _back(url: str, notice: str = "", **query: str) -> RedirectResponse:
        params = {k: v for k, v in query.items() if v}
        if notice:
            params["notice"] = notice
        return RedirectResponse(url + ("?" + urllib.parse.urlencode(params) if params else ""), 303)

    # ----- sign-in ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def _login_page(self, request: Request, ctx: Ctx, error: str, status: int = 200) -> Response:
        why = request.query_params.get("why", "")
        message = error or (
            "Your session ended or the services no longer accept its key; sign in again."
            if why == "expired"
            else ""
        )
        nxt = request.query_params.get("next", "/")
        html = self.render(
            request,
            ctx,
            "login.html",
            status=status,
            error=message,
            next=nxt if nxt.startswith("/") and not nxt.startswith("//") else "/",
        )
        if ctx.new:
            self._set_cookie(html, ctx.session)
        return html

    async def login_form(self, request: Request) -> Response:
        return self._login_page(request, self._session(request), "")

    async def login(self, request: Request) -> Response:
        ctx = self._session(request)
        if not self._same_origin(request):
            return PlainTextResponse("cross-site request refused", 403)
        form = await request.form()
        key = str(form.get("api_key", "")).strip()
        nxt = str(form.get("next", "/"))
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        if not key:
            return self._login_page(request, ctx, "Enter an API key.", 400)
        if not (key.isascii() and key.isprintable()):
            # gRPC metadata is printable ASCII, as every key is: this cannot be one.
            text = "That is not an API key: a key is printable ASCII (`lf_…`)."
            return self._login_page(request, ctx, text, 401)
        try:
            await self.backend.check_key(key)
        except ClientError as err:
            if err.code == grpc.StatusCode.UNAUTHENTICATED:
                text = f"The services refused this key: {err.message}"
            else:
                text = error_text(err)
            return self._login_page(request, ctx, text, status_of(err))
        # A fresh session id on sign-in, so an id known before it is worth nothing after.
        self.sessions.end(ctx.session.id)
        session = self.sessions.create(key)
        response = RedirectResponse(nxt, 303)
        self._set_cookie(response, session)
        return response

    async def logout(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-site request refused", 403)
        self.sessions.end(request.cookies.get(COOKIE))
        response = RedirectResponse("/login" if self.auth else "/", 303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    def _run_name(self, request: Request) -> str:
        p = request.path_params
        return f"apps/{p['app']}/models/{p['model']}/versions/{p['version']}"

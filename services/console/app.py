"""The console's pages and endpoints: server-rendered HTML, SSE for live runs and answers.

Every page is rendered here from the services' answers (`backend`); the browser's script
(`static/console.js`) only adds what a plain page cannot do: upload progress, checking a
parameter as it is typed, the live run chart and the streamed playground. Without it the
forms still work.

A failed call shows on the page, never as a crash: field violations at their fields, a
refused key (UNAUTHENTICATED) sends the user to sign in again, PERMISSION_DENIED says
what the key may not do, and anything else is a message with the service's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import jinja2
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loraforge.client.client import ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.console import events, forms
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
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
}


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


def _state(mv: tpb.ModelVersion) -> str:
    return events.state_name(mv.state)


def _eta(mv: tpb.ModelVersion) -> str:
    if _state(mv) != "TRAINING" or not mv.progress.HasField("eta"):
        return ""
    return clock(mv.progress.eta.ToTimedelta().total_seconds())


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour on."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def _percent(mv: tpb.ModelVersion) -> int:
    if _state(mv) == "TRAINED":
        return 100
    total = mv.progress.total_steps
    return int(100 * mv.progress.step / total) if total else 0


def _eval_state(state: int) -> str:
    return epb.EvaluationState.Name(state).removeprefix("EVALUATION_STATE_")  # type: ignore[arg-type]


def _short(name: str) -> str:
    """`apps/a/models/m/versions/v` -> `m/v`; `apps/a/datasets/d/versions/v` -> `d/v`."""
    parts = name.split("/")
    return "/".join(parts[3::2]) if len(parts) >= 4 else name


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[dict[str, Any]]:
    """Equal-width bins over the lengths: [{low, high, count, height (0..1)}]."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    bins = max(1, min(bins, high - low + 1))
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // width)] += 1
    while counts and counts[-1] == 0:
        counts.pop()
    top = max(counts) or 1
    return [
        {"low": low + i * width, "high": low + (i + 1) * width - 1, "count": c, "height": c / top}
        for i, c in enumerate(counts)
    ]


async def _file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


class TooLarge(Exception):
    pass


async def _body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in request.stream():
        sent += len(chunk)
        if sent > limit:
            raise TooLarge(f"the file is larger than this console accepts ({limit} bytes)")
        if chunk:
            yield chunk


class Console:
    """The routes over one `Backend` and the sessions."""

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
        self.env.filters["short"] = _short
        self.env.filters["state"] = _state
        self.env.filters["eta"] = _eta
        self.env.filters["percent"] = _percent
        self.env.filters["quote"] = lambda s: urllib.parse.quote(str(s), safe="")

    # ----- plumbing ---------------------------------------------------------------------

    def routes(self) -> list[Route | Mount]:
        p = self.page
        app = "/apps/{app}"
        ds = app + "/datasets/{dataset}"
        run = app + "/models/{model}/versions/{version}"
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", p(self.apps_page), methods=["GET"]),
            Route("/apps", p(self.create_app), methods=["POST"]),
            Route(app, p(self.app_page), methods=["GET"]),
            Route(app + "/delete", p(self.delete_app), methods=["GET", "POST"]),
            Route(app + "/datasets", p(self.create_dataset), methods=["POST"]),
            Route(ds, p(self.dataset_page), methods=["GET"]),
            Route(ds + "/delete", p(self.delete_dataset), methods=["GET", "POST"]),
            Route(ds + "/upload", p(self.upload), methods=["POST"]),
            Route(ds + "/versions", p(self.create_version), methods=["POST"]),
            Route(app + "/train", p(self.train_page), methods=["GET"]),
            Route(app + "/train", p(self.train), methods=["POST"]),
            Route(app + "/runs", p(self.runs_page), methods=["GET"]),
            Route(run, p(self.run_page), methods=["GET"]),
            Route(run + "/events", p(self.run_events), methods=["GET"]),
            Route(run + "/cancel", p(self.cancel), methods=["POST"]),
            Route(run + "/evaluations", p(self.evaluations_page), methods=["GET"]),
            Route(run + "/evaluations", p(self.evaluate), methods=["POST"]),
            Route(run + "/evaluations/{evaluation}", p(self.evaluation_page), methods=["GET"]),
            Route(
                app + "/models/{model}/evaluations/{evaluation}",
                p(self.evaluation_page),
                methods=["GET"],
            ),
            Route(app + "/playground", p(self.playground_page), methods=["GET"]),
            Route(app + "/playground/stream", p(self.playground_stream), methods=["POST"]),
            Mount("/static", StaticFiles(directory=package_dir("static")), name="static"),
        ]

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
        status = STATUS.get(err.code, 500)
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
        try:
            await self.backend.check_key(key)
        except ClientError as err:
            if err.code == grpc.StatusCode.UNAUTHENTICATED:
                text = f"The services refused this key: {err.message}"
            else:
                text = error_text(err)
            return self._login_page(request, ctx, text, STATUS.get(err.code, 500))
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

    # ----- apps and datasets ------------------------------------------------------------

    async def apps_page(
        self, request: Request, ctx: Ctx, errors: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        apps = await self.backend.apps(ctx.key)
        return self.render(
            request, ctx, "apps.html", status=status, apps=apps, errors=errors or {}, form={}
        )

    async def create_app(self, request: Request, ctx: Ctx) -> Response:
        form = await request.form()
        app_id = str(form.get("app_id", "")).strip()
        try:
            await self.backend.create_app(app_id, str(form.get("description", "")), ctx.key)
        except ClientError as err:
            if err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                errors = {f: d for f, d in err.fields} or {"app_id": err.message}
                errors = {
                    ("app_id" if f in ("app_id", "name") else f): d for f, d in errors.items()
                }
                return await self.apps_page(request, ctx, errors, STATUS[err.code])
            raise
        return self._back(f"/apps/{app_id}", f"Created app {app_id}.")

    async def app_page(
        self, request: Request, ctx: Ctx, errors: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        name = f"apps/{request.path_params['app']}"
        app, datasets, runs = await asyncio.gather(
            self.backend.app(name, ctx.key),
            self.backend.datasets_of(name, ctx.key),
            self.backend.runs(name, ctx.key),
        )
        return self.render(
            request,
            ctx,
            "app.html",
            status=status,
            app=app,
            datasets=datasets,
            runs=runs[:10],
            errors=errors or {},
        )

    async def _confirm_delete(
        self,
        request: Request,
        ctx: Ctx,
        what: str,
        name: str,
        delete: Callable[[], Awaitable[None]],
        back: str,
        done: str,
    ) -> Response:
        if request.method == "GET":
            return self.render(request, ctx, "confirm_delete.html", what=what, name=name, back=back)
        await delete()
        return self._back(done, f"Deleted {what} {_short(name) if what != 'app' else name}.")

    async def delete_app(self, request: Request, ctx: Ctx) -> Response:
        name = f"apps/{request.path_params['app']}"
        await self.backend.app(name, ctx.key)
        return await self._confirm_delete(
            request,
            ctx,
            "app",
            name,
            lambda: self.backend.delete_app(name, ctx.key),
            f"/{name}",
            "/",
        )

    async def create_dataset(self, request: Request, ctx: Ctx) -> Response:
        app = request.path_params["app"]
        form = await request.form()
        dataset_id = str(form.get("dataset_id", "")).strip()
        try:
            await self.backend.create_dataset(
                f"apps/{app}", dataset_id, str(form.get("description", "")), ctx.key
            )
        except ClientError as err:
            if err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                errors = {f: d for f, d in err.fields} or {"dataset_id": err.message}
                errors = {
                    ("dataset_id" if f in ("dataset_id", "name") else f): d
                    for f, d in errors.items()
                }
                return await self.app_page(request, ctx, errors, STATUS[err.code])
            raise
        return self._back(f"/apps/{app}/datasets/{dataset_id}", f"Created dataset {dataset_id}.")

    async def delete_dataset(self, request: Request, ctx: Ctx) -> Response:
        app, dataset = request.path_params["app"], request.path_params["dataset"]
        name = f"apps/{app}/datasets/{dataset}"
        await self.backend.dataset(name, ctx.key)
        return await self._confirm_delete(
            request,
            ctx,
            "dataset",
            name,
            lambda: self.backend.delete_dataset(name, ctx.key),
            f"/{name}",
            f"/apps/{app}",
        )

    async def dataset_page(self, request: Request, ctx: Ctx) -> Response:
        name = f"apps/{request.path_params['app']}/datasets/{request.path_params['dataset']}"
        dataset, versions, inputs = await asyncio.gather(
            self.backend.dataset(name, ctx.key),
            self.backend.versions(name, ctx.key),
            self.backend.inputs(name, HISTOGRAM_SAMPLE, ctx.key),
        )
        report, page, pages = None, 1, 1
        upload_id = request.query_params.get("upload", "")
        kept = ctx.session.uploads.get(upload_id)
        if kept is not None and kept[0] == name:
            report = kept[1]
            pages = max(1, math.ceil(len(report.row_errors) / PAGE_ROWS))
            with contextlib.suppress(ValueError):
                page = min(pages, max(1, int(request.query_params.get("page", "1"))))
        lengths = [len(i.example.prompt) + len(i.example.completion) for i in inputs.inputs]
        return self.render(
            request,
            ctx,
            "dataset.html",
            dataset=dataset,
            versions=versions,
            preview=list(inputs.inputs[:PREVIEW_ROWS]),
            total=inputs.total_size or dataset.input_count,
            histogram=histogram(lengths),
            sampled=len(lengths),
            report=report,
            format_name=lambda f: dpb.SourceFormat.Name(f).removeprefix("SOURCE_FORMAT_"),
            version_state=lambda s: dpb.DatasetVersionState.Name(s).removeprefix(
                "DATASET_VERSION_STATE_"
            ),
            rows=list(report.row_errors[(page - 1) * PAGE_ROWS : page * PAGE_ROWS])
            if report
            else [],
            page=page,
            pages=pages,
            upload_id=upload_id,
        )

    async def upload(self, request: Request, ctx: Ctx) -> Response:
        """A file into a dataset: the page's script sends the raw file (`X-File-Name` names
        it), a plain form sends multipart; either way it is streamed on, never held whole."""
        name = f"apps/{request.path_params['app']}/datasets/{request.path_params['dataset']}"
        scripted = request.headers.get("x-file-name") is not None
        try:
            if scripted:
                file_name = urllib.parse.unquote(request.headers["x-file-name"])
                skip = request.headers.get("x-skip-duplicates", "") == "true"
                chunks = _body_chunks(request, self.config.max_upload_bytes)
            else:
                form: FormData = await request.form(max_part_size=self.config.max_upload_bytes)
                file = form.get("file")
                if not isinstance(file, UploadFile) or not file.filename:
                    raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "choose a file to upload")
                file_name, skip = file.filename, form.get("skip_duplicates") == "on"
                chunks = _file_chunks(file)
            report = await self.backend.upload(name, file_name, chunks, ctx.key, skip)
        except (ClientError, TooLarge) as err:
            if (
                isinstance(err, ClientError)
                and err.code
                in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.NOT_FOUND,
                )
                and not scripted
            ):
                raise
            message = error_text(err) if isinstance(err, ClientError) else str(err)
            if scripted:
                return JSONResponse({"error": message}, 400)
            return self._back(f"/{name}", message)
        ctx.session.keep_upload(name, report)
        target = f"/{name}?upload={urllib.parse.quote(report.upload_id)}#report"
        if scripted:
            return JSONResponse({"redirect": target})
        return RedirectResponse(target, 303)

    async def create_version(self, request: Request, ctx: Ctx) -> Response:
        name = f"apps/{request.path_params['app']}/datasets/{request.path_params['dataset']}"
        form = await request.form()
        try:
            version = await self.backend.create_version(
                name, str(form.get("description", "")), ctx.key
            )
        except ClientError as err:
            if err.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                return self._back(f"/{name}", error_text(err))
            raise
        stats = version.stats
        return self._back(
            f"/{name}",
            f"Created version {version.name.rsplit('/', 1)[-1]}: {stats.example_count} examples.",
        )

    # ----- training ---------------------------------------------------------------------

    async def train_page(
        self,
        request: Request,
        ctx: Ctx,
        *,
        values: dict[str, str] | None = None,
        errors: dict[str, str] | None = None,
        general: list[str] | None = None,
        status: int = 200,
        template_name: str = "",
    ) -> Response:
        app = f"apps/{request.path_params['app']}"
        templates, versions, models, model_types = await asyncio.gather(
            self.backend.templates(ctx.key),
            self.backend.app_versions(app, ctx.key),
            self.backend.models(app, ctx.key),
            self.backend.model_types(ctx.key),
        )
        chosen = template_name or request.query_params.get("template", "")
        if not chosen:
            chosen = next((t.name for t in templates if t.recommended), "")
        template = await self.backend.template(chosen, ctx.key) if chosen else None
        fields = forms.fields_of(template) if template else []
        values = values if values is not None else {}
        shown = {f.path: values.get(f.path, f.text(f.default)) for f in fields}
        ready = [v for v in versions if v.state == dpb.DATASET_VERSION_STATE_READY]
        return self.render(
            request,
            ctx,
            "train.html",
            status=status,
            templates=templates,
            template=template,
            groups=forms.groups(fields),
            tolerance=next((f for f in fields if f.path == forms.TOLERANCE), None),
            values=shown,
            form=values,
            errors=errors or {},
            general=general or [],
            versions=ready,
            models=models,
            model_types=model_types,
            field_json=lambda f: json.dumps(
                {
                    "kind": f.kind,
                    "min": f.min,
                    "max": f.max,
                    "choices": f.choices,
                    "nullable": f.nullable,
                }
            ),
        )

    async def train(self, request: Request, ctx: Ctx) -> Response:
        app = f"apps/{request.path_params['app']}"
        form = await request.form()
        values = {k: str(v) for k, v in form.items() if isinstance(v, str)}
        template_name = values.get("template", "")
        template = await self.backend.template(template_name, ctx.key)
        fields = forms.fields_of(template)
        # A browser sends no unchecked box: in the page's whole form, a missing bool is false.
        if values.get("_form") == "whole":
            for f in fields:
                if f.kind == "bool":
                    values.setdefault(f.path, "")
        overrides, _, errors = forms.overrides(fields, values)
        model_id = values.get("model", "").strip()
        dataset_version = values.get("dataset_version", "")
        if not model_id:
            errors["model"] = "enter a model id (a new model is created with it)"
        if not dataset_version:
            errors["dataset_version"] = "choose a dataset version (create one on a dataset's page)"
        if errors:
            return await self.train_page(
                request, ctx, values=values, errors=errors, status=400, template_name=template.name
            )
        try:
            model = await self.backend.ensure_model(
                app, model_id, template.model_type or values.get("model_type", ""), ctx.key
            )
            run = await self.backend.train(
                model.name,
                template.name,
                dataset_version,
                overrides,
                values.get("description", ""),
                ctx.key,
            )
        except ClientError as err:
            if err.code not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise
            by_field, rest = forms.violations_by_field(err.fields)
            if not by_field:
                rest = [error_text(err), *rest]
            return await self.train_page(
                request,
                ctx,
                values=values,
                errors=by_field,
                general=rest,
                status=STATUS[err.code],
                template_name=template.name,
            )
        return RedirectResponse(f"/{run.name}", 303)

    async def runs_page(self, request: Request, ctx: Ctx) -> Response:
        app = f"apps/{request.path_params['app']}"
        runs = await self.backend.runs(app, ctx.key)
        return self.render(request, ctx, "runs.html", runs=runs)

    def _run_name(self, request: Request) -> str:
        p = request.path_params
        return f"apps/{p['app']}/models/{p['model']}/versions/{p['version']}"

    async def run_page(self, request: Request, ctx: Ctx) -> Response:
        mv = await self.backend.model_version(self._run_name(request), ctx.key)
        return self.render(
            request,
            ctx,
            "run.html",
            run=mv,
            final=_state(mv) in FINAL_STATES,
            metrics=sorted(mv.metrics.items()),
            params=json.dumps(json_format.MessageToDict(mv.param_overrides), indent=2),
        )

    async def run_events(self, request: Request, ctx: Ctx) -> Response:
        """The run's events as SSE, resuming after `Last-Event-ID` (or `?after=`)."""
        name = self._run_name(request)
        after = events.resume_point(
            request.headers.get("last-event-id"), request.query_params.get("after")
        )
        stream = self._event_stream(name, after, ctx.key)
        try:
            await self.backend.model_version(name, ctx.key)  # a refusal before the stream starts
        except ClientError as err:
            if err.code != grpc.StatusCode.UNAVAILABLE:
                raise
            stream = self._retry_soon()  # an error status would stop the browser's retries
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @staticmethod
    async def _retry_soon() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n: the trainer is not reachable; reconnect\n\n"

    async def _event_stream(self, name: str, after: int, key: str) -> AsyncIterator[bytes]:
        """The watch as SSE. It ends with an `end` event once the run is over; a watch that
        breaks off before (the trainer restarting, unreachable) just ends the response, so
        the browser reconnects in a second with `Last-Event-ID` and nothing is lost."""
        yield b"retry: 1000\n\n"
        queue: asyncio.Queue[tpb.TrainingEvent | ClientError | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for event in self.backend.watch(name, after, key):
                    queue.put_nowait(event)
            except ClientError as err:
                queue.put_nowait(err)
            queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), events.KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if item is None:
                    try:
                        mv = await self.backend.model_version(name, key)
                    except ClientError:
                        return  # the browser reconnects and asks again
                    if _state(mv) in FINAL_STATES:
                        yield events.sse(
                            {"state": _state(mv), "status_code": mv.status_code}, event="end"
                        )
                    # Otherwise the watch broke off early (a trainer restarting): the browser
                    # reconnects with the last id it saw, and the watch resumes after it.
                    return
                if isinstance(item, ClientError):
                    if item.code == grpc.StatusCode.UNAVAILABLE:
                        return  # the browser reconnects, as for a watch that broke off
                    yield events.sse(
                        {"message": error_text(item), "code": item.code.name}, event="failure"
                    )
                    return
                yield events.sse(events.event_payload(item), id=item.sequence)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def cancel(self, request: Request, ctx: Ctx) -> Response:
        name = self._run_name(request)
        await self.backend.cancel(name, ctx.key)
        return self._back(f"/{name}", "Cancel requested.")

    # ----- evaluation -------------------------------------------------------------------

    async def evaluations_page(
        self, request: Request, ctx: Ctx, errors: dict[str, str] | None = None, status: int = 200
    ) -> Response:
        """A version's evaluations, the base model's prompted like it, and a form for more."""
        name = self._run_name(request)
        model = name.rsplit("/versions/", 1)[0]
        app = f"apps/{request.path_params['app']}"
        mv, own, base, versions = await asyncio.gather(
            self.backend.model_version(name, ctx.key),
            self.backend.evaluations(name, ctx.key),
            self.backend.evaluations(model, ctx.key),
            self.backend.app_versions(app, ctx.key),
        )
        return self.render(
            request,
            ctx,
            "evaluations.html",
            status=status,
            run=mv,
            evaluations=own + [e for e in base if e.prompt_like == name],
            versions=[v for v in versions if v.state == dpb.DATASET_VERSION_STATE_READY],
            errors=errors or {},
            eval_state=_eval_state,
        )

    async def evaluate(self, request: Request, ctx: Ctx) -> Response:
        """Scores the version, and the base model prompted like it, on one dataset version."""
        name = self._run_name(request)
        form = await request.form()
        dataset_version = str(form.get("dataset_version", ""))
        raw = str(form.get("max_examples", "")).strip() or "0"
        if not raw.isdigit():
            return await self.evaluations_page(
                request, ctx, {"max_examples": f"{raw!r} is not a whole number"}, 400
            )
        limit = int(raw)
        try:
            mine = await self.backend.create_evaluation(name, dataset_version, limit, "", ctx.key)
            other = ""
            if form.get("with_base") == "on":
                model = name.rsplit("/versions/", 1)[0]
                base = await self.backend.create_evaluation(
                    model, dataset_version, limit, name, ctx.key
                )
                other = base.name
        except ClientError as err:
            if err.code not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.NOT_FOUND,
            ):
                raise
            errors = {f: d for f, d in err.fields if f in ("dataset_version", "max_examples")}
            return await self.evaluations_page(
                request, ctx, errors or {"general": error_text(err)}, STATUS[err.code]
            )
        return self._back(f"/{mine.name}", vs=other)

    async def evaluation_page(self, request: Request, ctx: Ctx) -> Response:
        """An evaluation: state, scores, its worst results, and the comparison with `?vs=`."""
        name = request.url.path.lstrip("/")
        other = request.query_params.get("vs", "")
        evaluation = await self.backend.evaluation(name, ctx.key)
        done = _eval_state(evaluation.state) == "SUCCEEDED"
        results = await self.backend.results(name, PAGE_ROWS, ctx.key) if done else None
        comparison, other_eval = None, None
        if other:
            other_eval = await self.backend.evaluation(other, ctx.key)
            if done and _eval_state(other_eval.state) == "SUCCEEDED":
                comparison = await self.backend.compare(name, other, PAGE_ROWS, ctx.key)
        running = any(
            e is not None and _eval_state(e.state) == "RUNNING" for e in (evaluation, other_eval)
        )
        return self.render(
            request,
            ctx,
            "evaluation.html",
            evaluation=evaluation,
            other=other_eval,
            results=results,
            comparison=comparison,
            running=running,
            eval_state=_eval_state,
            change=lambda c: epb.Change.Name(c).removeprefix("CHANGE_").lower(),
            scores=lambda e: sorted(e.scores.items()),
        )

    # ----- playground -------------------------------------------------------------------

    async def playground_page(self, request: Request, ctx: Ctx) -> Response:
        app = f"apps/{request.path_params['app']}"
        runs = await self.backend.runs(app, ctx.key)
        trained = [r for r in runs if _state(r) == "TRAINED"]
        chosen = request.query_params.get("version", "") or (trained[0].name if trained else "")
        run = next((r for r in trained if r.name == chosen), None)
        tokenizer = json_format.MessageToDict(run.params).get("tokenizer_config", {}) if run else {}
        return self.render(
            request,
            ctx,
            "playground.html",
            trained=trained,
            chosen=run.name if run else "",
            system_prompt=str(tokenizer.get("system_prompt", "")),
            prompt_format=str(tokenizer.get("prompt_format", "")),
        )

    async def playground_stream(self, request: Request, ctx: Ctx) -> Response:
        """The base model's and a fine-tuned version's answers to one prompt, with the same
        inference parameters, as one SSE stream of `{side, delta}` events."""
        form = await request.form()
        version = str(form.get("version", ""))
        errors: dict[str, str] = {}
        params = ppb.InferenceParams(system_prompt=str(form.get("system_prompt", "")))
        fmt = str(form.get("prompt_format", ""))
        params.prompt_format = {"raw": ppb.PROMPT_FORMAT_RAW, "chat": ppb.PROMPT_FORMAT_CHAT}.get(
            fmt, ppb.PROMPT_FORMAT_UNSPECIFIED
        )
        for name, kind in (("temperature", float), ("max_tokens", int), ("top_p", float)):
            raw = str(form.get(name, "")).strip()
            if not raw:
                continue
            try:
                setattr(params, name, kind(raw))
            except ValueError:
                errors[name] = f"{raw!r} is not a {'whole ' if kind is int else ''}number"
        prompt = str(form.get("prompt", ""))
        if not prompt.strip():
            errors["prompt"] = "enter a prompt"
        if not version:
            errors["version"] = "choose a fine-tuned version (train one first)"
        if errors:
            return JSONResponse({"error": "check the marked fields", "fields": errors}, 400)
        sides = {"base": "", "tuned": version}
        return StreamingResponse(
            self._answers(sides, prompt, params, ctx.key),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _answers(
        self, sides: dict[str, str], prompt: str, params: ppb.InferenceParams, key: str
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def answer(side: str, model: str) -> None:
            try:
                async for r in self.backend.predict_stream(model, prompt, params, key):
                    queue.put_nowait(
                        events.sse(
                            {
                                "side": side,
                                "delta": r.delta,
                                "model_version": r.model_version,
                                "finish_reason": ppb.FinishReason.Name(r.finish_reason)
                                .removeprefix("FINISH_REASON_")
                                .lower()
                                if r.finish_reason
                                else "",
                                "completion_tokens": r.completion_tokens,
                            }
                        )
                    )
            except ClientError as err:
                by_field = {
                    f.removeprefix("params."): d for f, d in err.fields if f.startswith("params.")
                }
                queue.put_nowait(
                    events.sse(
                        {"side": side, "message": error_text(err), "fields": by_field},
                        event="failure",
                    )
                )
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(answer(s, m)) for s, m in sides.items()]
        open_sides = len(tasks)
        try:
            while open_sides:
                item = await queue.get()
                if item is None:
                    open_sides -= 1
                else:
                    yield item
            yield events.sse({}, event="done")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def create_app(config: ConsoleConfig, backend: Backend) -> Starlette:
    return Starlette(routes=Console(config, backend).routes())

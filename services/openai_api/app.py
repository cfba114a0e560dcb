"""The HTTP routes: OpenAI JSON in (`convert`), predictor calls (`upstream`), OpenAI JSON out.

Handlers stay thin. Every error leaves in OpenAI's shape: a request's own mistake
as 4xx naming the field, a service's refusal with the status of its gRPC code,
and anything unexpected as 500 with an incident id (the traceback stays in this
process's log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraforge.predictor.v1 import predictor_service_pb2
from loraforge.services.common.channels import aio_channel
from loraforge.services.common.http_limits import ASGIApp, BodyLimit, BodyTooLarge
from loraforge.services.openai_api import convert
from loraforge.services.openai_api.convert import CHAT, TEXT, ApiError, CompletionRequest, Kind
from loraforge.services.openai_api.upstream import ChoiceStreams, Metadata, Upstream, UpstreamError

# The predictor's readiness: its service's health, NOT_SERVING while it replaces its engine.
PREDICTOR_SERVICE = predictor_service_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name
log = logging.getLogger("loraforge.openai")

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")
# Bodies up to this size are parsed on the event loop (less time than a thread hand-off).
INLINE_PARSE_BYTES = 64 * 1024


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _unexpected(exc: BaseException, where: str) -> ApiError:
    incident = uuid.uuid4().hex[:12]
    log.error("%s failed unexpectedly (incident %s)", where, incident, exc_info=exc)
    return ApiError(
        500,
        f"internal error (incident {incident}); the server log has the details",
        type="server_error",
        code="internal_error",
    )


def _as_api_error(exc: Exception, request: CompletionRequest | None, where: str) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BodyTooLarge):
        return convert.too_large(exc.limit)
    if isinstance(exc, UpstreamError):
        return convert.error_from_rpc(exc.error, request, exc.service)
    return _unexpected(exc, where)


def _metadata(request: Request) -> Metadata:
    """What the services get from the HTTP request: its bearer key, as `authorization`
    metadata, which they check (this API has no key of its own)."""
    auth = request.headers.get("authorization")
    if auth and not (auth.isascii() and auth.isprintable()):
        # gRPC metadata is printable ASCII, as every key is: this cannot be one.
        raise ApiError(
            401,
            "the Authorization header is not a valid API key (a key is printable ASCII, "
            "`Bearer lf_…`); send the key `loraforge keys create` printed",
            type="authentication_error",
            code="invalid_api_key",
        )
    return (("authorization", auth),) if auth else ()


async def _body(request: Request) -> Any:
    """The body's JSON (`convert.parse_body`); a large one is parsed off the event loop."""
    raw = await request.body()
    if len(raw) <= INLINE_PARSE_BYTES:
        return convert.parse_body(raw)
    return await asyncio.to_thread(convert.parse_body, raw)


async def _unless_disconnected(http: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has gone away: then `work` is cancelled, and
    with it its predictor calls, so the engine aborts them."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # its calls cancelled before the handler returns
    return None if task.cancelled() else task.result()


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Api:
    """The routes, over one `Upstream`."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self._guard(self.chat), methods=["POST"]),
            Route("/v1/completions", self._guard(self.completions), methods=["POST"]),
            Route("/v1/models", self._guard(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._guard(self.model), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/livez", self.live, methods=["GET"]),
        ]

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return _error_response(_as_api_error(exc, None, request.url.path))

        return guarded

    async def health(self, request: Request) -> Response:
        """200 while the predictor serves; 503 while it does not (its engine is being
        replaced, or it is down), so that traffic goes to an API that can complete."""
        config = self.upstream.config
        try:
            # A channel of its own: health is open, so it carries no caller's key.
            async with aio_channel(config.predictor_address, self.upstream.security) as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=PREDICTOR_SERVICE), timeout=3
                )
            predictor = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.aio.AioRpcError as exc:
            predictor = exc.code().name
        if predictor == "SERVING":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "predictor": predictor}, status_code=503)

    async def live(self, request: Request) -> Response:
        """200 while this process answers, whatever the predictor's state: the liveness
        probe (`/health` is readiness; a restart would not bring the predictor back)."""
        return JSONResponse({"status": "alive"})

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, TEXT)

    async def models(self, request: Request) -> Response:
        return JSONResponse(convert.model_list(await self.upstream.list_models(_metadata(request))))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for listed in await self.upstream.list_models(_metadata(request)):
            if listed.id == name:
                return JSONResponse(convert.model_object(listed))
        raise convert.model_not_found(name, await self.upstream.base_model(_metadata(request)))

    async def _complete(self, http: Request, kind: Kind) -> Response:
        request = convert.parse_request(await _body(http), kind)
        metadata = _metadata(http)
        base_model = await self.upstream.base_model(metadata)
        where = convert.target(request.model, base_model)
        try:
            if not request.stream:
                responses = await _unless_disconnected(
                    http,
                    self.upstream.predict(convert.predict_requests(request, where), metadata),
                )
                if responses is None:
                    return Response(status_code=499)  # nginx's "client closed request"; unread
                return JSONResponse(convert.completion_response(request, responses, base_model))
            streams = self.upstream.predict_stream(
                convert.stream_requests(request, where), metadata
            )
            await streams.start()
        except Exception as exc:
            raise _as_api_error(exc, request, http.url.path) from None
        builder = convert.StreamBuilder(request, base_model)
        return StreamingResponse(
            self._events(streams, builder, http.url.path),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self, streams: ChoiceStreams, builder: convert.StreamBuilder, path: str
    ) -> AsyncIterator[bytes]:
        """The SSE body. A client that disconnects cancels this generator, and with it every
        `PredictStream` call, so the predictor aborts their engine requests."""
        try:
            for chunk in builder.start(streams.first[0].model_version):
                yield _sse(chunk)
            for index, message in enumerate(streams.first):
                for chunk in builder.message(index, message):
                    yield _sse(chunk)
            async for batch in streams.messages():
                yield b"".join(
                    _sse(chunk)
                    for index, message in batch
                    for chunk in builder.message(index, message)
                )
            for chunk in builder.end():
                yield _sse(chunk)
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # after the headers: the error is the stream's last event
            yield _sse(_as_api_error(exc, builder.request, path).body())
        finally:
            streams.cancel()


async def _no_route(request: Request, exc: Exception) -> Response:
    """A path or method this API does not serve, in OpenAI's error shape."""
    if getattr(exc, "status_code", 404) == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        allowed = dict(getattr(exc, "headers", None) or {})
        return _error_response(ApiError(405, message, code="method_not_allowed", headers=allowed))
    message = (
        f"no such endpoint: {request.method} {request.url.path}; this API serves "
        "/v1/chat/completions, /v1/completions and /v1/models"
    )
    return _error_response(ApiError(404, message, code="unknown_url"))


def create_app(upstream: Upstream) -> ASGIApp:
    """The routes, behind the request-body bound (`max_request_bytes`): a larger body is
    answered 413 before it is read."""
    limit = upstream.config.max_request_bytes
    return BodyLimit(
        Starlette(
            routes=Api(upstream).routes(),
            exception_handlers={404: _no_route, 405: _no_route},
        ),
        lambda _scope: limit,
        lambda limit: _error_response(convert.too_large(limit)),
    )

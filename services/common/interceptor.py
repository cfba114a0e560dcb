"""The one place where domain errors become gRPC status codes.

Every service installs `ErrorMappingInterceptor`. A `LoraforgeError` becomes its
status code with `google.rpc.Status` details (`ErrorInfo`, and `BadRequest` when
fields are named). Anything else is logged once with its traceback and becomes
INTERNAL with an incident id, never the traceback itself.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from loraforge.services.common import errors
from loraforge.services.common.rpc import Context

log = logging.getLogger("loraforge.rpc")

ERROR_DOMAIN = "loraforge.dev"

_CODES: list[tuple[type[errors.LoraforgeError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]


def status_code_for(err: errors.LoraforgeError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.UNKNOWN


# gRPC refuses response headers past 8 KiB (its receivers' default soft limit), and the
# message travels twice: percent-encoded as `grpc-message`, and inside the base64
# `grpc-status-details-bin`. These bounds keep both, together, well under it.
MAX_MESSAGE_BYTES = 1024
MAX_DESCRIPTION_CHARS = 300
MAX_METADATA_CHARS = 128
MAX_METADATA_ENTRIES = 8
MAX_DETAILS_BYTES = 3072


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, saying how much was left off."""
    data = text.encode()
    if len(data) <= limit:
        return text
    kept = data[: max(limit - 40, 0)].decode(errors="ignore")
    return f"{kept}… ({len(text) - len(kept)} more characters)"


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(err: errors.LoraforgeError) -> grpc.Status:
    """Builds the gRPC status (code, message, details) for a domain error.

    Long messages, descriptions and lists of violations are cut, so that the status always
    fits gRPC's limit on response headers: past it the caller would get RESOURCE_EXHAUSTED
    and no details at all."""
    code = status_code_for(err)
    info = error_details_pb2.ErrorInfo(
        reason=_clip(err.reason, MAX_METADATA_CHARS),
        domain=ERROR_DOMAIN,
        metadata={
            _clip(k, MAX_METADATA_CHARS): _clip(v, MAX_METADATA_CHARS)
            for k, v in list(err.metadata.items())[:MAX_METADATA_ENTRIES]
        },
    )
    violations = [
        error_details_pb2.BadRequest.FieldViolation(
            field=_clip(v.field, MAX_DESCRIPTION_CHARS),
            description=_clip(v.description, MAX_DESCRIPTION_CHARS),
        )
        # Already bounded by LoraforgeError: the first ones and one counting the rest.
        for v in err.field_violations[: errors.MAX_FIELD_VIOLATIONS + 1]
    ]
    message = _clip(err.message, MAX_MESSAGE_BYTES)
    keep = len(violations)
    while True:
        shown = violations[:keep]
        if keep < len(violations):  # long field paths: fewer, and a line saying so
            shown.append(
                error_details_pb2.BadRequest.FieldViolation(
                    description="and more problems like these; fix these and send the "
                    "request again to see the rest"
                )
            )
        details = [_pack(info)]
        if shown:
            details.append(_pack(error_details_pb2.BadRequest(field_violations=shown)))
        status = status_pb2.Status(
            code=getattr(code_pb2, code.name), message=message, details=details
        )
        if keep == 0 or status.ByteSize() <= MAX_DETAILS_BYTES:
            break
        keep //= 2
    return cast(grpc.Status, rpc_status.to_status(status))


def _internal_status(incident: str) -> grpc.Status:
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (incident {incident}); the server log has the details",
    )
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"incident": incident}
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    status.details.append(packed)
    return cast(grpc.Status, rpc_status.to_status(status))


def _from_generated_base(exc: NotImplementedError) -> bool:
    """Raised by a generated servicer base class for an RPC the service does not implement
    (any other NotImplementedError is a bug: INTERNAL)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("_pb2_grpc.py")


async def _abort_for(exc: BaseException, context: Context, method: str) -> None:
    if isinstance(exc, NotImplementedError) and _from_generated_base(exc):
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server"
        )
    if isinstance(exc, errors.LoraforgeError):
        log.info("%s -> %s: %s", method, status_code_for(exc).name, exc.message)
        await context.abort_with_status(to_rpc_status(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("%s failed unexpectedly (incident %s)", method, incident, exc_info=exc)
    await context.abort_with_status(_internal_status(incident))


def _passthrough(exc: BaseException) -> bool:
    # context.abort() raises an exception grpc needs to see; cancellation must propagate.
    return isinstance(exc, grpc.aio.AbortError | grpc.RpcError) or not isinstance(exc, Exception)


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request_or_iterator: Any, context: Context) -> Any:
        try:
            result = behavior(request_or_iterator, context)
            return await result if inspect.isawaitable(result) else result
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await _abort_for(exc, context, method)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        try:
            result = behavior(request_or_iterator, context)
            if inspect.isawaitable(result):  # a coroutine that writes with context.write
                await result
            elif hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:
                for item in result:
                    yield item
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await _abort_for(exc, context, method)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps typed domain errors to status codes with details; hides unexpected ones."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        common = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method), **common
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method), **common
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method), **common
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method), **common
            )
        return handler

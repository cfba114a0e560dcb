"""Outgoing gRPC channels: TLS when a CA bundle is given, an API key on every call.

`ChannelSecurity` says how to reach a service: `ca_file` (PEM bundle that
verifies the server; set, the channel uses TLS), `cert_file`/`key_file` (a
client certificate, for servers that verify clients: mTLS) and `api_key` (sent
as `authorization: Bearer <key>` metadata on every call). `security_from` builds
it from a process's settings (`service_key`, `service_key_file`, `tls_ca_file`,
`tls_client_cert_file`, `tls_client_key_file`), refusing a file it cannot read
with an `InvalidArgument` that names the setting.

The key travels through a client interceptor rather than call credentials, so it
is sent on a plaintext loopback channel too. A call that already carries an
`authorization` entry (a caller's own key, forwarded) keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from loraforge.services.common.config import ProcessConfig, describe
from loraforge.services.common.errors import FailedPrecondition, InvalidArgument

MiB = 1024 * 1024
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]
AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class ChannelSecurity:
    """How a channel reaches its server: TLS files and the API key its calls carry."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    api_key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca_file)

    def without_key(self) -> ChannelSecurity:
        """The same TLS settings, no key (for calls that forward their caller's own)."""
        return ChannelSecurity(self.ca_file, self.cert_file, self.key_file)


def read_file(path: str, what: str) -> bytes:
    """The file's bytes; InvalidArgument naming `what` (a setting) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"{what}: cannot read {path!r} ({exc.strerror or exc})", reason="UNREADABLE_FILE"
        ) from None


def read_key_file(path: str, what: str) -> str:
    """The key a key file holds (its first non-empty, non-comment line), stripped."""
    text = read_file(path, what).decode("utf-8", errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise InvalidArgument(f"{what}: {path!r} holds no key", reason="EMPTY_KEY_FILE")


def security_from(config: ProcessConfig) -> ChannelSecurity:
    """The channel security a process's settings ask for; files are checked here, at start."""
    key = config.service_key.strip()
    if not key and config.service_key_file:
        key = read_key_file(config.service_key_file, describe("service_key_file"))
    settings = {
        "tls_ca_file": config.tls_ca_file,
        "tls_client_cert_file": config.tls_client_cert_file,
        "tls_client_key_file": config.tls_client_key_file,
    }
    for name, path in settings.items():
        if path:
            read_file(path, describe(name))
    if bool(config.tls_client_cert_file) != bool(config.tls_client_key_file):
        raise InvalidArgument(
            f"{describe('tls_client_cert_file')} and {describe('tls_client_key_file')} go "
            "together: set both or neither",
            reason="INCOMPLETE_CLIENT_CERTIFICATE",
        )
    if config.tls_client_cert_file and not config.tls_ca_file:
        raise InvalidArgument(
            f"{describe('tls_client_cert_file')} is set but {describe('tls_ca_file')} is not: "
            "a client certificate is only sent over TLS, which needs the servers' CA bundle",
            reason="CLIENT_CERTIFICATE_WITHOUT_TLS",
        )
    return ChannelSecurity(
        ca_file=config.tls_ca_file,
        cert_file=config.tls_client_cert_file,
        key_file=config.tls_client_key_file,
        api_key=key,
    )


def channel_credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    """TLS credentials from `security`'s files (InvalidArgument naming a file it cannot read)."""
    root = read_file(security.ca_file, "TLS CA bundle")
    cert = read_file(security.cert_file, "TLS client certificate") if security.cert_file else None
    key = read_file(security.key_file, "TLS client key") if security.key_file else None
    if (cert is None) != (key is None):
        raise InvalidArgument(
            "a TLS client certificate needs its private key, and the key its certificate",
            reason="INCOMPLETE_CLIENT_CERTIFICATE",
        )
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )


def service_key_refused(err: grpc.RpcError, whom: str, what: str = "") -> FailedPrecondition | None:
    """The error for `whom` (a service, "the predictor at host:port") refusing this process's
    own service key: a setting to fix, not a retry (FAILED_PRECONDITION, never the caller's
    UNAUTHENTICATED). None for any other error."""
    code = err.code()
    if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return None
    purpose = f" for {what}" if what else ""
    return FailedPrecondition(
        f"{whom} refused this process's service key{purpose} ({code.name}: {err.details()}); "
        f"check its {describe('service_key')} or {describe('service_key_file')} against the "
        "dataset service's service_keys",
        reason="SERVICE_KEY_REFUSED",
    )


def bearer(api_key: str) -> tuple[str, str]:
    return (AUTHORIZATION, f"Bearer {api_key}")


def _with_key(metadata: Any, api_key: str) -> list[tuple[str, Any]]:
    entries = list(metadata or ())
    if not any(k.lower() == AUTHORIZATION for k, _ in entries):
        entries.append(bearer(api_key))
    return entries


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _SyncKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer key to every call of a blocking channel."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(  # type: ignore[return-value]
            details.method,
            details.timeout,
            _with_key(details.metadata, self.api_key),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)


def _aio_details(details: grpc.aio.ClientCallDetails, api_key: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*_with_key(details.metadata, api_key))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details, self.api_key), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details, self.api_key), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details, self.api_key), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details, self.api_key), request_iterator)


def aio_interceptors(api_key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add `authorization: Bearer <api_key>` to every call of an aio channel."""
    if not api_key:
        return []
    return [
        _AioUnaryUnary(api_key),
        _AioUnaryStream(api_key),
        _AioStreamUnary(api_key),
        _AioStreamStream(api_key),
    ]


def sync_interceptor(api_key: str) -> grpc.UnaryUnaryClientInterceptor:
    """An interceptor that adds `authorization: Bearer <api_key>` to every call of a channel."""
    return _SyncKey(api_key)


def aio_channel(
    address: str,
    security: ChannelSecurity,
    options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS when `security.ca_file` is set, its key on every call."""
    interceptors = aio_interceptors(security.api_key) or None
    if security.tls:
        return grpc.aio.secure_channel(
            address, channel_credentials(security), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(
    address: str,
    security: ChannelSecurity,
    options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
) -> grpc.Channel:
    """A blocking channel to `address`: TLS when `security.ca_file` is set, its key on every call."""
    if security.tls:
        channel = grpc.secure_channel(address, channel_credentials(security), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if security.api_key:
        return grpc.intercept_channel(channel, sync_interceptor(security.api_key))
    return channel

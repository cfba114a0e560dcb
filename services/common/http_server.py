"""The HTTP processes' server (the OpenAI-compatible API, the console): uvicorn on a socket
bound here, so port 0 works and the port is known.

HTTPS with `tls_cert_file` and `tls_key_file` (and, with `tls_client_ca_file`, only for
clients that present a certificate it signed). Without them it listens on a loopback host
only, unless `insecure` is set: the API keys its users send would otherwise cross the
network in the clear. SIGTERM or SIGINT stops accepting and gives running requests
`shutdown_grace_seconds` (streams still open then are closed, which cancels their gRPC
calls), like the gRPC services' shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import ssl
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from loraforge.services.common.auth import is_loopback
from loraforge.services.common.channels import read_file
from loraforge.services.common.config import ServerConfig, describe
from loraforge.services.common.errors import InvalidArgument, Unavailable
from loraforge.services.common.server import write_ready_file

log = logging.getLogger("loraforge.http")


class _Server(uvicorn.Server):
    """uvicorn with a hook once it accepts connections, and our own signal handling (uvicorn's
    re-raises the signal after shutdown, so the process would not exit 0)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Unavailable(
            f"cannot listen on {host}:{port} ({exc.strerror}); is the port in use?",
            reason="PORT_IN_USE",
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def tls_settings(config: ServerConfig, whose_keys: str = "callers' API keys") -> dict[str, Any]:
    """uvicorn's TLS arguments from the settings; InvalidArgument naming a setting it refuses.

    `whose_keys` says, in the refusal of plain HTTP off loopback, what would be readable.
    """
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise InvalidArgument(
            f"{describe('tls_cert_file')} and {describe('tls_key_file')} go together: set both "
            "for HTTPS, or neither",
            reason="INCOMPLETE_SERVER_CERTIFICATE",
        )
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise InvalidArgument(
            f"{describe('tls_client_ca_file')} needs HTTPS: set {describe('tls_cert_file')} "
            f"and {describe('tls_key_file')} too",
            reason="CLIENT_CA_WITHOUT_TLS",
        )
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        if getattr(config, name):
            read_file(getattr(config, name), describe(name))
    if not config.tls_cert_file:
        if not is_loopback(config.host) and not config.insecure:
            raise InvalidArgument(
                f"refusing to serve plain HTTP on {config.host}: {whose_keys} would cross "
                f"the network unencrypted. Set {describe('tls_cert_file')} and "
                f"{describe('tls_key_file')} for HTTPS, or {describe('insecure')} when a proxy "
                "in front terminates TLS",
                reason="INSECURE_LISTEN",
            )
        return {}
    settings: dict[str, Any] = {
        "ssl_certfile": config.tls_cert_file,
        "ssl_keyfile": config.tls_key_file,
    }
    if config.tls_client_ca_file:
        settings["ssl_ca_certs"] = config.tls_client_ca_file
        settings["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return settings


async def serve_http(
    app: Any,
    config: ServerConfig,
    tls: dict[str, Any],
    sock: socket.socket,
    *,
    label: str,
    path: str = "/",
) -> None:
    """Serves ASGI `app` on `sock` (from `bind`) until SIGTERM or SIGINT.

    `tls` is `tls_settings(config)`; `path` is what the start line shows after the port.
    """
    scheme = "https" if tls else "http"
    port = sock.getsockname()[1]
    settings = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=math.ceil(max(config.shutdown_grace_seconds, 0.0)),
        **tls,
    )
    try:
        settings.load()  # reads the certificate now: a bad one is one line, not a traceback
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise InvalidArgument(
            f"{describe('tls_cert_file')} / {describe('tls_key_file')}: not a usable "
            f"certificate and key ({exc})",
            reason="BAD_CERTIFICATE",
        ) from None

    def started() -> None:
        log.info("%s serving on %s://%s:%d%s", label, scheme, config.host, port, path)
        print(f"{label} listening on {scheme}://{config.host}:{port}{path}", flush=True)
        if config.ready_file:
            write_ready_file(config.ready_file, port)

    server = _Server(settings, started)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await server.serve(sockets=[sock])
    log.info("%s stopped", label)

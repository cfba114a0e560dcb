"""Runs the console: uvicorn on a socket bound here, so port 0 works and the port is known.

As the OpenAI-compatible API does: HTTPS with `tls_cert_file` and `tls_key_file` (and, with
`tls_client_ca_file`, only for clients with a certificate it signed); plain HTTP on a
loopback host only, unless `insecure` is set (a proxy in front terminates TLS): the API
keys users sign in with would otherwise cross the network readable. Behind HTTPS the
session cookie is Secure. SIGTERM or SIGINT stops accepting, gives running requests
`shutdown_grace_seconds` (open event streams are closed then, which cancels their
watches and predictions) and closes the gRPC channels.
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
from pathlib import Path
from typing import Any

import uvicorn

from loraforge.services.common.auth import is_loopback
from loraforge.services.common.config import ServerConfig, describe
from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.server import write_ready_file
from loraforge.services.console.app import create_app
from loraforge.services.console.backend import Backend
from loraforge.services.console.config import ConsoleConfig
from loraforge.services.openai_api.server import bind

log = logging.getLogger("loraforge.console")
LABEL = "console"


class _Server(uvicorn.Server):
    """uvicorn with a hook once it accepts connections, and our own signal handling."""

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


def tls_settings(config: ServerConfig) -> dict[str, Any]:
    """uvicorn's TLS arguments from the settings; InvalidArgument naming a setting it refuses."""
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
        path = getattr(config, name)
        if path and not Path(path).is_file():
            raise InvalidArgument(
                f"{describe(name)}: cannot read {path!r}", reason="UNREADABLE_FILE"
            )
    if not config.tls_cert_file:
        if not is_loopback(config.host) and not config.insecure:
            raise InvalidArgument(
                f"refusing to serve plain HTTP on {config.host}: the API keys users sign in "
                f"with would cross the network unencrypted. Set {describe('tls_cert_file')} and "
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


async def serve(config: ConsoleConfig) -> None:
    tls = tls_settings(config)
    scheme = "https" if tls else "http"
    if tls:
        config.secure_cookies = True
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    backend = Backend(config)
    try:
        settings = uvicorn.Config(
            create_app(config, backend),
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
            log.info("%s serving on %s://%s:%d/", LABEL, scheme, config.host, port)
            print(f"{LABEL} listening on {scheme}://{config.host}:{port}/", flush=True)
            if config.ready_file:
                write_ready_file(config.ready_file, port)

        server = _Server(settings, started)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        await server.serve(sockets=[sock])
    finally:
        await backend.close()
    log.info("%s stopped", LABEL)

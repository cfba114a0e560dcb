"""Runs the HTTP API: uvicorn on a socket bound here, so port 0 works and the port is known.

SIGTERM or SIGINT stops accepting, gives running requests `shutdown_grace_seconds`
(streams still open then are closed, which cancels their predictor calls) and
closes the gRPC channels, like the gRPC services' shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
from collections.abc import Callable, Generator

import uvicorn

from loraforge.services.common.errors import Unavailable
from loraforge.services.common.server import write_ready_file
from loraforge.services.openai_api.app import create_app
from loraforge.services.openai_api.config import OpenAIConfig
from loraforge.services.openai_api.upstream import open_upstream

log = logging.getLogger("loraforge.openai")
LABEL = "openai"


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


async def serve(config: OpenAIConfig) -> None:
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    async with open_upstream(config) as upstream:
        settings = uvicorn.Config(
            create_app(upstream),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=math.ceil(max(config.shutdown_grace_seconds, 0.0)),
        )

        def started() -> None:
            log.info("%s serving on http://%s:%d/v1", LABEL, config.host, port)
            print(f"{LABEL} listening on http://{config.host}:{port}/v1", flush=True)
            if config.ready_file:
                write_ready_file(config.ready_file, port)

        server = _Server(settings, started)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        await server.serve(sockets=[sock])
    log.info("%s stopped", LABEL)

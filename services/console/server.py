"""Runs the console: uvicorn on a socket bound here, so port 0 works and the port is known.

As the OpenAI-compatible API does: SIGTERM or SIGINT stops accepting, gives running
requests `shutdown_grace_seconds` (open event streams are closed then, which cancels
their watches and predictions) and closes the gRPC channels.
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


async def serve(config: ConsoleConfig) -> None:
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
        )

        def started() -> None:
            log.info("%s serving on http://%s:%d/", LABEL, config.host, port)
            print(f"{LABEL} listening on http://{config.host}:{port}/", flush=True)
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

"""Server bootstrap shared by the three services.

`create_server` builds a `grpc.aio` server with the error interceptor, the
standard health service (one entry per service) and server reflection, binds a
given or free port and returns it. `serve` runs one until SIGTERM/SIGINT, then
drains: health turns NOT_SERVING, running calls get `shutdown_grace_seconds`,
and the service's own shutdown hooks run last.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraforge.services.common.config import ServerConfig
from loraforge.services.common.errors import Unavailable
from loraforge.services.common.interceptor import ErrorMappingInterceptor

log = logging.getLogger("loraforge.server")

MiB = 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]


@dataclass
class ServiceBinding:
    """One gRPC service to host: its full name, servicer and generated `add_*_to_server`."""

    name: str
    servicer: Any
    register: Callable[[Any, grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started server, the port it got and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def create_server(
    bindings: Sequence[ServiceBinding], host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Starts a server hosting `bindings` plus health and reflection; returns it with its port."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=CHANNEL_OPTIONS)
    for binding in bindings:
        binding.register(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise Unavailable(
            f"cannot listen on {host}:{port}; is the port in use?", reason="PORT_IN_USE"
        )
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health_servicer, names)


def _write_ready_file(path: str, port: int) -> None:
    # Written then renamed, so a reader never sees an empty or partial port number.
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


async def serve(
    bindings: Sequence[ServiceBinding],
    config: ServerConfig,
    *,
    label: str,
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Runs a server until SIGTERM or SIGINT, then shuts down gracefully."""
    running = await create_server(bindings, config.host, config.port)
    log.info("%s serving on %s:%d", label, config.host, running.port)
    print(f"{label} listening on {config.host}:{running.port}", flush=True)
    if config.ready_file:
        _write_ready_file(config.ready_file, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s draining (grace %.1fs)", label, config.shutdown_grace_seconds)
    await running.stop(config.shutdown_grace_seconds)
    for hook in on_shutdown:
        await hook()
    log.info("%s stopped", label)


def run_main(main: Awaitable[None] | Callable[[], None]) -> int:
    """Runs an entry point's body: a coroutine, or a function for a process without an event loop.

    A LoraforgeError (a bad setting, a store it cannot open) becomes one line and
    exit 2, so entry points load their settings inside `main`.
    """
    from loraforge.services.common.errors import LoraforgeError

    try:
        if inspect.isawaitable(main):
            asyncio.run(main)  # type: ignore[arg-type]
        else:
            main()  # type: ignore[operator]
    except LoraforgeError as exc:
        print(f"error: {exc.message}", flush=True)
        return 2
    return 0

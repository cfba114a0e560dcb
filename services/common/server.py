"""Server bootstrap shared by the three services.

`create_server` builds a `grpc.aio` server with the error interceptor, the
standard health service (one entry per service) and server reflection, binds a
given or free port and returns it. `serve` runs one until SIGTERM/SIGINT, then
drains within `shutdown_grace_seconds`: health turns NOT_SERVING, running calls
get most of the grace and are then cancelled, the service's own shutdown hooks
run (each bounding its own time), and blocking work that is still running when the grace is
over (a thread deep in a slow call) is left behind: the process exits anyway,
so an orchestrator's stop never hangs on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
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
# The part of the shutdown grace kept for what runs after the calls are cancelled.
SHUTDOWN_RESERVE = 0.25
MAX_SHUTDOWN_RESERVE_SECONDS = 3.0
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


def shutdown_reserve(grace: float) -> float:
    """The part of a shutdown grace kept for after the running calls are cancelled."""
    return min(max(grace, 0.0) * SHUTDOWN_RESERVE, MAX_SHUTDOWN_RESERVE_SECONDS)


def write_ready_file(path: str, port: int) -> None:
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
        write_ready_file(config.ready_file, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Our own pool for blocking work (asyncio.to_thread), so shutdown can bound its wait.
    work = concurrent.futures.ThreadPoolExecutor(thread_name_prefix=f"{label}-work")
    loop.set_default_executor(work)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grace = max(config.shutdown_grace_seconds, 0.0)
    deadline = loop.time() + grace
    reserve = shutdown_reserve(grace)
    log.info("%s draining (grace %.1fs)", label, grace)
    await running.stop(grace - reserve)
    for hook in on_shutdown:  # each bounds its own time
        await hook()
    # Threads of cancelled calls may still be inside blocking work: wait for them in the
    # grace that is left, from a thread of its own so the wait can be given up.
    drained = asyncio.Event()

    def drain() -> None:
        work.shutdown(wait=True)
        loop.call_soon_threadsafe(drained.set)

    threading.Thread(target=drain, name=f"{label}-drain", daemon=True).start()
    try:
        await asyncio.wait_for(drained.wait(), max(deadline - loop.time(), 0.1))
    except TimeoutError:
        log.warning(
            "%s stopped; blocking work of cancelled calls was still running at the end of "
            "the %.1fs grace, exiting without it",
            label,
            grace,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    log.info("%s stopped", label)


def run_main(main: Coroutine[Any, Any, None] | Callable[[], None]) -> int:
    """Runs an entry point's body: a coroutine, or a function for a process without an event loop.

    A LoraforgeError (a bad setting, a store it cannot open) becomes one line and
    exit 2, so entry points load their settings inside `main`.
    """
    from loraforge.services.common.errors import LoraforgeError

    try:
        if inspect.iscoroutine(main):
            asyncio.run(main)
        else:
            assert callable(main)
            main()
    except LoraforgeError as exc:
        print(f"error: {exc.message}", flush=True)
        return 2
    return 0

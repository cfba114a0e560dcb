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

from loraforge.services.common.auth import AuthInterceptor, Verifier, is_loopback
from loraforge.services.common.channels import read_file
from loraforge.services.common.config import ServerConfig, describe
from loraforge.services.common.errors import InvalidArgument, Unavailable
from loraforge.services.common.interceptor import ErrorMappingInterceptor
from loraforge.services.common.policy import POLICY
from loraforge.services.common.progress import finish as finish_progress
from loraforge.services.common.progress import report as report_progress

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

    async def set_serving(self, serving: bool) -> None:
        """Reports each service of the server SERVING or NOT_SERVING (no-op once stopping).

        The server as a whole ("") stays SERVING while its process answers: probes of a
        service's name are readiness (take traffic elsewhere), a probe of "" is liveness, and
        a process that is replacing its engine by itself must not be killed for it.
        """
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key (PEM), and the CA its clients' certificates need (mTLS)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def server_tls(config: ServerConfig) -> ServerTLS | None:
    """The TLS a server's settings ask for (None: plaintext); files are read here, at start."""
    if not config.tls_cert_file and not config.tls_key_file:
        if config.tls_client_ca_file:
            raise InvalidArgument(
                f"{describe('tls_client_ca_file')} needs TLS: set {describe('tls_cert_file')} "
                f"and {describe('tls_key_file')} too"
            )
        return None
    if not config.tls_cert_file or not config.tls_key_file:
        raise InvalidArgument(
            f"{describe('tls_cert_file')} and {describe('tls_key_file')} go together: set both"
        )
    client_ca = (
        read_file(config.tls_client_ca_file, describe("tls_client_ca_file"))
        if config.tls_client_ca_file
        else None
    )
    return ServerTLS(
        read_file(config.tls_cert_file, describe("tls_cert_file")),
        read_file(config.tls_key_file, describe("tls_key_file")),
        client_ca,
    )


def check_exposure(config: ServerConfig, label: str) -> None:
    """Refuses to listen beyond this machine with auth off or without TLS, unless `insecure`."""
    if is_loopback(config.host):
        return
    missing = []
    if config.auth != "on":
        missing.append("auth is off (anyone who reaches the port may do anything)")
    if not config.tls_cert_file:
        missing.append("there is no TLS (keys and data cross the network readable)")
    if not missing:
        return
    why = " and ".join(missing)
    if config.insecure:
        log.warning("%s listens on %s although %s: --insecure is set", label, config.host, why)
        return
    raise InvalidArgument(
        f"refusing to listen on {config.host}, beyond this machine, because {why}; set "
        f"{describe('tls_cert_file')} and {describe('tls_key_file')} with auth on, listen on "
        f"127.0.0.1, or accept the risk with {describe('insecure')}",
        reason="INSECURE_EXPOSURE",
    )


async def create_server(
    bindings: Sequence[ServiceBinding],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    verifier: Verifier | None = None,
    tls: ServerTLS | None = None,
) -> RunningServer:
    """Starts a server hosting `bindings` plus health and reflection; returns it with its port.

    With a `verifier`, every call but health and reflection needs an API key that `POLICY`
    allows; with `tls`, the port speaks only TLS.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMappingInterceptor()]
    if verifier is not None:
        interceptors.append(AuthInterceptor(verifier, POLICY))
    server = grpc.aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)
    for binding in bindings:
        binding.register(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, tls.credentials())
        if tls is not None
        else server.add_insecure_port(address)
    )
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
    finish_progress()  # serving: nothing left to report to whoever waits for the start
    # Written then renamed, so a reader never sees an empty or partial port number.
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


async def serve(
    bindings: Sequence[ServiceBinding],
    config: ServerConfig,
    *,
    label: str,
    verifier: Verifier | None = None,
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
    on_stopping: Sequence[Callable[[], None]] = (),
    on_started: Sequence[Callable[[RunningServer], None]] = (),
) -> None:
    """Runs a server until SIGTERM or SIGINT, then shuts down gracefully.

    `on_started` hooks get the running server once its port is open (to report health
    with `RunningServer.set_serving`); `on_stopping` hooks run as soon as the signal
    arrives, before requests drain; `on_shutdown` hooks after.

    `verifier` checks API keys; it is required when the settings have auth on.
    """
    check_exposure(config, label)
    if config.auth == "on" and verifier is None:
        raise InvalidArgument(f"{label} has auth on but no way to verify keys")
    tls = server_tls(config)
    report_progress(f"opening port {config.port or '(any free one)'}")
    running = await create_server(
        bindings,
        config.host,
        config.port,
        verifier=verifier if config.auth == "on" else None,
        tls=tls,
    )
    log.info(
        "%s serving on %s:%d (auth %s, %s)",
        label,
        config.host,
        running.port,
        config.auth,
        "TLS" + (" with client certificates" if tls and tls.client_ca else "")
        if tls
        else "plaintext",
    )
    print(f"{label} listening on {config.host}:{running.port}", flush=True)
    for started in on_started:
        started(running)
    if config.ready_file:
        write_ready_file(config.ready_file, running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Our own pool for blocking work (asyncio.to_thread), so shutdown can bound its wait.
    work = concurrent.futures.ThreadPoolExecutor(thread_name_prefix=f"{label}-work")
    loop.set_default_executor(work)

    def request_stop() -> None:
        for notify in on_stopping:
            notify()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
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

    # Homes hold training data, keys and logs: whatever a process creates is its owner's only.
    os.umask(0o077)
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

"""Supervision of the predictor's engine: one that dies is replaced, and health says so.

vLLM runs its engine in a child process; an exception there (or the process being
killed) ends it for every request. The supervisor notices within `poll_seconds`,
turns the server's health NOT_SERVING at once (requests in flight and new ones fail
UNAVAILABLE with a retry-after), starts a new engine off the event loop, switches the
predictor to it (adapters load again on first use, pinned ones at once) and turns
health back to SERVING. After `attempts` failed starts, with a backoff doubling from
`backoff_seconds`, it gives up: the process exits non-zero, for its process manager
to start a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable

from loraforge.services.predictor.engines.base import DEFAULT_RETRY_AFTER_SECONDS, Engine
from loraforge.services.predictor.predictor import Predictor

log = logging.getLogger("loraforge.predictor")

# Exit status of a predictor whose engine could not be started again.
EXIT_ENGINE_FAILED = 3
# Most time given to a dead engine's shutdown before a new one starts.
DEAD_ENGINE_SHUTDOWN_SECONDS = 30.0

HealthReport = Callable[[bool], Awaitable[None]]


def _exit_process(status: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine's processes end with this one (vllm_lifeline).
    os._exit(status)


class EngineSupervisor:
    """Watches `predictor`'s engine and replaces it, with `start` (blocking), when it dies."""

    def __init__(
        self,
        predictor: Predictor,
        start: Callable[[], Engine],
        *,
        attempts: int = 3,
        backoff_seconds: float = 2.0,
        poll_seconds: float = 0.25,
        give_up: Callable[[int], None] = _exit_process,
    ) -> None:
        self.predictor = predictor
        self._start = start
        self.attempts = max(1, attempts)
        self.backoff_seconds = max(0.0, backoff_seconds)
        self.poll_seconds = poll_seconds
        self._give_up = give_up
        self._report: HealthReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.restarts = 0
        # How long a new engine takes to start; the first estimate until one has.
        self.retry_after_seconds = DEFAULT_RETRY_AFTER_SECONDS

    def report_health(self, report: HealthReport) -> None:
        """Where the engine's state goes: the server's health (`RunningServer.set_serving`)."""
        self._report = report

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        """Stops watching (the service is stopping: its engine may end with it)."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    async def _health(self, serving: bool) -> None:
        if self._report is not None:
            await self._report(serving)

    async def _watch(self) -> None:
        while not self._stopped:
            engine = self.predictor.engine
            cause = engine.failure()
            if cause is None:
                await asyncio.sleep(self.poll_seconds)
            else:
                await self._replace(engine, cause)

    async def _replace(self, dead: Engine, cause: str) -> None:
        log.error("the %s engine has stopped: %s; starting a new one", dead.kind.value, cause)
        self.predictor.engine_down(self.retry_after_seconds)
        await self._health(False)
        # Its memory back before a new one takes as much.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dead.shutdown(), DEAD_ENGINE_SHUTDOWN_SECONDS)
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.attempts + 1):
            began = loop.time()
            try:
                engine = await asyncio.to_thread(self._start)
            except Exception as exc:
                log.error(
                    "start %d of %d of a new %s engine failed: %s",
                    attempt,
                    self.attempts,
                    dead.kind.value,
                    exc,
                )
                if attempt == self.attempts:
                    log.critical(
                        "no engine could be started; the predictor exits (status %d) for its "
                        "process manager to restart it",
                        EXIT_ENGINE_FAILED,
                    )
                    self._give_up(EXIT_ENGINE_FAILED)
                    return
                await asyncio.sleep(self.backoff_seconds * 2 ** (attempt - 1))
                continue
            self.retry_after_seconds = max(1, math.ceil(loop.time() - began))
            await self.predictor.switch_engine(engine, self.predictor.choice)
            self.predictor.engine_up()
            self.restarts += 1
            await self._health(True)
            log.info(
                "a new %s engine serves (started in %ds)",
                engine.kind.value,
                self.retry_after_seconds,
            )
            return

"""What a starting process is doing, for whoever waits for it to serve (`loraforge up`).

A process started with `LORAFORGE_PROGRESS_FILE` set keeps that file current
from the moment the platform's code loads until it serves: the step it is on
("loading the base model", "starting vLLM", "converting ... from its GGUF")
and a heartbeat that counts up every few seconds while the process runs. The
waiter never needs a fixed total time: a process whose file stops changing
has stalled; one that is slow but alive keeps beating.

The variable is taken out of the environment when this module loads, so the
processes a service starts (vLLM's engine core, a background measurement)
never write over their parent's file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("loraforge.progress")

PROGRESS_FILE_ENV = "LORAFORGE_PROGRESS_FILE"
HEARTBEAT_SECONDS = 2.0
SERVING = "serving"


@dataclass(frozen=True)
class Progress:
    """One reading of a progress file."""

    step: str
    beat: int  # counts up while the process runs
    pid: int


class ProgressReporter:
    """Writes the step and a heartbeat to `path`, each write whole (written, then renamed)."""

    def __init__(self, path: Path, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.path = path
        self._step = "loading Python libraries"
        self._beat = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._heartbeat_seconds = heartbeat_seconds
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._run, name="progress-heartbeat", daemon=True)
        self._thread.start()

    def report(self, step: str) -> None:
        with self._lock:
            self._step = step
        self._write()

    def finish(self, step: str = SERVING) -> None:
        """The last step: the heartbeat stops (a serving process has nothing left to report)."""
        self._stopped.set()
        self.report(step)

    def _run(self) -> None:
        while not self._stopped.wait(self._heartbeat_seconds):
            self._write()

    def _write(self) -> None:
        with self._lock:
            self._beat += 1
            body = json.dumps({"step": self._step, "beat": self._beat, "pid": os.getpid()})
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(body)
                os.replace(tmp, self.path)
            except OSError as exc:  # a report is for people; it never stops the process
                log.debug("cannot write progress to %s: %s", self.path, exc)


def _from_environment() -> ProgressReporter | None:
    path = os.environ.pop(PROGRESS_FILE_ENV, "")
    if not path:
        return None
    reporter = ProgressReporter(Path(path))
    reporter.start()
    return reporter


_reporter = _from_environment()


def report(step: str) -> None:
    """Says what this process is doing now (a log line; the progress file when it has one)."""
    log.info("%s", step)
    if _reporter is not None:
        _reporter.report(step)


def finish(step: str = SERVING) -> None:
    """This process serves: the last report, and its heartbeat stops."""
    if _reporter is not None:
        _reporter.finish(step)


def read_progress(path: Path) -> Progress | None:
    """The last report in `path` (None before the first, or if it cannot be read)."""
    try:
        data = json.loads(path.read_text())
        return Progress(str(data["step"]), int(data["beat"]), int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None

"""Training worker: `python -m loraforge.services.trainer.worker` (or `loraforge-worker`).

A worker is a separate process sharing the trainer's database and the object
store. It advertises its hardware (CUDA and GPU memory, GPTQModel) in the
workers table, with the memory it trains within, and in a loop it requeues runs
whose worker died (expired lease), claims the oldest queued run that hardware can
train, and runs it in a process of its own (`training_child`): read the dataset
version from the dataset service, train (resuming from the run's last checkpoint
if it has one), upload checkpoints as they are written and the final adapter with
a manifest, and report every state change, progress event and log line as it
goes. A heartbeat thread renews the lease and the worker's entry; when the run is
cancelled or taken over the heartbeat fails and training stops at the next step.

The worker outlives the training process. With `--memory-limit-gib` it polls that
process's memory and kills it past the limit, as a cgroup's out-of-memory killer
would; a training process killed for memory (by the worker, or with SIGKILL by the
kernel) gets its run retried once with a smaller plan (gradient checkpointing,
half the micro-batch, the same global batch) from its last checkpoint, and failed
with what to change if that is killed too. Start as many workers as you have
accelerators; each runs one job at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from loraforge.services.common.channels import security_from
from loraforge.services.common.config import ProcessConfig, describe, load_config, setting
from loraforge.services.common.errors import InvalidArgument, LoraforgeError
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.model_access import (
    ModelAccess,
    allow_hub_models_setting,
    model_roots_setting,
    parse_model_roots,
    trust_remote_code_setting,
)
from loraforge.services.common.resources import new_id
from loraforge.services.common.server import run_main
from loraforge.services.trainer import hardware, memory_fit, training_child
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.jobs import ClaimedJob, JobQueue, JobReporter
from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.store import TrainerStore
from loraforge.services.trainer.training_child import unexpected_failure
from loraforge.services.trainer.workers import Workers

log = logging.getLogger("loraforge.worker")


@dataclasses.dataclass
class WorkerConfig(ProcessConfig):
    """Settings of a training worker (its database and object store are the trainer's)."""

    dataset_address: str = setting(
        "", "host:port of the dataset service, to read dataset versions.", required=True
    )
    worker_id: str = setting(
        "", "Name of this worker in events and logs. Default: host-pid-random."
    )
    work_dir: str = setting(
        "", "Local scratch folder for checkpoints and adapters. Default: a temporary folder."
    )
    poll_seconds: float = setting(1.0, "How often an idle worker looks for queued runs.")
    lease_seconds: float = setting(
        60.0,
        "A run whose worker has not renewed its lease for this long is requeued; a worker "
        "whose entry in the workers table is this old counts as gone.",
    )
    heartbeat_seconds: float = setting(
        5.0, "How often a busy worker renews its lease and checks for cancellation."
    )
    max_attempts: int = setting(3, "Starts of one run (crashes included) before it is failed.")
    max_jobs: int = setting(0, "Exit after this many runs (0: run until stopped).")
    cpu_threads: int = setting(
        0,
        "Threads torch may use on a CPU (0: its default). Set it when several workers share one CPU host.",
    )
    memory_limit_gib: float = setting(
        0.0,
        "Memory a run may use on a CPU, in GiB: a run whose estimate is larger trains with "
        "gradient checkpointing and smaller micro-batches of the same global batch. 0: what "
        "the machine, the worker's cgroup and its address-space limit leave it.",
    )
    calibrate_training: bool = setting(
        True,
        "At start, measure the training throughput of the recommended template's base model "
        "on this machine once (a few steps in a low-priority background process, stopped "
        "when a run is claimed), so estimates have a time before any run has trained.",
    )
    # Set like the trainer's: a run's base model is checked there and again here.
    model_roots: str = model_roots_setting()
    allow_hub_models: bool = allow_hub_models_setting()
    trust_remote_code: bool = trust_remote_code_setting()

    def __post_init__(self) -> None:
        parse_model_roots(self.model_roots, Path(self.home))  # a malformed value stops the start
        for name in ("poll_seconds", "lease_seconds", "heartbeat_seconds"):
            value = getattr(self, name)
            if value <= 0:
                raise InvalidArgument(f"{describe(name)} must be more than 0 (got {value})")
        if not 0 <= self.memory_limit_gib < float("inf"):
            raise InvalidArgument(
                f"{describe('memory_limit_gib')} must be 0 (what the worker has) or more "
                f"(got {self.memory_limit_gib})"
            )
        if self.poll_seconds >= self.lease_seconds:
            raise InvalidArgument(
                f"{describe('poll_seconds')} must be shorter than {describe('lease_seconds')} "
                f"(got {self.poll_seconds:g} and {self.lease_seconds:g}): an idle worker renews "
                "its entry in the workers table as it polls, and counts as gone once it is older"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            raise InvalidArgument(
                f"{describe('heartbeat_seconds')} must be shorter than "
                f"{describe('lease_seconds')} (got {self.heartbeat_seconds:g} and "
                f"{self.lease_seconds:g}), or leases expire while the worker is alive"
            )
        for name in ("max_attempts",):
            if getattr(self, name) < 1:
                raise InvalidArgument(
                    f"{describe(name)} must be at least 1 (got {getattr(self, name)})"
                )
        for name in ("max_jobs", "cpu_threads"):
            if getattr(self, name) < 0:
                raise InvalidArgument(
                    f"{describe(name)} must not be negative (got {getattr(self, name)})"
                )


# How often the memory watchdog reads the training process's memory (seconds).
WATCH_SECONDS = 0.1
# Retries with a smaller memory plan after an out-of-memory kill, before the run fails.
MEMORY_RETRIES = 1


@dataclasses.dataclass(frozen=True)
class ChildExit:
    """How the process that trained a run ended."""

    code: int
    peak_rss: int  # the most memory it (with its own children) held, as the watchdog saw it
    watchdog_killed: bool = False  # over the worker's memory limit: the worker killed it
    kernel_killed: bool = False  # the kernel's out-of-memory killer counted a kill meanwhile

    @property
    def out_of_memory(self) -> bool:
        """Killed for memory: by the watchdog, or with SIGKILL as the kernel's OOM killer does."""
        return self.watchdog_killed or self.code == -signal.SIGKILL

    @property
    def cause(self) -> str:
        if self.watchdog_killed:
            return "killed by the worker's memory watchdog"
        if self.kernel_killed:
            return "killed by the kernel's out-of-memory killer"
        return "killed with SIGKILL, as the kernel's out-of-memory killer does"


def tree_rss(pid: int) -> int:
    """The resident memory of process `pid` and its descendants, in bytes (0: it is gone)."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for member in family:
        try:
            total += int(member.memory_info().rss)
        except psutil.Error:
            pass
    return total


def kill_tree(pid: int) -> None:
    """SIGKILLs process `pid` and its descendants."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return
    for member in family:
        try:
            member.kill()
        except psutil.Error:
            pass


def signal_line(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.store = TrainerStore(config.database_url_for("trainer"))
        self.queue = JobQueue(self.store)
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_id()[:6]}"
        self.workers = Workers(self.store)
        # The memory runs train within: the limit, or what the machine (its cgroup) has.
        self.memory_limit = int(config.memory_limit_gib * 2**30)
        self.memory_bytes = self.memory_limit or hardware.machine_memory()
        self.capabilities = dataclasses.replace(hardware.probe(), memory_bytes=self.memory_bytes)
        # Checked now, so a bad file stops the start; each run's process uses them itself.
        security_from(config)
        self.models: ModelAccess = tpl.model_access(
            parse_model_roots(config.model_roots, config.home_path()), config.allow_hub_models
        )
        if config.trust_remote_code:
            log.warning(
                "trust_remote_code is on: base models that bring their own Python code run it "
                "in this worker"
            )
        self._advertised = -math.inf
        self.stop = threading.Event()

    def advertise(self) -> None:
        """Renews this worker's entry (what it can train, live for one lease time) once a
        quarter of that time has passed since the last renewal."""
        now = time.monotonic()
        if now - self._advertised < self.config.lease_seconds / 4:
            return
        self.workers.advertise(self.worker_id, self.capabilities, self.config.lease_seconds)
        self._advertised = now

    def run_forever(self) -> None:
        has = self.capabilities
        log.info(
            "worker %s polling for runs every %.1fs; it has %s and %s, and trains within "
            "%.2f GiB of memory%s",
            self.worker_id,
            self.config.poll_seconds,
            f"a CUDA GPU ({has.gpu_memory_gib:.1f} GiB)" if has.cuda else "no CUDA GPU",
            "GPTQModel" if has.gptq else "no GPTQModel",
            self.memory_bytes / 2**30,
            " (its limit: a run's process that holds more is killed)" if self.memory_limit else "",
        )
        if self.config.calibrate_training:
            from loraforge.services.trainer import calibration

            calibration.start_in_background(self)
        done = 0
        try:
            while not self.stop.is_set():
                self.advertise()
                reaped = self.queue.reap_expired(self.config.max_attempts)
                if reaped:
                    log.warning(
                        "requeued runs whose worker stopped reporting: %s", ", ".join(reaped)
                    )
                job = self.queue.claim(self.worker_id, self.config.lease_seconds)
                if job is None:
                    self.stop.wait(self.config.poll_seconds)
                    continue
                self.run_job(job)
                done += 1
                if self.config.max_jobs and done >= self.config.max_jobs:
                    break
        finally:
            self.workers.forget(self.worker_id)
        log.info("worker %s stopped", self.worker_id)

    def run_job(self, job: ClaimedJob) -> None:
        """Trains `job` in a process of its own (`training_child`) while this one renews the
        lease and watches its memory; the worker lives on whatever happens to that process."""
        log.info("claimed %s (attempt %d)", job.name, job.attempt)
        reporter = JobReporter(self.store, job.name, self.worker_id)
        lost = threading.Event()  # the run is no longer ours (cancelled, taken over)
        done = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(reporter, lost, done), daemon=True
        )
        heartbeat.start()
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=self._scratch_root()))
        try:
            ended = self._train_in_child(job, scratch, lost)
            if ended.code == 0:
                return
            if ended.out_of_memory:
                self._out_of_memory(job, reporter, ended)
            else:
                self._crashed(job, reporter, ended)
        except Exception as exc:
            incident = new_id()[:12]
            log.exception("run %s failed unexpectedly (incident %s)", job.name, incident)
            reason = unexpected_failure(exc, incident, self.worker_id)
            reporter.log(reason, "ERROR")
            reporter.failed(reason)
        finally:
            done.set()  # ends the heartbeat thread
            heartbeat.join(timeout=10)
            shutil.rmtree(scratch, ignore_errors=True)

    def _train_in_child(self, job: ClaimedJob, scratch: Path, lost: threading.Event) -> ChildExit:
        """Runs the training process for `job` to its end: it is told when the worker shuts
        down (SIGTERM) or the run is no longer ours (SIGUSR1), and killed (SIGKILL) when it
        holds more memory than the worker's limit."""
        kills_before = hardware.oom_kills()
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraforge.services.trainer.training_child"],
            stdin=subprocess.PIPE,
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(training_child.spec(self.config, self.worker_id, job, scratch))
            proc.stdin.close()
        except BrokenPipeError:  # it died at once; its exit code says how
            pass
        try:
            return self._watch(job, proc, lost, kills_before)
        finally:
            if proc.poll() is None:  # the worker itself failed: the process must not outlive it
                kill_tree(proc.pid)
                proc.wait()

    def _watch(
        self,
        job: ClaimedJob,
        proc: subprocess.Popen[bytes],
        lost: threading.Event,
        kills_before: int | None,
    ) -> ChildExit:
        peak = 0
        watchdog_killed = told_stop = told_lost = False
        interval = WATCH_SECONDS if self.memory_limit else 5 * WATCH_SECONDS
        while True:
            try:
                code = proc.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                pass
            rss = tree_rss(proc.pid)
            peak = max(peak, rss)
            if self.memory_limit and rss > self.memory_limit and not watchdog_killed:
                log.warning(
                    "%s: its training process holds %.2f GiB, over this worker's limit of "
                    "%.2f GiB: killing it",
                    job.name,
                    rss / 2**30,
                    self.memory_limit / 2**30,
                )
                kill_tree(proc.pid)
                watchdog_killed = True
            if self.stop.is_set() and not told_stop:
                proc.send_signal(signal.SIGTERM)
                told_stop = True
            if lost.is_set() and not told_lost:
                proc.send_signal(signal.SIGUSR1)
                told_lost = True
        kills_after = hardware.oom_kills()
        kernel = kills_before is not None and kills_after is not None and kills_after > kills_before
        if code != 0:
            log.warning("%s: its training process exited with %s", job.name, signal_line(code))
        return ChildExit(code, peak, watchdog_killed, kernel)

    def _attempted_params(self, job: ClaimedJob) -> tuple[TrainingParams, str] | None:
        """The parameters the killed attempt started from, and the model's folder (None: the
        run's stored parameters or its model cannot be read here)."""
        try:
            params = tpl.stored_params(job.template, job.params)
            model_path = self.models.resolve(params.base_model)
        except (ValueError, LoraforgeError):
            return None
        for _ in range(job.memory_retries):
            params = memory_fit.smaller_plan(params)
        return params, model_path

    def _out_of_memory(self, job: ClaimedJob, reporter: JobReporter, ended: ChildExit) -> None:
        """Retries the run once with a smaller plan, from its last checkpoint; fails it after that."""
        row = self.store.get_version(job.name)
        step = int((row.progress or {}).get("step", 0))
        attempted = self._attempted_params(job)
        estimate = memory_fit.estimated_peak(*attempted) if attempted else 0
        figures = (
            f"estimated {memory_fit.gib(estimate)}" if estimate else "no estimate of its peak"
        ) + (
            f", the worker had {memory_fit.gib(self.memory_bytes)} "
            f"(peak RSS {memory_fit.gib(ended.peak_rss)}; {ended.cause})"
        )
        if job.memory_retries < MEMORY_RETRIES and attempted is not None:
            trc = memory_fit.smaller_plan(attempted[0]).trainer_config
            where = (
                f"from checkpoint step {row.checkpoint_step}"
                if row.checkpoint_step
                else "from the start"
            )
            message = (
                f"out of memory at step {step}: {figures}; retrying with micro-batch "
                f"{trc.per_device_train_batch_size} x {trc.gradient_accumulation_steps} "
                f"accumulation steps and gradient checkpointing (the same global batch) {where}"
            )
            reporter.log(message, "ERROR")
            reporter.retry_smaller(message)
            return
        again = ", again after a retry with a smaller plan" if job.memory_retries else ""
        message = f"out of memory at step {step}: {figures}{again}. {memory_fit.WHAT_TO_CHANGE}"
        reporter.log(message, "ERROR")
        reporter.failed(message)

    def _crashed(self, job: ClaimedJob, reporter: JobReporter, ended: ChildExit) -> None:
        """The training process died on its own (not for memory): requeued while starts are left."""
        reason = (
            f"the training process on worker {self.worker_id} exited with {signal_line(ended.code)}"
        )
        if self.stop.is_set():
            reporter.release(f"{reason} as the worker shut down; requeued")
        elif job.starts < self.config.max_attempts:
            reporter.release(f"{reason}; requeued to retry from its last checkpoint")
        else:
            reporter.failed(
                f"{reason} on attempt {job.starts} of {self.config.max_attempts}; giving up "
                f"(the worker's log has the details)"
            )

    def _scratch_root(self) -> str | None:
        if not self.config.work_dir:
            return None
        Path(self.config.work_dir).mkdir(parents=True, exist_ok=True)
        return self.config.work_dir

    def _heartbeat(
        self, reporter: JobReporter, lost: threading.Event, done: threading.Event
    ) -> None:
        while not done.wait(self.config.heartbeat_seconds):
            try:
                if not lost.is_set() and not reporter.heartbeat(self.config.lease_seconds):
                    log.warning(
                        "%s is no longer ours (cancelled or taken over); stopping it", reporter.name
                    )
                    lost.set()
                self.advertise()
            except Exception:  # a database hiccup: keep trying until the lease runs out
                log.exception("heartbeat for %s failed", reporter.name)


def main(argv: Sequence[str] | None = None) -> int:
    def start() -> None:
        # Loaded inside `run_main`, so a bad setting is one line and exit 2, not a traceback.
        config = load_config(WorkerConfig, argv, prog="loraforge-worker")
        setup_logging(config.log_level, config.log_format, service="worker")
        if config.cpu_threads > 0:
            import torch

            torch.set_num_threads(config.cpu_threads)
        worker = Worker(config)

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %d: finishing the current step, then stopping", signum)
            worker.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        worker.run_forever()

    return run_main(start)


if __name__ == "__main__":
    sys.exit(main())

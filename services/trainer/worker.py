"""Training worker: `python -m loraforge.services.trainer.worker` (or `loraforge-worker`).

A worker is a separate process sharing the trainer's database and the object
store. It advertises its hardware (CUDA and GPU memory, GPTQModel) in the
workers table, and in a loop it requeues runs whose worker died (expired
lease), claims the oldest queued run that hardware can train, and runs it: read
the dataset version from the dataset service, train (resuming from the run's
last checkpoint if it has one), upload checkpoints as they are written and the
final adapter with a manifest, and report every state change, progress event
and log line as it goes. A heartbeat thread renews the lease and the worker's
entry; when the run is cancelled or taken over the heartbeat fails and
training stops at the next step. Start as many workers as you have
accelerators; each runs one job at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraforge.services.common.channels import security_from
from loraforge.services.common.config import ProcessConfig, describe, load_config, setting
from loraforge.services.common.errors import InvalidArgument, LoraforgeError, Unavailable
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.model_access import (
    ModelAccess,
    allow_hub_models_setting,
    model_roots_setting,
    parse_model_roots,
    trust_remote_code_setting,
)
from loraforge.services.common.objectstore import ObjectStore, copy_store_to_tree, open_object_store
from loraforge.services.common.resources import new_id
from loraforge.services.common.server import run_main
from loraforge.services.trainer import checkpoints, dataset_client, hardware
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.continuation import INIT_ADAPTER, INIT_FILES
from loraforge.services.trainer.jobs import ClaimedJob, JobQueue, JobReporter
from loraforge.services.trainer.store import TrainerStore, version_prefix
from loraforge.services.trainer.training import (
    ToleranceExceeded,
    TrainingError,
    TrainingStopped,
    library_versions,
    run_training,
)
from loraforge.services.trainer.workers import Workers

log = logging.getLogger("loraforge.worker")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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


class _RunReporter:
    """Bridges the training function to the job's fenced event writes and the object store."""

    def __init__(
        self, worker: Worker, job: ClaimedJob, reporter: JobReporter, stop: threading.Event
    ) -> None:
        self.worker = worker
        self.job = job
        self.reporter = reporter
        self.stop = stop
        self.lost = threading.Event()
        self.keep = 1  # until the run's parameters are read: `keep_checkpoints`
        self.keep_best = False  # also keep the checkpoint with the lowest eval loss
        self.prefix = version_prefix(job.name) + "/checkpoints"

    def keep_checkpoints(self, count: int, keep_best: bool = False) -> None:
        self.keep = count
        self.keep_best = keep_best

    def _check(self, written: bool) -> None:
        if not written:
            self.lost.set()

    def log(self, message: str, level: str = "INFO") -> None:
        log.info("%s: %s", self.job.name, message)
        self._check(self.reporter.log(message, level))

    def progress(self, progress: dict[str, Any]) -> None:
        self._check(self.reporter.progress(progress))

    def checkpoint_saved(self, step: int, folder: Path) -> None:
        key = f"{self.prefix}/checkpoint-{step}"
        store = self.worker.objects
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            store.put_file(f"{key}/{path.relative_to(folder).as_posix()}", path)
        # Last: a checkpoint is listed (`checkpoints.py`) once this is there.
        summary = checkpoints.summary_of(folder, step)
        store.put_bytes(f"{key}/{checkpoints.INFO_FILE}", json.dumps(summary).encode())
        # The database points at a checkpoint only once all its files are in the store.
        self._check(self.reporter.checkpoint(step, key, self.prefix))
        kept = sorted(
            {
                info.key[len(self.prefix) + 1 :].split("/", 1)[0]
                for info in store.list(self.prefix + "/")
            },
            key=lambda d: int(d.rsplit("-", 1)[-1]) if d.rsplit("-", 1)[-1].isdigit() else -1,
        )
        best = self._best_checkpoint() if self.keep_best else None
        for old in kept[: -self.keep]:
            if old not in (f"checkpoint-{step}", best):
                store.delete_prefix(f"{self.prefix}/{old}/")

    def _best_checkpoint(self) -> str | None:
        """The folder of the stored checkpoint with the lowest eval loss, if any has one."""
        scored = [
            c
            for c in checkpoints.list_checkpoints(self.worker.objects, self.job.name)
            if c.eval_loss is not None
        ]
        if not scored:
            return None
        return f"checkpoint-{min(scored, key=lambda c: (c.eval_loss, c.step)).step}"

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.stop.is_set()


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.store = TrainerStore(config.database_url_for("trainer"))
        self.queue = JobQueue(self.store)
        self.objects: ObjectStore = open_object_store(config.object_store_url_or_default())
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_id()[:6]}"
        self.workers = Workers(self.store)
        self.capabilities = hardware.probe()
        # TLS and this worker's own key for its dataset-service calls (files checked now).
        self.security = security_from(config)
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
            "worker %s polling for runs every %.1fs; it has %s and %s",
            self.worker_id,
            self.config.poll_seconds,
            f"a CUDA GPU ({has.gpu_memory_gib:.1f} GiB)" if has.cuda else "no CUDA GPU",
            "GPTQModel" if has.gptq else "no GPTQModel",
        )
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
        log.info("claimed %s (attempt %d)", job.name, job.attempt)
        reporter = JobReporter(self.store, job.name, self.worker_id)
        bridge = _RunReporter(self, job, reporter, self.stop)
        heartbeat = threading.Thread(target=self._heartbeat, args=(reporter, bridge), daemon=True)
        heartbeat.start()
        scratch = Path(tempfile.mkdtemp(prefix="run-", dir=self._scratch_root()))
        try:
            self._train_and_upload(job, reporter, bridge, scratch)
        except TrainingStopped:
            self._stopped(job, reporter, bridge)
        except ToleranceExceeded as exc:
            reporter.failed(str(exc), tolerance_exceeded=True)
        except TrainingError as exc:
            reporter.failed(str(exc))
        except Unavailable as exc:
            if job.attempt < self.config.max_attempts:
                reporter.release(f"{exc.message}; requeued to retry")
            else:
                reporter.failed(exc.message)
        except LoraforgeError as exc:
            reporter.failed(exc.message)
        except Exception as exc:
            incident = new_id()[:12]
            log.exception("run %s failed unexpectedly (incident %s)", job.name, incident)
            reason = unexpected_failure(exc, incident, self.worker_id)
            reporter.log(reason, "ERROR")
            reporter.failed(reason)
        finally:
            bridge.lost.set()  # ends the heartbeat thread
            heartbeat.join(timeout=10)
            shutil.rmtree(scratch, ignore_errors=True)

    def _scratch_root(self) -> str | None:
        if not self.config.work_dir:
            return None
        Path(self.config.work_dir).mkdir(parents=True, exist_ok=True)
        return self.config.work_dir

    def _heartbeat(self, reporter: JobReporter, bridge: _RunReporter) -> None:
        while not bridge.lost.wait(self.config.heartbeat_seconds):
            try:
                if not reporter.heartbeat(self.config.lease_seconds):
                    log.warning(
                        "%s is no longer ours (cancelled or taken over); stopping it", reporter.name
                    )
                    bridge.lost.set()
                self.advertise()
            except Exception:  # a database hiccup: keep trying until the lease runs out
                log.exception("heartbeat for %s failed", reporter.name)

    def _stopped(self, job: ClaimedJob, reporter: JobReporter, bridge: _RunReporter) -> None:
        if self.stop.is_set() and not bridge.lost.is_set():
            reporter.release(
                f"worker {self.worker_id} shut down; requeued to resume from its last checkpoint"
            )
            return
        # A cancelled run keeps the checkpoints it saved: they export and continue like a
        # version's adapter until the version is deleted.
        state = self.store.version_state(job.name)
        log.info("%s stopped: it is now %s", job.name, state)

    def _train_and_upload(
        self, job: ClaimedJob, reporter: JobReporter, bridge: _RunReporter, scratch: Path
    ) -> None:
        try:
            params = tpl.stored_params(job.template, job.params)
        except ValueError as exc:
            raise TrainingError(
                f"the run's stored parameters cannot be read ({exc}); create the run again"
            ) from None
        # The trainer checked the name when the run was created; the settings may differ here.
        model_path = self.models.resolve(params.base_model)
        trc = params.trainer_config
        bridge.keep_checkpoints(trc.save_total_limit, keep_best=trc.adapter_checkpoint == "best")
        examples = list(
            dataset_client.read_examples(
                self.config.dataset_address, job.dataset_version, self.security
            )
        )
        bridge.log(f"read {len(examples)} examples from {job.dataset_version}")
        resume_from = None
        init_adapter = None
        if job.checkpoint_key:
            resume_from = scratch / "checkpoints" / job.checkpoint_key.rsplit("/", 1)[-1]
            copy_store_to_tree(self.objects, job.checkpoint_key, resume_from)
            bridge.log(
                f"downloaded checkpoint {job.checkpoint_key} to resume at step {job.checkpoint_step}"
            )
        elif job.from_model_version:
            # A checkpoint of this run already holds what it learnt on top of the earlier adapter.
            init_adapter = scratch / INIT_ADAPTER
            prefix = f"{version_prefix(job.name)}/{INIT_ADAPTER}"
            if len(copy_store_to_tree(self.objects, prefix, init_adapter)) < len(INIT_FILES):
                raise TrainingError(
                    f"the adapter of {job.from_model_version} that this run continues from is "
                    f"missing under {prefix}; create the run again"
                )
            bridge.log(f"starting from the adapter of {job.from_model_version}")
        result = run_training(
            params,
            examples,
            scratch,
            bridge,
            resume_from=resume_from,
            model_path=model_path,
            trust_remote_code=self.config.trust_remote_code,
            init_adapter=init_adapter,
            memory_limit=int(self.config.memory_limit_gib * 2**30) or None,
        )
        # A folder in a model root is recorded by its real path: what a predictor serves.
        base_model = model_path if model_path.startswith("/") else params.base_model
        if bridge.should_stop():
            raise TrainingStopped()
        if not reporter.uploading():
            raise TrainingStopped()
        adapter_prefix = version_prefix(job.name) + "/adapter"
        manifest = {
            "format": "loraforge.adapter.v1",
            "model_version": job.name,
            "base_model": base_model,
            "template": job.template,
            "dataset_version": job.dataset_version,
            "from_model_version": job.from_model_version,
            "params": params.to_dict(),
            "metrics": result.metrics,
            "global_step": result.global_step,
            "resumed_from_step": result.resumed_from_step,
            "attempt": job.attempt,
            "library_versions": library_versions(),
            "files": list(ADAPTER_FILES),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (result.adapter_dir / "manifest.json").write_text(
            json.dumps(manifest, indent=2, sort_keys=True)
        )
        size = 0
        for name in (*ADAPTER_FILES, "manifest.json"):
            size += self.objects.put_file(
                f"{adapter_prefix}/{name}", result.adapter_dir / name
            ).size
        bridge.log(f"uploaded the adapter ({size:,} bytes) to {adapter_prefix}")
        if not reporter.trained(
            adapter_prefix=adapter_prefix,
            base_model=base_model,
            adapter_bytes=size,
            metrics=result.metrics,
        ):
            self.objects.delete_prefix(adapter_prefix + "/")
            raise TrainingStopped()
        log.info("%s trained: %s", job.name, result.metrics)


def unexpected_failure(exc: BaseException, incident: str, worker_id: str) -> str:
    """What a user reads when training stopped on an error that is not theirs to fix alone."""
    import torch

    cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if isinstance(exc, MemoryError | getattr(torch, "OutOfMemoryError", MemoryError)):
        return (
            f"training ran out of memory ({cause}). Lower trainer_config.per_device_train_batch_size "
            "or tokenizer_config.model_max_length, or turn on trainer_config.gradient_checkpointing, "
            "then create the run again."
        )
    return (
        f"training stopped on an unexpected error ({cause}). Create the run again; if it fails "
        f"the same way, the log of worker {worker_id} has the details under incident {incident}."
    )


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

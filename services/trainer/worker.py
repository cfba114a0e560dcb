"""Training worker: `python -m loraforge.services.trainer.worker` (or `loraforge-worker`).

A worker is a separate process sharing the trainer's database and the object
store. In a loop it requeues runs whose worker died (expired lease), claims the
oldest queued run, and runs it: read the dataset version from the dataset
service, train (resuming from the run's last checkpoint if it has one), upload
checkpoints as they are written and the final adapter with a manifest, and
report every state change, progress event and log line as it goes. A
heartbeat thread renews the lease; when the run is cancelled or taken over the
heartbeat fails and training stops at the next step. Start as many workers as
you have accelerators; each runs one job at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraforge.services.common.config import ServerConfig, load_config, setting
from loraforge.services.common.errors import LoraforgeError, Unavailable
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.objectstore import ObjectStore, copy_store_to_tree, open_object_store
from loraforge.services.common.resources import new_id
from loraforge.services.trainer import dataset_client
from loraforge.services.trainer.jobs import ClaimedJob, JobQueue, JobReporter
from loraforge.services.trainer.store import State, TrainerStore, version_prefix
from loraforge.services.trainer.training import (
    ToleranceExceeded,
    TrainingError,
    TrainingStopped,
    library_versions,
    run_training,
)

log = logging.getLogger("loraforge.worker")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclasses.dataclass
class WorkerConfig:
    """Settings of a training worker."""

    home: str = setting(
        "",
        "Folder for embedded state (the trainer's SQLite file, local objects). Default ~/.loraforge.",
    )
    database_url: str = setting(
        "", "SQLAlchemy URL of the trainer's database (the same as the trainer server's)."
    )
    object_store_url: str = setting(
        "", "Object store shared with the services (folder, file:// or s3:// URL)."
    )
    dataset_address: str = setting(
        "", "host:port of the dataset service, to read dataset versions."
    )
    worker_id: str = setting(
        "", "Name of this worker in events and logs. Default: host-pid-random."
    )
    work_dir: str = setting(
        "", "Local scratch folder for checkpoints and adapters. Default: a temporary folder."
    )
    poll_seconds: float = setting(1.0, "How often an idle worker looks for queued runs.")
    lease_seconds: float = setting(
        60.0, "A run whose worker has not renewed its lease for this long is requeued."
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
    log_level: str = setting("INFO", "Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = setting("text", "Log format: text or json.")

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            home=self.home, database_url=self.database_url, object_store_url=self.object_store_url
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
        self.keep = int(job.params["trainer_config"].get("save_total_limit", 2))
        self.prefix = version_prefix(job.name) + "/checkpoints"

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
        # The database points at a checkpoint only once all its files are in the store.
        self._check(self.reporter.checkpoint(step, key, self.prefix))
        kept = sorted(
            {
                info.key[len(self.prefix) + 1 :].split("/", 1)[0]
                for info in store.list(self.prefix + "/")
            },
            key=lambda d: int(d.rsplit("-", 1)[-1]) if d.rsplit("-", 1)[-1].isdigit() else -1,
        )
        for old in kept[: -self.keep]:
            if old != f"checkpoint-{step}":
                store.delete_prefix(f"{self.prefix}/{old}/")

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.stop.is_set()


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        base = config.server_config()
        self.store = TrainerStore(base.database_url_for("trainer"))
        self.queue = JobQueue(self.store)
        self.objects: ObjectStore = open_object_store(base.object_store_url_or_default())
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_id()[:6]}"
        self.stop = threading.Event()

    def run_forever(self) -> None:
        log.info("worker %s polling for runs every %.1fs", self.worker_id, self.config.poll_seconds)
        done = 0
        while not self.stop.is_set():
            reaped = self.queue.reap_expired(self.config.max_attempts)
            if reaped:
                log.warning("requeued runs whose worker stopped reporting: %s", ", ".join(reaped))
            job = self.queue.claim(self.worker_id, self.config.lease_seconds)
            if job is None:
                self.stop.wait(self.config.poll_seconds)
                continue
            self.run_job(job)
            done += 1
            if self.config.max_jobs and done >= self.config.max_jobs:
                break
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
            log.error("run %s failed:\n%s", job.name, traceback.format_exc())
            reporter.log(traceback.format_exc(limit=8), "ERROR")
            reporter.failed(f"training failed: {type(exc).__name__}: {exc}")
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
            except Exception:  # a database hiccup: keep trying until the lease runs out
                log.exception("heartbeat for %s failed", reporter.name)

    def _stopped(self, job: ClaimedJob, reporter: JobReporter, bridge: _RunReporter) -> None:
        if self.stop.is_set() and not bridge.lost.is_set():
            reporter.release(
                f"worker {self.worker_id} shut down; requeued to resume from its last checkpoint"
            )
            return
        state = self.store.version_state(job.name)
        log.info("%s stopped: it is now %s", job.name, state)
        if state == State.CANCELLED:
            self.objects.delete_prefix(version_prefix(job.name) + "/")

    def _train_and_upload(
        self, job: ClaimedJob, reporter: JobReporter, bridge: _RunReporter, scratch: Path
    ) -> None:
        params = job.params
        examples = list(
            dataset_client.read_examples(self.config.dataset_address, job.dataset_version)
        )
        bridge.log(f"read {len(examples)} examples from {job.dataset_version}")
        resume_from = None
        if job.checkpoint_key:
            resume_from = scratch / "checkpoints" / job.checkpoint_key.rsplit("/", 1)[-1]
            copy_store_to_tree(self.objects, job.checkpoint_key, resume_from)
            bridge.log(
                f"downloaded checkpoint {job.checkpoint_key} to resume at step {job.checkpoint_step}"
            )
        result = run_training(params, examples, scratch, bridge, resume_from=resume_from)
        if bridge.should_stop():
            raise TrainingStopped()
        if not reporter.uploading():
            raise TrainingStopped()
        adapter_prefix = version_prefix(job.name) + "/adapter"
        manifest = {
            "format": "loraforge.adapter.v1",
            "model_version": job.name,
            "base_model": params["model_config"]["pretrained_model_name_or_path"],
            "template": job.template,
            "dataset_version": job.dataset_version,
            "params": params,
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
            base_model=manifest["base_model"],
            adapter_bytes=size,
            metrics=result.metrics,
        ):
            self.objects.delete_prefix(adapter_prefix + "/")
            raise TrainingStopped()
        log.info("%s trained: %s", job.name, result.metrics)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(WorkerConfig, argv, prog="loraforge-worker")
    except LoraforgeError as exc:
        print(f"error: {exc.message}", flush=True)
        return 2
    setup_logging(config.log_level, config.log_format, service="worker")
    if config.heartbeat_seconds >= config.lease_seconds:
        print("error: --heartbeat-seconds must be shorter than --lease-seconds", flush=True)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

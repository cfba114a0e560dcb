"""The process that trains one claimed run: `python -m loraforge.services.trainer.training_child`.

A worker (`worker.py`) starts one per run and writes it, on its standard input, the
worker's settings, its id and the claimed run as JSON. This process opens its own
connections to the trainer's database and the object store, reads the dataset version,
trains (resuming from the run's last checkpoint, if it has one), uploads the checkpoints
and the adapter, and reports every event as the worker, fenced on the worker's ownership
of the run. The worker renews the lease and watches the memory; when this process dies (the
kernel's or the worker's out-of-memory kill), the worker lives on and decides what happens
to the run.

Signals: SIGTERM, the worker is shutting down (the run is requeued at the next step);
SIGUSR1, the run is no longer the worker's (cancelled, taken over): stop at the next step.
SIGINT is the worker's to handle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from loraforge.services.common.channels import security_from
from loraforge.services.common.errors import LoraforgeError, Unavailable
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.model_access import ModelAccess, parse_model_roots
from loraforge.services.common.objectstore import ObjectStore, copy_store_to_tree, open_object_store
from loraforge.services.common.resources import new_id
from loraforge.services.trainer import checkpoints, dataset_client, memory_fit
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.continuation import INIT_ADAPTER, INIT_FILES
from loraforge.services.trainer.jobs import ClaimedJob, JobReporter
from loraforge.services.trainer.store import TrainerStore, version_prefix
from loraforge.services.trainer.training import (
    ToleranceExceeded,
    TrainingError,
    TrainingStopped,
    library_versions,
    memory_budget,
    run_training,
)

log = logging.getLogger("loraforge.worker")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class _RunReporter:
    """Bridges the training function to the job's fenced event writes and the object store."""

    def __init__(
        self,
        objects: ObjectStore,
        job: ClaimedJob,
        reporter: JobReporter,
        stop: threading.Event,
        lost: threading.Event,
    ) -> None:
        self.objects = objects
        self.job = job
        self.reporter = reporter
        self.stop = stop
        self.lost = lost
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
        store = self.objects
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
            for c in checkpoints.list_checkpoints(self.objects, self.job.name)
            if c.eval_loss is not None
        ]
        if not scored:
            return None
        return f"checkpoint-{min(scored, key=lambda c: (c.eval_loss, c.step)).step}"

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.stop.is_set()


class RunTrainer:
    """Trains one claimed run for the worker `worker_id` and reports it to the end: TRAINED,
    FAILED, requeued (the worker shuts down, a service is down) or stopped (cancelled)."""

    def __init__(
        self,
        config: Any,
        worker_id: str,
        stop: threading.Event | None = None,
        lost: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.store = TrainerStore(config.database_url_for("trainer"))
        self.objects: ObjectStore = open_object_store(config.object_store_url_or_default())
        self.security = security_from(config)
        self.models: ModelAccess = tpl.model_access(
            parse_model_roots(config.model_roots, config.home_path()), config.allow_hub_models
        )
        self.stop = stop or threading.Event()  # the worker shuts down
        self.lost = lost or threading.Event()  # the run is no longer the worker's

    def run(self, job: ClaimedJob, scratch: Path) -> None:
        reporter = JobReporter(self.store, job.name, self.worker_id)
        bridge = _RunReporter(self.objects, job, reporter, self.stop, self.lost)
        try:
            self._train_and_upload(job, reporter, bridge, scratch)
        except TrainingStopped:
            self._stopped(job, reporter)
        except ToleranceExceeded as exc:
            reporter.failed(str(exc), tolerance_exceeded=True)
        except TrainingError as exc:
            reporter.failed(str(exc))
        except Unavailable as exc:
            if job.starts < self.config.max_attempts:
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

    def _stopped(self, job: ClaimedJob, reporter: JobReporter) -> None:
        if self.stop.is_set() and not self.lost.is_set():
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
        # The bytes training may use on a CPU (None: what this process has); a retry after an
        # out-of-memory kill trains a smaller plan in a share of what the first attempt had.
        memory_limit = int(self.config.memory_limit_gib * 2**30) or None
        if job.memory_retries:
            for _ in range(job.memory_retries):
                params = memory_fit.smaller_plan(params)
            import torch

            if not torch.cuda.is_available():
                budget = memory_limit or memory_budget()
                memory_limit = int(budget * memory_fit.RETRY_BUDGET_SHARE**job.memory_retries)
            trc = params.trainer_config
            bridge.log(
                f"retrying after an out-of-memory kill with micro-batch "
                f"{trc.per_device_train_batch_size} x {trc.gradient_accumulation_steps} "
                "accumulation steps, gradient checkpointing on"
                + (f", planned within {memory_fit.gib(memory_limit)}" if memory_limit else ""),
                "WARNING",
            )
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
            memory_limit=memory_limit,
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


def spec(config: Any, worker_id: str, job: ClaimedJob, scratch: Path) -> bytes:
    """What the worker writes on the standard input of the process it starts for `job`."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    return json.dumps(
        {
            "config": settings,
            "worker_id": worker_id,
            "job": dataclasses.asdict(job),
            "scratch": str(scratch),
        }
    ).encode()


def _watch_worker(worker_pid: int, lost: threading.Event) -> None:
    """Stops training at the next step once the worker that started this process is gone:
    nobody renews the run's lease any more, and another worker will resume it."""
    while os.getppid() == worker_pid:
        time.sleep(1)
    log.warning("the worker (pid %d) is gone; stopping", worker_pid)
    lost.set()


def main() -> None:
    from loraforge.services.trainer.worker import WorkerConfig

    stop, lost = threading.Event(), threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: lost.set())
    data = json.loads(sys.stdin.buffer.read())
    config = WorkerConfig(**data["config"])
    setup_logging(config.log_level, config.log_format, service="worker")
    if config.cpu_threads > 0:
        import torch

        torch.set_num_threads(config.cpu_threads)
    threading.Thread(target=_watch_worker, args=(os.getppid(), lost), daemon=True).start()
    trainer = RunTrainer(config, data["worker_id"], stop, lost)
    trainer.run(ClaimedJob(**data["job"]), Path(data["scratch"]))
    # Everything is reported: exit without tearing the libraries down (quicker, and nothing
    # it does can change the run any more).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

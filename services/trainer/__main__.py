"""Entry point: `python -m loraforge.services.trainer` (or `loraforge-trainer`).

The server stores and streams; training runs in worker processes
(`python -m loraforge.services.trainer.worker`) that share its database. In the
background it requeues runs whose worker died, notes why queued runs wait
(no live worker has what they need), and sweeps dataset-version
references that no run holds (before it serves, then every `reference_sweep_seconds`).
Evaluations run as tasks of this process, generating through the predictor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loraforge.services.common.channels import security_from
from loraforge.services.common.config import ServerConfig, describe, load_config, setting
from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.model_access import (
    allow_hub_models_setting,
    model_roots_setting,
    parse_model_roots,
)
from loraforge.services.common.objectstore import open_object_store
from loraforge.services.common.server import ServiceBinding, check_exposure, run_main, serve
from loraforge.services.common.verify import remote_verifier
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.dataset_client import AsyncDatasetClient
from loraforge.services.trainer.evaluations import Evaluations
from loraforge.services.trainer.exports import Exports
from loraforge.services.trainer.jobs import JobQueue
from loraforge.services.trainer.predictor_client import AsyncPredictorClient
from loraforge.services.trainer.runs import Runs
from loraforge.services.trainer.servicer import TrainerServicer
from loraforge.services.trainer.store import TrainerStore
from loraforge.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc

SERVICE_NAME = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
log = logging.getLogger("loraforge.trainer")
START_SWEEP_SECONDS = 15.0


@dataclass
class TrainerConfig(ServerConfig):
    """Settings of the trainer service."""

    dataset_address: str = setting(
        "",
        "host:port of the dataset service (resolves and references dataset versions).",
        required=True,
    )
    watch_poll_seconds: float = setting(
        0.25, "How often a WatchModelVersion stream looks for new events."
    )
    reap_seconds: float = setting(
        10.0,
        "How often the server requeues runs whose worker stopped renewing its lease, and "
        "notes in a queued run's log why no live worker can take it.",
    )
    max_attempts: int = setting(3, "Starts of one run (crashes included) before it is failed.")
    reference_sweep_seconds: float = setting(
        600.0,
        "How often the server removes dataset-version references that no run holds "
        "(left by a creation or deletion that was interrupted).",
    )
    predictor_address: str = setting(
        "",
        "host:port of the predictor that evaluations generate through (empty: no evaluations).",
    )
    evaluation_lease_seconds: float = setting(
        30.0,
        "How long a running evaluation stays this server's without renewal; one whose server "
        "stopped is failed once it expires.",
    )
    # The same settings as the training workers': a name is checked here and there.
    model_roots: str = model_roots_setting()
    allow_hub_models: bool = allow_hub_models_setting()
    max_concurrent_merges: int = setting(
        1,
        "Merged exports (a base model with an adapter merged in) this server builds at once, "
        "each in a process of its own that loads the whole base model; later ones wait.",
    )
    merge_timeout_seconds: float = setting(
        3600.0, "A merged export whose merge runs longer than this is stopped."
    )

    def __post_init__(self) -> None:
        parse_model_roots(self.model_roots, Path(self.home))  # a malformed value stops the start
        for name in (
            "watch_poll_seconds",
            "reap_seconds",
            "reference_sweep_seconds",
            "evaluation_lease_seconds",
        ):
            value = getattr(self, name)
            if value <= 0:
                raise InvalidArgument(f"{describe(name)} must be more than 0 (got {value})")
        for name in ("max_attempts", "max_concurrent_merges"):
            if getattr(self, name) < 1:
                raise InvalidArgument(
                    f"{describe(name)} must be at least 1 (got {getattr(self, name)})"
                )
        if self.merge_timeout_seconds <= 0:
            raise InvalidArgument(
                f"{describe('merge_timeout_seconds')} must be more than 0 "
                f"(got {self.merge_timeout_seconds})"
            )


async def _sweep(runs: Runs, limit_seconds: float | None = None) -> None:
    try:
        removed = await asyncio.wait_for(runs.sweep_references(), limit_seconds)
        if removed:
            log.warning("removed %d dataset-version references no run holds", len(removed))
    except Exception:
        log.exception("sweeping dataset-version references failed; retrying later")


async def _sweep_forever(runs: Runs, config: TrainerConfig) -> None:
    while True:
        await asyncio.sleep(config.reference_sweep_seconds)
        await _sweep(runs)


async def _reap_forever(queue: JobQueue, runs: Runs, config: TrainerConfig) -> None:
    # Workers reap too; this covers a cluster where every worker is gone.
    while True:
        await asyncio.sleep(config.reap_seconds)
        try:
            reaped = await asyncio.to_thread(queue.reap_expired, config.max_attempts)
            if reaped:
                log.warning("requeued runs whose worker stopped reporting: %s", ", ".join(reaped))
        except Exception:
            log.exception("requeueing expired runs failed")
        try:
            await asyncio.to_thread(runs.workers.forget_expired, runs.clock())
            await runs.note_waiting()
        except Exception:
            log.exception("noting why queued runs wait failed")


async def run(config: TrainerConfig) -> None:
    check_exposure(config, "trainer")
    verifier = remote_verifier(config, security_from(config), config.dataset_address)
    store = TrainerStore(config.database_url_for("trainer"))
    objects = open_object_store(config.object_store_url_or_default())
    datasets = AsyncDatasetClient(config.dataset_address, security_from(config))
    models = tpl.model_access(
        parse_model_roots(config.model_roots, config.home_path()), config.allow_hub_models
    )
    runs = Runs(store, objects, datasets, models=models)
    exports = Exports(
        store,
        objects,
        models,
        scratch_dir=config.home_path() / "exports",
        max_merges=config.max_concurrent_merges,
        merge_timeout_seconds=config.merge_timeout_seconds,
    )
    predictor = AsyncPredictorClient(config.predictor_address, security_from(config))
    evaluations = Evaluations(
        store,
        datasets,
        predictor,
        lease_seconds=config.evaluation_lease_seconds,
        objects=objects,
    )
    servicer = TrainerServicer(
        store,
        runs,
        datasets,
        watch_poll_seconds=config.watch_poll_seconds,
        exports=exports,
        evaluations=evaluations,
    )
    binding = ServiceBinding(
        SERVICE_NAME, servicer, trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server
    )
    await evaluations.start()
    # Swept once before serving (bounded, so a dataset service that is down delays nothing long).
    await _sweep(runs, limit_seconds=START_SWEEP_SECONDS)
    background = [
        asyncio.create_task(_reap_forever(JobQueue(store), runs, config)),
        asyncio.create_task(_sweep_forever(runs, config)),
    ]

    async def shutdown() -> None:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await evaluations.close()
        await predictor.close()
        await datasets.close()
        store.engine.dispose()

    hooks = [shutdown] if verifier is None else [shutdown, verifier.close]
    await serve([binding], config, label="trainer", verifier=verifier, on_shutdown=hooks)


def main(argv: Sequence[str] | None = None) -> int:
    async def start() -> None:
        # Loaded inside `run_main`, so a bad setting is one line and exit 2, not a traceback.
        config = load_config(TrainerConfig, argv, prog="loraforge-trainer")
        setup_logging(config.log_level, config.log_format, service="trainer")
        await run(config)

    return run_main(start())


if __name__ == "__main__":
    sys.exit(main())

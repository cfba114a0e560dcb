"""Entry point: `python -m loraforge.services.trainer` (or `loraforge-trainer`).

The server stores and streams; training runs in worker processes
(`python -m loraforge.services.trainer.worker`) that share its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from loraforge.services.common.config import ServerConfig, load_config, setting
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.objectstore import open_object_store
from loraforge.services.common.server import ServiceBinding, run_main, serve
from loraforge.services.trainer.dataset_client import AsyncDatasetClient
from loraforge.services.trainer.jobs import JobQueue
from loraforge.services.trainer.servicer import TrainerServicer
from loraforge.services.trainer.store import TrainerStore
from loraforge.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc

SERVICE_NAME = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
log = logging.getLogger("loraforge.trainer")


@dataclass
class TrainerConfig(ServerConfig):
    """Settings of the trainer service."""

    dataset_address: str = setting(
        "", "host:port of the dataset service (resolves and references dataset versions)."
    )
    watch_poll_seconds: float = setting(
        0.25, "How often a WatchModelVersion stream looks for new events."
    )
    reap_seconds: float = setting(
        10.0, "How often the server requeues runs whose worker stopped renewing its lease."
    )
    max_attempts: int = setting(3, "Starts of one run (crashes included) before it is failed.")


async def _reap_forever(queue: JobQueue, config: TrainerConfig) -> None:
    # Workers reap too; this covers a cluster where every worker is gone.
    while True:
        await asyncio.sleep(config.reap_seconds)
        try:
            reaped = await asyncio.to_thread(queue.reap_expired, config.max_attempts)
            if reaped:
                log.warning("requeued runs whose worker stopped reporting: %s", ", ".join(reaped))
        except Exception:
            log.exception("requeueing expired runs failed")


async def run(config: TrainerConfig) -> None:
    store = TrainerStore(config.database_url_for("trainer"))
    objects = open_object_store(config.object_store_url_or_default())
    datasets = AsyncDatasetClient(config.dataset_address)
    servicer = TrainerServicer(
        store, objects, datasets, watch_poll_seconds=config.watch_poll_seconds
    )
    binding = ServiceBinding(
        SERVICE_NAME, servicer, trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server
    )
    reaper = asyncio.create_task(_reap_forever(JobQueue(store), config))

    async def shutdown() -> None:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await datasets.close()
        store.engine.dispose()

    await serve([binding], config, label="trainer", on_shutdown=[shutdown])


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(TrainerConfig, argv, prog="loraforge-trainer")
    setup_logging(config.log_level, config.log_format, service="trainer")
    return run_main(run(config))


if __name__ == "__main__":
    sys.exit(main())

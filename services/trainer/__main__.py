"""Entry point: `python -m loraforge.services.trainer` (or `loraforge-trainer`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from loraforge.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc
from loraforge.services.common.config import ServerConfig, load_config
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.server import ServiceBinding, run_main, serve

SERVICE_NAME = trainer_service_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


@dataclass
class TrainerConfig(ServerConfig):
    """Settings of the trainer service."""


async def run(config: TrainerConfig) -> None:
    servicer = trainer_service_pb2_grpc.TrainerServiceServicer()
    binding = ServiceBinding(SERVICE_NAME, servicer, trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server)
    await serve([binding], config, label="trainer")


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(TrainerConfig, argv, prog="loraforge-trainer")
    setup_logging(config.log_level, config.log_format, service="trainer")
    return run_main(run(config))


if __name__ == "__main__":
    sys.exit(main())

"""Entry point: `python -m loraforge.services.dataset` (or `loraforge-dataset`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from loraforge.dataset.v1 import dataset_service_pb2, dataset_service_pb2_grpc
from loraforge.services.common.config import ServerConfig, load_config
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.server import ServiceBinding, run_main, serve

SERVICE_NAME = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name


@dataclass
class DatasetConfig(ServerConfig):
    """Settings of the dataset service."""


async def run(config: DatasetConfig) -> None:
    servicer = dataset_service_pb2_grpc.DatasetServiceServicer()
    binding = ServiceBinding(SERVICE_NAME, servicer, dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server)
    await serve([binding], config, label="dataset")


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(DatasetConfig, argv, prog="loraforge-dataset")
    setup_logging(config.log_level, config.log_format, service="dataset")
    return run_main(run(config))


if __name__ == "__main__":
    sys.exit(main())

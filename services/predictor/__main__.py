"""Entry point: `python -m loraforge.services.predictor` (or `loraforge-predictor`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from loraforge.predictor.v1 import predictor_service_pb2, predictor_service_pb2_grpc
from loraforge.services.common.config import ServerConfig, load_config
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.server import ServiceBinding, run_main, serve

SERVICE_NAME = predictor_service_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name


@dataclass
class PredictorConfig(ServerConfig):
    """Settings of the predictor service."""


async def run(config: PredictorConfig) -> None:
    servicer = predictor_service_pb2_grpc.PredictorServiceServicer()
    binding = ServiceBinding(SERVICE_NAME, servicer, predictor_service_pb2_grpc.add_PredictorServiceServicer_to_server)
    await serve([binding], config, label="predictor")


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(PredictorConfig, argv, prog="loraforge-predictor")
    setup_logging(config.log_level, config.log_format, service="predictor")
    return run_main(run(config))


if __name__ == "__main__":
    sys.exit(main())

"""Entry point: `python -m loraforge.services.predictor` (or `loraforge-predictor`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from loraforge.predictor.v1 import predictor_service_pb2, predictor_service_pb2_grpc
from loraforge.services.common.channels import security_from
from loraforge.services.common.config import load_config
from loraforge.services.common.logs import setup_logging
from loraforge.services.common.server import ServiceBinding, check_exposure, run_main, serve
from loraforge.services.common.verify import remote_verifier
from loraforge.services.predictor.config import PredictorConfig
from loraforge.services.predictor.engines.base import Engine
from loraforge.services.predictor.predictor import _start_engine, build_predictor
from loraforge.services.predictor.servicer import PredictorServicer
from loraforge.services.predictor.supervision import EngineSupervisor

SERVICE_NAME = predictor_service_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name

__all__ = ["PredictorConfig", "main"]


async def run(config: PredictorConfig) -> None:
    check_exposure(config, "predictor")
    verifier = remote_verifier(config, security_from(config))
    # The engine starts before the port opens: a predictor that answers is ready to generate.
    predictor = await build_predictor(config)
    servicer = PredictorServicer(predictor)

    def new_engine() -> Engine:  # the same kind and model as the one that served
        return _start_engine(predictor.choice.kind, predictor.engine.base_model, config)

    supervisor = EngineSupervisor(
        predictor,
        new_engine,
        attempts=config.engine_restart_attempts,
        backoff_seconds=config.engine_restart_backoff_seconds,
    )
    supervisor.start()
    binding = ServiceBinding(
        SERVICE_NAME, servicer, predictor_service_pb2_grpc.add_PredictorServiceServicer_to_server
    )
    hooks = [predictor.shutdown] if verifier is None else [predictor.shutdown, verifier.close]
    await serve(
        [binding],
        config,
        label="predictor",
        verifier=verifier,
        on_shutdown=hooks,
        on_stopping=[supervisor.stop, predictor.stopping],
        on_started=[lambda running: supervisor.report_health(running.set_serving)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    async def start() -> None:
        # Loaded inside `run_main`, so a bad setting is one line and exit 2, not a traceback.
        config = load_config(PredictorConfig, argv, prog="loraforge-predictor")
        setup_logging(config.log_level, config.log_format, service="predictor")
        await run(config)

    return run_main(start())


if __name__ == "__main__":
    sys.exit(main())

"""Each service runs as its own process: health, reflection, graceful SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import channel, start_service

SERVICES = [
    ("loraforge.services.dataset", "loraforge.dataset.v1.DatasetService"),
    ("loraforge.services.trainer", "loraforge.trainer.v1.TrainerService"),
    ("loraforge.services.predictor", "loraforge.predictor.v1.PredictorService"),
]


def _list_services(ch: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    return {s.name for r in responses for s in r.list_services_response.service}


@pytest.mark.parametrize(
    ("module", "service"), SERVICES, ids=[s[0].rsplit(".", 1)[1] for s in SERVICES]
)
def test_service_process_answers_health_and_reflection_and_stops_on_sigterm(
    module: str, service: str, tmp_path: Path
) -> None:
    extra: list[str] = []
    if module.endswith("predictor"):
        # The predictor's engine needs a base model; the smallest real one is built locally.
        from tests.tiny_model import build_tiny_model

        extra = ["--base-model", str(build_tiny_model(tmp_path / "tiny"))]
    svc = start_service(module, tmp_path, args=extra, timeout=240)
    try:
        with channel(svc.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as exc:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            names = _list_services(ch)
            assert {
                service,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(60) == 0, svc.log()
        assert "stopped" in svc.log()
    finally:
        svc.stop()

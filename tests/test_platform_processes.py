"""Each service runs as its own process: health, reflection, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import channel, free_port, start_service

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
def test_service_process_answers_health_and_reflection_and_stops_cleanly_on_sigterm_to_its_group(
    module: str, service: str, tmp_path: Path
) -> None:
    extra: list[str] = []
    if module.endswith("predictor"):
        # The predictor's engine needs a base model; the smallest real one is built locally.
        from tests.tiny_model import build_tiny_model

        extra = [
            "--base-model",
            str(build_tiny_model(tmp_path / "tiny")),
            # Required; nothing listens there, which only a request naming a model notices.
            "--trainer-address",
            f"127.0.0.1:{free_port()}",
        ]
    if module.endswith("trainer"):
        # Required; nothing listens there, which only the trainer's reference sweep notices.
        extra = ["--dataset-address", f"127.0.0.1:{free_port()}"]
    svc = start_service(module, tmp_path, args=extra, timeout=240, new_session=True)
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
        # A process manager's stop: SIGTERM to the group, which reaches any engine process
        # the service started as well (the predictor's vLLM engine core and worker).
        os.killpg(svc.proc.pid, signal.SIGTERM)
        assert svc.proc.wait(60) == 0, svc.log()
        log = svc.log()
        assert "stopped" in log
        if module.endswith("predictor"):  # the others log their unreachable peers' errors
            # An engine process ended by the same signal is part of the stop, not an error.
            assert " ERROR " not in log and "Traceback" not in log, log
    finally:
        svc.stop()


ENTRY_POINTS = ["loraforge.services.trainer", "loraforge.services.trainer.worker"]


def _start_and_exit(module: str, tmp_path: Path, *args: str, **env: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, "LORAFORGE_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


@pytest.mark.parametrize("module", ENTRY_POINTS, ids=["trainer", "worker"])
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--dataset-address", "127.0.0.1:1"],
            {"LORAFORGE_MAX_ATTEMPTS": "three"},
            "error: LORAFORGE_MAX_ATTEMPTS: 'three' is not a whole number",
        ),
        (
            [],
            {},
            "error: --dataset-address (LORAFORGE_DATASET_ADDRESS) is required: host:port of "
            "the dataset service",
        ),
        (
            ["--dataset-address", "127.0.0.1:1", "--log-format", "xml"],
            {},
            "error: --log-format (LORAFORGE_LOG_FORMAT) must be one of text, json (got 'xml')",
        ),
    ],
    ids=["bad-number", "no-dataset-address", "bad-log-format"],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    module: str, tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    code, output = _start_and_exit(module, tmp_path, *args, **env)
    assert code == 2, output
    assert "\n" not in output and output.startswith(message), output


def test_a_trainer_given_a_port_that_is_no_number_says_so_and_exits_2(tmp_path: Path) -> None:
    code, output = _start_and_exit(
        "loraforge.services.trainer",
        tmp_path,
        "--dataset-address",
        "127.0.0.1:1",
        LORAFORGE_PORT="eighty",
    )
    assert (code, output) == (2, "error: LORAFORGE_PORT: 'eighty' is not a whole number")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--trainer-address", "127.0.0.1:1"],
            {"LORAFORGE_PORT": "eighty"},
            "error: LORAFORGE_PORT: 'eighty' is not a whole number",
        ),
        (
            [],
            {},
            "error: --trainer-address (LORAFORGE_TRAINER_ADDRESS) is required: host:port of "
            "the TrainerService",
        ),
        (
            ["--trainer-address", "127.0.0.1:1", "--engine", "llama.cpp"],
            {},
            "error: --engine (LORAFORGE_ENGINE) must be one of auto, vllm, transformers "
            "(got 'llama.cpp')",
        ),
        (
            ["--trainer-address", "127.0.0.1:1", "--dtype", "int4"],
            {},
            "error: --dtype (LORAFORGE_DTYPE) must be one of auto, float32, float16, bfloat16 "
            "(got 'int4')",
        ),
        (
            ["--trainer-address", "127.0.0.1:1"],
            {"LORAFORGE_VLLM_RESERVED_CORES": "-2"},
            "error: --vllm-reserved-cores (LORAFORGE_VLLM_RESERVED_CORES) must be at least -1 "
            "(got -2)",
        ),
    ],
    ids=["bad-port", "no-trainer-address", "unknown-engine", "unknown-dtype", "negative-cores"],
)
def test_a_predictor_given_a_bad_setting_says_so_in_one_line_and_exits_2(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    code, output = _start_and_exit("loraforge.services.predictor", tmp_path, *args, **env)
    assert code == 2, output
    assert "\n" not in output and output.startswith(message), output


def test_a_worker_whose_heartbeat_outlasts_its_lease_is_refused(tmp_path: Path) -> None:
    code, output = _start_and_exit(
        "loraforge.services.trainer.worker",
        tmp_path,
        "--dataset-address",
        "127.0.0.1:1",
        "--heartbeat-seconds",
        "30",
        "--lease-seconds",
        "10",
    )
    assert code == 2
    assert output == (
        "error: --heartbeat-seconds (LORAFORGE_HEARTBEAT_SECONDS) must be shorter than "
        "--lease-seconds (LORAFORGE_LEASE_SECONDS) (got 30 and 10), or leases expire while "
        "the worker is alive"
    )


def test_a_worker_that_polls_less_often_than_its_lease_is_refused(tmp_path: Path) -> None:
    """An idle worker renews its entry in the workers table as it polls: polling less
    often than its lease would have it counted as gone between polls."""
    code, output = _start_and_exit(
        "loraforge.services.trainer.worker",
        tmp_path,
        "--dataset-address",
        "127.0.0.1:1",
        "--poll-seconds",
        "20",
        "--lease-seconds",
        "10",
        "--heartbeat-seconds",
        "5",
    )
    assert code == 2
    assert output.startswith(
        "error: --poll-seconds (LORAFORGE_POLL_SECONDS) must be shorter than "
        "--lease-seconds (LORAFORGE_LEASE_SECONDS) (got 20 and 10)"
    ), output


def test_a_starting_service_reports_its_steps_and_ends_with_serving(tmp_path: Path) -> None:
    from loraforge.services.common.progress import PROGRESS_FILE_ENV, read_progress

    progress = tmp_path / "dataset.progress"
    svc = start_service(
        "loraforge.services.dataset", tmp_path, env={PROGRESS_FILE_ENV: str(progress)}
    )
    try:
        reported = read_progress(progress)
        assert reported is not None and reported.pid == svc.proc.pid
        assert reported.step == "serving"
        assert "opening port (any free one)" in svc.log()  # each step is a log line too
    finally:
        svc.stop()

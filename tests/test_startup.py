"""Start-up that never races a fixed clock.

A start waits on what each process reports (its step and a heartbeat), not on a
fixed total; the predictor serves before it has measured its engines and measures
in the background, resuming a measurement that was stopped half way; processes
starting at the same time on one machine do not trip over each other.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraforge.client.client import Client
from loraforge.client.local import LocalCluster, Proc, wait_until_serving
from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common import base_models
from loraforge.services.common.progress import PROGRESS_FILE_ENV, read_progress
from loraforge.services.predictor.engines.base import EngineKind
from loraforge.services.predictor.engines.calibration import (
    MEASURED_KINDS,
    WORKLOADS,
    CalibrationStore,
    missing_workloads,
    signature,
)
from tests.support import REPO, ServiceProcess, channel, free_port, start_service, wait_until
from tests.test_predictor_helpers import tiny_base

# A process that starts slowly but says so: a step a second, then an HTTP health endpoint.
_SLOW_START = """
import http.server, sys, threading, time
from loraforge.services.common.progress import report
from loraforge.services.common.server import write_ready_file
steps, ready = int(sys.argv[1]), sys.argv[2]
for i in range(steps):
    report(f"step {i + 1} of {steps}")
    time.sleep(1)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Health)
write_ready_file(ready, server.server_address[1])
server.serve_forever()
"""

# A process that reports one step and then freezes (stopped: no heartbeat either).
_FROZEN = """
import os, signal
from loraforge.services.common.progress import report
report("loading the base model")
os.kill(os.getpid(), signal.SIGSTOP)
"""


def _process(tmp_path: Path, name: str, script: str, *args: str) -> tuple[Proc, Path, Path]:
    logs = tmp_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ready, progress, log = logs / f"{name}.port", logs / f"{name}.progress", logs / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, PROGRESS_FILE_ENV: str(progress)},
            cwd=REPO,
        )
    return Proc(name, popen, popen.pid, 0, log), ready, progress


def _end(proc: Proc) -> None:
    assert proc.popen is not None
    proc.popen.kill()
    proc.popen.wait()


def test_a_start_that_keeps_reporting_progress_is_waited_for_past_the_stall_deadline(
    tmp_path: Path,
) -> None:
    steps = 10  # a second each: longer in all than the stall deadline below
    ready_file = tmp_path / "logs" / "slow.port"
    proc, ready, progress = _process(tmp_path, "slow", _SLOW_START, str(steps), str(ready_file))
    seen: list[tuple[str, str]] = []
    try:
        port = wait_until_serving(
            proc, ready, progress, 6.0, lambda name, step: seen.append((name, step)), http=True
        )
        assert port == int(ready.read_text())
        reported = [step for name, step in seen if name == "slow"]
        assert [s for s in reported if s.startswith("step ")] == [
            f"step {i + 1} of {steps}" for i in range(steps)
        ]
        final = read_progress(progress)
        assert final is not None and final.step == "serving" and final.pid == proc.pid
    finally:
        _end(proc)


def test_a_start_whose_process_stops_reporting_fails_after_the_stall_deadline_saying_its_step(
    tmp_path: Path,
) -> None:
    proc, ready, progress = _process(tmp_path, "frozen", _FROZEN)
    try:
        with pytest.raises(RuntimeError) as exc:
            wait_until_serving(proc, ready, progress, 2.0)
        message = str(exc.value)
        assert "the frozen service has reported no progress for 2s" in message
        assert "(its last report: loading the base model)" in message
        assert "LORAFORGE_START_STALL_SECONDS" in message and str(proc.log) in message
    finally:
        _end(proc)


def test_a_port_in_use_is_named_before_any_process_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        cluster = LocalCluster(
            home=tmp_path / "home",
            base_model="unused",
            ports={"dataset": taken, "trainer": 0, "predictor": 0, "openai": 0, "console": 0},
        )
        with pytest.raises(RuntimeError) as exc:
            cluster.start()
    assert f"port {taken} (dataset) on 127.0.0.1 is in use" in str(exc.value)
    assert "--base-port" in str(exc.value)
    assert not cluster.procs and not (tmp_path / "home" / "logs").exists()


@pytest.mark.slow
def test_two_clusters_starting_at_once_on_different_homes_both_come_up(tmp_path: Path) -> None:
    base = tiny_base(tmp_path)
    clusters = [
        LocalCluster(
            home=tmp_path / f"home-{i}",
            base_model=str(base),
            ports=dict.fromkeys(("dataset", "trainer", "predictor", "openai", "console"), 0),
            extra_env={"LORAFORGE_CALIBRATE_ENGINES": "false"},
        )
        for i in range(2)
    ]
    steps: dict[int, list[str]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            clusters[i].start(on_progress=lambda name, step: steps[i].append(f"{name}: {step}"))
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        for i, cluster in enumerate(clusters):
            with Client(**cluster.addresses, api_key=cluster.api_key()) as client:
                assert client.list_base_models()
            assert any(s.startswith("predictor: starting ") for s in steps[i]), steps[i]
        assert len({c.address("predictor") for c in clusters}) == 2
    finally:
        for cluster in clusters:
            cluster.stop()


_RESOLVE = """
import sys
from pathlib import Path
from loraforge.services.common.base_models import resolve_base_model
print(resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", Path(sys.argv[1])))
"""


def test_a_process_waiting_for_another_ones_base_model_conversion_says_so_and_uses_its_copy(
    tmp_path: Path,
) -> None:
    entry = base_models.SMOLLM2_135M_INSTRUCT
    converted = Path(base_models.resolve_base_model(entry.model_id))  # the machine's copy
    if not (converted / base_models.MARKER).is_file():
        pytest.skip(f"{entry.model_id} comes from the hub cache here, not from a conversion")
    root = tmp_path / "base-models"
    # This test holds the conversion lock, as a process converting the model does.
    with base_models._exclusive(root / f".{entry.id}.lock"):
        proc, _, progress = _process(tmp_path, "waiter", _RESOLVE, str(root))
        waiting = f"waiting for another process's conversion of {entry.model_id} in {root}"
        assert wait_until(
            lambda: (p := read_progress(progress)) is not None and p.step == waiting, 300
        ), proc.log.read_text()
        # The other process finishes: its folder appears whole, with its marker.
        partial = root / f"{entry.id}.partial-test"
        shutil.copytree(converted, partial, copy_function=os.symlink)
        os.rename(partial, base_models.materialised_folder(entry, root))
    assert proc.popen is not None and proc.popen.wait(300) == 0, proc.log.read_text()
    assert proc.log.read_text().strip().splitlines()[-1] == str(root / entry.id)
    last = read_progress(progress)
    assert last is not None and last.step == waiting  # it never converted itself


# --- the predictor's engine measurement -------------------------------------------------------


def _predictor(workdir: Path, base: Path, calibration_file: Path) -> ServiceProcess:
    return start_service(
        "loraforge.services.predictor",
        workdir,
        args=[
            "--base-model",
            str(base),
            "--trainer-address",
            f"127.0.0.1:{free_port()}",
            "--calibration-file",
            str(calibration_file),
            "--dtype",
            "float32",
        ],
        env={"LORAFORGE_CALIBRATE_ENGINES": "true"},
        timeout=600,
        new_session=True,
    )


def _served(process: ServiceProcess) -> pb.ServedBaseModel:
    stub = pb_grpc.PredictorServiceStub(channel(process.address))
    (served,) = stub.GetServingInfo(pb.GetServingInfoRequest(), timeout=60).base_models
    return served


def _predict(process: ServiceProcess) -> pb.PredictResponse:
    stub = pb_grpc.PredictorServiceStub(channel(process.address))
    return stub.Predict(
        pb.PredictRequest(
            base_model=True,
            inputs=[pb.PredictInput(text="Question: what is 2 plus 2?")],
            params=pb.InferenceParams(max_tokens=3),
        ),
        timeout=120,
    )


@pytest.mark.slow
def test_a_predictor_serves_and_answers_before_its_engine_measurement_ends(
    tmp_path: Path,
) -> None:
    base = tiny_base(tmp_path)
    store = CalibrationStore(tmp_path / "calibration.json")
    key = signature(str(base), "float32")
    # Another predictor of this machine is measuring the same model shape: this one's
    # measurement waits for it, and the predictor serves meanwhile.
    with store.measuring(key):
        predictor = _predictor(tmp_path / "p", base, store.path)
        try:
            served = _served(predictor)
            assert served.engine == pb.ENGINE_VLLM
            assert served.engine_reason.startswith(
                "measuring vLLM and transformers + PEFT with a LoRA adapter on this machine "
                "(0 of 4 workloads measured); serving with vLLM meanwhile"
            ), served.engine_reason
            assert _predict(predictor).outputs[0].completion_tokens == 3
            assert store.get(key) is None and not store.figures(key)
        finally:
            predictor.stop()


@pytest.mark.slow
def test_a_measurement_killed_half_way_resumes_from_its_stored_figures(tmp_path: Path) -> None:
    base = tiny_base(tmp_path)
    store = CalibrationStore(tmp_path / "calibration.json")
    key = signature(str(base), "float32")
    total = len(MEASURED_KINDS) * len(WORKLOADS)
    first = _predictor(tmp_path / "first", base, store.path)
    try:
        assert wait_until(lambda: missing_workloads(store.figures(key)) < total, 600), first.log()
        os.killpg(first.proc.pid, signal.SIGSTOP)  # the predictor and its measurement, frozen
        before = store.figures(key)
        assert missing_workloads(before) > 0, "the measurement finished before it was stopped"
        os.killpg(first.proc.pid, signal.SIGKILL)  # killed half way: no clean stop
        first.proc.wait(60)
    finally:
        first.stop()

    second = _predictor(tmp_path / "second", base, store.path)
    try:
        measured_before = total - missing_workloads(before)
        assert f"({measured_before} of {total} workloads measured)" in _served(second).engine_reason
        assert wait_until(lambda: store.get(key) is not None, 900), second.log()
        after = store.figures(key)
        for kind, figures in before.items():
            for workload, rate in figures.items():
                assert after[kind][workload] == rate  # reused, not measured again
        log = second.log()
        assert f"resuming the engine measurement: {measured_before} of {total}" in log
        measured_again = re.findall(r"calibration: .* (prefill|decode) [0-9.]+ requests/s", log)
        assert len(measured_again) == total - measured_before
    finally:
        second.stop()


@pytest.mark.slow
def test_a_measurement_that_picks_the_other_engine_switches_the_serving_predictor_to_it(
    tmp_path: Path,
) -> None:
    base = tiny_base(tmp_path)
    store = CalibrationStore(tmp_path / "calibration.json")
    key = signature(str(base), "float32")
    # Half measured already, transformers + PEFT far ahead: once vLLM's workloads are
    # measured, transformers + PEFT wins.
    for workload in WORKLOADS:
        store.put_figure(key, EngineKind.TRANSFORMERS, workload, 1e6)
    predictor = _predictor(tmp_path / "p", base, store.path)
    try:
        assert _served(predictor).engine == pb.ENGINE_VLLM
        assert wait_until(lambda: _served(predictor).engine == pb.ENGINE_TRANSFORMERS, 900), (
            predictor.log()
        )
        stored = store.get(key)
        assert stored is not None and stored.winner() is EngineKind.TRANSFORMERS
        served = _served(predictor)
        assert served.engine_reason == stored.reason()
        assert served.dtype == "float32"
        assert _predict(predictor).outputs[0].completion_tokens == 3
    finally:
        predictor.stop()

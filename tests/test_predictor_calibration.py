"""`engine: auto` on a CPU: the engine that serves adapters fastest here, measured once
(in the background, while the predictor serves)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.predictor.engines.base import EngineKind
from loraforge.services.predictor.engines.calibration import (
    Calibration,
    CalibrationStore,
    combined_rate,
    missing_workloads,
    signature,
)
from tests.support import REPO, ServiceProcess, channel, free_port, start_service, wait_until
from tests.test_predictor_helpers import tiny_base


def _predictor(workdir: Path, base: Path, calibration_file: Path, *args: str) -> ServiceProcess:
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
            *args,
        ],
        env={"LORAFORGE_CALIBRATE_ENGINES": "true"},
        timeout=300,
    )


def _served(process: ServiceProcess) -> pb.ServedBaseModel:
    stub = pb_grpc.PredictorServiceStub(channel(process.address))
    (served,) = stub.GetServingInfo(pb.GetServingInfoRequest(), timeout=30).base_models
    return served


def test_the_signature_is_the_model_shape_and_dtype_not_its_folder(tmp_path: Path) -> None:
    base = tiny_base(tmp_path)
    copy = tmp_path / "elsewhere"
    shutil.copytree(base, copy)
    assert signature(str(base), "float32") == signature(str(copy), "float32")
    assert signature(str(base), "float32") != signature(str(base), "bfloat16")
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    assert signature(str(base), "float32") != signature(str(copy), "float32")


def test_a_damaged_calibration_file_is_ignored_and_rewritten(tmp_path: Path) -> None:
    store = CalibrationStore(tmp_path / "calibration.json")
    store.path.write_text("{not json")
    assert store.get("k") is None
    store.put(Calibration("k", {"vllm": 3.0, "transformers": 5.0}, "2026-12-01T00:00:00+00:00"))
    found = store.get("k")
    assert found is not None and found.winner() is EngineKind.TRANSFORMERS
    store.path.write_text(json.dumps({"k": {"requests_per_second": {"llama.cpp": 9}}}))
    assert store.get("k") is None


def test_a_stored_measurement_chooses_the_engine_and_the_serving_info_says_why(
    tmp_path: Path,
) -> None:
    base = tiny_base(tmp_path)
    calibration_file = tmp_path / "calibration.json"
    CalibrationStore(calibration_file).put(
        Calibration(
            signature(str(base), "auto"),
            {"vllm": 1.5, "transformers": 4.25},
            "2026-11-30T10:00:00+00:00",
        )
    )
    predictor = _predictor(tmp_path / "auto", base, calibration_file)
    try:
        served = _served(predictor)
        assert served.engine == pb.ENGINE_TRANSFORMERS
        assert served.engine_reason == (
            "transformers + PEFT serves adapters fastest on this machine (measured "
            "2026-11-30: transformers + PEFT 4.25, vLLM 1.50 requests/s with a LoRA adapter)"
        )
    finally:
        predictor.stop()


def test_an_engine_set_by_the_operator_is_served_whatever_was_measured(tmp_path: Path) -> None:
    base = tiny_base(tmp_path)
    calibration_file = tmp_path / "calibration.json"
    CalibrationStore(calibration_file).put(
        Calibration(signature(str(base), "auto"), {"vllm": 9.0, "transformers": 1.0}, "2026-11-30")
    )
    predictor = _predictor(tmp_path / "forced", base, calibration_file, "--engine", "transformers")
    try:
        served = _served(predictor)
        assert served.engine == pb.ENGINE_TRANSFORMERS
        assert served.engine_reason == "transformers + PEFT, as configured"
    finally:
        predictor.stop()


_PUT_FIGURES = """
import sys
from pathlib import Path
from loraforge.services.predictor.engines.base import EngineKind
from loraforge.services.predictor.engines.calibration import CalibrationStore
store, writer = CalibrationStore(Path(sys.argv[1])), int(sys.argv[2])
for i in range(20):
    kind = (EngineKind.VLLM, EngineKind.TRANSFORMERS)[i % 2]
    store.put_figure(f"shape-{writer}-{i % 5}", kind, ("prefill", "decode")[i // 10], writer + i + 1)
"""


def test_predictors_storing_figures_at_once_lose_none_of_them(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    writers = [
        subprocess.Popen([sys.executable, "-c", _PUT_FIGURES, str(path), str(w)], cwd=REPO)
        for w in range(4)
    ]
    assert [w.wait(120) for w in writers] == [0] * 4
    store = CalibrationStore(path)
    for w in range(4):
        for i in range(20):
            kind = ("vllm", "transformers")[i % 2]
            workload = ("prefill", "decode")[i // 10]
            assert store.figures(f"shape-{w}-{i % 5}")[kind][workload] == w + i + 1
    assert not list(tmp_path.glob("*.tmp"))


def test_figures_stored_per_workload_make_a_calibration_only_when_complete(
    tmp_path: Path,
) -> None:
    store = CalibrationStore(tmp_path / "calibration.json")
    store.put_figure("k", EngineKind.VLLM, "prefill", 4.0)
    store.put_figure("k", EngineKind.VLLM, "decode", 1.0)
    assert store.get("k") is None
    assert missing_workloads(store.figures("k")) == 2
    store.put(Calibration("k", {"vllm": combined_rate({"prefill": 4.0, "decode": 1.0})}, "x"))
    assert store.figures("k")["vllm"] == {"prefill": 4.0, "decode": 1.0}  # kept by put
    found = store.get("k")
    assert found is not None and found.requests_per_second["vllm"] == pytest.approx(1.6)


@pytest.mark.slow
def test_without_a_stored_measurement_vllm_serves_at_once_and_the_faster_once_measured(
    tmp_path: Path,
) -> None:
    base = tiny_base(tmp_path)
    calibration_file = tmp_path / "calibration.json"
    predictor = _predictor(tmp_path / "auto", base, calibration_file, "--dtype", "float32")
    try:
        store = CalibrationStore(calibration_file)
        key = signature(str(base), "float32")
        assert "serving with vLLM meanwhile" in _served(predictor).engine_reason
        assert wait_until(lambda: store.get(key) is not None, 900), predictor.log()
        stored = store.get(key)
        assert stored is not None
        rates = stored.requests_per_second
        assert set(rates) == {"vllm", "transformers"} and min(rates.values()) > 0
        winner = (
            pb.ENGINE_VLLM if rates["vllm"] >= rates["transformers"] else pb.ENGINE_TRANSFORMERS
        )
        # The predictor takes the measurement up (switching engines if vLLM lost).
        assert wait_until(lambda: _served(predictor).engine_reason == stored.reason(), 600), (
            predictor.log()
        )
        assert _served(predictor).engine == winner
        stub = pb_grpc.PredictorServiceStub(channel(predictor.address))
        # The measurement's adapter never reaches the serving engine; the base model answers.
        assert not stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters
        reply = stub.Predict(
            pb.PredictRequest(
                base_model=True,
                inputs=[pb.PredictInput(text="Question: what is 2 plus 2?")],
                params=pb.InferenceParams(max_tokens=3),
            ),
            timeout=60,
        )
        assert reply.outputs[0].completion_tokens == 3
    finally:
        predictor.stop()

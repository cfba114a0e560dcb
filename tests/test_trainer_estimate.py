"""Estimates before training through real gRPC: the examples a run would keep and drop and why,
its tokens and steps (equal to what the run then trains), a time calibrated by real runs, and
the invalid-data tolerance refused before anything is queued."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import REPO, channel, error_details, start_service, wait_until
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/shop"
MODEL = f"{APP}/models/sums"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
GOOD, LONG = 30, 2


@dataclass
class Stack:
    tiny: Path
    stub: pb_grpc.TrainerServiceStub
    dataset_version: str
    worker_env: dict[str, str]
    workdir: Path
    addresses: list[str]  # CLI flags that reach the services


def _examples() -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(GOOD)
    ] + [{"prompt": "Question: count?", "completion": " 1 2 3 4 5" * 40} for _ in range(LONG)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("estimate-stack")
    tiny = build_tiny_model(workdir / "tiny-llama")
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address],
        env=roots,
    )
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="sums"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/sums", file_name="sums.jsonl")
        dstub.UploadInputs(
            iter(
                [dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=_examples())]
            )
        )
        dataset_version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/sums", version_id="v1")
        ).dataset_version.name
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id="sums"))
        env = {
            **os.environ,
            "LORAFORGE_HOME": str(workdir / "home"),
            "LORAFORGE_DATASET_ADDRESS": dataset.address,
            "LORAFORGE_AUTH": "off",
            **roots,
        }
        addresses = ["--dataset-address", dataset.address, "--trainer-address", trainer.address]
        yield Stack(tiny, stub, dataset_version, env, workdir, addresses)
    finally:
        trainer.stop()
        dataset.stop()


def _overrides(stack: Stack, **trainer: Any) -> dict[str, Any]:
    return {
        "model_config": {"pretrained_model_name_or_path": str(stack.tiny)},
        "peft_config": {"r": 4},
        "tokenizer_config": {"model_max_length": 64},
        "trainer_config": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "eval_split_percent": 10,
            "save_steps": 100,
            **trainer,
        },
        "invalid_data_tolerance_percent": 10,
    }


def _estimate(stack: Stack, overrides: dict[str, Any]) -> pb.EstimateModelVersionResponse:
    return stack.stub.EstimateModelVersion(
        pb.EstimateModelVersionRequest(
            parent=MODEL,
            template=TEMPLATE,
            dataset_version=stack.dataset_version,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    )


def test_an_estimate_lists_the_examples_dropped_and_why_and_says_when_it_has_no_time_yet(
    stack: Stack,
) -> None:
    estimate = _estimate(stack, _overrides(stack))
    assert (estimate.examples_total, estimate.examples_kept) == (GOOD + LONG, GOOD)
    assert estimate.examples_dropped == LONG
    assert dict(estimate.dropped_by_code) == {"TOO_LONG": LONG}
    assert all("longer than model_max_length 64" in d.reason for d in estimate.dropped)
    assert all(d.input.startswith(f"{APP}/datasets/sums/inputs/") for d in estimate.dropped)
    assert (estimate.train_examples, estimate.eval_examples) == (27, 3)
    assert estimate.steps == 7 and estimate.epochs == 1  # ceil(27 / 4)
    assert estimate.tokens_per_epoch == estimate.total_tokens > 0
    assert estimate.worker_kind == "cpu"
    assert estimate.estimated_peak_memory_bytes > (stack.tiny / "model.safetensors").stat().st_size
    # No run has measured this model's throughput yet: no time, and the answer says why.
    assert not estimate.HasField("estimated_time")
    assert "no TRAINED run of" in estimate.calibration
    # Nothing was queued.
    listed = stack.stub.ListModelVersions(pb.ListModelVersionsRequest(parent=MODEL))
    assert list(listed.model_versions) == []


def test_a_run_over_the_invalid_data_tolerance_is_refused_before_queueing(stack: Stack) -> None:
    overrides = {**_overrides(stack), "invalid_data_tolerance_percent": 5}  # 2 of 32 is 6.25%
    with pytest.raises(grpc.RpcError) as caught:
        _estimate(stack, overrides)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(caught.value)[0] == "INVALID_DATA_TOLERANCE_EXCEEDED"
    assert "2 of 32 examples (6.2%) are invalid" in (caught.value.details() or "")
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None and b"21119" in b"".join(d.value for d in status.details)


def test_a_chat_prompt_format_for_a_model_without_a_chat_template_is_refused_not_internal(
    stack: Stack,
) -> None:
    overrides = _overrides(stack)
    overrides["tokenizer_config"] = {**overrides["tokenizer_config"], "prompt_format": "chat"}
    with pytest.raises(grpc.RpcError) as caught:
        _estimate(stack, overrides)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no chat template" in (caught.value.details() or "")


def test_a_trained_run_calibrates_the_time_and_trains_the_tokens_and_steps_estimated(
    stack: Stack,
) -> None:
    overrides = _overrides(stack)
    before = _estimate(stack, overrides)
    name = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=MODEL,
            version_id="v1",
            template=TEMPLATE,
            dataset_version=stack.dataset_version,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    ).model_version.name
    with open(stack.workdir / "worker.log", "ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "loraforge.services.trainer.worker", "--poll-seconds", "0.2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=stack.worker_env,
            cwd=REPO,
        )
    try:

        def version() -> pb.ModelVersion:
            return stack.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version

        assert wait_until(lambda: version().state == pb.MODEL_VERSION_STATE_TRAINED, 300), (
            version().failure_reason
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    trained = version()
    # What the run trained is what the estimate said it would.
    assert trained.metrics["global_step"] == before.steps
    assert trained.metrics["train_tokens"] == before.total_tokens
    assert trained.metrics["invalid_examples"] == before.examples_dropped

    after = _estimate(stack, overrides)
    rate = trained.metrics["tokens_per_second"]
    assert after.tokens_per_second == pytest.approx(rate)
    overhead = (
        trained.end_time.ToNanoseconds() - trained.start_time.ToNanoseconds()
    ) / 1e9 - trained.metrics["train_seconds"]
    seconds = after.estimated_time.ToNanoseconds() / 1e9
    assert seconds == pytest.approx(after.total_tokens / rate + overhead, rel=1e-3)
    assert "median of the latest 1 TRAINED run(s)" in after.calibration


def test_cli_train_estimate_prints_the_estimate_and_queues_nothing(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraforge.client.cli import main as cli_main

    args = [*stack.addresses, "train", "shop/sums", "--template", TEMPLATE, "--estimate"]
    args += ["--dataset-version", stack.dataset_version]
    args += ["--set", f"model_config.pretrained_model_name_or_path={stack.tiny}"]
    args += ["--set", "tokenizer_config.model_max_length=64"]
    args += ["--set", "invalid_data_tolerance_percent=10"]
    before = stack.stub.ListModelVersions(pb.ListModelVersionsRequest(parent=MODEL))
    capsys.readouterr()
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "nothing queued" in out and f"{GOOD} of {GOOD + LONG} kept" in out
    assert f"{LONG} TOO_LONG" in out
    after = stack.stub.ListModelVersions(pb.ListModelVersionsRequest(parent=MODEL))
    assert len(after.model_versions) == len(before.model_versions)

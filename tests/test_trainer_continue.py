"""Continue training through real gRPC: a new version that starts from an earlier version's
adapter, with new data and hyperparameters, and the refusals when the base model or the
LoRA shape does not match. Dataset service, trainer and a worker are real processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import json_format, struct_pb2
from safetensors.torch import load_file

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common.objectstore import copy_store_to_tree, open_object_store
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import (
    channel,
    error_details,
    start_service,
    start_worker,
    stop_process,
    wait_until,
)
from tests.tiny_model import TinyModelSpec, build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/shop"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
SOURCE_TARGETS = ["q_proj", "v_proj"]


@dataclass
class Stack:
    workdir: Path
    tiny: Path
    other_tiny: Path
    stub: pb_grpc.TrainerServiceStub
    trainer_address: str
    dataset_address: str
    datasets: dict[str, str]
    source: str
    cancelled: str

    def objects_dir(self) -> str:
        return str(self.workdir / "home" / "objects")


def _examples(n: int, times: int) -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} times {times}? Answer:", "completion": f" {i * times}"}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(value, struct_pb2.Struct())


def _wait(stub: pb_grpc.TrainerServiceStub, name: str) -> pb.ModelVersion:
    def done() -> bool:
        state = stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version.state
        return state in (
            pb.MODEL_VERSION_STATE_TRAINED,
            pb.MODEL_VERSION_STATE_FAILED,
            pb.MODEL_VERSION_STATE_CANCELLED,
        )

    assert wait_until(done, 300), f"{name} did not finish"
    version = stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version
    assert version.state == pb.MODEL_VERSION_STATE_TRAINED, version.failure_reason
    return version


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("continue-stack")
    tiny = build_tiny_model(workdir / "tiny-llama")
    other = build_tiny_model(workdir / "other-llama", TinyModelSpec(seed=1))
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address],
        env=roots,
    )
    worker: subprocess.Popen[bytes] | None = None
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="elsewhere"))
        datasets = {}
        for name, times in (("doubles", 2), ("triples", 3)):
            dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id=name))
            header = dpb.UploadHeader(dataset=f"{APP}/datasets/{name}", file_name="x.jsonl")
            dstub.UploadInputs(
                iter(
                    [
                        dpb.UploadInputsRequest(header=header),
                        dpb.UploadInputsRequest(chunk=_examples(24, times)),
                    ]
                )
            )
            datasets[name] = dstub.CreateDatasetVersion(
                dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/{name}", version_id="v1")
            ).dataset_version.name
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        for model in ("sums", "pending"):
            stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id=model))
        overrides = _struct(
            {
                "model_config": {"pretrained_model_name_or_path": str(tiny)},
                "peft_config": {"r": 4, "target_modules": SOURCE_TARGETS},
                "tokenizer_config": {"model_max_length": 64},
                "trainer_config": {
                    "max_steps": 6,
                    "logging_steps": 3,
                    "save_steps": 100,
                    "per_device_train_batch_size": 4,
                    "learning_rate": 3e-2,
                    "eval_split_percent": 0,
                },
            }
        )
        source, cancelled = (
            stub.CreateModelVersion(
                pb.CreateModelVersionRequest(
                    parent=f"{APP}/models/{model}",
                    version_id="v1",
                    template=TEMPLATE,
                    dataset_version=datasets["doubles"],
                    param_overrides=overrides,
                )
            ).model_version.name
            for model in ("sums", "pending")
        )
        stub.CancelModelVersion(pb.CancelModelVersionRequest(name=cancelled))
        worker = start_worker(workdir, dataset.address, env=roots)
        _wait(stub, source)
        yield Stack(
            workdir,
            tiny,
            other,
            stub,
            trainer.address,
            dataset.address,
            datasets,
            source,
            cancelled,
        )
    finally:
        stop_process(worker)
        trainer.stop()
        dataset.stop()


def _continue(stack: Stack, version_id: str, overrides: dict[str, Any], **fields: Any) -> Any:
    fields = {
        "from_model_version": stack.source,
        "dataset_version": stack.datasets["triples"],
        **fields,
    }
    request = pb.CreateModelVersionRequest(
        parent=f"{APP}/models/sums",
        version_id=version_id,
        param_overrides=_struct(overrides),
        **fields,
    )
    return stack.stub.CreateModelVersion(request).model_version


def _lora_weights(stack: Stack, adapter_prefix: str, dest: Path) -> dict[str, torch.Tensor]:
    copy_store_to_tree(open_object_store(stack.objects_dir()), adapter_prefix, dest)
    return load_file(str(dest / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def continued(stack: Stack) -> pb.ModelVersion:
    """A version continued from the source on new data, with a learning rate so small that
    training barely moves the weights: they stay the source's."""
    created = _continue(stack, "v2", {"trainer_config": {"learning_rate": 1e-8, "max_steps": 3}})
    assert created.from_model_version == stack.source
    return _wait(stack.stub, created.name)


def test_a_continued_version_starts_from_the_earlier_adapter_with_new_data_and_parameters(
    stack: Stack, continued: pb.ModelVersion, tmp_path: Path
) -> None:
    source = stack.stub.GetModelVersion(pb.GetModelVersionRequest(name=stack.source)).model_version
    assert continued.from_model_version == stack.source
    assert continued.template == TEMPLATE  # the source's, since the request named none
    assert continued.dataset_version == stack.datasets["triples"]
    params = json_format.MessageToDict(continued.params)
    # The source's parameters, changed where the request says.
    assert params["peft_config"]["r"] == 4
    assert params["peft_config"]["target_modules"] == SOURCE_TARGETS
    assert params["model_config"]["pretrained_model_name_or_path"] == str(stack.tiny)
    assert params["trainer_config"]["learning_rate"] == 1e-8
    assert params["trainer_config"]["max_steps"] == 3

    before = _lora_weights(stack, source.artifacts.adapter_prefix, tmp_path / "source")
    after = _lora_weights(stack, continued.artifacts.adapter_prefix, tmp_path / "continued")
    assert after.keys() == before.keys()
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and all(before[k].abs().max() > 1e-3 for k in lora_b)  # a fresh B is zero
    for key, tensor in before.items():
        assert torch.allclose(after[key], tensor, atol=1e-5), key
    logs = stack.stub.GetModelVersionLogs(pb.GetModelVersionLogsRequest(name=continued.name))
    assert any(f"starting from the adapter of {stack.source}" in e.log.message for e in logs.events)
    manifest = json.loads((tmp_path / "continued" / "manifest.json").read_text())
    assert manifest["from_model_version"] == stack.source
    assert manifest["dataset_version"] == stack.datasets["triples"]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"peft_config": {"r": 16}}, "param_overrides.peft_config.r", ["r 4", "is 16"]),
        (
            {"peft_config": {"target_modules": ["q_proj"]}},
            "param_overrides.peft_config.target_modules",
            ["['q_proj', 'v_proj']", "['q_proj']"],
        ),
    ],
)
def test_continuing_with_another_lora_shape_is_refused_naming_the_parameter(
    stack: Stack, overrides: dict[str, Any], field: str, words: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _continue(stack, "shape", overrides)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = error_details(caught.value)
    assert reason == "LORA_SHAPE_MISMATCH"
    assert list(fields) == [field]
    for word in words:
        assert word in fields[field]
    assert f"cannot continue from {stack.source}" in (caught.value.details() or "")
    _assert_not_queued(stack, "shape")


def test_continuing_on_another_base_model_is_refused_naming_both(stack: Stack) -> None:
    other = {"model_config": {"pretrained_model_name_or_path": str(stack.other_tiny)}}
    with pytest.raises(grpc.RpcError) as caught:
        _continue(stack, "base", other)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, fields = error_details(caught.value)
    assert reason == "BASE_MODEL_MISMATCH"
    description = fields["param_overrides.model_config.pretrained_model_name_or_path"]
    assert str(stack.tiny.resolve()) in description and str(stack.other_tiny) in description
    _assert_not_queued(stack, "base")


@pytest.mark.parametrize(
    ("source", "code", "reason"),
    [
        ("cancelled", grpc.StatusCode.FAILED_PRECONDITION, "SOURCE_NOT_TRAINED"),
        (f"{APP}/models/sums/versions/nope", grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND"),
        ("apps/elsewhere/models/m/versions/v1", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        ("sums/v1", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME"),
    ],
)
def test_continuing_from_a_version_that_cannot_be_continued_is_refused(
    stack: Stack, source: str, code: grpc.StatusCode, reason: str
) -> None:
    name = stack.cancelled if source == "cancelled" else source
    with pytest.raises(grpc.RpcError) as caught:
        _continue(stack, "bad-source", {}, from_model_version=name)
    assert caught.value.code() == code
    assert error_details(caught.value)[0] == reason
    assert "from_model_version" in (caught.value.details() or "")
    _assert_not_queued(stack, "bad-source")


def _assert_not_queued(stack: Stack, version_id: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetModelVersion(
            pb.GetModelVersionRequest(name=f"{APP}/models/sums/versions/{version_id}")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_train_continues_from_a_version_with_its_template_and_parameters(
    stack: Stack,
) -> None:
    from loraforge.client.cli import main as cli_main

    args = ["--trainer-address", stack.trainer_address, "--dataset-address", stack.dataset_address]
    args += ["train", "shop/sums", "--no-watch"]
    args += ["--from-version", "shop/sums/v1", "--id", "from-cli"]
    args += ["--dataset-version", stack.datasets["triples"], "--set", "trainer_config.max_steps=2"]
    assert cli_main(args) == 0
    name = f"{APP}/models/sums/versions/from-cli"
    version = stack.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version
    assert (version.from_model_version, version.template) == (stack.source, TEMPLATE)
    params = json_format.MessageToDict(version.params)
    assert params["peft_config"]["r"] == 4 and params["trainer_config"]["max_steps"] == 2
    stack.stub.CancelModelVersion(pb.CancelModelVersionRequest(name=name))


def test_a_run_continued_from_a_version_deleted_before_it_trains_still_starts_from_it(
    stack: Stack, continued: pb.ModelVersion, tmp_path: Path
) -> None:
    before = _lora_weights(stack, continued.artifacts.adapter_prefix, tmp_path / "before")
    chained = _continue(
        stack,
        "v3",
        {"trainer_config": {"max_steps": 2}},
        from_model_version=continued.name,
        dataset_version=stack.datasets["doubles"],
    )
    # The run has its own copy of the adapter: deleting the version does not break it.
    stack.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=continued.name))
    trained = _wait(stack.stub, chained.name)
    assert trained.from_model_version == continued.name
    after = _lora_weights(stack, trained.artifacts.adapter_prefix, tmp_path / "after")
    for key, tensor in before.items():
        assert torch.allclose(after[key], tensor, atol=1e-5), key


def test_the_worker_refuses_an_adapter_to_continue_from_that_has_another_shape(
    tmp_path: Path,
) -> None:
    from loraforge.services.trainer import templates as tpl
    from loraforge.services.trainer import training
    from tests.test_predictor_helpers import make_adapter

    base = build_tiny_model(tmp_path / "tiny-llama")
    adapter = make_adapter(base, tmp_path / "r8", seed=0, r=8, targets=SOURCE_TARGETS)
    params = tpl.resolve_params(
        tpl.get_template(TEMPLATE),
        {
            "model_config": {"pretrained_model_name_or_path": str(base)},
            "peft_config": {"r": 4, "target_modules": SOURCE_TARGETS},
        },
    )
    with pytest.raises(training.TrainingError, match=r"has r 8 .* this run r 4"):
        training.load_model(params, init_adapter=adapter)

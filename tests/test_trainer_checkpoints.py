"""Checkpoints as resources through real gRPC: listed with step, epoch and losses, exported
and continued from by name. Dataset service, trainer and a worker are real processes."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
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
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/shop"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"


@dataclass
class Stack:
    workdir: Path
    trainer_address: str
    stub: pb_grpc.TrainerServiceStub
    dataset_version: str
    version: pb.ModelVersion
    overrides: dict[str, Any]  # the first run's parameters


def _examples(n: int) -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _wait(stub: pb_grpc.TrainerServiceStub, name: str) -> pb.ModelVersion:
    final = (
        pb.MODEL_VERSION_STATE_TRAINED,
        pb.MODEL_VERSION_STATE_FAILED,
        pb.MODEL_VERSION_STATE_CANCELLED,
    )

    def get() -> pb.ModelVersion:
        return stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version

    assert wait_until(lambda: get().state in final, 300), f"{name} did not finish"
    version = get()
    assert version.state == pb.MODEL_VERSION_STATE_TRAINED, version.failure_reason
    return version


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("checkpoint-stack")
    tiny = build_tiny_model(workdir / "tiny-llama")
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
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="sums"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/sums", file_name="sums.jsonl")
        dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=_examples(24)),
                ]
            )
        )
        dataset_version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/sums", version_id="v1")
        ).dataset_version.name
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id="sums"))
        overrides = {
            "model_config": {"pretrained_model_name_or_path": str(tiny)},
            "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "tokenizer_config": {"model_max_length": 64},
            "trainer_config": {
                "max_steps": 6,
                "logging_steps": 1,
                "save_steps": 2,
                "save_total_limit": 2,
                "per_device_train_batch_size": 4,
                "learning_rate": 3e-2,
                "eval_split_percent": 0,
            },
        }
        name = stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"{APP}/models/sums",
                version_id="v1",
                template=TEMPLATE,
                dataset_version=dataset_version,
                param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
            )
        ).model_version.name
        worker = start_worker(workdir, dataset.address, env=roots)
        yield Stack(workdir, trainer.address, stub, dataset_version, _wait(stub, name), overrides)
    finally:
        stop_process(worker)
        trainer.stop()
        dataset.stop()


def _checkpoints(stack: Stack) -> list[pb.Checkpoint]:
    return list(
        stack.stub.ListCheckpoints(pb.ListCheckpointsRequest(parent=stack.version.name)).checkpoints
    )


def _weights(stack: Stack, prefix: str, dest: Path) -> dict[str, torch.Tensor]:
    copy_store_to_tree(open_object_store(str(stack.workdir / "home" / "objects")), prefix, dest)
    return load_file(str(dest / "adapter_model.safetensors"))


def test_a_runs_last_checkpoints_are_listed_with_step_epoch_and_losses(stack: Stack) -> None:
    found = _checkpoints(stack)
    # Saved every 2 steps, the last 2 kept (trainer_config.save_total_limit).
    assert [c.step for c in found] == [4, 6]
    assert [c.name for c in found] == [f"{stack.version.name}/checkpoints/{s}" for s in (4, 6)]
    for c in found:
        assert c.epoch > 0 and c.HasField("train_loss") and not c.HasField("eval_loss")
        assert c.create_time.seconds > 0
    assert found[0].epoch < found[1].epoch
    # A page at a time, as every list.
    first = stack.stub.ListCheckpoints(
        pb.ListCheckpointsRequest(parent=stack.version.name, page_size=1)
    )
    assert [c.step for c in first.checkpoints] == [4] and first.next_page_token
    rest = stack.stub.ListCheckpoints(
        pb.ListCheckpointsRequest(
            parent=stack.version.name, page_size=1, page_token=first.next_page_token
        )
    )
    assert [c.step for c in rest.checkpoints] == [6] and not rest.next_page_token


def test_a_checkpoint_exports_as_its_own_adapter_with_a_manifest(
    stack: Stack, tmp_path: Path
) -> None:
    name = f"{stack.version.name}/checkpoints/4"
    responses = stack.stub.ExportModelVersion(pb.ExportModelVersionRequest(name=name))
    info = next(responses).info
    data = b"".join(r.chunk for r in responses)
    assert info.file_name == "sums-v1-step4-adapter.tar"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "sums-v1-step4-adapter"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["checkpoint"], manifest["global_step"]) == (name, 4)
    assert manifest["model_version"] == stack.version.name
    assert manifest["metrics"]["step"] == 4 and "train_loss" in manifest["metrics"]
    exported = load_file(str(folder / "adapter_model.safetensors"))
    # Step 4's weights, not the final adapter's.
    final = _weights(stack, stack.version.artifacts.adapter_prefix, tmp_path / "final")
    assert exported.keys() == final.keys()
    assert any(not torch.equal(exported[k], final[k]) for k in final)
    # The last checkpoint is the final adapter.
    last = _weights(stack, f"trainer/{stack.version.name}/checkpoints/checkpoint-6", tmp_path / "6")
    assert all(torch.equal(last[k], final[k]) for k in final)


def test_a_run_continues_from_a_checkpoint_by_its_name(stack: Stack, tmp_path: Path) -> None:
    name = f"{stack.version.name}/checkpoints/4"
    overrides: dict[str, Any] = {"trainer_config": {"learning_rate": 1e-8, "max_steps": 2}}
    created = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=f"{APP}/models/sums",
            version_id="from-step-4",
            dataset_version=stack.dataset_version,
            from_model_version=name,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    ).model_version
    assert created.from_model_version == name
    trained = _wait(stack.stub, created.name)
    before = _weights(
        stack, f"trainer/{stack.version.name}/checkpoints/checkpoint-4", tmp_path / "a"
    )
    after = _weights(stack, trained.artifacts.adapter_prefix, tmp_path / "b")
    for key, tensor in before.items():
        assert torch.allclose(after[key], tensor, atol=1e-5), key


@pytest.mark.parametrize(
    ("suffix", "code", "words"),
    [
        ("checkpoints/2", grpc.StatusCode.NOT_FOUND, "has are: 4, 6"),
        ("checkpoints/last", grpc.StatusCode.INVALID_ARGUMENT, "named by its step"),
    ],
)
def test_a_checkpoint_that_is_gone_or_misnamed_is_refused_saying_which_exist(
    stack: Stack, suffix: str, code: grpc.StatusCode, words: str
) -> None:
    name = f"{stack.version.name}/{suffix}"
    with pytest.raises(grpc.RpcError) as caught:
        next(stack.stub.ExportModelVersion(pb.ExportModelVersionRequest(name=name)))
    assert caught.value.code() == code
    assert words in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as continued:
        stack.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"{APP}/models/sums",
                version_id="refused",
                dataset_version=stack.dataset_version,
                from_model_version=name,
            )
        )
    assert continued.value.code() == code
    if code == grpc.StatusCode.NOT_FOUND:
        assert error_details(continued.value)[0] == "CHECKPOINT_NOT_FOUND"


def test_client_and_cli_list_and_export_checkpoints_by_short_name(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loraforge.client import Client
    from loraforge.client.cli import main as cli_main

    with Client(trainer=stack.trainer_address) as client:
        assert [c.step for c in client.checkpoints("shop/sums/v1")] == [4, 6]
        path, info = client.export("shop/sums/v1@6", tmp_path)
    assert path.name == "sums-v1-step6-adapter.tar" == info.file_name
    capsys.readouterr()
    assert (
        cli_main(["--trainer-address", stack.trainer_address, "checkpoints", "shop/sums/v1"]) == 0
    )
    out = capsys.readouterr().out
    steps = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert [s for s in steps if s] == ["4", "6"]


def test_early_stopping_ends_a_run_whose_eval_loss_stops_improving_and_keeps_the_best(
    stack: Stack, tmp_path: Path
) -> None:
    trainer_config = {
        **stack.overrides["trainer_config"],
        "max_steps": 40,
        "learning_rate": 0.5,  # far too high: the eval loss soon gets worse
        "eval_split_percent": 25,
        "save_steps": 2,
        "save_total_limit": 1,
        "early_stopping_patience": 2,
        "adapter_checkpoint": "best",
    }
    overrides = {**stack.overrides, "trainer_config": trainer_config}
    created = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=f"{APP}/models/sums",
            version_id="early",
            dataset_version=stack.dataset_version,
            template=TEMPLATE,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    ).model_version
    trained = _wait(stack.stub, created.name)
    # Evaluated at every checkpoint (2, 4, 6): 4 and 6 did not beat 2, so it stopped at 6.
    assert trained.metrics["early_stopped"] == 1
    assert trained.metrics["global_step"] == 6 < trainer_config["max_steps"]
    logs = stack.stub.GetModelVersionLogs(pb.GetModelVersionLogsRequest(name=trained.name))
    assert any("early stopping at step 6" in e.log.message for e in logs.events)
    found = list(
        stack.stub.ListCheckpoints(pb.ListCheckpointsRequest(parent=trained.name)).checkpoints
    )
    # The last one and, though save_total_limit is 1, the best one.
    assert [c.step for c in found] == [2, 6]
    assert found[0].eval_loss < found[1].eval_loss
    assert trained.metrics["adapter_step"] == 2
    adapter = _weights(stack, trained.artifacts.adapter_prefix, tmp_path / "adapter")
    best = _weights(stack, f"trainer/{trained.name}/checkpoints/checkpoint-2", tmp_path / "2")
    assert all(torch.equal(adapter[k], best[k]) for k in best)


@pytest.mark.parametrize("name", ["early_stopping_patience", "adapter_checkpoint"])
def test_judging_by_eval_loss_without_an_evaluation_split_is_refused(
    stack: Stack, name: str
) -> None:
    value = 2 if name == "early_stopping_patience" else "best"
    trainer_config = {**stack.overrides["trainer_config"], name: value}
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"{APP}/models/sums",
                version_id="no-eval",
                dataset_version=stack.dataset_version,
                template=TEMPLATE,
                param_overrides=json_format.ParseDict(
                    {**stack.overrides, "trainer_config": trainer_config}, struct_pb2.Struct()
                ),
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = error_details(caught.value)[1]
    assert (
        "set trainer_config.eval_split_percent above 0"
        in (fields[f"param_overrides.trainer_config.{name}"])
    )


def test_each_checkpoint_records_the_scores_of_its_answers_to_held_out_examples(
    stack: Stack,
) -> None:
    trainer_config = {
        **stack.overrides["trainer_config"],
        "max_steps": 4,
        "eval_split_percent": 25,
        "save_steps": 2,
        "eval_generate_examples": 4,
        "eval_max_new_tokens": 4,
    }
    overrides = {**stack.overrides, "trainer_config": trainer_config}
    created = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=f"{APP}/models/sums",
            version_id="scored",
            dataset_version=stack.dataset_version,
            template=TEMPLATE,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    ).model_version
    trained = _wait(stack.stub, created.name)
    found = list(
        stack.stub.ListCheckpoints(pb.ListCheckpointsRequest(parent=trained.name)).checkpoints
    )
    assert [c.step for c in found] == [2, 4]
    for checkpoint in found:
        assert {"exact_match", "rouge1", "rouge2", "rougeL", "bleu"} <= set(checkpoint.eval_scores)
        assert 0.0 <= checkpoint.eval_scores["exact_match"] <= 1.0
    # The adapter is the last step's, so its scores are the last checkpoint's.
    final = {k[len("eval_") :]: v for k, v in trained.metrics.items() if k.startswith("eval_")}
    assert all(final[k] == pytest.approx(v) for k, v in found[-1].eval_scores.items())
    logs = stack.stub.GetModelVersionLogs(pb.GetModelVersionLogsRequest(name=trained.name))
    assert any("held-out answers at step 2" in e.log.message for e in logs.events)


def test_held_out_answers_need_an_evaluation_split_and_completion_only_loss(
    stack: Stack,
) -> None:
    for extra, needed in [
        ({"eval_split_percent": 0}, "eval_split_percent above 0"),
        ({"eval_split_percent": 25, "completion_only_loss": False}, "completion_only_loss"),
    ]:
        trainer_config = {
            **stack.overrides["trainer_config"],
            "eval_generate_examples": 4,
            **extra,
        }
        with pytest.raises(grpc.RpcError) as caught:
            stack.stub.CreateModelVersion(
                pb.CreateModelVersionRequest(
                    parent=f"{APP}/models/sums",
                    version_id="unscored",
                    dataset_version=stack.dataset_version,
                    template=TEMPLATE,
                    param_overrides=json_format.ParseDict(
                        {**stack.overrides, "trainer_config": trainer_config}, struct_pb2.Struct()
                    ),
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = error_details(caught.value)[1]
        assert needed in fields["param_overrides.trainer_config.eval_generate_examples"]


def test_held_out_answers_are_scored_against_the_completion_after_the_prompt(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.services.trainer.training import (
        IGNORE_INDEX,
        Feature,
        PackedRow,
        held_out_answers,
        score_answers,
    )

    folder = build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("what is 2 plus 2?", add_special_tokens=False)["input_ids"]
    greedy = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    other = [t for t in tokenizer(" elsewhere", add_special_tokens=False)["input_ids"]]
    mask = [IGNORE_INDEX] * len(prompt)
    right = Feature(prompt + greedy, mask + greedy)
    wrong = Feature(prompt + other, mask + other)
    text = Feature(prompt, list(prompt))  # a plain text: no prompt to answer
    found = held_out_answers([text, PackedRow([right, wrong])], limit=5)
    assert found == [(prompt, greedy), (prompt, other)]
    assert held_out_answers([right, wrong], limit=1) == [(prompt, greedy)]
    model.train()  # as the Trainer has it at a save
    scores = score_answers(model, tokenizer, found, max_new_tokens=3)
    assert scores["exact_match"] == pytest.approx(0.5)  # the greedy answer, and another
    assert model.training  # handed back to training as it was


def _create(stack: Stack, version_id: str, trainer_config: dict[str, Any], **kw: str) -> str:
    overrides = {
        **stack.overrides,
        "trainer_config": {**stack.overrides["trainer_config"], **trainer_config},
    }
    if "from_model_version" in kw:
        overrides = {"trainer_config": trainer_config}
    return str(
        stack.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"{APP}/models/sums",
                version_id=version_id,
                dataset_version=stack.dataset_version,
                template="" if "from_model_version" in kw else TEMPLATE,
                param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
                **kw,
            )
        ).model_version.name
    )


def test_a_cancelled_run_keeps_its_checkpoints_to_export_and_continue_from(
    stack: Stack, tmp_path: Path
) -> None:
    name = _create(stack, "cancelled", {"max_steps": 100000, "save_steps": 2})

    def saved() -> list[pb.Checkpoint]:
        return list(stack.stub.ListCheckpoints(pb.ListCheckpointsRequest(parent=name)).checkpoints)

    assert wait_until(lambda: bool(saved()), 300), "the run saved no checkpoint"
    stack.stub.CancelModelVersion(pb.CancelModelVersionRequest(name=name))
    # The one worker trains the next run only once it has stopped the cancelled one.
    _wait(stack.stub, _create(stack, "after-cancel", {"max_steps": 2}))
    kept = saved()
    assert kept, "cancelling the run deleted its checkpoints"
    last = kept[-1]
    info = next(stack.stub.ExportModelVersion(pb.ExportModelVersionRequest(name=last.name))).info
    assert info.file_name == f"sums-cancelled-step{last.step}-adapter.tar"
    continued = _wait(
        stack.stub,
        _create(stack, "from-cancelled", {"max_steps": 2}, from_model_version=last.name),
    )
    assert continued.from_model_version == last.name
    # A step it never reached is missing because the run stopped, not because of rotation.
    reached = stack.stub.GetModelVersion(
        pb.GetModelVersionRequest(name=name)
    ).model_version.progress.step
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.GetCheckpoint(
            pb.GetCheckpointRequest(name=f"{name}/checkpoints/{reached + 1000}")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details() or ""
    assert f"the run stopped at step {reached} (CANCELLED)" in details
    assert "save_total_limit" not in details
    # Deleting the version deletes its checkpoints.
    stack.stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=name))
    store = open_object_store(str(stack.workdir / "home" / "objects"))
    assert not list(store.list(f"trainer/{name}/"))


def test_a_checkpoint_removed_by_rotation_or_never_saved_says_which(stack: Stack) -> None:
    for step, words in [
        (2, "removed when newer ones were saved: the run keeps its last 2"),
        (3, "saves one every 2 steps (trainer_config.save_steps) and at its last step"),
    ]:
        name = f"{stack.version.name}/checkpoints/{step}"
        with pytest.raises(grpc.RpcError) as caught:
            stack.stub.GetCheckpoint(pb.GetCheckpointRequest(name=name))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert words in (caught.value.details() or "")

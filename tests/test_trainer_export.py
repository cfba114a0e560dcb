"""Exports through real gRPC: a trained version's adapter (and a merged full model) as one
streamed archive, loaded with plain PEFT / transformers, answering as the predictor does.

One stack for the module: dataset, trainer and a worker train a LoRA adapter of the tiny
Llama; a predictor (transformers + PEFT, float32) serves it.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.client import Client
from loraforge.client.cli import main as cli_main
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as ppb_grpc
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import (
    ServiceProcess,
    channel,
    error_details,
    start_service,
    start_worker,
    stop_process,
    wait_until,
)
from tests.test_predictor_helpers import peft_greedy, tiny_base

pytestmark = pytest.mark.slow

APP = "apps/shop"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
PROMPT = "Question: what is 3 plus 3? Answer:"
MAX_TOKENS = 8


@dataclass
class Stack:
    workdir: Path
    base: Path
    dataset_address: str
    trainer: ServiceProcess
    trainer_stub: tpb_grpc.TrainerServiceStub
    predictor: ppb_grpc.PredictorServiceStub
    version: str
    cancelled: str


def _examples(n: int) -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _overrides(base: Path) -> struct_pb2.Struct:
    return json_format.ParseDict(
        {
            "model_config": {"pretrained_model_name_or_path": str(base), "torch_dtype": "float32"},
            "peft_config": {"r": 8},
            "tokenizer_config": {"model_max_length": 64, "prompt_format": "raw"},
            "trainer_config": {
                "max_steps": 8,
                "logging_steps": 4,
                "save_steps": 100,
                "per_device_train_batch_size": 4,
                "learning_rate": 3e-2,
                "seed": 1,
            },
        },
        struct_pb2.Struct(),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("export-stack")
    base = tiny_base(workdir)
    started: list[ServiceProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    try:
        dataset = start_service("loraforge.services.dataset", workdir)
        started.append(dataset)
        trainer = start_service(
            "loraforge.services.trainer",
            workdir,
            args=["--dataset-address", dataset.address],
            # The operator's setting that lets runs name the tiny model built under `workdir`.
            env=roots,
        )
        started.append(trainer)
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="sums"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/sums", file_name="sums.jsonl")
        dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=_examples(32)),
                ]
            )
        )
        dataset_version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/sums", version_id="v1")
        ).dataset_version.name
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        versions = {}
        for model in ("adder", "pending"):
            tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id=model))
            versions[model] = tstub.CreateModelVersion(
                tpb.CreateModelVersionRequest(
                    parent=f"{APP}/models/{model}",
                    version_id="v1",
                    template=TEMPLATE,
                    dataset_version=dataset_version,
                    param_overrides=_overrides(base),
                )
            ).model_version.name
            if model == "pending":  # cancelled before any worker runs: never TRAINED
                tstub.CancelModelVersion(tpb.CancelModelVersionRequest(name=versions[model]))
        worker = start_worker(workdir, dataset.address, env=roots)
        # The predictor starts while the worker trains.
        predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            args=[
                *("--base-model", str(base), "--trainer-address", trainer.address),
                *("--engine", "transformers", "--dtype", "float32", "--max-lora-rank", "8"),
            ],
            timeout=300,
        )
        started.append(predictor)

        def trained() -> bool:
            mv = tstub.GetModelVersion(tpb.GetModelVersionRequest(name=versions["adder"]))
            assert mv.model_version.state != tpb.MODEL_VERSION_STATE_FAILED, (
                mv.model_version.failure_reason
            )
            return mv.model_version.state == tpb.MODEL_VERSION_STATE_TRAINED

        assert wait_until(trained, 300), f"{versions['adder']} did not train"
        yield Stack(
            workdir,
            base,
            dataset.address,
            trainer,
            tstub,
            ppb_grpc.PredictorServiceStub(channel(predictor.address)),
            versions["adder"],
            versions["pending"],
        )
    finally:
        stop_process(worker)
        for service in reversed(started):
            service.stop()


def _export(stack: Stack, name: str, merged: bool) -> tuple[tpb.ExportInfo, bytes, int]:
    """The info, the archive's bytes and how many chunk messages carried them."""
    responses = stack.trainer_stub.ExportModelVersion(
        tpb.ExportModelVersionRequest(name=name, merged=merged), timeout=600
    )
    first = next(responses)
    assert first.WhichOneof("payload") == "info"
    chunks = [r.chunk for r in responses]
    assert all(chunks)
    return first.info, b"".join(chunks), len(chunks)


def _extract(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        assert len(tops) == 1, tops
        tar.extractall(dest, filter="data")
    return dest / tops.pop()


def _predictor_greedy(stack: Stack) -> ppb.PredictOutput:
    response = stack.predictor.Predict(
        ppb.PredictRequest(
            model=stack.version,
            inputs=[ppb.PredictInput(text=PROMPT)],
            params=ppb.InferenceParams(max_tokens=MAX_TOKENS, temperature=0.0),
        ),
        timeout=120,
    )
    return response.outputs[0]


def test_an_exported_adapter_loaded_with_plain_peft_answers_as_the_predictor_does(
    stack: Stack, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    info, data, chunks = _export(stack, stack.version, merged=False)
    assert info.file_name == "adder-v1-adapter.tar"
    assert (info.size_bytes, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert chunks >= 1
    assert [f.rsplit("/", 1)[1] for f in info.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    folder = _extract(data, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert json_format.MessageToDict(info.manifest) == manifest
    assert manifest["model_version"] == stack.version
    assert manifest["base_model"] == str(stack.base.resolve())
    assert manifest["template"] == TEMPLATE
    assert manifest["dataset_version"] == f"{APP}/datasets/sums/versions/v1"
    assert manifest["params"]["peft_config"]["r"] == 8
    assert manifest["global_step"] == 8 and "train_loss" in manifest["metrics"]
    assert manifest["merged"] is False

    served = _predictor_greedy(stack)
    tokenizer = AutoTokenizer.from_pretrained(stack.base)
    ids = tokenizer(PROMPT)["input_ids"]
    expected = peft_greedy(stack.base, folder, ids, served.completion_tokens)
    assert served.text == tokenizer.decode(expected, skip_special_tokens=True)
    # The adapter changed the model: the base model alone answers otherwise.
    assert expected != peft_greedy(stack.base, None, ids, served.completion_tokens)


def test_a_merged_export_is_a_full_model_that_answers_as_the_adapter_does(
    stack: Stack, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info, data, _ = _export(stack, stack.version, merged=True)
    assert info.file_name == "adder-v1-merged.tar"
    names = {f.rsplit("/", 1)[1] for f in info.files}
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    folder = _extract(data, tmp_path)
    assert json.loads((folder / "manifest.json").read_text())["merged"] is True

    served = _predictor_greedy(stack)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert not any("lora_" in name for name, _ in model.named_parameters())
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=served.completion_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
    assert served.text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("merged", [False, True])
def test_exporting_a_version_that_never_trained_is_refused_with_its_state(
    stack: Stack, merged: bool
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _export(stack, stack.cancelled, merged)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is CANCELLED, so it has no adapter to export" in (caught.value.details() or "")
    assert error_details(caught.value)[0] == "VERSION_NOT_TRAINED"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (f"{APP}/models/adder/versions/nope", grpc.StatusCode.NOT_FOUND),
        ("adder/v1", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_exporting_a_missing_or_malformed_name_says_so(
    stack: Stack, name: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _export(stack, name, merged=False)
    assert caught.value.code() == code


def test_client_and_cli_download_the_archive_and_check_it(stack: Stack, tmp_path: Path) -> None:
    with Client(trainer=stack.trainer.address) as client:
        path, info = client.export("shop/adder/v1", tmp_path)
    assert path == tmp_path / "adder-v1-adapter.tar"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256

    out = tmp_path / "cli" / "mine.tar"
    out.parent.mkdir()
    cli = ["--trainer-address", stack.trainer.address, "export", "shop/adder/v1"]
    assert cli_main([*cli, "-o", str(out)]) == 0
    with tarfile.open(out) as tar:
        assert [m.name for m in tar.getmembers()] == list(info.files)
    assert [p.name for p in out.parent.iterdir()] == ["mine.tar"]  # no partial file is left
    assert cli_main([*cli[:2], "export", "shop/pending/v1", "-o", str(out)]) == 1


def test_a_merge_that_runs_past_the_trainers_limit_is_stopped_and_says_so(stack: Stack) -> None:
    # A second trainer on the same database and objects, with a limit no merge can meet.
    hurried = start_service(
        "loraforge.services.trainer",
        stack.workdir,
        args=["--dataset-address", stack.dataset_address, "--merge-timeout-seconds", "0.2"],
        env={"LORAFORGE_MODEL_ROOTS": f"tests={stack.workdir}"},
        name="hurried-trainer",
    )
    try:
        stub = tpb_grpc.TrainerServiceStub(channel(hurried.address))
        with pytest.raises(grpc.RpcError) as caught:
            next(
                stub.ExportModelVersion(
                    tpb.ExportModelVersionRequest(name=stack.version, merged=True)
                )
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "took longer than 0.2 s" in (caught.value.details() or "")
        assert error_details(caught.value)[0] == "MERGE_TIMEOUT"
        # Nothing of the stopped merge is left behind.
        assert not list((stack.workdir / "home" / "exports").glob("export-*"))
    finally:
        hurried.stop()


def test_the_predictor_serves_a_checkpoint_by_its_name(stack: Stack) -> None:
    listed = stack.trainer_stub.ListCheckpoints(tpb.ListCheckpointsRequest(parent=stack.version))
    last = listed.checkpoints[-1]
    assert last.step == 8  # the final step is saved too
    got = stack.trainer_stub.GetCheckpoint(tpb.GetCheckpointRequest(name=last.name)).checkpoint
    assert got.adapter_prefix.endswith("/checkpoints/checkpoint-8")
    assert got.base_model == str(stack.base.resolve())

    def predict(model: str) -> ppb.PredictResponse:
        return stack.predictor.Predict(
            ppb.PredictRequest(
                model=model,
                inputs=[ppb.PredictInput(text=PROMPT)],
                params=ppb.InferenceParams(max_tokens=MAX_TOKENS, temperature=0.0),
            ),
            timeout=120,
        )

    served = predict(last.name)
    assert served.model_version == last.name
    # The last checkpoint holds the version's final weights: the same answer.
    assert served.outputs[0].text == predict(stack.version).outputs[0].text
    with pytest.raises(grpc.RpcError) as caught:
        predict(f"{stack.version}/checkpoints/3")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

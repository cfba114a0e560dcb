"""No code from user input: `trust_remote_code` is the operator's, model names stay in bounds.

Through real processes: a dataset service, a trainer with one model root, a
training worker and a predictor. A user may not set `trust_remote_code`; a model
name is a catalogue entry, a template's own base model or a folder inside a model
root, and every other name (absolute paths, traversal, symbolic links out of a
root) gets one and the same INVALID_ARGUMENT whether or not the file exists, and a
worker checks the name again with its own settings before loading. A
model folder whose `auto_map` would import its own Python code (which writes a
marker file here) is refused with a clear error by the worker and the predictor,
even inside a model root, and the code never runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import (
    REPO,
    ServiceProcess,
    channel,
    error_details,
    free_port,
    start_service,
    wait_until,
)
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/safe"
MODEL = f"{APP}/models/qa"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
FIELD = "param_overrides.model_config.pretrained_model_name_or_path"
ROOT = "vetted"  # the model root's name
TRAINER_ONLY = "trainer-only"  # a root only the trainer has: the worker checks again
S = pb.ModelVersionState

# Imported by transformers only where trust_remote_code lets a model's own code run.
EVIL_CODE = """\
from pathlib import Path

Path({marker!r}).write_text("the model's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


@dataclass
class Stack:
    workdir: Path
    root: Path
    outside: Path  # a real model folder outside every model root
    evil: Path  # inside the root: a model whose config maps to its own code
    marker: Path  # what the evil code writes when it runs
    dataset: ServiceProcess
    trainer: ServiceProcess
    stub: pb_grpc.TrainerServiceStub
    dataset_version: str
    worker: subprocess.Popen[bytes] | None = None
    versions: list[str] = field(default_factory=list)


def make_evil_model(tiny: Path, dest: Path, marker: Path) -> Path:
    """A copy of `tiny` whose config and tokenizer config point at a module of its own."""
    shutil.copytree(tiny, dest)
    (dest / "evil_model.py").write_text(EVIL_CODE.format(marker=str(marker)))
    for name, entry in (
        (
            "config.json",
            {
                "AutoConfig": "evil_model.EvilConfig",
                "AutoModelForCausalLM": "evil_model.EvilForCausalLM",
            },
        ),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil_model.EvilTokenizer", None]}),
    ):
        path = dest / name
        config = json.loads(path.read_text()) if path.exists() else {}
        config["auto_map"] = entry
        path.write_text(json.dumps(config, indent=2))
    return dest


def _examples(n: int) -> bytes:
    rows = [{"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("model-safety")
    root = workdir / "models"
    tiny = build_tiny_model(root / "tiny")
    outside = build_tiny_model(workdir / "elsewhere" / "tiny")
    marker = workdir / "marker" / "code-ran.txt"
    marker.parent.mkdir()
    evil = make_evil_model(tiny, root / "evil", marker)
    (root / "escape").symlink_to(outside)  # a link inside the root to a folder outside it
    env = {"LORAFORGE_MODEL_ROOTS": f"{ROOT}={root}"}
    trainer_only = workdir / "trainer-only"
    shutil.copytree(tiny, trainer_only / "tiny")
    trainer_env = {"LORAFORGE_MODEL_ROOTS": f"{ROOT}={root},{TRAINER_ONLY}={trainer_only}"}
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address, "--reap-seconds", "1"],
        env=trainer_env,
    )
    s: Stack | None = None
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="safe"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="qa"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/qa", file_name="qa.jsonl")
        dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=_examples(16)),
                ]
            )
        )
        dv = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/qa", version_id="v1")
        )
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id="qa"))
        s = Stack(
            workdir, root, outside, evil, marker, dataset, trainer, stub, dv.dataset_version.name
        )
        log = open(workdir / "worker.log", "ab")
        s.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraforge.services.trainer.worker",
                "--poll-seconds",
                "0.2",
                "--cpu-threads",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "LORAFORGE_HOME": str(workdir / "home"),
                "LORAFORGE_DATASET_ADDRESS": dataset.address,
                "HF_HUB_OFFLINE": "1",
                **env,
            },
            cwd=REPO,
        )
        yield s
    finally:
        if s is not None and s.worker is not None and s.worker.poll() is None:
            s.worker.terminate()
            try:
                s.worker.wait(30)
            except subprocess.TimeoutExpired:
                s.worker.kill()
                s.worker.wait()
        trainer.stop()
        dataset.stop()


def _overrides(model_config: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(
        {
            "model_config": model_config,
            "tokenizer_config": {"model_max_length": 32},
            "trainer_config": {
                "max_steps": 2,
                "logging_steps": 1,
                "save_steps": 100,
                "per_device_train_batch_size": 4,
                "eval_split_percent": 0,
            },
        },
        struct_pb2.Struct(),
    )


def _create(stack: Stack, model_config: dict[str, Any]) -> pb.ModelVersion:
    version = stack.stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=MODEL,
            template=TEMPLATE,
            dataset_version=stack.dataset_version,
            param_overrides=_overrides(model_config),
        ),
        timeout=60,
    ).model_version
    stack.versions.append(version.name)
    return version


def _refused(stack: Stack, model_config: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """CreateModelVersion is INVALID_ARGUMENT: its message and field violations."""
    before = _version_count(stack)
    with pytest.raises(grpc.RpcError) as info:
        _create(stack, model_config)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    _, fields = error_details(info.value)
    assert _version_count(stack) == before  # nothing was queued
    return info.value.details() or "", fields


def _version_count(stack: Stack) -> int:
    reply = stack.stub.ListModelVersions(
        pb.ListModelVersionsRequest(parent=MODEL, page_size=100), timeout=30
    )
    return len(reply.model_versions)


def _wait_done(stack: Stack, name: str, timeout: float = 240) -> pb.ModelVersion:
    done = (S.MODEL_VERSION_STATE_TRAINED, S.MODEL_VERSION_STATE_FAILED)
    latest: list[pb.ModelVersion] = []

    def finished() -> bool:
        latest[:] = [stack.stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version]
        return latest[0].state in done

    assert wait_until(finished, timeout=timeout), f"{name} is still {latest[0].state}"
    return latest[0]


@pytest.mark.parametrize("value", [True, False])
def test_trust_remote_code_is_not_a_parameter(stack: Stack, value: bool) -> None:
    message, fields = _refused(
        stack,
        {"pretrained_model_name_or_path": f"{ROOT}/tiny", "trust_remote_code": value},
    )
    field_path = "param_overrides.model_config.trust_remote_code"
    assert field_path in fields and "operator setting" in fields[field_path]
    assert "operator setting" in message


def test_no_template_offers_trust_remote_code(stack: Stack) -> None:
    for template in stack.stub.ListTemplates(
        pb.ListTemplatesRequest(page_size=100), timeout=30
    ).templates:
        text = json_format.MessageToJson(template)
        assert "trust_remote_code" not in text, template.name


def _generic(message: str, name: str) -> str:
    """The message with the caller's own name taken out: what could tell files apart."""
    return message.replace(repr(name), "'NAME'")


@pytest.mark.parametrize(
    ("existing", "missing"),
    [
        ("/etc/passwd", "/etc/no-such-file-here"),
        ("/etc", "/no-such-folder-here"),
        ("../../../../tmp", "../../../../tmp/no-such-folder-here"),
        (f"{ROOT}/../elsewhere/tiny", f"{ROOT}/../elsewhere/nothing"),
        (f"{ROOT}/escape", f"{ROOT}/no-such-model"),
        ("elsewhere/tiny", "elsewhere/nothing"),
    ],
)
def test_names_outside_the_catalogue_and_the_roots_get_one_answer(
    stack: Stack, existing: str, missing: str
) -> None:
    answers = []
    for name in (existing, missing):
        message, fields = _refused(stack, {"pretrained_model_name_or_path": name})
        assert set(fields) == {FIELD}
        assert "not in the base-model catalogue or a configured model root" in message
        assert "loraforge base-models" in message
        for revealing in ("JSON", "exist", "not found", "permission", "directory"):
            assert revealing not in message
        answers.append((_generic(message, name), _generic(fields[FIELD], name)))
    assert answers[0] == answers[1]


def test_a_real_model_outside_every_root_is_refused_by_absolute_path(stack: Stack) -> None:
    _, fields = _refused(stack, {"pretrained_model_name_or_path": str(stack.outside)})
    assert "configured model root" in fields[FIELD]
    # The same folder through a symbolic link inside the root: its real path is outside.
    _, fields = _refused(stack, {"pretrained_model_name_or_path": str(stack.root / "escape")})
    assert "configured model root" in fields[FIELD]


def test_a_model_in_a_root_trains_by_root_name_and_by_absolute_path(stack: Stack) -> None:
    for name in (f"{ROOT}/tiny", str(stack.root / "tiny")):
        version = _wait_done(stack, _create(stack, {"pretrained_model_name_or_path": name}).name)
        assert version.state == S.MODEL_VERSION_STATE_TRAINED, version.failure_reason
        # Recorded by its real path: what a predictor serving that folder names.
        assert version.artifacts.base_model == os.path.realpath(stack.root / "tiny")


def test_a_model_with_its_own_code_never_runs_it_in_the_worker(stack: Stack) -> None:
    version = _create(stack, {"pretrained_model_name_or_path": f"{ROOT}/evil"})
    done = _wait_done(stack, version.name)
    assert done.state == S.MODEL_VERSION_STATE_FAILED
    assert "needs its own Python code" in done.failure_reason
    assert "auto_map" in done.failure_reason and "trust_remote_code" in done.failure_reason
    assert not stack.marker.exists()


def test_the_worker_checks_the_name_again_before_loading(stack: Stack) -> None:
    """A run the trainer accepted (its model roots) fails on a worker without that root."""
    version = _create(stack, {"pretrained_model_name_or_path": f"{TRAINER_ONLY}/tiny"})
    done = _wait_done(stack, version.name)
    assert done.state == S.MODEL_VERSION_STATE_FAILED
    assert "is not in the base-model catalogue or a configured model root" in done.failure_reason


def test_a_template_that_declares_trust_remote_code_is_refused(tmp_path: Path) -> None:
    from loraforge.services.trainer import templates as tpl

    source = tpl.TEMPLATES_DIR / "HF_SmolLM2_135m_instruct_lora.yaml"
    text = source.read_text().replace(
        "  quantization_config:\n",
        "    trust_remote_code:\n      type: bool\n      default: false\n"
        "      description: run the model's own code\n  quantization_config:\n",
        1,
    )
    copy = tmp_path / source.name
    copy.write_text(text)
    with pytest.raises(ValueError, match="operator setting"):
        tpl.load_template(copy)


def test_a_predictor_refuses_a_base_model_with_its_own_code(stack: Stack) -> None:
    with pytest.raises(RuntimeError) as info:
        start_service(
            "loraforge.services.predictor",
            stack.workdir / "predictor",
            args=[
                "--base-model",
                str(stack.evil),
                "--engine",
                "transformers",
                "--trainer-address",
                f"127.0.0.1:{free_port()}",
            ],
            timeout=240,
        )
    assert "needs its own Python code" in str(info.value)
    assert "trust_remote_code" in str(info.value)
    assert not stack.marker.exists()


def test_the_marker_proves_the_code_would_run_where_the_operator_allows_it(
    stack: Stack, tmp_path: Path
) -> None:
    """The check above means something: transformers does import this folder's code when
    trust_remote_code is on (here, in a process of its own, on a copy of the folder)."""
    marker = tmp_path / "ran.txt"
    copy = make_evil_model(stack.root / "tiny", tmp_path / "evil", marker)
    script = (
        "import sys\n"
        "from transformers import AutoConfig\n"
        "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(copy)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")},
        capture_output=True,
        timeout=120,
    )
    assert marker.exists()
    assert not stack.marker.exists()

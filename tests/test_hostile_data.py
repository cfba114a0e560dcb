"""What a service keeps under its home is its owner's alone: state databases, the object
store's folders and objects (datasets, checkpoints, adapters), scratch and keys, checked
on a real dataset service, trainer and worker after an upload, a version and a run."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import channel, start_service, start_worker, stop_process, wait_until
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

APP = "apps/private"


def _loose(home: Path) -> list[str]:
    """Every file or folder under `home` (itself included) that others may read or enter."""
    found = []
    for path in [home, *home.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        if mode & 0o077:
            found.append(f"{stat.filemode(mode)} {path.relative_to(home.parent)}")
    return found


def test_everything_a_cluster_writes_under_its_home_is_its_owners_only(tmp_path: Path) -> None:
    workdir = tmp_path / "cluster"
    tiny = build_tiny_model(tmp_path / "models" / "tiny-llama")
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={tmp_path / 'models'}"}
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
        dstub.CreateApp(dpb.CreateAppRequest(app_id="private"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="secrets"))
        rows = "".join(
            json.dumps({"prompt": f"Secret {i}?", "completion": f" {i * 7}"}) + "\n"
            for i in range(16)
        )
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/secrets", file_name="secrets.jsonl")
        dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=rows.encode()),
                ]
            )
        )
        version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/secrets", version_id="v1")
        ).dataset_version
        assert version.state == dpb.DATASET_VERSION_STATE_READY, version.failure_reason
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id="m"))
        overrides = {
            "model_config": {"pretrained_model_name_or_path": str(tiny)},
            "peft_config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
            "tokenizer_config": {"model_max_length": 32},
            "trainer_config": {
                "max_steps": 2,
                "save_steps": 1,
                "per_device_train_batch_size": 4,
                "eval_split_percent": 0,
            },
        }
        run = tstub.CreateModelVersion(
            tpb.CreateModelVersionRequest(
                parent=f"{APP}/models/m",
                version_id="v1",
                template="templates/HF_Llama_3_2_1b_instruct_lora",
                dataset_version=version.name,
                param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
            )
        ).model_version
        worker = start_worker(workdir, dataset.address, env=roots)

        def state() -> int:
            return int(
                tstub.GetModelVersion(tpb.GetModelVersionRequest(name=run.name)).model_version.state
            )

        assert wait_until(
            lambda: state() in (tpb.MODEL_VERSION_STATE_TRAINED, tpb.MODEL_VERSION_STATE_FAILED),
            300,
        ), "the run did not finish"
        assert state() == tpb.MODEL_VERSION_STATE_TRAINED
        archive = tstub.ExportModelVersion(tpb.ExportModelVersionRequest(name=run.name))
        assert b"".join(r.chunk for r in archive)
    finally:
        stop_process(worker)
        trainer.stop()
        dataset.stop()
    home = workdir / "home"
    # What was written: both databases, the dataset's snapshot, the run's checkpoints.
    assert (home / "dataset.db").is_file() and (home / "trainer.db").is_file()
    objects = [p for p in (home / "objects").rglob("*") if p.is_file()]
    assert any("snapshots" in str(p) for p in objects)
    assert any("checkpoint-1" in str(p) for p in objects)
    assert _loose(home) == []

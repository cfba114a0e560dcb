"""Training on long real examples fits a worker's memory: the real SmolLM2 template's
defaults at model_max_length 2,048 on whole emails (some over 1,000 tokens), through the
services, with the worker limited to 4 GiB."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.client.demo import demo_file
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common import base_models
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import REPO, channel, start_service

pytestmark = pytest.mark.slow

GIB = 2**30


def _emails(n: int) -> bytes:
    """Real emails of realistic length (the SpamAssassin corpus's, whole up to 6,000
    characters): the first eight run from about 500 to 1,270 tokens, four over 1,000."""
    lines = demo_file("spam_long.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return ("\n".join(lines) + "\n").encode()


def test_the_default_template_trains_long_real_emails_in_a_worker_limited_to_4_gib(
    tmp_path: Path,
) -> None:
    base_models.resolve_base_model(base_models.DEFAULT_BASE_MODEL)  # converted once per machine
    dataset = start_service("loraforge.services.dataset", tmp_path)
    trainer = start_service(
        "loraforge.services.trainer", tmp_path, args=["--dataset-address", dataset.address]
    )
    worker = None
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="mem"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent="apps/mem", dataset_id="emails"))
        header = dpb.UploadHeader(dataset="apps/mem/datasets/emails", file_name="r.jsonl")
        upload = dstub.UploadInputs(
            iter(
                [
                    dpb.UploadInputsRequest(header=header),
                    dpb.UploadInputsRequest(chunk=_emails(8)),
                ]
            )
        )
        assert upload.rows_accepted == 8
        dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent="apps/mem/datasets/emails", version_id="v1")
        )
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        tstub.CreateModel(tpb.CreateModelRequest(parent="apps/mem", model_id="spam"))
        # The template's defaults (micro-batch 8, no gradient checkpointing) but one step,
        # no held-out split, and room for the longest email.
        overrides = {
            "tokenizer_config": {"model_max_length": 2048},
            "trainer_config": {"max_steps": 1, "eval_split_percent": 0},
        }
        request = tpb.CreateModelVersionRequest(
            parent="apps/mem/models/spam",
            version_id="v1",
            template="templates/HF_SmolLM2_135m_instruct_lora",
            dataset_version="apps/mem/datasets/emails/versions/v1",
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
        estimate = tstub.EstimateModelVersion(
            tpb.EstimateModelVersionRequest(
                parent=request.parent,
                template=request.template,
                dataset_version=request.dataset_version,
                param_overrides=request.param_overrides,
            )
        )
        assert estimate.examples_kept == 8 and estimate.estimated_peak_memory_bytes > 4 * GIB
        name = tstub.CreateModelVersion(request).model_version.name
        env = {
            **os.environ,
            "LORAFORGE_HOME": str(tmp_path / "home"),
            "LORAFORGE_DATASET_ADDRESS": dataset.address,
        }
        with open(tmp_path / "worker.log", "ab") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "loraforge.services.trainer.worker",
                    *("--poll-seconds", "0.2", "--max-jobs", "1", "--memory-limit-gib", "4"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        peak = _peak_rss_at_exit(worker, timeout=1800)
        version = tstub.GetModelVersion(tpb.GetModelVersionRequest(name=name)).model_version
        events = tstub.GetModelVersionLogs(tpb.GetModelVersionLogsRequest(name=name)).events
        lines = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
        assert version.state == tpb.MODEL_VERSION_STATE_TRAINED, lines[-20:]
        assert version.metrics["invalid_examples"] == 0
        assert version.metrics["train_examples"] == 8
        plan = [line for line in lines if "this worker has" in line]
        assert len(plan) == 1 and "the same global batch of 8" in plan[0], lines
        print(f"the worker's peak RSS: {peak / GIB:.2f} GiB; {plan[0]}")
        assert peak < 4 * GIB, f"the worker's peak RSS was {peak / GIB:.2f} GiB: {plan[0]}"
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        trainer.stop()
        dataset.stop()


def _peak_rss_at_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Waits for `proc` to exit (within `timeout`) and returns its peak RSS in bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            assert proc.returncode == 0, f"the worker exited {proc.returncode}"
            return int(usage.ru_maxrss) * 1024  # KiB on Linux
        time.sleep(0.5)
    raise AssertionError(f"the worker did not finish its one run within {timeout:.0f}s")

"""The estimate before training against the wall time the run then takes, on the real base model.

Run: `.venv/bin/python bench/bench_estimate.py` (CPU or GPU). It starts a dataset service, a
trainer and one worker (their own state in a temporary folder), uploads the demo's 420
financial-news examples, and trains SmolLM2-135M-Instruct with LoRA twice:

1. a calibration run (`--calibration-steps`), the first real run of this base model on this
   kind of worker, which is what an estimate's time is measured from;
2. an estimate (`EstimateModelVersion`) of a run of `--steps` steps, then that run.

It prints the estimated time, the measured one (the worker's start to TRAINED, the span the
estimate covers) and their ratio. Target: within ±30%.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf import json_format, struct_pb2

from loraforge.client.demo import demo_file
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common.base_models import DEFAULT_BASE_MODEL
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import REPO, channel, start_service, wait_until

APP = "apps/bench"
MODEL = f"{APP}/models/sentiment"
TEMPLATE = "templates/HF_SmolLM2_135m_instruct_lora"


def overrides(steps: int, batch: int) -> struct_pb2.Struct:
    params: dict[str, Any] = {
        "tokenizer_config": {"prompt_format": "chat", "system_prompt": "Classify the news."},
        "trainer_config": {
            "max_steps": steps,
            "per_device_train_batch_size": batch,
            "eval_split_percent": 0,
            "logging_steps": 5,
            "save_steps": 1000,
        },
    }
    return json_format.ParseDict(params, struct_pb2.Struct())


def train(
    stub: pb_grpc.TrainerServiceStub, dataset_version: str, version_id: str, steps: int, batch: int
) -> pb.ModelVersion:
    name = stub.CreateModelVersion(
        pb.CreateModelVersionRequest(
            parent=MODEL,
            version_id=version_id,
            template=TEMPLATE,
            dataset_version=dataset_version,
            param_overrides=overrides(steps, batch),
        )
    ).model_version.name

    def get() -> pb.ModelVersion:
        return stub.GetModelVersion(pb.GetModelVersionRequest(name=name)).model_version

    done = (pb.MODEL_VERSION_STATE_TRAINED, pb.MODEL_VERSION_STATE_FAILED)
    if not wait_until(lambda: get().state in done, 3600):
        raise SystemExit(f"{name} did not finish within an hour")
    version = get()
    if version.state != pb.MODEL_VERSION_STATE_TRAINED:
        raise SystemExit(f"{name} failed: {version.failure_reason}")
    return version


def wall_seconds(version: pb.ModelVersion) -> float:
    return (version.end_time.ToNanoseconds() - version.start_time.ToNanoseconds()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    dataset = start_service("loraforge.services.dataset", workdir)
    trainer = start_service(
        "loraforge.services.trainer", workdir, args=["--dataset-address", dataset.address]
    )
    env = {
        **os.environ,
        "LORAFORGE_HOME": str(workdir / "home"),
        "LORAFORGE_AUTH": "off",
        "LORAFORGE_DATASET_ADDRESS": dataset.address,
        "HF_HUB_OFFLINE": "1",
    }
    log = open(workdir / "worker.log", "ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "loraforge.services.trainer.worker", "--poll-seconds", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="bench"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="news"))
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/news", file_name="sentiment_train.jsonl")
        data = demo_file("sentiment_train.jsonl").read_bytes()
        dstub.UploadInputs(
            iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=data)])
        )
        dataset_version = dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/news", version_id="v1")
        ).dataset_version.name
        stub = pb_grpc.TrainerServiceStub(channel(trainer.address))
        stub.CreateModel(pb.CreateModelRequest(parent=APP, model_id="sentiment"))
        print(f"base model {DEFAULT_BASE_MODEL}, batch {args.batch}")
        calibration = train(
            stub, dataset_version, "calibration", args.calibration_steps, args.batch
        )
        print(
            f"calibration run: {args.calibration_steps} steps, {wall_seconds(calibration):.1f} s, "
            f"{calibration.metrics['tokens_per_second']:.0f} tokens/s"
        )
        started = time.monotonic()
        estimate = stub.EstimateModelVersion(
            pb.EstimateModelVersionRequest(
                parent=MODEL, template=TEMPLATE, dataset_version=dataset_version,
                param_overrides=overrides(args.steps, args.batch),
            )
        )  # fmt: skip
        took = time.monotonic() - started
        estimated = estimate.estimated_time.ToNanoseconds() / 1e9
        print(
            f"estimate ({took:.1f} s to make): {estimate.steps} steps, {estimate.total_tokens:,} "
            f"tokens, {estimated:.1f} s, peak memory "
            f"{estimate.estimated_peak_memory_bytes / 2**30:.2f} GiB; {estimate.calibration}"
        )
        run = train(stub, dataset_version, "estimated", args.steps, args.batch)
        measured = wall_seconds(run)
        print(
            f"measured: {run.metrics['global_step']:.0f} steps, {run.metrics['train_tokens']:,.0f} "
            f"tokens, {measured:.1f} s"
        )
        print(f"estimate / measured = {estimated / measured:.2f} (target 0.70 to 1.30)")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        trainer.stop()
        dataset.stop()


if __name__ == "__main__":
    main()

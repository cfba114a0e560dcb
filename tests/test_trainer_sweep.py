"""A parameter sweep through real services: dataset, trainer, a worker and a predictor.

`loraforge train --sweep` queues one run of a tiny Llama per learning rate, waits for
them, scores each TRAINED one on a held-out dataset version and marks the best as the
model's `best_version`; the scores it compared are read back from the evaluations. A bad
key or value is refused before anything is queued, and a model's best version must be a
TRAINED version of that model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from loraforge.client.client import Client, ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from tests.support import (
    ServiceProcess,
    channel,
    free_port,
    start_service,
    start_worker,
    stop_process,
)
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

APP = "apps/sweep"
MODEL = f"{APP}/models/parity"


@dataclass
class Stack:
    workdir: Path
    base: Path
    dataset: ServiceProcess
    trainer: ServiceProcess
    client: Client


def _upload(stub: dpb_grpc.DatasetServiceStub, dataset_id: str, numbers: range) -> None:
    rows = [
        {"prompt": f"Sentiment: {n} rose?", "completion": " positive" if n % 2 else " negative"}
        for n in numbers
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    dataset = f"{APP}/datasets/{dataset_id}"
    stub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id=dataset_id))
    header = dpb.UploadHeader(dataset=dataset, file_name="numbers.jsonl")
    stub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=data)])
    )
    stub.CreateDatasetVersion(dpb.CreateDatasetVersionRequest(parent=dataset, version_id="v1"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("sweep")
    base = tiny_base(workdir)
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    predictor_port = free_port()
    started: list[ServiceProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        dataset = start_service("loraforge.services.dataset", workdir)
        started.append(dataset)
        trainer = start_service(
            "loraforge.services.trainer",
            workdir,
            args=[
                *("--dataset-address", dataset.address),
                *("--predictor-address", f"127.0.0.1:{predictor_port}"),
            ],
            env=roots,
        )
        started.append(trainer)
        worker = start_worker(workdir, dataset.address, env=roots)
        predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            args=[
                *("--port", str(predictor_port)),
                *("--base-model", str(base), "--trainer-address", trainer.address),
                *("--engine", "transformers", "--dtype", "float32", "--max-lora-rank", "8"),
            ],
            timeout=300,
        )
        started.append(predictor)
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="sweep"))
        _upload(dstub, "numbers", range(0, 64))
        _upload(dstub, "heldout", range(100, 116))
        client = Client(dataset.address, trainer.address, api_key="")
        client.app("sweep").create_model("parity")
        client.app("sweep").create_model("other")
        yield Stack(workdir, base, dataset, trainer, client)
    finally:
        stop_process(worker)
        for service in reversed(started):
            service.stop()


def _train(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`loraforge train` of the tiny model with a short, fixed recipe and `args`."""
    recipe = {
        "model_config.pretrained_model_name_or_path": str(stack.base),
        "peft_config.r": 8,
        "tokenizer_config.model_max_length": 32,
        "tokenizer_config.prompt_format": "raw",
        "trainer_config.max_steps": 40,
        "trainer_config.per_device_train_batch_size": 8,
        "trainer_config.eval_split_percent": 0,
        "trainer_config.save_steps": 1000,
        "trainer_config.seed": 1,
    }
    return subprocess.run(
        [
            *(sys.executable, "-m", "loraforge.client.cli"),
            *("--dataset-address", stack.dataset.address),
            *("--trainer-address", stack.trainer.address),
            *("train", "sweep/parity", "--template", "HF_Llama_3_2_1b_instruct_lora"),
            *("--dataset-version", f"{APP}/datasets/numbers/versions/v1"),
            *(f"--set={k}={v}" for k, v in recipe.items()),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200", "LORAFORGE_API_KEY": ""},
    )


def _versions(stack: Stack) -> list[tpb.ModelVersion]:
    return stack.client.trainer.ListModelVersions(
        tpb.ListModelVersionsRequest(parent=MODEL)
    ).model_versions


def test_a_sweep_with_a_bad_key_or_value_is_refused_before_anything_is_queued(
    stack: Stack,
) -> None:
    for flags, named in (
        (["--sweep", "learning_rat=1e-4,1e-3"], "learning_rat"),
        (["--sweep", "learning_rate=1e-4,fast"], "'fast'"),
        (["--sweep", "trainer_config.max_steps=10,2.5"], "2.5"),
        (["--sweep", "learning_rate=1e-4", "--sweep", "no_such=1"], "no_such"),
    ):
        refused = _train(stack, *flags, "--eval-dataset-version", "sweep/heldout/v1")
        assert refused.returncode == 1, refused.stdout
        assert named in refused.stderr and "--sweep" in refused.stderr, refused.stderr
    unheld = _train(stack, "--sweep", "learning_rate=1e-4")
    assert unheld.returncode == 1 and "--eval-dataset-version" in unheld.stderr
    missing = _train(
        stack, "--sweep", "learning_rate=1e-4", "--eval-dataset-version", "sweep/heldout/v9"
    )
    assert missing.returncode == 1 and "heldout/versions/v9" in missing.stderr
    assert _versions(stack) == []  # nothing was queued


def test_a_sweep_marks_the_candidate_with_the_higher_score_as_the_best_version(
    stack: Stack,
) -> None:
    swept = _train(
        stack,
        *("--sweep", "learning_rate=1e-6,5e-3"),
        *("--eval-dataset-version", "sweep/heldout/v1", "--eval-max-tokens", "3"),
    )
    assert swept.returncode == 0, swept.stderr + swept.stdout
    versions = _versions(stack)
    assert len(versions) == 2
    assert {v.state for v in versions} == {tpb.MODEL_VERSION_STATE_TRAINED}
    # The scores, read back from each version's evaluation on the held-out data.
    scores: dict[str, float] = {}
    for version in versions:
        (evaluation,) = stack.client.list_evaluations(version.name)
        assert evaluation.state == epb.EVALUATION_STATE_SUCCEEDED, evaluation.failure_reason
        assert evaluation.dataset_version == f"{APP}/datasets/heldout/versions/v1"
        assert evaluation.primary_score == "label_accuracy"  # the labels' default metrics
        scores[version.name] = evaluation.scores[evaluation.primary_score]
        assert f"{evaluation.scores['label_accuracy']:.4g}" in swept.stdout
    assert len(set(scores.values())) == 2, scores  # the learning rates made a difference
    best = max(scores, key=lambda name: scores[name])
    model = stack.client.model("sweep/parity").pb
    assert model.best_version == best
    assert best in swept.stdout and "best version" in swept.stdout


def test_a_best_version_must_be_a_trained_version_of_the_model_itself(stack: Stack) -> None:
    theirs = _train(stack, "--no-watch", "--id", "queued")
    assert theirs.returncode == 0, theirs.stderr
    queued = f"{MODEL}/versions/queued"
    stack.client.cancel(queued)
    trained = next(v.name for v in _versions(stack) if v.state == tpb.MODEL_VERSION_STATE_TRAINED)
    with pytest.raises(ClientError) as other:
        stack.client.update_model("sweep/other", best_version=trained)
    assert other.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "another model" in str(other.value) and "model.best_version" in str(other.value)
    with pytest.raises(ClientError) as cancelled:
        stack.client.update_model("sweep/parity", best_version=queued)
    assert cancelled.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "CANCELLED" in str(cancelled.value)
    # A TRAINED version of its own model is taken, and "" clears it.
    assert stack.client.update_model("sweep/parity", best_version=trained).pb.best_version == (
        trained
    )
    assert stack.client.update_model("sweep/parity", best_version="").pb.best_version == ""
    assert stack.client.model("sweep/other").pb.best_version == ""
    # Deleting the best version leaves the model without one.
    stack.client.update_model("sweep/parity", best_version=trained)
    stack.client.trainer.DeleteModelVersion(tpb.DeleteModelVersionRequest(name=trained))
    assert stack.client.model("sweep/parity").pb.best_version == ""

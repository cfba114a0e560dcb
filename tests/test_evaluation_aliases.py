"""Label aliases declared with an evaluation, through real services: dataset, trainer and a
predictor serving a tiny base model that answers in (its own) words, never in the labels.

Label accuracy reads an answer's first label-like word; the words the base model answers
with are declared as aliases of the labels, so its label accuracy is what a hand count of
its outputs says. A bad alias is refused before anything runs, naming the entry.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from loraforge.client.client import Client, ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import ServiceProcess, channel, error_details, free_port, start_service
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

APP = "apps/words"
MODEL = f"{APP}/models/speaker"
HELD_OUT = f"{APP}/datasets/reviews/versions/v1"
LABELS = ("negative", "positive")


@dataclass
class Stack:
    dataset: ServiceProcess
    trainer: ServiceProcess
    client: Client
    stub: tpb_grpc.TrainerServiceStub


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("aliases")
    base = tiny_base(workdir)
    predictor_port = free_port()
    started: list[ServiceProcess] = []
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
            env={"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"},
        )
        started.append(trainer)
        predictor = start_service(
            "loraforge.services.predictor",
            workdir,
            args=[
                *("--port", str(predictor_port)),
                *("--base-model", str(base), "--trainer-address", trainer.address),
                *("--engine", "transformers", "--dtype", "float32"),
            ],
            timeout=300,
        )
        started.append(predictor)
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="words"))
        dstub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id="reviews"))
        rows = [
            {"prompt": f"Review {n}: the film was", "completion": f" {LABELS[n % 2]}"}
            for n in range(12)
        ]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        header = dpb.UploadHeader(dataset=f"{APP}/datasets/reviews", file_name="reviews.jsonl")
        dstub.UploadInputs(
            iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=data)])
        )
        dstub.CreateDatasetVersion(
            dpb.CreateDatasetVersionRequest(parent=f"{APP}/datasets/reviews", version_id="v1")
        )
        stub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        stub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id="speaker"))
        yield Stack(dataset, trainer, Client(dataset.address, trainer.address, api_key=""), stub)
    finally:
        for service in reversed(started):
            service.stop()


def _words(text: str) -> list[str]:
    """The words of an answer as the test reads them: lowercase, without punctuation."""
    return text.lower().translate(str.maketrans("", "", string.punctuation)).split()


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "loraforge.client.cli"),
            *("--dataset-address", stack.dataset.address),
            *("--trainer-address", stack.trainer.address),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", "LORAFORGE_API_KEY": ""},
    )


def test_label_accuracy_with_declared_aliases_is_the_hand_count_of_the_outputs(
    stack: Stack,
) -> None:
    plain = stack.client.wait_evaluation(
        stack.client.create_evaluation(
            MODEL, HELD_OUT, metrics=["label_accuracy"], inference_params={"max_tokens": 4}
        ).name,
        timeout=300,
    )
    assert plain.state == epb.EVALUATION_STATE_SUCCEEDED, plain.failure_reason
    outputs = stack.client.evaluation_results(plain.name)
    # The base model answers in words of its own, none a label: without aliases, none counts.
    assert plain.scores["label_accuracy"] == 0.0
    assert {r.predicted_label for r in outputs} == {"(other)"}
    # Its words become aliases, alternately of each label.
    words = sorted(
        {
            w
            for r in outputs
            for w in _words(r.output)
            if w.isascii() and w.isalpha() and w not in ("a", "an", "the")
        }
    )
    assert len(words) >= 2, [r.output for r in outputs]
    aliases = {word: LABELS[i % 2] for i, word in enumerate(words)}
    flags = [f"--label-alias={word.upper()}={label}" for word, label in aliases.items()]
    created = _cli(
        stack,
        *("eval", "create", "words/speaker", "--base", "--prompt-like", "none"),
        *("--dataset-version", "words/reviews/v1", "--metric", "label_accuracy"),
        *("--max-tokens", "4", "--id", "aliased", *flags),
    )
    assert created.returncode == 0, created.stderr
    assert "label aliases" in created.stdout and "SUCCEEDED" in created.stdout
    done = stack.client.evaluation(f"{MODEL}/evaluations/aliased")
    # Stored with the evaluation, normalized, so the scores can be reproduced.
    assert dict(done.label_aliases) == aliases
    results = stack.client.evaluation_results(done.name)
    assert [r.output for r in results] == [r.output for r in outputs]  # greedy: same answers
    right = 0
    for result in results:
        said = next((aliases[w] for w in _words(result.output) if w in aliases), "(other)")
        assert result.predicted_label == said, result.output
        right += said == result.reference.strip()
    assert done.scores["label_accuracy"] == pytest.approx(right / len(results))
    assert right > 0


def _refused(stack: Stack, aliases: dict[str, str], **fields: object) -> ClientError:
    with pytest.raises(ClientError) as info:
        stack.client.create_evaluation(
            MODEL,
            HELD_OUT,
            label_aliases=aliases,
            **fields,  # type: ignore[arg-type]
        )
    return info.value


def test_a_bad_label_alias_is_refused_naming_the_entry_and_the_labels(stack: Stack) -> None:
    before = stack.client.list_evaluations(MODEL)
    bad = _refused(stack, {"neg": "negative", "meh": "neutral"})
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "label_aliases['meh']" in str(bad) and "'negative', 'positive'" in str(bad)
    for aliases in ({"": "negative"}, {"neg": " . "}, {"so bad": "negative"}):
        refused = _refused(stack, aliases)
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and "label_aliases[" in str(refused)
    itself = _refused(stack, {"Positive": "negative"})
    assert itself.code == grpc.StatusCode.INVALID_ARGUMENT and "itself" in str(itself)
    unread = _refused(stack, {"neg": "negative"}, metrics=["exact_match"])
    assert unread.code == grpc.StatusCode.INVALID_ARGUMENT and "label_accuracy" in str(unread)
    assert stack.client.list_evaluations(MODEL) == before  # nothing was created

    cli = _cli(
        stack,
        *("eval", "create", "words/speaker", "--base", "--prompt-like", "none"),
        *("--dataset-version", "words/reviews/v1", "--label-alias", "meh=neutral"),
    )
    assert cli.returncode == 1 and "label_aliases['meh']" in cli.stderr
    with pytest.raises(grpc.RpcError) as info:  # the RPC's own details name the entry
        stack.stub.CreateEvaluation(
            epb.CreateEvaluationRequest(
                parent=MODEL,
                dataset_version=HELD_OUT,
                label_aliases={"meh": "neutral"},
                params=ppb.InferenceParams(max_tokens=2),
            )
        )
    reason, violations = error_details(info.value)
    assert reason == "BAD_LABEL_ALIAS" and "label_aliases['meh']" in violations

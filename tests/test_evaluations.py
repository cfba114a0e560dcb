"""Evaluations end to end through real services: dataset, trainer, a worker, a predictor.

One stack for the module: a tiny Llama is fine-tuned on numbers labelled `positive` or
`negative` by parity; the base model and the fine-tuned version are evaluated on a held-out dataset
version of other numbers, through the trainer's evaluation RPCs, which generate
through the predictor. The tiny model learns to answer with a label, not parity, so the
fine-tuned version beats the base model on exact match and label accuracy without
being right everywhere, and the comparison lists the examples that changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from loraforge.client.client import Client, ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as ppb_grpc
from loraforge.services.common.errors import InvalidArgument, NotFound
from loraforge.services.trainer.evaluation_store import EvaluationStore, Result
from loraforge.services.trainer.predictor_client import AsyncPredictorClient
from loraforge.services.trainer.store import EvaluationRow, TrainerStore
from loraforge.services.trainer.training import TrainingExample
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import (
    ServiceProcess,
    channel,
    error_details,
    free_port,
    start_service,
    start_worker,
    stop_process,
    wait_until,
)
from tests.test_predictor_helpers import tiny_base

pytestmark = pytest.mark.slow

APP = "apps/lab"
MODEL = f"{APP}/models/parity"
TEMPLATE = "templates/HF_Llama_3_2_1b_instruct_lora"
TRAIN = f"{APP}/datasets/numbers/versions/train"
HELD_OUT = f"{APP}/datasets/numbers-heldout/versions/v1"
PARAMS = ppb.InferenceParams(max_tokens=3)


@dataclass
class Stack:
    workdir: Path
    dataset: ServiceProcess
    trainer: ServiceProcess
    evaluations: tpb_grpc.TrainerServiceStub
    version: str


def _labelled(numbers: range) -> bytes:
    rows = [
        {"prompt": f"Sentiment: {n} rose?", "completion": " positive" if n % 2 else " negative"}
        for n in numbers
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _upload(stub: dpb_grpc.DatasetServiceStub, dataset_id: str, data: bytes, version: str) -> None:
    dataset = f"{APP}/datasets/{dataset_id}"
    stub.CreateDataset(dpb.CreateDatasetRequest(parent=APP, dataset_id=dataset_id))
    header = dpb.UploadHeader(dataset=dataset, file_name="numbers.jsonl")
    stub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=data)])
    )
    stub.CreateDatasetVersion(dpb.CreateDatasetVersionRequest(parent=dataset, version_id=version))


def _train(stub: tpb_grpc.TrainerServiceStub, base: Path) -> str:
    overrides = {
        "model_config": {"pretrained_model_name_or_path": str(base)},
        "peft_config": {"r": 8},
        "tokenizer_config": {"model_max_length": 32, "prompt_format": "raw"},
        "trainer_config": {
            "max_steps": 80,
            "logging_steps": 4,
            "save_steps": 40,  # a checkpoint half-way, evaluated on its own
            "per_device_train_batch_size": 8,
            "learning_rate": 5e-3,
            "eval_split_percent": 0,
            "seed": 1,
        },
    }
    return stub.CreateModelVersion(
        tpb.CreateModelVersionRequest(
            parent=MODEL,
            version_id="v1",
            template=TEMPLATE,
            dataset_version=TRAIN,
            param_overrides=json_format.ParseDict(overrides, struct_pb2.Struct()),
        )
    ).model_version.name


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("evaluations")
    base = tiny_base(workdir)
    roots = {"LORAFORGE_MODEL_ROOTS": f"tests={workdir}"}
    predictor_port = free_port()
    started: list[ServiceProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    try:
        dataset = start_service("loraforge.services.dataset", workdir)
        started.append(dataset)
        # The trainer knows where the predictor will be; it calls it only to evaluate.
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
        dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
        dstub.CreateApp(dpb.CreateAppRequest(app_id="lab"))
        _upload(dstub, "numbers", _labelled(range(0, 64)), "train")
        _upload(dstub, "numbers-heldout", _labelled(range(100, 120)), "v1")
        tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        tstub.CreateModel(tpb.CreateModelRequest(parent=APP, model_id="parity"))
        version = _train(tstub, base)
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

        def trained() -> bool:
            state = tstub.GetModelVersion(tpb.GetModelVersionRequest(name=version)).model_version
            assert state.state != tpb.MODEL_VERSION_STATE_FAILED, state.failure_reason
            return state.state == tpb.MODEL_VERSION_STATE_TRAINED

        assert wait_until(trained, 300), f"training {version}"
        yield Stack(
            workdir,
            dataset,
            trainer,
            tpb_grpc.TrainerServiceStub(channel(trainer.address)),
            version,
        )
    finally:
        stop_process(worker)
        for service in reversed(started):
            service.stop()


def _finished(stub: tpb_grpc.TrainerServiceStub, name: str) -> epb.Evaluation:
    """Follows WatchEvaluation to the end; the last message is the evaluation as it ended."""
    updates = [
        r.evaluation
        for r in stub.WatchEvaluation(epb.WatchEvaluationRequest(name=name), timeout=300)
    ]
    assert updates and updates[-1].state != epb.EVALUATION_STATE_RUNNING
    progress = [u.progress.completed_examples for u in updates]
    assert progress == sorted(progress)
    return updates[-1]


def _evaluate(stack: Stack, parent: str, evaluation_id: str) -> epb.Evaluation:
    created = stack.evaluations.CreateEvaluation(
        epb.CreateEvaluationRequest(
            parent=parent,
            evaluation_id=evaluation_id,
            dataset_version=HELD_OUT,
            params=PARAMS,
        )
    ).evaluation
    assert created.state == epb.EVALUATION_STATE_RUNNING
    assert created.params.temperature == 0 and created.params.max_tokens == 3  # greedy
    done = _finished(stack.evaluations, created.name)
    assert done.state == epb.EVALUATION_STATE_SUCCEEDED, done.failure_reason
    return done


def _results(stack: Stack, name: str, order_by: str = "") -> list[epb.EvaluationResult]:
    results: list[epb.EvaluationResult] = []
    token = ""
    while True:
        page = stack.evaluations.ListEvaluationResults(
            epb.ListEvaluationResultsRequest(
                parent=name, order_by=order_by, page_size=7, page_token=token
            )
        )
        assert page.total_size == 20
        results.extend(page.results)
        token = page.next_page_token
        if not token:
            return results


def test_the_fine_tuned_version_beats_the_base_model_and_the_comparison_lists_what_changed(
    stack: Stack,
) -> None:
    base = _evaluate(stack, MODEL, "base")
    tuned = _evaluate(stack, stack.version, "tuned")
    assert base.name == f"{MODEL}/evaluations/base" and base.base_model
    assert tuned.name == f"{stack.version}/evaluations/tuned"
    assert tuned.model_version == stack.version and not tuned.base_model
    assert base.base_model_name == tuned.base_model_name != ""
    for done in (base, tuned):
        # The completions are short labels: label accuracy leads, with the majority-class
        # rate beside it, and no n-gram overlap.
        assert list(done.metrics) == ["label_accuracy", "exact_match"]
        assert set(done.scores) == {"label_accuracy", "majority_label_rate", "exact_match"}
        assert done.progress.completed_examples == done.progress.total_examples == 20
        assert done.primary_score == "label_accuracy"
    assert tuned.scores["exact_match"] > base.scores["exact_match"]
    assert tuned.scores["label_accuracy"] > base.scores["label_accuracy"]
    matrix = tuned.confusion_matrix
    assert matrix.labels[:2] == ["negative", "positive"]
    assert sum(c.count for c in matrix.cells) == 20

    # Per-example results: every example once, in dataset order or worst first.
    in_order = _results(stack, tuned.name)
    assert [r.index for r in in_order] == list(range(20))
    assert in_order[0].prompt == "Sentiment: 100 rose?" and in_order[0].reference == " negative"
    exact = [r.scores["exact_match"] for r in in_order]
    assert sum(exact) / 20 == pytest.approx(tuned.scores["exact_match"])
    worst_first = _results(stack, tuned.name, "score")
    labels = [r.scores["label_accuracy"] for r in in_order]
    assert [r.scores["label_accuracy"] for r in worst_first] == sorted(labels)
    best_first = _results(stack, tuned.name, "exact_match desc")
    best = [r.scores["exact_match"] for r in best_first]
    assert best == sorted(best, reverse=True)
    assert {r.index for r in worst_first} == set(range(20))

    comparison = stack.evaluations.CompareEvaluations(
        epb.CompareEvaluationsRequest(evaluation=base.name, other=tuned.name)
    )
    assert comparison.score == "label_accuracy"
    assert comparison.better_count > comparison.worse_count
    assert comparison.better_count + comparison.worse_count + comparison.unchanged_count == 20
    assert len(comparison.changes) == comparison.better_count + comparison.worse_count
    by_index = {r.index: r for r in in_order}
    for change in comparison.changes:
        assert change.other_output == by_index[change.index].output
        assert (change.change == epb.CHANGE_BETTER) == (change.other_score > change.score)
    better = [c for c in comparison.changes if c.change == epb.CHANGE_BETTER]
    assert len(better) == comparison.better_count and better[0].other_score == 1.0

    listed = stack.evaluations.ListEvaluations(epb.ListEvaluationsRequest(parent=MODEL))
    assert [e.name for e in listed.evaluations] == [base.name]


def _refused(call: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    reason, fields = error_details(info.value)
    return info.value.code(), reason, fields


def test_bad_evaluations_are_refused_naming_the_field(stack: Stack) -> None:
    def create(**fields: object) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        request = epb.CreateEvaluationRequest(
            **{"parent": stack.version, "dataset_version": HELD_OUT, **fields}  # type: ignore[arg-type]
        )
        return _refused(lambda: stack.evaluations.CreateEvaluation(request))

    code, reason, fields = create(metrics=["rouge", "accuracy"])
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_METRIC")
    assert "metrics[1]" in fields and "exact_match" in fields["metrics[1]"]

    code, reason, fields = create(dataset_version=TRAIN)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DATASET_VERSION_TRAINED_ON")
    assert "trained on" in fields["dataset_version"]

    code, _, fields = create(params=ppb.InferenceParams(top_p=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "params.top_p" in fields

    code, _, fields = create(prompt_like=stack.version)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_like" in fields

    code, reason, _ = create(parent=f"{MODEL}/versions/nope")
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VERSION_NOT_FOUND")

    code, _, fields = create(parent="apps/lab/nothing")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "parent" in fields

    code, _, fields = create(dataset_version=f"{APP}/datasets/numbers/versions/none")
    assert code == grpc.StatusCode.NOT_FOUND and "dataset_version" in fields

    code, _, fields = _refused(
        lambda: stack.evaluations.ListEvaluationResults(
            epb.ListEvaluationResultsRequest(parent=f"{MODEL}/evaluations/none", order_by="x")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_training_rows_uploaded_again_elsewhere_are_found_by_content(stack: Stack) -> None:
    dstub = dpb_grpc.DatasetServiceStub(channel(stack.dataset.address))
    # The very rows the version trained on, in another dataset: refused, saying how many.
    _upload(dstub, "numbers-copy", _labelled(range(0, 64)), "v1")
    code, reason, fields = _refused(
        lambda: stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(
                parent=stack.version,
                dataset_version=f"{APP}/datasets/numbers-copy/versions/v1",
                params=PARAMS,
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "DATASET_VERSION_TRAINED_ON")
    assert (
        f"64 of the 64 examples it would score are rows of {TRAIN!r}" in fields["dataset_version"]
    )
    # Some of them among new rows: evaluated, with a warning that counts them.
    _upload(dstub, "numbers-mixed", _labelled(range(60, 70)), "v1")
    created = stack.evaluations.CreateEvaluation(
        epb.CreateEvaluationRequest(
            parent=stack.version,
            dataset_version=f"{APP}/datasets/numbers-mixed/versions/v1",
            params=PARAMS,
        )
    ).evaluation
    assert any("4 of the 10 examples it would score" in w for w in created.warnings)
    assert _finished(stack.evaluations, created.name).state == epb.EVALUATION_STATE_SUCCEEDED


def test_a_trainer_without_a_predictor_refuses_evaluations_naming_the_setting(
    stack: Stack, tmp_path: Path
) -> None:
    trainer = start_service(
        "loraforge.services.trainer",
        tmp_path,
        args=["--dataset-address", stack.dataset.address],
    )
    try:
        stub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        code, reason, _ = _refused(
            lambda: stub.CreateEvaluation(
                epb.CreateEvaluationRequest(parent=MODEL, dataset_version=HELD_OUT)
            )
        )
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PREDICTOR_NOT_CONFIGURED")
    finally:
        trainer.stop()


def test_an_evaluation_its_trainer_left_running_fails_at_the_next_start_saying_to_create_it_again(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'trainer.db'}"
    store = TrainerStore(url)
    name = f"{MODEL}/evaluations/left"
    EvaluationStore(store).create(
        EvaluationRow(
            name=name,
            parent=MODEL,
            base_model=True,
            dataset_version=HELD_OUT,
            metrics=["exact_match"],
            params={},
            state="RUNNING",
            create_time=time.time(),
            lease_expires=time.time() - 1,  # its trainer stopped renewing it
        )
    )
    store.engine.dispose()
    trainer = start_service(
        "loraforge.services.trainer",
        tmp_path,
        args=["--dataset-address", "127.0.0.1:1", "--database-url", url],
    )
    try:
        stub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
        got = stub.GetEvaluation(epb.GetEvaluationRequest(name=name)).evaluation
        assert got.state == epb.EVALUATION_STATE_FAILED
        assert "create the evaluation again" in got.failure_reason
        stub.DeleteEvaluation(epb.DeleteEvaluationRequest(name=name))
        code, reason, _ = _refused(lambda: stub.GetEvaluation(epb.GetEvaluationRequest(name=name)))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "EVALUATION_NOT_FOUND")
    finally:
        trainer.stop()


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


def test_the_client_and_the_cli_evaluate_show_results_worst_first_and_compare(
    stack: Stack,
) -> None:
    client = Client(stack.dataset.address, stack.trainer.address, api_key="")
    model = client.model("lab/parity")
    held_out = "lab/numbers-heldout/v1"
    tuned = model.evaluate(
        held_out, metrics=["exact_match", "rouge"], inference_params={"max_tokens": 3}
    )
    assert tuned.state == epb.EVALUATION_STATE_SUCCEEDED, tuned.failure_reason
    assert tuned.model_version == stack.version  # the latest trained version
    assert set(tuned.scores) == {"exact_match", "rouge1", "rouge2", "rougeL"}
    base = model.evaluate(
        held_out, base_model=True, metrics=["exact_match"], inference_params={"max_tokens": 3}
    )
    assert base.base_model and base.prompt_like == stack.version
    worst = client.evaluation_results(tuned.name, order_by="exact_match", limit=3)
    assert len(worst) == 3 and worst[0].scores["exact_match"] == 0.0
    with pytest.raises(ClientError) as info:  # BLEU was not asked for
        client.evaluation_results(tuned.name, order_by="bleu")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "order_by" in str(info.value)

    created = _cli(
        stack,
        *("eval", "create", "lab/parity/v1", "--dataset-version", held_out),
        *("--metric", "bleu", "--metric", "exact_match", "--max-tokens", "3", "--id", "cli"),
    )
    assert created.returncode == 0, created.stderr
    assert "apps/lab/models/parity/versions/v1/evaluations/cli" in created.stdout
    assert "SUCCEEDED" in created.stdout and "bleu" in created.stdout
    results = _cli(stack, "eval", "results", "lab/parity/v1/cli", "--worst", "--limit", "4")
    assert results.returncode == 0, results.stderr
    assert "Sentiment: 1" in results.stdout and "exact_match" in results.stdout
    shown = _cli(stack, "eval", "show", "lab/parity/v1/cli")
    assert "SUCCEEDED" in shown.stdout and "dataset version" in shown.stdout
    compared = _cli(stack, "eval", "compare", base.name, "lab/parity/v1/cli")
    assert compared.returncode == 0, compared.stderr
    counts = client.compare_evaluations(base.name, "lab/parity/v1/cli")
    assert f"{counts.better_count} better" in compared.stdout and "better" in compared.stdout
    based = _cli(
        stack,
        *("eval", "create", "lab/parity", "--base", "--dataset-version", held_out),
        *("--metric", "exact_match", "--max-tokens", "3", "--id", "clibase"),
    )
    assert based.returncode == 0, based.stderr
    assert "prompted like" in based.stdout and stack.version in based.stdout  # by default
    listed = _cli(stack, "eval", "list", "lab/parity/v1")
    assert "cli" in listed.stdout and tuned.name.rsplit("/", 1)[-1] in listed.stdout

    refused = _cli(
        stack, "eval", "create", "lab/parity/v1", "--dataset-version", held_out, "--metric", "f1"
    )
    assert refused.returncode == 1 and "metrics[0]" in refused.stderr


def test_deleting_a_model_deletes_its_evaluations_and_their_results(tmp_path: Path) -> None:
    store = TrainerStore(f"sqlite:///{tmp_path / 'trainer.db'}")
    evaluations = EvaluationStore(store)
    store.create_model("lab", "gone", "", "modelTypes/text-to-text")
    name = "apps/lab/models/gone/evaluations/e1"
    evaluations.create(
        EvaluationRow(
            name=name,
            parent="apps/lab/models/gone",
            base_model=True,
            dataset_version=HELD_OUT,
            metrics=["exact_match"],
            params={},
            state="RUNNING",
            create_time=time.time(),
        )
    )
    result = Result(0, "apps/lab/datasets/d/inputs/i", "p", "r", "r", {"exact_match": 1.0})
    assert evaluations.add_results(name, [result], time.time() + 30)
    store.delete_model("apps/lab/models/gone", force=True)
    with pytest.raises(NotFound):
        evaluations.get(name)
    assert evaluations.results(name, "", False, 0, 10) == ([], 0)
    # The task of a running evaluation finds it gone at its next write, and stops.
    assert not evaluations.add_results(name, [result], time.time() + 30)
    store.engine.dispose()


def test_the_predictor_client_retries_a_predictor_that_is_briefly_unavailable() -> None:
    class FlakyPredictor(ppb_grpc.PredictorServiceServicer):
        calls = 0

        async def Predict(
            self, request: ppb.PredictRequest, context: grpc.aio.ServicerContext
        ) -> ppb.PredictResponse:
            FlakyPredictor.calls += 1
            if FlakyPredictor.calls == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            if request.inputs[0].text == "refuse":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "params.top_p: too big")
            return ppb.PredictResponse(
                outputs=[ppb.PredictOutput(id=i.id, text=i.text.upper()) for i in request.inputs]
            )

    async def scenario() -> None:
        server = grpc.aio.server()
        ppb_grpc.add_PredictorServiceServicer_to_server(FlakyPredictor(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = AsyncPredictorClient(f"127.0.0.1:{port}")
        try:
            outputs = await client.predict("", ["a", "b"], ppb.InferenceParams())
            assert [o.text for o in outputs] == ["A", "B"] and FlakyPredictor.calls == 2
            with pytest.raises(InvalidArgument) as info:  # not retried: it would fail again
                await client.predict("", ["refuse"], ppb.InferenceParams())
            assert "params.top_p" in info.value.message and FlakyPredictor.calls == 3
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_cancelled_evaluation_stops_and_keeps_the_results_it_has(stack: Stack) -> None:
    created = stack.evaluations.CreateEvaluation(
        epb.CreateEvaluationRequest(
            parent=stack.version,
            dataset_version=HELD_OUT,
            metrics=["exact_match"],
            params=ppb.InferenceParams(max_tokens=32, stop=["never"]),
        )
    ).evaluation
    cancelled = stack.evaluations.CancelEvaluation(
        epb.CancelEvaluationRequest(name=created.name)
    ).evaluation
    assert cancelled.state == epb.EVALUATION_STATE_CANCELLED
    final = _finished(stack.evaluations, created.name)  # the stream ends at once
    assert final.state == epb.EVALUATION_STATE_CANCELLED and not final.scores
    results = stack.evaluations.ListEvaluationResults(
        epb.ListEvaluationResultsRequest(parent=created.name)
    )
    assert results.total_size == final.progress.completed_examples < 20
    code, reason, _ = _refused(
        lambda: stack.evaluations.CancelEvaluation(epb.CancelEvaluationRequest(name=created.name))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "EVALUATION_NOT_RUNNING")
    stack.evaluations.DeleteEvaluation(epb.DeleteEvaluationRequest(name=created.name))


def test_reference_perplexity_is_transformers_own_loss_on_the_completion_tokens(
    tmp_path: Path,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.services.trainer import templates as tpl
    from loraforge.services.trainer.perplexity import reference_nll
    from loraforge.services.trainer.training import load_tokenizer, tokenize_examples

    base = tiny_base(tmp_path)
    params = tpl.resolve_params(
        tpl.get_template(TEMPLATE),
        {
            "model_config": {"pretrained_model_name_or_path": str(base)},
            # An example too long is left out rather than cut, so it has no measure.
            "tokenizer_config": {
                "model_max_length": 24,
                "prompt_format": "raw",
                "truncation": "drop",
            },
        },
    )
    examples = [("Sentiment: 3 rose?", " positive"), ("Sentiment: 4 rose?", " negative")]
    too_long = ("Sentiment: " + "rose " * 40, " positive")
    found = reference_nll(params, None, [*examples, too_long])
    assert found[2] is None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(params)
    features, _ = tokenize_examples(tokenizer, [TrainingExample(*e) for e in examples], params)
    for feature, measured in zip(features, found, strict=False):
        assert measured is not None
        nll, tokens = measured
        with torch.inference_mode():
            loss = model(
                input_ids=torch.tensor([feature.input_ids]),
                labels=torch.tensor([feature.labels]),
            ).loss
        assert tokens == sum(label != -100 for label in feature.labels)
        assert nll / tokens == pytest.approx(float(loss), rel=1e-5)


def test_the_fine_tuned_version_gives_its_reference_completions_a_lower_perplexity(
    stack: Stack,
) -> None:
    asked = {"dataset_version": HELD_OUT, "metrics": ["perplexity"], "params": PARAMS}
    tuned = _finished(
        stack.evaluations,
        stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(parent=stack.version, **asked)  # type: ignore[arg-type]
        ).evaluation.name,
    )
    base = _finished(
        stack.evaluations,
        stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(parent=MODEL, prompt_like=stack.version, **asked)  # type: ignore[arg-type]
        ).evaluation.name,
    )
    for done in (tuned, base):
        assert done.state == epb.EVALUATION_STATE_SUCCEEDED, done.failure_reason
        assert done.primary_score == "perplexity" and done.scores["perplexity"] >= 1.0
    assert tuned.scores["perplexity"] < base.scores["perplexity"]
    worst_first = _results(stack, tuned.name, "score")
    values = [r.scores["perplexity"] for r in worst_first]
    assert values == sorted(values, reverse=True)  # lower is better: highest first
    comparison = stack.evaluations.CompareEvaluations(
        epb.CompareEvaluationsRequest(evaluation=base.name, other=tuned.name)
    )
    assert comparison.better_count > comparison.worse_count
    assert all(
        (c.change == epb.CHANGE_BETTER) == (c.other_score < c.score) for c in comparison.changes
    )
    code, _, fields = _refused(
        lambda: stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(parent=MODEL, **asked)  # type: ignore[arg-type]
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_like" in fields


def test_label_likelihood_scores_the_label_the_model_finds_likeliest_as_counted_by_hand(
    stack: Stack,
) -> None:
    from loraforge.services.trainer import templates as tpl
    from loraforge.services.trainer.perplexity import reference_nll

    done = _finished(
        stack.evaluations,
        stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(
                parent=MODEL,
                prompt_like=stack.version,
                dataset_version=HELD_OUT,
                metrics=["label_likelihood", "label_accuracy"],
                params=PARAMS,
            )
        ).evaluation.name,
    )
    assert done.state == epb.EVALUATION_STATE_SUCCEEDED, done.failure_reason
    assert done.primary_score == "label_likelihood"
    # By hand: the base model's log-likelihood of each label after each prompt, rendered as
    # the version the evaluation is prompted like was trained.
    version = stack.evaluations.GetModelVersion(
        tpb.GetModelVersionRequest(name=stack.version)
    ).model_version
    params = tpl.stored_params(version.template, json_format.MessageToDict(version.params))
    labels = [" negative", " positive"]
    results = _results(stack, done.name)
    right = 0
    for result in results:
        found = reference_nll(params, None, [(result.prompt, label) for label in labels])
        likeliest = min((m[0], label) for m, label in zip(found, labels, strict=True) if m)[1]
        assert result.scores["label_likelihood"] == float(likeliest == result.reference)
        right += likeliest == result.reference
    assert done.scores["label_likelihood"] == pytest.approx(right / len(results))
    code, _, fields = _refused(
        lambda: stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(
                parent=MODEL, dataset_version=HELD_OUT, metrics=["label_likelihood"]
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_like" in fields


def test_a_checkpoint_is_evaluated_by_its_name_like_a_version(stack: Stack) -> None:
    kept = stack.evaluations.ListCheckpoints(tpb.ListCheckpointsRequest(parent=stack.version))
    halfway = next(c for c in kept.checkpoints if c.step == 40)
    done = _evaluate(stack, halfway.name, "halfway")
    assert done.name == f"{halfway.name}/evaluations/halfway"
    assert done.model_version == halfway.name and not done.base_model
    assert done.progress.completed_examples == 20
    perplexity = _finished(
        stack.evaluations,
        stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(
                parent=halfway.name,
                evaluation_id="halfway-ppl",
                dataset_version=HELD_OUT,
                metrics=["perplexity"],
                params=PARAMS,
            )
        ).evaluation.name,
    )  # measured with the checkpoint's own adapter
    assert perplexity.state == epb.EVALUATION_STATE_SUCCEEDED, perplexity.failure_reason
    assert perplexity.scores["perplexity"] >= 1.0
    listed = stack.evaluations.ListEvaluations(epb.ListEvaluationsRequest(parent=halfway.name))
    assert {e.name for e in listed.evaluations} == {done.name, perplexity.name}
    with pytest.raises(grpc.RpcError) as missing:
        stack.evaluations.CreateEvaluation(
            epb.CreateEvaluationRequest(
                parent=f"{stack.version}/checkpoints/7", dataset_version=HELD_OUT, params=PARAMS
            )
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "40" in (missing.value.details() or "")  # says which checkpoints were kept

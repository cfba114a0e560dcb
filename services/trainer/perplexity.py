"""Perplexity of reference completions: `python -m loraforge.services.trainer.perplexity`.

Teacher forcing: each example is tokenized exactly as training tokenizes it (the run's
prompt format, system prompt and end-of-sequence token), the model reads prompt and
completion in one forward pass, and the completion's tokens (and the end-of-sequence
token) are scored by their log-likelihood. An evaluation runs this as a process of its
own, as a merged export does, since it loads a whole base model.

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
    TrainingExample,
    load_tokenizer,
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
    found: list[tuple[float, int] | None] = []
    with torch.inference_mode():
        for prompt, completion in examples:
            features, _ = tokenize_examples(
                tokenizer, [TrainingExample(prompt, completion)], params
            )
            if not features:
                found.append(None)
                continue
            ids = torch.tensor([features[0].input_ids])
            labels = torch.tensor(features[0].labels[1:])
            logits = model(input_ids=ids).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            found.append((float(nll), int((labels != IGNORE_INDEX).sum())))
    return found


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

"""Merging a LoRA adapter into its base model: `python -m loraforge.services.trainer.merge`.

The trainer runs this as a process of its own for a merged export: it loads a whole base
model, which would otherwise take the trainer's memory and hold its GIL, and a process
can be bounded in time and killed. It writes the merged model (safetensors) and the base
model's tokenizer into `--out`.

Exit status 0: merged. 3: refused for a reason the user can act on (the base model is not
on this machine, it needs its own code); the last line of stderr says why. Anything else
is a failure whose traceback is on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraforge.services.common.base_models import resolve_base_model
from loraforge.services.common.errors import LoraforgeError
from loraforge.services.common.model_access import refuse_model_code

REFUSED = 3
DTYPES = ("auto", "float32", "float16", "bfloat16")


def merge_adapter(base_model: str, adapter_dir: Path, out_dir: Path, dtype: str = "auto") -> None:
    """Loads `base_model` (a catalogue name or a local folder), applies the adapter, merges it
    into the weights and saves the plain model and its tokenizer to `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(base_model)
    refuse_model_code(path, trust_remote_code=False, shown=base_model)
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=False, low_cpu_mem_usage=True
    )
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(path, trust_remote_code=False).save_pretrained(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.services.trainer.merge")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.base_model, args.adapter, args.out, args.dtype)
    except (LoraforgeError, OSError) as exc:
        # A model that is not here, or that needs its own code: the user's to fix.
        print(" ".join(str(exc).split()), file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())

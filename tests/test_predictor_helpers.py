"""Test data for the predictor tests: tiny base models and PEFT LoRA adapters made directly.

(The end-to-end test trains its adapters through the trainer instead.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.services.common.objectstore import ObjectStore, copy_tree_to_store
from tests.tiny_model import TinyModelSpec, build_tiny_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT_NEO_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


def tiny_base(root: Path, architecture: str = "llama") -> Path:
    return build_tiny_model(root / f"tiny-{architecture}", TinyModelSpec(architecture=architecture))


def make_adapter(
    base: Path,
    dest: Path,
    *,
    seed: int,
    r: int = 8,
    targets: list[str] | None = None,
    scale: float = 0.5,
    modules_to_save: list[str] | None = None,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, so it changes the base model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (dest / "adapter_config.json").exists():
        return dest
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    arch = model.config.architectures[0]
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets or (GPT_NEO_TARGETS if "Neo" in arch else LLAMA_TARGETS),
        lora_dropout=0.0,
        init_lora_weights=False,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(dest)
    return dest


def publish_adapter(store: ObjectStore, prefix: str, folder: Path, base_model: str) -> str:
    """Puts an adapter and a manifest under `prefix` in the object store, as the trainer does."""
    copy_tree_to_store(store, folder, prefix)
    store.put_bytes(f"{prefix}/manifest.json", json.dumps({"base_model": base_model}).encode())
    return prefix


def peft_greedy(
    base: Path, adapter: Path | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """Reference: the tokens transformers + PEFT generate greedily (float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=model.config.eos_token_id,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]

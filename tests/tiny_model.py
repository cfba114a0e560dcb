"""Builds small, random-initialised base models on local disk.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with the
`tokenizers` library on local text, and the model is a freshly initialised
Llama-style (or GPT-Neo) network saved with `save_pretrained`, so every loader
(`from_pretrained`, vLLM) treats the folder like any model from a hub. It knows no
language: it is for fast unit tests only; the product's default base model is the
real one in the base-model catalogue (`services/common/base_models.py`).

Attention heads are 64 wide: vLLM's CPU attention refuses smaller head sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

_DEFAULT_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Question: What is the capital of France? Answer: Paris. Translate to French: good morning -> bonjour.
Sentiment: positive, negative, neutral. Net sales increased, operating profit decreased, earnings rose.
Summarize the following text. Extract the main entities. Classify the topic of the text.
### Instruction: ### Human: ### Assistant: ### Input: ### Response: system user assistant
0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } : ; , . ! ? " ' < > | _ # @ % & $
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. The defaults train in seconds on a CPU."""

    architecture: str = "llama"  # "llama" or "gpt_neo"
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    # The output layer is drawn wider than the rest: with a frozen random output layer at
    # 0.02, the logit margin caps near 2.6, so a LoRA adapter (which does not train the
    # output layer) could never make a confident prediction.
    output_init_std: float = 0.5
    seed: int = 0


def _fingerprint(spec: TinyModelSpec, corpus: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for line in corpus:
        digest.update(line.encode())
    return digest.hexdigest()[:16]


def train_tokenizer(
    corpus: Iterable[str], dest: Path, vocab_size: int, model_max_length: int
) -> None:
    """Trains a byte-level BPE tokenizer on `corpus` and saves it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(dest)


def build_tiny_model(
    dest: str | os.PathLike[str],
    spec: TinyModelSpec | None = None,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Writes a tiny model + tokenizer to `dest` (skipped if the same one is already there)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    spec = spec or TinyModelSpec()
    dest = Path(dest)
    lines = [
        line for line in (corpus if corpus is not None else _DEFAULT_CORPUS.splitlines()) if line
    ]
    lines = lines + _DEFAULT_CORPUS.splitlines()
    stamp = dest / "loraforge_tiny_model.json"
    fingerprint = _fingerprint(spec, lines)
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    train_tokenizer(lines, dest, spec.vocab_size, spec.max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(spec.seed)
    if spec.architecture == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            head_dim=spec.hidden_size // spec.num_heads,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=False,
            initializer_range=spec.initializer_range,
            torch_dtype="float32",
            **ids,
        )
        model = LlamaForCausalLM(config)
    elif spec.architecture == "gpt_neo":
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        config = GPTNeoConfig(
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            attention_types=[[["global", "local"], max(1, spec.num_layers // 2)]],
            intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.max_position_embeddings,
            window_size=min(256, spec.max_position_embeddings),
            initializer_range=spec.initializer_range,
            torch_dtype="float32",
            **ids,
        )
        model = GPTNeoForCausalLM(config)
    else:
        raise ValueError(
            f"unknown tiny architecture {spec.architecture!r}: use 'llama' or 'gpt_neo'"
        )
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, spec.output_init_std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    model.save_pretrained(dest, safe_serialization=True)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "spec": asdict(spec)}, indent=2))
    return dest

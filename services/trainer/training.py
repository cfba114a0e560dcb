"""The training function: examples + parameters in, a PEFT LoRA adapter out.

It knows nothing of gRPC or the job queue; the worker gives it examples and a
`Reporter`, and the benchmark calls it directly. Steps:

1. Tokenize and validate every example for this model's tokenizer. Rows that are
   too long or have no completion tokens are invalid; above
   `invalid_data_tolerance_percent` the run stops (`ToleranceExceeded`).
2. Hold out an evaluation split (seeded).
3. Optionally pack short examples into rows of `model_max_length` tokens. A
   packed row's `position_ids` restart at 0 for every example and the batch
   has no attention mask: transformers then builds a
   block-diagonal causal mask (flash-attention varlen on GPUs), so packed
   examples cannot attend to each other; each packed row keeps its own slot in
   the batch. The first label of each example is
   ignored, so no example is trained to predict the start of the next.
4. Train with transformers' `Trainer` and PEFT LoRA: loss on completion tokens
   only for prompt/completion examples (configurable), evaluation loss on the
   held-out split, checkpoints handed to the reporter as they are written, and a
   resume path from a checkpoint folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from loraforge.services.common.base_models import resolve_base_model
from loraforge.services.common.model_access import refuse_model_code
from loraforge.services.common.prompts import has_chat_template, render_prompt
from loraforge.services.trainer.checkpoints import EVAL_SCORES_FILE
from loraforge.services.trainer.params import TrainingParams, with_trainer

IGNORE_INDEX = -100
REAL_TOKENS = (
    "real_tokens"  # batch key with the non-padding token count; removed before the forward pass
)
MAX_LISTED_INVALID = 5


@dataclass(frozen=True)
class TrainingExample:
    """One example. `prompt` empty and `is_text` set means full language-model loss."""

    prompt: str
    completion: str
    is_text: bool = False
    ref: str = ""  # where it came from, for messages about bad rows


@dataclass(frozen=True)
class InvalidRow:
    ref: str
    reason: str


@dataclass
class Feature:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # cut to model_max_length (tokenizer_config.truncation)


# A truncated prompt keeps at least this many of its own tokens; a completion that leaves
# fewer makes the example invalid, as dropping would.
MIN_PROMPT_TOKENS = 8
ELLIPSIS = " … "  # marks where a prompt was cut


class Reporter(Protocol):
    """What training tells the outside world; the worker stores it as events."""

    def log(self, message: str, level: str = "INFO") -> None: ...

    def progress(self, progress: dict[str, Any]) -> None: ...

    def checkpoint_saved(self, step: int, folder: Path) -> None: ...

    def should_stop(self) -> bool: ...


class QuietReporter:
    """A reporter that records nothing and never stops (benchmarks, scripts)."""

    def log(self, message: str, level: str = "INFO") -> None:
        pass

    def progress(self, progress: dict[str, Any]) -> None:
        pass

    def checkpoint_saved(self, step: int, folder: Path) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class TrainingError(Exception):
    """Training cannot go on; the message is for the user."""


class ToleranceExceeded(TrainingError):
    """Too many examples are invalid for this tokenizer (the seed's status 21119)."""


class TrainingStopped(Exception):
    """The reporter asked to stop (cancelled, or the run was taken over)."""


@dataclass
class TrainingResult:
    adapter_dir: Path
    metrics: dict[str, float]
    global_step: int
    total_steps: int
    resumed_from_step: int
    train_tokens: int
    train_seconds: float
    invalid_rows: list[InvalidRow] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


# 1. Tokenize and validate.


def base_model_path(
    params: TrainingParams, model_path: str = "", trust_remote_code: bool = False
) -> str:
    """What `from_pretrained` loads for the run's base model (catalogue names resolve locally).

    `model_path`: what the worker's `ModelAccess` made of the base model's name (the run's
    parameter when empty). A folder that brings its own code is refused unless the operator's
    `trust_remote_code` is on.
    """
    path = resolve_base_model(model_path or params.base_model)
    refuse_model_code(path, trust_remote_code, params.base_model)
    return path


def load_tokenizer(
    params: TrainingParams, *, model_path: str = "", trust_remote_code: bool = False
) -> Any:
    from transformers import AutoTokenizer

    mc, tc = params.model_config, params.tokenizer_config
    tokenizer = AutoTokenizer.from_pretrained(
        base_model_path(params, model_path, trust_remote_code),
        revision=mc.revision or None,
        trust_remote_code=trust_remote_code,
    )
    tokenizer.model_max_length = tc.model_max_length
    tokenizer.padding_side = tc.padding_side
    if tc.pad_token:
        tokenizer.pad_token = tc.pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_examples(
    tokenizer: Any, examples: Sequence[TrainingExample], params: TrainingParams
) -> tuple[list[Feature], list[InvalidRow]]:
    """Turns examples into features; returns the valid ones and why each other one is not."""
    tc = params.tokenizer_config
    max_len = tc.model_max_length
    completion_only = params.trainer_config.completion_only_loss
    eos = (
        [tokenizer.eos_token_id] if tc.add_eos_token and tokenizer.eos_token_id is not None else []
    )
    fmt = tc.prompt()
    if fmt.is_chat and not has_chat_template(tokenizer):
        raise TrainingError(
            f"tokenizer_config.prompt_format is chat, but the base model "
            f"{params.base_model} has no chat template; "
            "use prompt_format raw and put the markup in the prompts"
        )
    # Plain texts are learned whole; only prompts are wrapped in the chat template.
    rendered = [
        e.prompt if e.is_text else render_prompt(tokenizer, e.prompt, fmt) for e in examples
    ]
    prompts = (
        tokenizer(rendered, add_special_tokens=not fmt.is_chat)["input_ids"] if examples else []
    )
    completions = (
        tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
        if examples
        else []
    )
    marker = tokenizer(ELLIPSIS, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    features: list[Feature] = []
    invalid: list[InvalidRow] = []
    for example, prompt_ids, completion_ids in zip(examples, prompts, completions, strict=True):
        if not completion_ids:
            what = "no text" if example.is_text else "no completion tokens (nothing to learn)"
            invalid.append(InvalidRow(example.ref, f"has {what} for this tokenizer"))
            continue
        if example.is_text:
            # The whole text is the target; the prompt side only contributes special tokens (BOS).
            prompt_ids = [t for t in prompt_ids if t in special]
        ids = list(prompt_ids) + list(completion_ids) + eos
        truncated = False
        if len(ids) > max_len and tc.truncation != "drop":
            if example.is_text:
                room = max_len - len(prompt_ids) - len(eos)
                if room >= MIN_PROMPT_TOKENS:
                    completion_ids, truncated = completion_ids[:room], True
            else:
                room = max_len - len(completion_ids) - len(eos)
                lead = next(
                    (i for i, t in enumerate(prompt_ids) if t not in special), len(prompt_ids)
                )
                cut = truncate_prompt(prompt_ids, room, marker, tc.truncation, lead)
                if cut is not None:
                    prompt_ids, truncated = cut, True
            ids = list(prompt_ids) + list(completion_ids) + eos
        if len(ids) > max_len:
            invalid.append(
                InvalidRow(
                    example.ref,
                    f"is {len(ids)} tokens long, longer than model_max_length {max_len}"
                    + (
                        ""
                        if tc.truncation == "drop"
                        else f", and its completion alone leaves the prompt under "
                        f"{MIN_PROMPT_TOKENS} tokens"
                    ),
                )
            )
            continue
        if example.is_text or not completion_only:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids) + eos
        features.append(Feature(ids, labels, truncated))
    return features, invalid


def truncate_prompt(
    prompt_ids: Sequence[int], room: int, marker: Sequence[int], mode: str, lead: int = 0
) -> list[int] | None:
    """`prompt_ids` cut to `room` tokens, `marker` where the cut is, or None where that would
    leave fewer than MIN_PROMPT_TOKENS of the prompt.

    "prompt_middle" keeps a quarter of the room from the start (a chat template's header and
    system prompt, an instruction) and the rest from the end (the end of the input and the
    assistant's header, next to what the model answers); "prompt_start" keeps the end alone.
    Either keeps the first `lead` tokens (a BOS token) whole.
    """
    keep = room - len(marker)
    if keep < MIN_PROMPT_TOKENS:
        return None
    head = max(keep // 4 if mode == "prompt_middle" else 0, min(lead, keep - MIN_PROMPT_TOKENS))
    tail = keep - head
    return [*prompt_ids[:head], *marker, *prompt_ids[len(prompt_ids) - tail :]]


def check_tolerance(total: int, invalid: Sequence[InvalidRow], tolerance_percent: float) -> None:
    if total == 0:
        raise TrainingError("the dataset version has no examples")
    share = 100.0 * len(invalid) / total
    if share > tolerance_percent or len(invalid) == total:
        listed = "; ".join(f"{row.ref}: {row.reason}" for row in invalid[:MAX_LISTED_INVALID])
        more = (
            f" (and {len(invalid) - MAX_LISTED_INVALID} more)"
            if len(invalid) > MAX_LISTED_INVALID
            else ""
        )
        raise ToleranceExceeded(
            f"{len(invalid)} of {total} examples ({share:.1f}%) are invalid for this model's tokenizer, "
            f"more than invalid_data_tolerance_percent {tolerance_percent:g}%. Examples: {listed}{more}. "
            "Fix or remove these rows, raise tokenizer_config.model_max_length, or raise the tolerance."
        )


def split_eval(
    features: list[Feature], percent: float, seed: int
) -> tuple[list[Feature], list[Feature]]:
    if percent <= 0 or len(features) < 2:
        return features, []
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(features) - 1, max(1, round(len(features) * percent / 100)))
    held = set(order[:n_eval])
    train = [f for i, f in enumerate(features) if i not in held]
    return train, [features[i] for i in sorted(held)]


# 2. Packing and collation.


@dataclass
class PackedRow:
    """Several examples laid end to end; positions restart at each one."""

    examples: list[Feature]

    @property
    def length(self) -> int:
        return sum(len(f.input_ids) for f in self.examples)


def pack(features: Sequence[Feature], max_length: int) -> list[PackedRow]:
    """First-fit-decreasing bin packing into rows of at most `max_length` tokens (deterministic)."""
    rows: list[PackedRow] = []
    space: list[int] = []
    for feature in sorted(features, key=lambda f: -len(f.input_ids)):
        n = len(feature.input_ids)
        for i, free in enumerate(space):
            if n <= free:
                rows[i].examples.append(feature)
                space[i] -= n
                break
        else:
            rows.append(PackedRow([feature]))
            space.append(max_length - n)
    return rows


class TokenCounter:
    """Counts the real (non-padding) tokens the collator hands to the model."""

    def __init__(self) -> None:
        self.tokens = 0


class PaddingCollator:
    """Pads a batch of features to its longest one; padding gets no attention and no loss."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.left = padding_side == "left"

    def __call__(self, batch: Sequence[Feature]) -> dict[str, Any]:
        import torch

        width = max(len(f.input_ids) for f in batch)
        ids, labels, mask = [], [], []
        for f in batch:
            pad = width - len(f.input_ids)
            if self.left:
                ids.append([self.pad_token_id] * pad + f.input_ids)
                labels.append([IGNORE_INDEX] * pad + f.labels)
                mask.append([0] * pad + [1] * len(f.input_ids))
            else:
                ids.append(f.input_ids + [self.pad_token_id] * pad)
                labels.append(f.labels + [IGNORE_INDEX] * pad)
                mask.append([1] * len(f.input_ids) + [0] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


class PackedCollator:
    """Lays out a batch of packed rows with per-example positions and no attention mask.

    Each row keeps its own batch slot, so attention stays quadratic in the row
    length, not in the batch's total length. A row shorter than the longest one
    is filled with padding that forms a block of its own (positions restart at
    0), gets no loss, and is not counted as trained tokens.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[PackedRow]) -> dict[str, Any]:
        import torch

        width = max(row.length for row in batch)
        ids, labels, positions = [], [], []
        for row in batch:
            row_ids: list[int] = []
            row_labels: list[int] = []
            row_positions: list[int] = []
            for f in row.examples:
                row_ids.extend(f.input_ids)
                row_labels.append(
                    IGNORE_INDEX
                )  # never learn to predict an example's start from the one before
                row_labels.extend(f.labels[1:])
                row_positions.extend(range(len(f.input_ids)))
            pad = width - len(row_ids)
            ids.append(row_ids + [self.pad_token_id] * pad)
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            positions.append(row_positions + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            REAL_TOKENS: torch.tensor(sum(row.length for row in batch)),
        }


# 3. Model.


def _dtype(name: str) -> Any:
    import torch

    return {
        "auto": "auto",
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def load_model(
    params: TrainingParams,
    *,
    model_path: str = "",
    trust_remote_code: bool = False,
    init_adapter: Path | None = None,
) -> Any:
    """Loads the base model (hub id or local folder) and wraps it with LoRA, whose weights
    start as `init_adapter`'s (a PEFT adapter folder of the same shape) when given."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    mc, qc, pc = params.model_config, params.quantization_config, params.peft_config
    gradient_checkpointing = params.trainer_config.gradient_checkpointing
    kwargs: dict[str, Any] = {
        "revision": mc.revision or None,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": mc.attn_implementation,
    }
    dtype = mc.torch_dtype
    quantized = qc.quant_method == "gptq"
    if quantized:
        if not torch.cuda.is_available():
            raise TrainingError("GPTQ base models need a CUDA GPU; this worker has none")
        from transformers import GPTQConfig

        # The checkpoint carries its own quantization config; this picks a kernel that can train.
        kwargs["quantization_config"] = GPTQConfig(bits=qc.bits, backend=qc.backend)
        kwargs["device_map"] = "auto"
        dtype = "float16" if dtype == "auto" else dtype
    elif not torch.cuda.is_available() and dtype in ("float16", "auto"):
        # Half precision on a CPU is slow and loses precision; train the LoRA in float32 there.
        dtype = "float32"
    kwargs["dtype"] = _dtype(dtype)
    path = base_model_path(params, model_path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if kwargs["attn_implementation"] != "sdpa" or "scaled_dot_product_attention" not in str(
            exc
        ):
            raise
        # Some architectures (GPT-Neo among them) have no SDPA path; eager attention is exact too.
        kwargs["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=pc.r,
        # PEFT takes a fractional alpha too (scaling is alpha / r), though it annotates an int.
        lora_alpha=pc.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=pc.lora_dropout,
        target_modules=list(pc.target_modules),
        bias=cast(Literal["none", "all", "lora_only"], pc.bias),  # the template allows these
        use_rslora=pc.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainingError(f"peft_config.target_modules does not fit this model: {exc}") from None
    if init_adapter is not None:
        load_init_adapter(peft_model, params, init_adapter)
    return peft_model


def load_init_adapter(model: Any, params: TrainingParams, folder: Path) -> None:
    """Sets the LoRA weights of `model` to those of the adapter in `folder`; TrainingError when
    that adapter has another shape (the trainer checked it, this checks the file itself)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    pc = params.peft_config
    targets = config.get("target_modules") or []
    had = (config.get("r"), sorted(targets) if isinstance(targets, list) else targets)
    if had != (pc.r, sorted(pc.target_modules)):
        raise TrainingError(
            f"the adapter to continue from has r {had[0]} and target modules {had[1]}, this run "
            f"r {pc.r} and {sorted(pc.target_modules)}; continue with the adapter's shape"
        )
    state = load_file(str(folder / "adapter_model.safetensors"))
    try:
        result: Any = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # a tensor of another size
        raise TrainingError(
            f"the adapter to continue from does not fit this model: {exc}"
        ) from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        shown = (list(result.unexpected_keys) + missing)[:3]
        raise TrainingError(
            "the adapter to continue from does not fit this model's LoRA layers "
            f"(e.g. {', '.join(shown)}); continue on the base model it was trained on"
        )


# 4. Training.


def _mixed_precision(choice: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments: half precision only on a CUDA GPU."""
    import torch

    if not torch.cuda.is_available() or choice == "no":
        return False, False
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return choice == "bf16", choice == "fp16"


def training_arguments(params: TrainingParams, output_dir: Path, has_eval: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    trc = params.trainer_config
    bf16, fp16 = _mixed_precision(trc.mixed_precision)
    eval_strategy = "no"
    eval_steps = None
    best = has_eval and trc.adapter_checkpoint == "best"
    if has_eval:
        eval_strategy = "steps" if trc.eval_steps else "epoch"
        eval_steps = trc.eval_steps or None
        if best or trc.early_stopping_patience:
            # Every checkpoint's eval loss is known: the best is one of the checkpoints.
            eval_strategy, eval_steps = "steps", trc.eval_steps or trc.save_steps
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=trc.num_train_epochs,
        max_steps=trc.max_steps,
        per_device_train_batch_size=trc.per_device_train_batch_size,
        per_device_eval_batch_size=trc.per_device_train_batch_size,
        gradient_accumulation_steps=trc.gradient_accumulation_steps,
        learning_rate=trc.learning_rate,
        lr_scheduler_type=trc.lr_scheduler_type,
        warmup_steps=trc.warmup_ratio,  # a float below 1 is a ratio of all steps
        weight_decay=trc.weight_decay,
        max_grad_norm=trc.max_grad_norm,
        optim=trc.optim,
        seed=trc.seed,
        data_seed=trc.seed,
        logging_steps=trc.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=trc.save_steps,
        save_total_limit=1,  # local copies; the object store keeps `save_total_limit`
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        # The Trainer keeps the best checkpoint's folder and loads it back at the end.
        load_best_model_at_end=best,
        metric_for_best_model="eval_loss" if best else None,
        greater_is_better=False if best else None,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        fp16=fp16,
    )


def _make_trainer_class() -> type:
    from transformers import Trainer

    class CountingTrainer(Trainer):
        """Trainer that counts the real tokens of every training batch (for tokens/s)."""

        token_counter: TokenCounter

        def training_step(
            self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> Any:
            mask = inputs.get("attention_mask")
            self.token_counter.tokens += (
                int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            )
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            keep = labelled_positions(inputs.get("labels"))
            if keep is None or not takes_logits_to_keep(model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            outputs = model(
                **{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep
            )
            loss = labelled_loss(outputs.logits, labels[:, keep + 1])
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # The Trainer's own convention: a sum over the whole accumulated batch's labels.
                loss = loss / num_items_in_batch
            else:
                loss = loss / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return CountingTrainer


def labelled_positions(labels: Any) -> Any:
    """The positions whose next token is a label in some row of the batch, as a 1-D tensor, or
    None where they are most of the batch (a plain forward pass then costs no more).

    A completion-only batch of long prompts and short completions (a classifier's) scores a
    few positions of each row: computing the logits there alone, rather than a vocabulary's
    worth of them for every token, is most of a training step's memory
    (8 × 1,024 tokens × 49,152 words in float32 is 1.6 GB, and as much again for the gradient).
    """
    if labels is None or labels.dim() != 2 or labels.shape[1] < 2:
        return None
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0 or keep.numel() * 2 > labels.shape[1]:
        return None
    return keep


def labelled_loss(logits: Any, targets: Any) -> Any:
    """Summed cross-entropy of `logits` [batch, positions, vocabulary] against `targets`
    [batch, positions] (IGNORE_INDEX where a row has no label), in float32 as the models'
    own loss functions compute it."""
    import torch

    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the (PEFT-wrapped) causal LM's forward takes `logits_to_keep` (transformers'
    Llama, Qwen2, Mistral, GPT-Neo and most decoder models do)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def held_out_answers(held_out: Sequence[Any], limit: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of up to `limit` held-out examples that have a prompt
    (features, or the packed rows holding them)."""
    features: list[Feature] = []
    for row in held_out:
        features.extend(row.examples if isinstance(row, PackedRow) else [row])
    found = []
    for feature in features:
        start = next((i for i, label in enumerate(feature.labels) if label != IGNORE_INDEX), 0)
        if start == 0:
            continue  # a plain text, or no prompt masked out: nothing to answer
        completion = [
            t
            for t, label in zip(feature.input_ids, feature.labels, strict=True)
            if label != IGNORE_INDEX
        ]
        found.append((feature.input_ids[:start], completion))
        if len(found) == limit:
            break
    return found


def score_answers(
    model: Any, tokenizer: Any, examples: Sequence[tuple[list[int], list[int]]], max_new_tokens: int
) -> dict[str, float]:
    """Greedy answers to `examples`, one at a time (so no padding changes them), scored against
    their completions with the evaluations' metrics; {} for no examples."""
    import torch

    from loraforge.services.trainer import metrics as scoring

    if not examples:
        return {}
    references = [tokenizer.decode(c, skip_special_tokens=True) for _, c in examples]
    scorer = scoring.Scorer(
        scoring.default_metrics(references),
        labels=sorted({scoring.normalize(r) for r in references}),
    )
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for (prompt, _), reference in zip(examples, references, strict=True):
                ids = torch.tensor([prompt], device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
                scorer.score(
                    tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True), reference
                )
    finally:
        model.train(training)
    return scorer.aggregates(len(examples))


def _make_callback(
    reporter: Reporter,
    counter: TokenCounter,
    score: Callable[[Any], dict[str, float]] | None = None,
) -> Any:
    """The callback that reports progress and checkpoints; `score(model)`, when given, scores
    held-out answers at each checkpoint (written beside it as `eval_scores.json`)."""
    from transformers import TrainerCallback

    class ReportingCallback(TrainerCallback):
        """Turns the Trainer's logs, saves and steps into reporter calls."""

        def __init__(self) -> None:
            self.start = time.monotonic()
            self.start_step = 0
            self.start_tokens = 0
            self.learning_rate = 0.0
            self.eval_step: int | None = None  # the step of the last eval loss reported

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.monotonic()
            self.start_step = state.global_step
            self.start_tokens = counter.tokens

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if reporter.should_stop():
                raise TrainingStopped()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            if "eval_loss" in logs and "loss" not in logs and state.global_step == self.eval_step:
                return  # the same weights evaluated again (the final evaluation): nothing new
            if "learning_rate" in logs:
                self.learning_rate = float(logs["learning_rate"])
            if "train_runtime" in logs:
                return  # the final summary; the worker reports final metrics itself
            elapsed = max(time.monotonic() - self.start, 1e-9)
            done = state.global_step - self.start_step
            left = max(state.max_steps - state.global_step, 0)
            progress: dict[str, Any] = {
                "step": state.global_step,
                "total_steps": state.max_steps,
                "epoch": float(state.epoch or 0.0),
                "learning_rate": self.learning_rate,
                "tokens_per_second": (counter.tokens - self.start_tokens) / elapsed,
                "eta_seconds": (elapsed / done * left) if done > 0 else 0.0,
            }
            # Each loss only in the event of the log that measured it, so a client plots each
            # once, at its step; the run's latest progress keeps the last of each (`jobs.py`).
            if "loss" in logs:
                progress["train_loss"] = float(logs["loss"])
            if "eval_loss" in logs:
                progress["eval_loss"] = float(logs["eval_loss"])
                self.eval_step = state.global_step
            reporter.progress(progress)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if score is not None and kwargs.get("model") is not None:
                scores = score(kwargs["model"])
                (folder / EVAL_SCORES_FILE).write_text(json.dumps(scores))
                shown = ", ".join(f"{k} {v:.3g}" for k, v in sorted(scores.items()))
                reporter.log(f"held-out answers at step {state.global_step}: {shown}")
            reporter.checkpoint_saved(state.global_step, folder)

    return ReportingCallback()


class EarlyStopping:
    """Stops training once the eval loss has not improved by more than `threshold` for
    `patience` evaluations in a row (the Trainer's own callback would also force the best
    checkpoint to become the adapter; here that is `adapter_checkpoint`'s choice)."""

    def __init__(self, patience: int, threshold: float, reporter: Reporter) -> None:
        self.patience = patience
        self.threshold = threshold
        self.reporter = reporter
        self.best: float | None = None
        self.since_best = 0
        self.stopped_at: int | None = None
        self.last_step = -1

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stopping = self

        class EarlyStoppingCallback(TrainerCallback):
            def on_evaluate(
                self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
            ) -> None:
                loss = (metrics or {}).get("eval_loss")
                if loss is not None and stopping.seen(float(loss), state.global_step):
                    control.should_training_stop = True

        return EarlyStoppingCallback()

    def seen(self, loss: float, step: int) -> bool:
        """Records an eval loss; True when training should stop."""
        if step == self.last_step:
            return False  # the same weights evaluated again (the final evaluation)
        self.last_step = step
        if self.best is None or self.best - loss > self.threshold:
            self.best, self.since_best = loss, 0
            return False
        self.since_best += 1
        if self.since_best < self.patience:
            return False
        self.stopped_at = step
        self.reporter.log(
            f"early stopping at step {step}: the eval loss has not improved on {self.best:.4f} "
            f"by more than {self.threshold:g} for {self.patience} evaluations"
        )
        return True


@dataclass
class PreparedData:
    train_rows: list[Any]
    eval_rows: list[Any]
    invalid: list[InvalidRow]
    truncated: int  # examples cut to model_max_length
    collator: Any


def prepare_data(
    tokenizer: Any,
    examples: Sequence[TrainingExample],
    params: TrainingParams,
    reporter: Reporter,
) -> PreparedData:
    """Tokenized, validated, split and (optionally) packed data plus its collator."""
    tc, trc = params.tokenizer_config, params.trainer_config
    features, invalid = tokenize_examples(tokenizer, examples, params)
    for row in invalid[:20]:
        reporter.log(f"skipping {row.ref}: {row.reason}", "WARNING")
    if len(invalid) > 20:
        reporter.log(f"skipping {len(invalid) - 20} more invalid rows", "WARNING")
    check_tolerance(len(examples), invalid, params.invalid_data_tolerance_percent)
    truncated = sum(f.truncated for f in features)
    if truncated:
        reporter.log(
            f"truncated {truncated} examples longer than model_max_length {tc.model_max_length} "
            f"to fit (tokenizer_config.truncation {tc.truncation}; a cut prompt is marked "
            f"{ELLIPSIS.strip()!r})"
        )
    train, held_out = split_eval(features, trc.eval_split_percent, trc.seed)
    if trc.packing:
        train_rows: list[Any] = list(pack(train, tc.model_max_length))
        eval_rows: list[Any] = list(pack(held_out, tc.model_max_length))
        collator: Any = PackedCollator(tokenizer.pad_token_id)
        reporter.log(
            f"packed {len(train)} training examples into {len(train_rows)} rows of ≤{tc.model_max_length} tokens"
        )
    else:
        train_rows, eval_rows = list(train), list(held_out)
        collator = PaddingCollator(tokenizer.pad_token_id, tc.padding_side)
    reporter.log(
        f"{len(features)} valid examples ({len(invalid)} invalid, {truncated} truncated): "
        f"{len(train)} for training, {len(held_out)} for evaluation"
    )
    return PreparedData(train_rows, eval_rows, invalid, truncated, collator)


def library_versions() -> dict[str, str]:
    out = {}
    for lib in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def memory_budget() -> int:
    """The bytes this process may still grow to: the least of the machine's available memory,
    its cgroup's room and its address-space limit, each plus what it already holds, less a
    sixth for what the estimate leaves out (the allocator, libraries, the data)."""
    import resource

    held = _proc_kib("/proc/self/status", "VmRSS") * 1024
    rooms = [_proc_kib("/proc/meminfo", "MemAvailable") * 1024]
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            rooms.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        rooms.append(soft - _proc_kib("/proc/self/status", "VmSize") * 1024)
    rooms = [room for room in rooms if room > 0]
    return int((held + min(rooms)) * 5 / 6) if rooms else 0


def _proc_kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def plan_memory(
    params: TrainingParams, data: PreparedData, model_path: str, budget: int, reporter: Reporter
) -> TrainingParams:
    """The parameters to train with in `budget` bytes: as given where their estimate fits;
    else with gradient checkpointing, then with a smaller micro-batch and as many more
    accumulation steps, so the global batch (and what the run learns) stays the same."""
    from loraforge.services.trainer.estimates import peak_memory

    trc = params.trainer_config
    rows = data.train_rows
    longest = max(
        (len(r.input_ids) if isinstance(r, Feature) else r.length for r in rows), default=0
    )
    labelled = None
    if rows and all(isinstance(r, Feature) for r in rows):
        labelled = max(sum(label != IGNORE_INDEX for label in r.labels) for r in rows)

    def estimate(candidate: TrainingParams) -> int:
        return peak_memory(candidate, model_path or candidate.base_model, longest, False, labelled)

    first = estimate(params)
    if budget <= 0 or first <= budget or first == 0:
        return params
    planned = params
    if not trc.gradient_checkpointing:
        planned = with_trainer(planned, gradient_checkpointing=True)
    while estimate(planned) > budget and planned.trainer_config.per_device_train_batch_size > 1:
        p = planned.trainer_config
        planned = with_trainer(
            planned,
            per_device_train_batch_size=p.per_device_train_batch_size // 2,
            gradient_accumulation_steps=p.gradient_accumulation_steps * 2,
        )
    p = planned.trainer_config
    gib = 2**30
    reporter.log(
        f"estimated {first / gib:.2f} GiB with micro-batch {trc.per_device_train_batch_size}, more "
        f"than the {budget / gib:.2f} GiB this worker has: training with micro-batch "
        f"{p.per_device_train_batch_size} x {p.gradient_accumulation_steps} accumulation steps "
        f"(the same global batch of {p.per_device_train_batch_size * p.gradient_accumulation_steps})"
        f"{', gradient checkpointing on' if p.gradient_checkpointing else ''}, estimated "
        f"{estimate(planned) / gib:.2f} GiB",
        "WARNING",
    )
    return planned


def run_training(
    params: TrainingParams,
    examples: Sequence[TrainingExample],
    work_dir: Path,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    *,
    model_path: str = "",
    trust_remote_code: bool = False,
    init_adapter: Path | None = None,
    memory_limit: int | None = None,
) -> TrainingResult:
    """Trains a LoRA adapter; writes checkpoints under `work_dir/checkpoints`, the adapter to `work_dir/adapter`.

    `model_path` and `trust_remote_code` come from the worker's settings (see `base_model_path`).
    `memory_limit`: the bytes training may use on a CPU (`plan_memory`); None: what this
    process has (`memory_budget`); 0: no planning.

    Raises ToleranceExceeded / TrainingError for problems the user must fix, and
    TrainingStopped when the reporter asks to stop.
    """
    from transformers import PrinterCallback, set_seed

    reporter = reporter or QuietReporter()
    tokenizer = load_tokenizer(params, model_path=model_path, trust_remote_code=trust_remote_code)
    data = prepare_data(tokenizer, examples, params, reporter)
    if memory_limit is None:
        import torch

        memory_limit = 0 if torch.cuda.is_available() else memory_budget()
    params = plan_memory(params, data, model_path, memory_limit, reporter)
    trc = params.trainer_config
    train_rows, eval_rows, invalid, collator = (
        data.train_rows,
        data.eval_rows,
        data.invalid,
        data.collator,
    )

    set_seed(trc.seed)
    model = load_model(
        params,
        model_path=model_path,
        trust_remote_code=trust_remote_code,
        init_adapter=init_adapter,
    )
    trainable, total = model.get_nb_trainable_parameters()
    reporter.log(
        f"loaded {params.base_model}: {trainable:,} trainable LoRA parameters of {total:,}"
    )
    counter = TokenCounter()
    answers = held_out_answers(eval_rows, trc.eval_generate_examples)

    def score(scored_model: Any) -> dict[str, float]:
        return score_answers(scored_model, tokenizer, answers, trc.eval_max_new_tokens)

    args = training_arguments(params, work_dir / "checkpoints", has_eval=bool(eval_rows))
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[_make_callback(reporter, counter, score if answers else None)],
    )
    early = None
    if trc.early_stopping_patience and eval_rows:
        early = EarlyStopping(trc.early_stopping_patience, trc.early_stopping_threshold, reporter)
        trainer.add_callback(early.callback())
    trainer.token_counter = counter
    trainer.remove_callback(PrinterCallback)  # progress goes to the reporter, not stdout
    resumed_from = 0
    if resume_from is not None:
        resumed_from = int(resume_from.name.rsplit("-", 1)[-1])
        reporter.log(f"resuming from checkpoint step {resumed_from}")
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.monotonic() - started
    metrics: dict[str, float] = {
        "train_loss": float(output.training_loss),
        "global_step": float(trainer.state.global_step),
        "train_examples": float(
            sum(len(r.examples) for r in train_rows) if trc.packing else len(train_rows)
        ),
        "invalid_examples": float(len(invalid)),
        "truncated_examples": float(data.truncated),
        "train_tokens": float(counter.tokens),
        "train_seconds": train_seconds,
        "tokens_per_second": counter.tokens / train_seconds if train_seconds > 0 else 0.0,
    }
    if eval_rows:
        eval_metrics = trainer.evaluate()
        metrics["eval_loss"] = float(eval_metrics["eval_loss"])
        if math.isfinite(metrics["eval_loss"]):
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        reporter.log(f"final eval loss {metrics['eval_loss']:.4f}")
    best = trainer.state.best_model_checkpoint if args.load_best_model_at_end else None
    metrics["adapter_step"] = float(
        int(best.rsplit("-", 1)[-1]) if best else trainer.state.global_step
    )
    metrics["early_stopped"] = 1.0 if early is not None and early.stopped_at is not None else 0.0
    if best:
        reporter.log(f"the adapter is the best checkpoint's, step {int(metrics['adapter_step'])}")
    if answers:  # the adapter's own answers, whichever checkpoint it is
        metrics.update({f"eval_{k}": v for k, v in score(model).items()})
    adapter_dir = work_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    return TrainingResult(
        adapter_dir=adapter_dir,
        metrics=metrics,
        global_step=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        resumed_from_step=resumed_from,
        train_tokens=counter.tokens,
        train_seconds=train_seconds,
        invalid_rows=invalid,
    )

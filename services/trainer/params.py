"""Typed training parameters: one frozen dataclass per parameter group.

Templates (`templates.py`) say which values a user may choose and check them;
these classes are what the training code receives. Every template declares
exactly these parameters with matching types (checked when the templates load),
so nothing downstream needs a default of its own.

The stored form (`to_dict`: the JSON of a run row, the `params` Struct of a
model version) is the nested groups of plain values: ints stay ints, string
lists are lists.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraforge.services.common.prompts import PromptFormat


@dataclass(frozen=True)
class ModelConfig:
    pretrained_model_name_or_path: str
    revision: str | None
    torch_dtype: str
    attn_implementation: str
    # No `trust_remote_code`: whether a model's own code may run is the operator's setting
    # (of the training workers and predictors), never a parameter (`templates.OPERATOR_ONLY`).


@dataclass(frozen=True)
class QuantizationConfig:
    quant_method: str
    bits: int
    backend: str


@dataclass(frozen=True)
class PeftConfig:
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    bias: str
    use_rslora: bool


@dataclass(frozen=True)
class TokenizerConfig:
    model_max_length: int
    add_eos_token: bool
    padding_side: str
    pad_token: str | None
    prompt_format: str
    system_prompt: str | None
    # An example longer than model_max_length: "prompt_middle", "prompt_start" or "drop".
    truncation: str = "prompt_middle"

    def prompt(self) -> PromptFormat:
        return PromptFormat(self.prompt_format, self.system_prompt or "")


@dataclass(frozen=True)
class TrainerConfig:
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    optim: str
    mixed_precision: str
    gradient_checkpointing: bool
    completion_only_loss: bool
    packing: bool
    eval_split_percent: float
    eval_steps: int
    logging_steps: int
    save_steps: int
    save_total_limit: int
    seed: int
    early_stopping_patience: int = 0
    early_stopping_threshold: float = 0.0
    adapter_checkpoint: str = "last"  # or "best": the checkpoint with the lowest eval loss
    # Held-out examples answered greedily and scored at every checkpoint (0: none).
    eval_generate_examples: int = 0
    eval_max_new_tokens: int = 16


GROUP_TYPES: dict[str, type] = {
    "model_config": ModelConfig,
    "quantization_config": QuantizationConfig,
    "peft_config": PeftConfig,
    "tokenizer_config": TokenizerConfig,
    "trainer_config": TrainerConfig,
}
TOLERANCE = "invalid_data_tolerance_percent"


@dataclass(frozen=True)
class TrainingParams:
    """Everything one run trains with."""

    model_config: ModelConfig
    quantization_config: QuantizationConfig
    peft_config: PeftConfig
    tokenizer_config: TokenizerConfig
    trainer_config: TrainerConfig
    invalid_data_tolerance_percent: float

    @property
    def base_model(self) -> str:
        return self.model_config.pretrained_model_name_or_path

    def to_dict(self) -> dict[str, Any]:
        """The stored form: nested groups of JSON values."""
        out: dict[str, Any] = {}
        for group in GROUP_TYPES:
            out[group] = {
                f.name: _plain(getattr(getattr(self, group), f.name))
                for f in dataclasses.fields(getattr(self, group))
            }
        out[TOLERANCE] = self.invalid_data_tolerance_percent
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingParams:
        """Parses the stored form; ValueError naming every missing or mistyped parameter.

        Values are coerced to their field's type (a Struct carries 16 as 16.0), but
        bounds are not checked: they belong to templates, which may change after a
        run was stored.
        """
        problems: list[str] = []
        groups: dict[str, Any] = {}
        for group, group_cls in GROUP_TYPES.items():
            raw = data.get(group)
            if not isinstance(raw, Mapping):
                problems.append(f"{group}: missing")
                continue
            values = {}
            for name, tp in field_types(group_cls).items():
                if name not in raw:
                    problems.append(f"{group}.{name}: missing")
                    continue
                try:
                    values[name] = coerce(tp, raw[name])
                except ValueError as exc:
                    problems.append(f"{group}.{name}: {exc}")
            if len(values) == len(field_types(group_cls)):
                groups[group] = group_cls(**values)
        tolerance: float | None = None
        try:
            tolerance = coerce(float, data.get(TOLERANCE))
        except ValueError as exc:
            problems.append(f"{TOLERANCE}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        assert tolerance is not None
        return cls(**groups, invalid_data_tolerance_percent=tolerance)


@typing.no_type_check
def field_types(group_cls: type) -> dict[str, Any]:
    """Field name to type of a group class, in declaration order."""
    hints = typing.get_type_hints(group_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(group_cls)}


def schema() -> dict[str, Any]:
    """Every parameter path (`group.key` or the tolerance) and its Python type."""
    out: dict[str, Any] = {
        f"{group}.{name}": tp
        for group, group_cls in GROUP_TYPES.items()
        for name, tp in field_types(group_cls).items()
    }
    out[TOLERANCE] = float
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def coerce(tp: Any, value: Any) -> Any:
    """`value` as type `tp` (int, float, bool, str, str | None, tuple[str, ...])."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false (got {value!r})")
    if tp is int:
        if _is_number(value) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise ValueError(f"must be a whole number (got {value!r})")
    if tp is float:
        if _is_number(value) and math.isfinite(value):
            return float(value)
        raise ValueError(f"must be a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string (got {value!r})")
    if typing.get_origin(tp) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"must be a list of strings (got {value!r})")
    raise ValueError(f"has unsupported type {tp}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def with_trainer(params: TrainingParams, **changes: Any) -> TrainingParams:
    """`params` with some trainer_config fields changed (a memory plan, a retry's)."""
    return dataclasses.replace(
        params, trainer_config=dataclasses.replace(params.trainer_config, **changes)
    )

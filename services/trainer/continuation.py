"""Continued runs: a new version that starts from an earlier version's adapter.

The new run trains on its own dataset version with its own parameters, but its LoRA
weights start as the earlier version's. That only makes sense on the same base model
and with an adapter of the same shape (rank, target modules, bias: the tensors the
weights are loaded into), so both are checked before the run is queued, and the worker
checks the adapter's own `adapter_config.json` again before it loads the weights.

With the earlier version's template, the new run's parameters are the earlier version's
overrides with the new ones applied on top: "the same recipe, except ...". The earlier
adapter is copied under the new run's own prefix (`init-adapter/`) when the run is
created, so deleting the earlier version later does not break a queued run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraforge.services.common.base_models import canonical_name
from loraforge.services.common.errors import FieldViolation, InvalidArgument
from loraforge.services.common.model_access import MODEL_FIELD
from loraforge.services.trainer.params import TrainingParams

INIT_ADAPTER = "init-adapter"
INIT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def merged_overrides(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `top` applied: groups merge key by key, anything else is replaced."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def same_base_model(trained_on: str, loadable: str) -> bool:
    """Whether `loadable` (what the new run's base model resolves to) is the model an adapter
    was trained on (a folder's real path, or a catalogue or hub name)."""
    return canonical_name(trained_on) == canonical_name(loadable)


def shape_of(params: TrainingParams) -> dict[str, Any]:
    pc = params.peft_config
    return {"r": pc.r, "target_modules": sorted(pc.target_modules), "bias": pc.bias}


def check_compatible(
    source: str,
    trained_on: str,
    source_params: TrainingParams,
    params: TrainingParams,
    loadable: str,
) -> None:
    """InvalidArgument naming every parameter in which the new run cannot continue `source`."""
    violations: list[FieldViolation] = []
    if not same_base_model(trained_on, loadable):
        violations.append(
            FieldViolation(
                f"param_overrides.{MODEL_FIELD}",
                f"{source} was trained on the base model {trained_on!r}, and this run's is "
                f"{params.base_model!r}; an adapter continues only on the base model it was "
                f"trained on, so leave {MODEL_FIELD} as the version's",
            )
        )
    had, has = shape_of(source_params), shape_of(params)
    for key in had:
        if had[key] != has[key]:
            violations.append(
                FieldViolation(
                    f"param_overrides.peft_config.{key}",
                    f"{source}'s adapter has peft_config.{key} {had[key]!r}, and this run's is "
                    f"{has[key]!r}; its weights only load into an adapter of the same shape, so "
                    f"keep peft_config.{key} {had[key]!r}",
                )
            )
    if violations:
        base_differs = violations[0].field.endswith(MODEL_FIELD)
        raise InvalidArgument(
            f"cannot continue from {source}: " + "; ".join(v.description for v in violations),
            reason="BASE_MODEL_MISMATCH" if base_differs else "LORA_SHAPE_MISMATCH",
            field_violations=violations,
        )

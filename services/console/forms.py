"""The training form: one field per template parameter, typed as the template types it.

The fields carry their type, default, bounds and choices to the page, where a script checks
a value as it is typed (the same rules as `check`, so a bad value is flagged before it is
sent). What is sent back is parsed here by type; values that differ from the defaults
become the run's `param_overrides`. Bounds are the trainer's to enforce: its field
violations (`param_overrides.peft_config.r`) come back to the fields they name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraforge.client.params import parameter_default
from loraforge.trainer.v1 import trainer_service_pb2 as tpb

TOLERANCE = "invalid_data_tolerance_percent"
KINDS = {
    tpb.PARAMETER_TYPE_BOOL: "bool",
    tpb.PARAMETER_TYPE_INT: "int",
    tpb.PARAMETER_TYPE_FLOAT: "float",
    tpb.PARAMETER_TYPE_STRING: "string",
    tpb.PARAMETER_TYPE_CHOICE: "choice",
    tpb.PARAMETER_TYPE_STRING_LIST: "list",
}


@dataclass
class Field:
    """One parameter as a form field."""

    path: str
    kind: str
    default: Any
    description: str
    min: float | None
    max: float | None
    choices: list[str]
    nullable: bool

    @property
    def group(self) -> str:
        return self.path.split(".", 1)[0] if "." in self.path else ""

    @property
    def label(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def dom_id(self) -> str:
        return "p-" + self.path.replace(".", "-")

    def text(self, value: Any) -> str:
        """A value as the field shows it."""
        if value is None:
            return ""
        if self.kind == "list":
            return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        if self.kind == "bool":
            return "true" if value else ""
        if isinstance(value, float) and value.is_integer() and self.kind == "int":
            return str(int(value))
        return str(value)

    def default_text(self) -> str:
        """The default as the help line says it."""
        if self.kind == "bool":
            return "true" if self.default else "false"
        return self.text(self.default) or "empty"

    def bounds(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{_num(self.min)} to {_num(self.max)}"
        if self.min is not None:
            return f"at least {_num(self.min)}"
        if self.max is not None:
            return f"at most {_num(self.max)}"
        return ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def fields_of(template: tpb.Template) -> list[Field]:
    return [
        Field(
            path=p.path,
            kind=KINDS.get(p.type, "string"),
            default=parameter_default(p),
            description=p.description,
            min=p.min if p.HasField("min") else None,
            max=p.max if p.HasField("max") else None,
            choices=list(p.choices),
            nullable=p.nullable,
        )
        for p in template.parameters
    ]


def groups(fields: list[Field]) -> list[tuple[str, list[Field]]]:
    """Fields by group, in the template's order; ungrouped ones (the tolerance) left out."""
    out: dict[str, list[Field]] = {}
    for f in fields:
        if f.group:
            out.setdefault(f.group, []).append(f)
    return list(out.items())


class FieldError(ValueError):
    pass


def parse(field: Field, raw: str | None) -> Any:
    """The value a field's text means, by its type; FieldError saying what is wrong."""
    text = (raw or "").strip()
    if field.kind == "bool":
        return text.lower() in ("true", "on", "1", "yes")
    if field.kind in ("int", "float"):
        if not text:
            if field.nullable:
                return None
            raise FieldError("enter a number" if field.kind == "float" else "enter a whole number")
        try:
            number = float(text)
        except ValueError:
            raise FieldError(
                f"{text!r} is not a number"
                if field.kind == "float"
                else f"{text!r} is not a whole number"
            ) from None
        if field.kind == "int":
            if not number.is_integer():
                raise FieldError(f"{text!r} is not a whole number")
            return int(number)
        if not math.isfinite(number):
            raise FieldError(f"{text!r} is not a finite number")
        return number
    if field.kind == "list":
        return [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
    return raw if raw is not None else ""


def check(field: Field, value: Any) -> str:
    """Why `value` is out of the field's bounds or choices ('' when it is fine)."""
    if value is None:
        return ""
    if field.kind in ("int", "float"):
        if field.min is not None and value < field.min:
            return f"must be at least {_num(field.min)}"
        if field.max is not None and value > field.max:
            return f"must be at most {_num(field.max)}"
    if field.kind == "choice" and field.choices and value not in field.choices:
        return f"must be one of {', '.join(field.choices)}"
    if field.kind == "list" and field.choices:
        bad = [v for v in value if v not in field.choices]
        if bad:
            return f"{', '.join(bad)}: not among {', '.join(field.choices)}"
    if field.kind == "string" and not field.nullable and not str(value).strip():
        return "is required"
    return ""


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return bool(a == b) if not (a in (None, "") and b in (None, "")) else True


def overrides(
    fields: list[Field], form: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """(param_overrides nested by group, the values as typed, errors by path) of a form.

    A field that is not sent keeps its default. Values are parsed by type only: bounds
    stay the trainer's to check."""
    nested: dict[str, Any] = {}
    typed: dict[str, str] = {}
    errors: dict[str, str] = {}
    for f in fields:
        raw = form.get(f.path)
        if raw is None:
            continue  # not sent: the default
        typed[f.path] = raw
        try:
            value = parse(f, raw)
        except FieldError as err:
            errors[f.path] = str(err)
            continue
        if same(value, f.default):
            continue
        node = nested
        *path, leaf = f.path.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested, typed, errors


def violations_by_field(fields: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """Server field violations as (errors by form field, the rest as sentences)."""
    by_field: dict[str, str] = {}
    rest: list[str] = []
    for path, description in fields:
        name = path.removeprefix("param_overrides.")
        if path.startswith("param_overrides.") or path in ("dataset_version", "model", "template"):
            by_field[name] = (
                description if name not in by_field else f"{by_field[name]}; {description}"
            )
        else:
            rest.append(f"{path}: {description}" if path else description)
    return by_field, rest

"""Training parameters on the client side: a template's defaults, merging, overrides, YAML.

A protobuf `Struct` (how templates send defaults) holds every number as a double, so a
default is converted back to an int where the template says the parameter is one:
`peft_config.r` reads `16`, not `16.0`. YAML is read the way people write numbers:
`2e-4`, `1e3` and `5E-5` are numbers, as in YAML 1.2 and JSON, not the strings YAML
1.1 makes of them.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from google.protobuf import json_format

from loraforge.trainer.v1 import trainer_service_pb2 as tpb


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus exponent floats without a dot (`2e-4`, `1E3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parses YAML safely, reading `2e-4`-style numbers as floats."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass, so safe


def parameter_value(parameter: tpb.Parameter, value: Any) -> Any:
    """`value` as the template types it: whole numbers of an INT parameter as ints."""
    if parameter.type == tpb.PARAMETER_TYPE_INT and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parameter_default(parameter: tpb.Parameter) -> Any:
    """The parameter's default as a plain Python value (None when it has none)."""
    if not parameter.HasField("default_value"):
        return None
    return parameter_value(parameter, json_format.MessageToDict(parameter.default_value))


def template_defaults(template: tpb.Template) -> dict[str, Any]:
    """Every parameter's default, nested by group: `{"peft_config": {"r": 16, ...}, ...}`."""
    params: dict[str, Any] = {}
    for p in template.parameters:
        node = params
        *groups, leaf = p.path.split(".")
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = parameter_default(p)
    return params


def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Merges nested groups of `update` into `into`, in place; leaves are copied."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def overrides(params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """What `params` sets differently from `defaults`, nested by group."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        base = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(base, dict):
            sub = overrides(value, base)
            if sub:
                out[key] = sub
        elif value != base:
            out[key] = value
    return out

"""Training templates (data files in `templates/`) and validation of parameter overrides.

A template is a YAML file: a base model, a recipe and the parameters a user may
change, grouped as `model_config`, `quantization_config`, `peft_config`,
`tokenizer_config`, `trainer_config`, plus the top-level
`invalid_data_tolerance_percent`. Each parameter has a type, a default, bounds
and a description, so a client can render a form and a bad override is refused
(with its field path) before anything is queued.

Every template declares exactly the parameters of `params.TrainingParams`, with
matching types; a template that does not is refused when the templates load.
Validated parameters come back as a `TrainingParams`, so the training code reads
typed fields and has no defaults of its own. Numbers of `int` parameters are
ints everywhere (defaults, bounds, resolved values), even when they arrive as
the doubles of a protobuf Struct.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraforge.services.common.base_models import check_available
from loraforge.services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    invalid_field,
)
from loraforge.services.common.model_access import ModelAccess, ModelRoot
from loraforge.services.trainer import params as typed
from loraforge.services.trainer.hardware import Requirements, probe, unmet
from loraforge.services.trainer.params import TrainingParams

TEMPLATES_DIR = Path(__file__).parent / "templates"
MODEL_TYPE = "modelTypes/text-to-text"
GROUPS = (
    "model_config",
    "quantization_config",
    "peft_config",
    "tokenizer_config",
    "trainer_config",
)
TOLERANCE = typed.TOLERANCE
PARAMETER_TYPES = ("bool", "int", "float", "string", "choice", "string_list")
# Settings of the operator that a template or a user must not set, and what to say instead.
OPERATOR_ONLY = {
    "model_config.trust_remote_code": (
        "is an operator setting of the training workers and predictors "
        "(LORAFORGE_TRUST_REMOTE_CODE), not a parameter: a model's own code runs only where "
        "the operator allows it"
    ),
}


@dataclass(frozen=True, eq=False)
class Parameter:
    """One template parameter; `path` is `group.key` or a top-level key."""

    path: str
    type: str
    default: Any
    description: str
    min: int | float | None = None
    max: int | float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False


@dataclass(frozen=True)
class Hardware:
    requires_cuda: bool
    requires_gptq: bool
    min_gpu_memory_gib: float
    summary: str


RECOMMENDED_WHEN = ("always", "never", "cuda", "no_cuda")


@dataclass(frozen=True, eq=False)
class Template:
    name: str  # the id, e.g. `HF_GPTNeo_125m_lora`; resource name is `templates/{name}`
    display_name: str
    description: str
    recommended_when: str  # one of RECOMMENDED_WHEN
    model_type: str
    serving_engine: str
    hardware: Hardware
    parameters: tuple[Parameter, ...] = field(default_factory=tuple)

    @property
    def resource_name(self) -> str:
        return f"templates/{self.name}"

    @property
    def recommended(self) -> bool:
        """Recommended on this machine: some templates are the pick only with (or without) CUDA."""
        if self.recommended_when in ("cuda", "no_cuda"):
            return _cuda_available() == (self.recommended_when == "cuda")
        return self.recommended_when == "always"

    def parameter(self, path: str) -> Parameter | None:
        return next((p for p in self.parameters if p.path == path), None)

    def defaults(self) -> TrainingParams:
        """Every parameter at its default."""
        return TrainingParams.from_dict(self._default_tree())

    def _default_tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {g: {} for g in GROUPS}
        for p in self.parameters:
            _set_path(out, p.path, copy.deepcopy(p.default))
        return out


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    head, _, rest = path.partition(".")
    if rest:
        tree.setdefault(head, {})[rest] = value
    else:
        tree[head] = value


# The Python type each template parameter type resolves to (string: `str | None` when nullable).
_PYTHON_TYPES: dict[str, Any] = {
    "bool": bool,
    "int": int,
    "float": float,
    "string": str,
    "choice": str,
    "string_list": tuple[str, ...],
}


def _bound(ptype: str, value: Any, what: str) -> int | float | None:
    if value is None:
        return None
    if not _is_number(value) or (ptype == "int" and not float(value).is_integer()):
        raise ValueError(f"{what} must be a {'whole ' if ptype == 'int' else ''}number")
    return int(value) if ptype == "int" else float(value)


def _parse_parameter(path: str, spec: Mapping[str, Any], source: str) -> Parameter:
    ptype = spec.get("type")
    if ptype not in PARAMETER_TYPES:
        raise ValueError(f"{source}: parameter {path} has unknown type {ptype!r}")
    if path in OPERATOR_ONLY:
        raise ValueError(f"{source}: {path} {OPERATOR_ONLY[path]}")
    expected = typed.schema().get(path)
    if expected is None:
        raise ValueError(f"{source}: {path} is not a training parameter")
    nullable = bool(spec.get("nullable", False))
    declared = _PYTHON_TYPES[ptype]
    if expected not in (declared, declared | None if nullable else declared):
        raise ValueError(f"{source}: {path} is {ptype}, but training takes {expected}")
    if ptype in ("int", "float"):
        bounds = (
            _bound(ptype, spec.get("min"), f"{source}: min of {path}"),
            _bound(ptype, spec.get("max"), f"{source}: max of {path}"),
        )
    else:
        bounds = (None, None)
    param = Parameter(
        path=path,
        type=ptype,
        default=spec.get("default"),
        description=str(spec.get("description", "")).strip(),
        min=bounds[0],
        max=bounds[1],
        choices=tuple(spec.get("choices", ())),
        nullable=nullable,
    )
    if not param.description:
        raise ValueError(f"{source}: parameter {path} has no description")
    problem = check_value(param, param.default)
    if problem:
        raise ValueError(f"{source}: default of {path} is invalid: {problem}")
    # YAML may write an int's default as 2048.0 and a float's as 2: store the parameter's own type.
    return dataclasses.replace(param, default=_normalise(param, param.default))


def load_template(path: Path) -> Template:
    data = yaml.safe_load(path.read_text())
    params: list[Parameter] = []
    raw_params = data.get("parameters") or {}
    for group in GROUPS:
        for key, spec in (raw_params.get(group) or {}).items():
            params.append(_parse_parameter(f"{group}.{key}", spec, path.name))
    if TOLERANCE not in raw_params:
        raise ValueError(f"{path.name}: no {TOLERANCE} parameter")
    params.append(_parse_parameter(TOLERANCE, raw_params[TOLERANCE], path.name))
    unknown = set(raw_params) - {*GROUPS, TOLERANCE}
    if unknown:
        raise ValueError(f"{path.name}: unknown parameter groups {sorted(unknown)}")
    missing = set(typed.schema()) - {p.path for p in params}
    if missing:
        raise ValueError(f"{path.name}: training parameters {sorted(missing)} are not declared")
    if data["name"] != path.stem:
        raise ValueError(f"{path.name}: name {data['name']!r} differs from the file name")
    hw = data.get("hardware") or {}
    recommended = data.get("recommended", False)
    if isinstance(recommended, bool):
        recommended = "always" if recommended else "never"
    if recommended not in RECOMMENDED_WHEN:
        raise ValueError(
            f"{path.name}: recommended must be true, false, cuda or no_cuda (got {recommended!r})"
        )
    return Template(
        name=data["name"],
        display_name=data.get("display_name", data["name"]),
        description=str(data.get("description", "")).strip(),
        recommended_when=recommended,
        model_type=MODEL_TYPE,
        serving_engine=data.get("serving_engine", "transformers"),
        hardware=Hardware(
            requires_cuda=bool(hw.get("requires_cuda", False)),
            requires_gptq=bool(hw.get("requires_gptq", False)),
            min_gpu_memory_gib=float(hw.get("min_gpu_memory_gib", 0)),
            summary=str(hw.get("summary", "")),
        ),
        parameters=tuple(params),
    )


@functools.cache
def _load_templates() -> tuple[Template, ...]:
    return tuple(load_template(p) for p in sorted(TEMPLATES_DIR.glob("*.yaml")))


def all_templates() -> tuple[Template, ...]:
    """Every template, the ones recommended on this machine first, then by name."""
    return tuple(sorted(_load_templates(), key=lambda t: (not t.recommended, t.name)))


def get_template(resource_name: str, field_name: str = "name") -> Template:
    if not resource_name:
        raise invalid_field(field_name, "is required (a name like `templates/HF_GPTNeo_125m_lora`)")
    prefix = "templates/"
    if not resource_name.startswith(prefix) or "/" in resource_name[len(prefix) :]:
        raise invalid_field(
            field_name, f"{resource_name!r} is not a name like `templates/{{template}}`"
        )
    wanted = resource_name[len(prefix) :]
    for template in all_templates():
        if template.name == wanted:
            return template
    known = ", ".join(t.name for t in all_templates())
    raise NotFound(
        f"template {resource_name!r} not found; templates: {known}",
        reason="TEMPLATE_NOT_FOUND",
        field_violations=[FieldViolation(field_name, f"no template named {wanted!r}")],
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_value(param: Parameter, value: Any) -> str | None:
    """Why `value` is not acceptable for `param`, or None if it is."""
    if value is None:
        return None if param.nullable else "must not be null"
    kind = param.type
    if kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false (got {value!r})"
    if kind in ("int", "float"):
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a number (got {value!r})"
        if kind == "int" and float(value) != int(value):
            return f"must be a whole number (got {value!r})"
        if param.min is not None and value < param.min:
            return f"must be at least {_fmt(param.min)} (got {_fmt(value)})"
        if param.max is not None and value > param.max:
            return f"must be at most {_fmt(param.max)} (got {_fmt(value)})"
        return None
    if kind == "string":
        if not isinstance(value, str):
            return f"must be a string (got {value!r})"
        if not value and not param.nullable:
            return "must not be empty"
        return None
    if kind == "choice":
        if value not in param.choices:
            return f"must be one of {', '.join(param.choices)} (got {value!r})"
        return None
    if kind == "string_list":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            return f"must be a list of non-empty strings (got {value!r})"
        if not value and not param.nullable:
            return "must not be empty"
        if param.choices:
            bad = [v for v in value if v not in param.choices]
            if bad:
                return f"items {bad} are not among {', '.join(param.choices)}"
        return None
    return f"has unknown type {kind}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _normalise(param: Parameter, value: Any) -> Any:
    # google.protobuf.Struct carries every number as a double.
    if param.type == "int" and _is_number(value):
        return int(value)
    if param.type == "float" and _is_number(value):
        return float(value)
    return value


def normalise_overrides(template: Template, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Valid `overrides` (see `resolve_params`) with every number in its parameter's type."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            group = {}
            for sub, sub_value in value.items():
                param = template.parameter(f"{key}.{sub}")
                group[sub] = _normalise(param, sub_value) if param else sub_value
            out[key] = group
        else:
            param = template.parameter(key)
            out[key] = _normalise(param, value) if param else value
    return out


def resolve_params(
    template: Template, overrides: Mapping[str, Any], field_prefix: str = "param_overrides"
) -> TrainingParams:
    """Template defaults with `overrides` applied; InvalidArgument listing every bad field."""
    params = template._default_tree()
    violations: list[FieldViolation] = []
    for key, value in overrides.items():
        path = f"{field_prefix}.{key}"
        if key == TOLERANCE:
            param = template.parameter(TOLERANCE)
            assert param is not None
            problem = check_value(param, value)
            if problem:
                violations.append(FieldViolation(path, problem))
            else:
                params[TOLERANCE] = _normalise(param, value)
            continue
        if key not in GROUPS:
            violations.append(
                FieldViolation(
                    path, f"unknown parameter group; groups are {', '.join((*GROUPS, TOLERANCE))}"
                )
            )
            continue
        if not isinstance(value, Mapping):
            violations.append(
                FieldViolation(path, f"must be an object of {key} parameters (got {value!r})")
            )
            continue
        for sub, sub_value in value.items():
            param = template.parameter(f"{key}.{sub}")
            sub_path = f"{path}.{sub}"
            if f"{key}.{sub}" in OPERATOR_ONLY:
                violations.append(FieldViolation(sub_path, OPERATOR_ONLY[f"{key}.{sub}"]))
                continue
            if param is None:
                known = ", ".join(
                    p.path.split(".", 1)[1]
                    for p in template.parameters
                    if p.path.startswith(key + ".")
                )
                violations.append(FieldViolation(sub_path, f"unknown parameter; {key} has {known}"))
                continue
            problem = check_value(param, sub_value)
            if problem:
                violations.append(FieldViolation(sub_path, problem))
            else:
                params[key][sub] = _normalise(param, sub_value)
    fmt = params["tokenizer_config"]["prompt_format"]
    if params["tokenizer_config"]["system_prompt"] and fmt != "chat":
        violations.append(
            FieldViolation(
                f"{field_prefix}.tokenizer_config.system_prompt",
                f"is only used with tokenizer_config.prompt_format chat (this run uses {fmt}); "
                "set prompt_format to chat, or put the instruction in your prompts",
            )
        )
    violations += _evaluation_needs(params["trainer_config"], f"{field_prefix}.trainer_config")
    violations += _generation_needs(params["trainer_config"], f"{field_prefix}.trainer_config")
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(
            f"invalid parameter overrides for {template.resource_name}: {summary}",
            reason="INVALID_PARAMETERS",
            field_violations=violations,
        )
    return TrainingParams.from_dict(params)


def _evaluation_needs(trc: Mapping[str, Any], prefix: str) -> list[FieldViolation]:
    """Early stopping and a best-checkpoint adapter judge by the eval loss: they need an
    evaluation split, and an evaluation at every checkpoint."""
    wanted = [
        name
        for name, on in (
            ("early_stopping_patience", trc.get("early_stopping_patience", 0) > 0),
            ("adapter_checkpoint", trc.get("adapter_checkpoint", "last") == "best"),
        )
        if on
    ]
    if not wanted:
        return []
    if not trc["eval_split_percent"]:
        return [
            FieldViolation(
                f"{prefix}.{name}",
                "judges by the eval loss, and this run holds out no evaluation split; set "
                "trainer_config.eval_split_percent above 0",
            )
            for name in wanted
        ]
    eval_steps, save_steps = trc["eval_steps"], trc["save_steps"]
    if eval_steps and save_steps % eval_steps:
        return [
            FieldViolation(
                f"{prefix}.eval_steps",
                f"is {eval_steps}, and save_steps {save_steps} is not a multiple of it, so some "
                f"checkpoints would have no eval loss for {' and '.join(wanted)}; make "
                "save_steps a multiple of eval_steps (or leave eval_steps 0)",
            )
        ]
    return []


def _generation_needs(trc: Mapping[str, Any], prefix: str) -> list[FieldViolation]:
    """Scoring answers at checkpoints needs held-out examples with a completion of their own."""
    if not trc.get("eval_generate_examples", 0):
        return []
    missing = [
        why
        for why, lacking in (
            ("trainer_config.eval_split_percent above 0", not trc["eval_split_percent"]),
            ("trainer_config.completion_only_loss", not trc["completion_only_loss"]),
        )
        if lacking
    ]
    if not missing:
        return []
    return [
        FieldViolation(
            f"{prefix}.eval_generate_examples",
            "scores answers to held-out examples against their completions, which needs "
            + " and ".join(missing),
        )
    ]


# Parameters whose template default differs from what runs stored before the parameter
# existed did: those runs take this value, so continuing one trains as it did.
_EARLIER_BEHAVIOUR = {"tokenizer_config.truncation": "drop"}


def stored_params(template_name: str, stored: Mapping[str, Any]) -> TrainingParams:
    """A run's stored parameters, typed; ValueError when they cannot be read.

    A parameter added to the templates after the run was stored takes its
    template's default, which is what the run trained with, or, where the default
    changed that behaviour, the earlier one (`_EARLIER_BEHAVIOUR`).
    """
    try:
        return TrainingParams.from_dict(stored)
    except ValueError:
        template = next((t for t in _load_templates() if t.resource_name == template_name), None)
        if template is None:
            raise
    tree = template._default_tree()
    for path, value in _EARLIER_BEHAVIOUR.items():
        group, name = path.split(".")
        tree[group][name] = value
    for key, value in stored.items():
        if isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            tree[key].update(value)
        else:
            tree[key] = value
    return TrainingParams.from_dict(tree)


def uses_gptq(template: Template, params: TrainingParams) -> bool:
    return template.hardware.requires_gptq or params.quantization_config.quant_method == "gptq"


def requirements(template: Template, params: TrainingParams) -> Requirements:
    """What a worker must have to train `template` with `params` (a GPTQ base needs CUDA too)."""
    gptq = uses_gptq(template, params)
    cuda = template.hardware.requires_cuda or gptq
    return Requirements(
        cuda=cuda,
        gptq=gptq,
        gpu_memory_gib=template.hardware.min_gpu_memory_gib if cuda else 0.0,
    )


@dataclass(frozen=True)
class MemoryNeeds:
    """What `estimates.peak_memory` gives for a template's defaults at its model_max_length."""

    peak_bytes: int  # the defaults, rows of model_max_length tokens
    smallest_bytes: int  # gradient checkpointing at micro-batch 1: the least a plan goes to
    gpu_bytes: int  # the defaults on a CUDA GPU (workers plan no smaller micro-batches there)
    batch: int
    model_max_length: int
    cuda: bool  # computed for a CUDA worker (the template needs one), else for a CPU


# Template name -> (when computed, the needs or None where the base model is not here).
_NEEDS: dict[str, tuple[float, MemoryNeeds | None]] = {}
_NEEDS_LOCK = threading.Lock()
_UNKNOWN_SECONDS = 60.0  # how long a base model found missing is not looked for again


def memory_needs(template: Template) -> MemoryNeeds | None:
    """The memory training with `template`'s defaults needs, by the estimator's formula;
    None where its base model's files are not on this machine (nothing is downloaded or
    converted for this). Cached per template."""
    with _NEEDS_LOCK:
        cached = _NEEDS.get(template.name)
    if cached is not None and (
        cached[1] is not None or time.monotonic() - cached[0] < _UNKNOWN_SECONDS
    ):
        return cached[1]
    needs = _compute_needs(template)
    with _NEEDS_LOCK:
        _NEEDS[template.name] = (time.monotonic(), needs)
    return needs


def _compute_needs(template: Template) -> MemoryNeeds | None:
    from loraforge.services.trainer.calibration import local_folder
    from loraforge.services.trainer.estimates import peak_memory

    params = template.defaults()
    folder = local_folder(params.base_model)
    if folder is None:
        return None
    cuda = requirements(template, params).cuda
    length = params.tokenizer_config.model_max_length
    peak = peak_memory(params, str(folder), length, cuda)
    if peak <= 0:
        return None
    smallest = dataclasses.replace(
        params,
        trainer_config=dataclasses.replace(
            params.trainer_config, gradient_checkpointing=True, per_device_train_batch_size=1
        ),
    )
    return MemoryNeeds(
        peak_bytes=peak,
        smallest_bytes=peak_memory(smallest, str(folder), length, cuda),
        gpu_bytes=peak if cuda else peak_memory(params, str(folder), length, True),
        batch=params.trainer_config.per_device_train_batch_size,
        model_max_length=length,
        cuda=cuda,
    )


def gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def hardware_of(template: Template) -> Hardware:
    """The template's hardware as clients see it: its summary with the memory its defaults
    need (`memory_needs`), and a GPU figure no lower than that where it was computed."""
    hw = template.hardware
    needs = memory_needs(template)
    parts = [hw.summary.strip()] if hw.summary.strip() else []
    min_gpu = hw.min_gpu_memory_gib
    if needs is not None:
        sentence = (
            f"Needs about {gib(needs.peak_bytes)} of memory with its defaults (batch "
            f"{needs.batch}, model_max_length {needs.model_max_length}), for rows that long"
        )
        if not needs.cuda and needs.smallest_bytes < needs.peak_bytes:
            sentence += (
                "; a CPU worker with less trains it with gradient checkpointing and smaller "
                f"micro-batches of the same batch, down to about {gib(needs.smallest_bytes)}"
            )
        parts.append(sentence + ".")
        min_gpu = max(min_gpu, round(needs.gpu_bytes / 2**30, 1))
    if hw.requires_cuda or hw.requires_gptq:
        parts.append(
            f"Needs a CUDA GPU with {_fmt(min_gpu)} GiB or more"
            f"{' and the `gptq` extra (GPTQModel + optimum)' if hw.requires_gptq else ''}."
        )
    elif min_gpu > 0:
        parts.append(f"On a CUDA GPU it needs {_fmt(min_gpu)} GiB or more.")
    return dataclasses.replace(hw, min_gpu_memory_gib=min_gpu, summary=" ".join(parts))


def _cuda_available() -> bool:
    return probe().cuda


def missing_requirements(template: Template, params: TrainingParams) -> list[str]:
    """What this machine lacks to train `template` with `params` (empty when it can)."""
    return unmet(requirements(template, params), probe())


def check_base_model(loadable: str) -> None:
    """FailedPrecondition naming the base model when neither this machine nor the hub has it.

    `loadable` is what `ModelAccess.resolve` made of the run's base model.
    """
    check_available(loadable)


def template_base_models() -> frozenset[str]:
    """The base models the shipped templates default to: the operator's choice, so allowed."""
    return frozenset(
        str(p.default)
        for t in _load_templates()
        for p in t.parameters
        if p.path == "model_config.pretrained_model_name_or_path" and p.default
    )


def model_access(roots: tuple[ModelRoot, ...], allow_hub_models: bool) -> ModelAccess:
    """What users may name as a base model, with the templates' own base models allowed."""
    return ModelAccess(roots, allow_hub_models, template_base_models())

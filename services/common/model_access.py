"""Which models a user may name, and whether a model folder's own code may run.

A user names a base model in `model_config.pretrained_model_name_or_path`. That
name is input from the network, so it may only mean:

1. a base-model catalogue entry (`base_models.CATALOGUE`);
2. a name a shipped training template defaults to (templates are the
   operator's data, installed with the service);
3. a folder inside an operator-configured model root (setting `model_roots`):
   `root-name/model-folder`, or an absolute path that is inside a root once
   every symbolic link is resolved;
4. any other hub id (`org/name`), only where the operator set
   `allow_hub_models`.

Anything else (another absolute path, `..` traversal, a path outside every
root, a missing folder inside one) gets one and the same InvalidArgument, so the
answer says nothing about which files exist. The trainer checks a name when a
run is created, and the training worker checks it again before loading.

A model folder can carry Python code (an `auto_map` entry in its `config.json`
or tokenizer configuration, next to `.py` files) that `from_pretrained` runs
with `trust_remote_code`. That is an operator setting of the training workers
and predictors (`trust_remote_code`, off by default), never a parameter; with it
off, `refuse_model_code` stops such a folder with a clear error before
transformers reads it, and every loader is passed `trust_remote_code=False`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.services.common.base_models import lookup
from loraforge.services.common.config import describe, setting
from loraforge.services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument

MODEL_FIELD = "model_config.pretrained_model_name_or_path"
NOT_ALLOWED = "MODEL_NOT_ALLOWED"
HAS_CODE = "MODEL_HAS_CODE"
DEFAULT_ROOT_NAME = "models"
_ROOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_MAX_NAME = 1000
# Files whose `auto_map` makes transformers import the folder's own modules.
CODE_CONFIGS = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
)


def model_roots_setting() -> Any:
    return setting(
        "",
        "Folders of models users may name (comma-separated `name=folder`, or `folder`, named "
        "by its last component); a user writes `name/model-folder` or an absolute path inside "
        f"one. Default: `{DEFAULT_ROOT_NAME}={{home}}/models`.",
    )


def allow_hub_models_setting() -> Any:
    return setting(
        False,
        "Let users name any hub model id (`org/name`), not only the base-model catalogue, the "
        "templates' own base models and the model roots.",
    )


def trust_remote_code_setting() -> Any:
    return setting(
        False,
        "Let a base model's own Python code run (an `auto_map` entry in its config): only for "
        "models the operator has reviewed. Never a user parameter; off, such a model is refused.",
    )


@dataclass(frozen=True)
class ModelRoot:
    name: str
    folder: Path


def parse_model_roots(value: str, home: Path) -> tuple[ModelRoot, ...]:
    """The `model_roots` setting; InvalidArgument naming the setting when it is malformed."""
    if not value.strip():
        return (ModelRoot(DEFAULT_ROOT_NAME, (home / "models").absolute()),)
    roots: list[ModelRoot] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, sep, folder = item.partition("=")
        if not sep:
            folder, name = name, Path(name.rstrip("/")).name
        name, folder = name.strip(), folder.strip()
        if not _ROOT_NAME.match(name) or not folder:
            raise InvalidArgument(
                f"{describe('model_roots')}: {item!r} is not `name=folder` with a name of "
                "letters, digits, `.`, `_` or `-`"
            )
        if any(r.name == name for r in roots):
            raise InvalidArgument(f"{describe('model_roots')}: the name {name!r} is given twice")
        roots.append(ModelRoot(name, Path(folder).expanduser().absolute()))
    return tuple(roots)


def not_allowed(name: str, field_name: str = MODEL_FIELD) -> InvalidArgument:
    """The one answer for every name that is refused, whether or not a file of that name exists."""
    shown = name if len(name) <= 200 else name[:200] + "..."
    description = (
        f"model {shown!r} is not in the base-model catalogue or a configured model root; "
        "`loraforge base-models` lists them"
    )
    return InvalidArgument(
        f"{field_name}: {description}",
        reason=NOT_ALLOWED,
        field_violations=[FieldViolation(field_name, description)],
    )


def _inside(path: str, root: Path) -> str | None:
    """`path` with every link resolved, if it is a folder inside (or at) `root`'s real folder."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    try:
        if os.path.commonpath([real, real_root]) != real_root:
            return None
    except ValueError:
        return None
    return real if os.path.isdir(real) else None


@dataclass(frozen=True)
class ModelAccess:
    """What the models users name may resolve to (see the module docstring)."""

    roots: tuple[ModelRoot, ...] = ()
    allow_hub_models: bool = False
    vetted: frozenset[str] = field(default_factory=frozenset)

    def resolve(self, name: str, field_name: str = MODEL_FIELD) -> str:
        """What to load for `name`: the name itself (catalogue, template, hub) or the real
        path of a folder in a model root. InvalidArgument `not_allowed` otherwise."""
        if not name or len(name) > _MAX_NAME or "\x00" in name or "\\" in name:
            raise not_allowed(name, field_name)
        if lookup(name) is not None or name in self.vetted:
            return name
        parts = name.split("/")
        if name.startswith("/"):
            for root in self.roots:
                found = _inside(name, root.folder)
                if found is not None:
                    return found
            raise not_allowed(name, field_name)
        if any(p in ("", ".", "..") for p in parts):
            raise not_allowed(name, field_name)
        named = next((r for r in self.roots if r.name == parts[0]), None)
        if named is not None:
            found = _inside(os.path.join(named.folder, *parts[1:]), named.folder)
            if found is not None:
                return found
            raise not_allowed(name, field_name)
        if (
            self.allow_hub_models
            and len(parts) == 2
            and all(_HUB_PART.match(p) for p in parts)
            # from_pretrained would load a folder of that relative name instead of the hub id
            and not os.path.lexists(name)
        ):
            return name
        raise not_allowed(name, field_name)


def _auto_map_files(folder: Path) -> list[str]:
    found = []
    for name in CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(name)
    return found


def refuse_model_code(path: str, trust_remote_code: bool, shown: str = "") -> None:
    """FailedPrecondition when the local model folder `path` brings its own Python code
    (`auto_map`) and the operator has not turned on `trust_remote_code`."""
    folder = Path(path)
    if trust_remote_code or not folder.is_dir():
        return
    configs = _auto_map_files(folder)
    if not configs:
        return
    modules = sorted(p.name for p in folder.glob("*.py"))
    ships = f" and ships {', '.join(modules[:5])}" if modules else ""
    raise FailedPrecondition(
        f"base model {shown or path} needs its own Python code to load (`auto_map` in "
        f"{', '.join(configs)}{ships}); loraforge does not run code that comes with a model. "
        "Use a model that transformers supports natively, or, for a model you have reviewed, "
        "the operator can turn on trust_remote_code (LORAFORGE_TRUST_REMOTE_CODE) for the "
        "training workers and predictors",
        reason=HAS_CODE,
        metadata={"base_model": shown or path},
    )

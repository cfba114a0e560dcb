"""Models (the named series of a model's runs): the fields a user writes, checked and changed.

A model's description, notes, default inference parameters and best version are the
user's; everything else about it (its type, its latest trained version) is the trainer's.
The best version must be a TRAINED version of the model itself. Default inference
parameters are checked against the predictor's own bounds, so a default that a prediction
would refuse is refused when it is set. They are stored as canonical JSON of the fields
set, so an etag over them is stable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Protocol

from loraforge.services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    NotFound,
    invalid_field,
)
from loraforge.services.common.resources import parse_name
from loraforge.services.common.values import check_text
from loraforge.services.predictor.params import RequestedParams, check_params, raise_if_bad
from loraforge.services.trainer.runs import MODEL, VERSION
from loraforge.services.trainer.store import ModelRow, State, TrainerStore

MAX_DESCRIPTION_CHARS = 10_000
MAX_NOTES_CHARS = 100_000
INFERENCE_FIELD = "model.default_inference_params"
BEST_VERSION_FIELD = "model.best_version"


@dataclass(frozen=True)
class ModelChanges:
    """What an update sets; a field left None is unchanged. `inference_params` None with
    `clear_inference_params` removes the defaults."""

    description: str | None = None
    notes: str | None = None
    inference_params: RequestedParams | None = None
    clear_inference_params: bool = False
    # A version of the model, or "" to clear it.
    best_version: str | None = None


def check_description(value: str, field: str = "model.description") -> str:
    return check_text(value, field, MAX_DESCRIPTION_CHARS)


def inference_params_json(params: RequestedParams) -> str | None:
    """The stored form: the fields set, as canonical JSON; None when nothing is set."""
    doc = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dataclasses.asdict(params).items()
        if v not in (None, "", ())
    }
    return json.dumps(doc, sort_keys=True, ensure_ascii=False) if doc else None


def inference_params(row: ModelRow) -> RequestedParams | None:
    """A model's default inference parameters, or None when it has none."""
    if not row.default_inference_params:
        return None
    doc: dict[str, Any] = json.loads(row.default_inference_params)
    if "stop" in doc:
        doc["stop"] = tuple(doc["stop"])
    return RequestedParams(**doc)


class Apps(Protocol):
    """What models need of the dataset service, which owns apps (`dataset_client`)."""

    async def check_app(self, app: str, field: str) -> None: ...


class Models:
    """Blocking store work runs in threads, so callers on an event loop only wait."""

    def __init__(self, store: TrainerStore, apps: Apps) -> None:
        self.store = store
        self.apps = apps

    async def create(
        self, app: str, model_id: str, model_type: str, fields: ModelChanges
    ) -> ModelRow:
        """Checks the fields, then that the app exists, then creates the model."""
        values = self._columns(fields)
        await self.apps.check_app(f"apps/{app}", "parent")
        return await asyncio.to_thread(
            self.store.create_model,
            app,
            model_id,
            values.pop("description", None) or "",
            model_type,
            **values,
        )

    async def update(self, name: str, changes: ModelChanges, etag: str = "") -> ModelRow:
        parse_name(name, MODEL, "model.name")
        values: dict[str, str | None] = self._columns(changes)
        if changes.best_version is not None:
            values["best_version"] = await self._best_version(name, changes.best_version)
        return await asyncio.to_thread(self.store.update_model, name, values, etag)

    async def _best_version(self, model: str, version: str) -> str | None:
        """The stored best version: None to clear it, else `version` once it is known to be a
        TRAINED version of `model`."""
        if not version:
            return None
        parse_name(version, VERSION, BEST_VERSION_FIELD)
        if not version.startswith(f"{model}/versions/"):
            raise invalid_field(
                BEST_VERSION_FIELD,
                f"{version!r} is a version of another model; name one of {model!r}'s versions",
                reason="VERSION_OF_ANOTHER_MODEL",
            )
        row = await asyncio.to_thread(self.store.get_version, version)
        if row.state != State.TRAINED.value:
            raise FailedPrecondition(
                f"model version {version!r} is {row.state}; only a TRAINED version can be a "
                "model's best version",
                reason="VERSION_NOT_TRAINED",
                field_violations=[FieldViolation(BEST_VERSION_FIELD, f"is {row.state}")],
            )
        return version

    async def forget_version(self, version: str) -> None:
        """Clears the best version of the model whose best version `version` (now deleted)
        was."""
        model = version.split("/versions/", 1)[0]
        with contextlib.suppress(NotFound):  # the model is gone too: nothing to clear
            row = await asyncio.to_thread(self.store.get_model, model)
            if row.best_version == version:
                await asyncio.to_thread(self.store.update_model, model, {"best_version": None})

    @staticmethod
    def _columns(changes: ModelChanges) -> dict[str, str | None]:
        """The stored columns of what changes, or InvalidArgument naming a bad field."""
        values: dict[str, str | None] = {}
        if changes.description is not None:
            values["description"] = check_description(changes.description)
        if changes.notes is not None:
            values["notes"] = check_text(changes.notes, "model.notes", MAX_NOTES_CHARS)
        if changes.inference_params is not None:
            for text_field in ("system_prompt", "prompt_template"):
                value = getattr(changes.inference_params, text_field)
                check_text(value, f"{INFERENCE_FIELD}.{text_field}")
            for i, stop in enumerate(changes.inference_params.stop):
                check_text(stop, f"{INFERENCE_FIELD}.stop[{i}]")
            _, bad = check_params(changes.inference_params, INFERENCE_FIELD)
            raise_if_bad(bad)
            values["default_inference_params"] = inference_params_json(changes.inference_params)
        elif changes.clear_inference_params:
            values["default_inference_params"] = None
        return values

"""Checkpoints of a run as resources: `apps/{app}/models/{model}/versions/{version}/checkpoints/{step}`.

A worker uploads every checkpoint the Trainer saves to
`trainer/{version}/checkpoints/checkpoint-{step}/` (the PEFT adapter of that step, the
optimizer state a resume needs) and, last, `checkpoint.json`: step, epoch, the latest
train and eval loss, the scores of its answers to held-out examples where the run asked
for them (`trainer_config.eval_generate_examples`), and when it was saved. A checkpoint exists once that file does, so
a half-uploaded one is never listed. Keeping only the last `trainer_config.save_total_limit`
checkpoints deletes older ones as new ones arrive, so what the object store holds is the
list. Any listed checkpoint can be exported, or continued from, like a version, whatever
the state of its run: a cancelled or failed run keeps what it saved until the version is
deleted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.services.common.errors import NotFound, invalid_field
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.common.resources import parse_name
from loraforge.services.trainer.store import ACTIVE_STATES, version_prefix

if TYPE_CHECKING:
    from loraforge.services.trainer.runs import Run

VERSION = "apps/{app}/models/{model}/versions/{version}"
CHECKPOINT = VERSION + "/checkpoints/{checkpoint}"
INFO_FILE = "checkpoint.json"
EVAL_SCORES_FILE = "eval_scores.json"  # written beside the checkpoint by `training.py`
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    version: str
    step: int
    epoch: float
    train_loss: float | None
    eval_loss: float | None
    create_time: float
    prefix: str  # where its files are in the object store
    # Its answers to held-out examples, scored: exact_match, rouge1, bleu, ...
    eval_scores: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        if self.train_loss is not None:
            out["train_loss"] = self.train_loss
        if self.eval_loss is not None:
            out["eval_loss"] = self.eval_loss
        out.update({f"eval_{k}": v for k, v in self.eval_scores.items()})
        return out


def is_checkpoint_name(name: str) -> bool:
    return "/checkpoints/" in name


def parse_checkpoint(name: str, field: str = "name") -> tuple[str, int]:
    """(the version's name, the step) of a checkpoint name; InvalidArgument naming `field`."""
    parts = parse_name(name, CHECKPOINT, field)
    step = parts["checkpoint"]
    if not step.isdigit():
        raise invalid_field(
            field, f"{name!r}: a checkpoint is named by its step, a whole number (got {step!r})"
        )
    return name.rsplit("/checkpoints/", 1)[0], int(step)


def checkpoints_prefix(version: str) -> str:
    return f"{version_prefix(version)}/checkpoints"


def summary_of(folder: Path, step: int) -> dict[str, Any]:
    """What `checkpoint.json` says of the checkpoint the Trainer wrote to `folder`."""
    info: dict[str, Any] = {"step": step, "epoch": 0.0, "time": time.time()}
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return info
    info["epoch"] = float(state.get("epoch") or 0.0)
    try:
        scores = json.loads((folder / EVAL_SCORES_FILE).read_text(encoding="utf-8"))
        info["eval_scores"] = {str(k): float(v) for k, v in scores.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # none asked for (trainer_config.eval_generate_examples)
    for entry in state.get("log_history") or []:
        if "loss" in entry:
            info["train_loss"] = float(entry["loss"])
        if "eval_loss" in entry:
            info["eval_loss"] = float(entry["eval_loss"])
    return info


def _from_info(version: str, prefix: str, data: dict[str, Any]) -> CheckpointInfo:
    step = int(data["step"])
    return CheckpointInfo(
        name=f"{version}/checkpoints/{step}",
        version=version,
        step=step,
        epoch=float(data.get("epoch", 0.0)),
        train_loss=float(data["train_loss"]) if "train_loss" in data else None,
        eval_loss=float(data["eval_loss"]) if "eval_loss" in data else None,
        eval_scores={str(k): float(v) for k, v in (data.get("eval_scores") or {}).items()},
        create_time=float(data.get("time", 0.0)),
        prefix=prefix,
    )


def list_checkpoints(objects: ObjectStore, version: str) -> list[CheckpointInfo]:
    """The run's checkpoints in the object store, by step."""
    base = checkpoints_prefix(version) + "/"
    found = []
    for info in objects.list(base):
        folder, _, file_name = info.key[len(base) :].partition("/")
        if file_name != INFO_FILE:
            continue
        try:
            data = json.loads(objects.get_bytes(info.key))
            found.append(_from_info(version, base + folder, data))
        except (NotFound, ValueError, KeyError, TypeError):
            continue  # deleted meanwhile, or not ours to read
    return sorted(found, key=lambda c: c.step)


def get_checkpoint(
    objects: ObjectStore, name: str, field: str = "name", run: Run | None = None
) -> CheckpointInfo:
    """The checkpoint `name`; NOT_FOUND says why it is missing when `run` (its version) is given."""
    version, step = parse_checkpoint(name, field)
    prefix = f"{checkpoints_prefix(version)}/checkpoint-{step}"
    try:
        data = json.loads(objects.get_bytes(f"{prefix}/{INFO_FILE}"))
    except NotFound:
        kept = [c.step for c in list_checkpoints(objects, version)]
        listed = ", ".join(str(s) for s in kept) or "none"
        raise NotFound(
            f"checkpoint {name!r} not found: {why_missing(step, kept, run)}; "
            f"the checkpoints {version} has are: {listed}",
            reason="CHECKPOINT_NOT_FOUND",
        ) from None
    return _from_info(version, prefix, data)


def why_missing(step: int, kept: list[int], run: Run | None) -> str:
    """Why a run has no checkpoint at `step`: not reached yet, stopped before it, not a step
    it saves at, or removed as newer ones were saved."""
    if run is None:
        return (
            "older checkpoints are removed as newer ones are saved "
            "(trainer_config.save_total_limit)"
        )
    trc = run.params.trainer_config
    reached = max(int(run.progress.get("step") or 0), int(run.metrics.get("global_step") or 0))
    every = f"it saves one every {trc.save_steps} steps (trainer_config.save_steps)"
    if step > reached:
        if run.state in ACTIVE_STATES:
            return f"the run is {run.state.value} at step {reached}; {every}"
        before = "before its first checkpoint was saved" if not kept else f"before step {step}"
        return f"the run stopped at step {reached} ({run.state.value}) {before}; {every}"
    if step % max(trc.save_steps, 1) and step != reached:
        return f"{every} and at its last step, so none was saved at step {step}"
    if kept and step < kept[-1]:
        return (
            f"it was removed when newer ones were saved: the run keeps its last "
            f"{trc.save_total_limit} (trainer_config.save_total_limit)"
        )
    return (
        f"the run reached step {reached} but its checkpoint at step {step} is not in the object "
        "store (it was never uploaded, or was removed there)"
    )

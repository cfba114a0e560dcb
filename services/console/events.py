"""A run's training events as server-sent events, resumable by sequence.

Each event leaves with `id: <sequence>`. A browser whose connection drops reconnects with
that id as `Last-Event-ID`, and the watch resumes with `after_sequence` set to it, so the
page gets every event once: no gap, no duplicate. A page that is reloaded starts a new
EventSource, which gets the whole history from the start (it has nothing yet). When the
run ends, an `end` event tells the page not to reconnect.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from loraforge.trainer.v1 import trainer_service_pb2 as tpb

KEEPALIVE_SECONDS = 15.0


def state_name(state: int) -> str:
    return tpb.ModelVersionState.Name(state).removeprefix("MODEL_VERSION_STATE_")  # type: ignore[arg-type]


def event_payload(event: tpb.TrainingEvent) -> dict[str, Any]:
    """A training event as the page reads it."""
    out: dict[str, Any] = {"sequence": event.sequence, "time": event.time.ToJsonString()}
    kind = event.WhichOneof("kind")
    if kind == "progress":
        p = event.progress
        out["kind"] = "progress"
        out["step"] = p.step
        out["total_steps"] = p.total_steps
        out["epoch"] = p.epoch
        out["train_loss"] = p.train_loss if p.HasField("train_loss") else None
        out["eval_loss"] = p.eval_loss if p.HasField("eval_loss") else None
        out["learning_rate"] = p.learning_rate
        out["tokens_per_second"] = p.tokens_per_second
        out["eta_seconds"] = p.eta.ToTimedelta().total_seconds() if p.HasField("eta") else None
    elif kind == "state_change":
        out["kind"] = "state"
        out["state"] = state_name(event.state_change.state)
        out["status_code"] = event.state_change.status_code
        out["message"] = event.state_change.message
    elif kind == "log":
        out["kind"] = "log"
        out["level"] = tpb.LogLevel.Name(event.log.level).removeprefix("LOG_LEVEL_")
        out["message"] = event.log.message
    else:
        out["kind"] = "other"
        out["raw"] = json_format.MessageToDict(event)
    return out


def sse(data: dict[str, Any], *, event: str = "", id: int | None = None) -> bytes:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def resume_point(last_event_id: str | None, after: str | None) -> int:
    """The sequence to resume after: `Last-Event-ID` (a reconnect), else `?after=`, else 0."""
    for raw in (last_event_id, after):
        if raw and raw.strip().isdigit():
            return int(raw.strip())
    return 0

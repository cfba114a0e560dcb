"""The trainer's metadata store: models, model versions (training runs) and their events.

The gRPC server and the workers share this database and nothing else: the
server creates, cancels and reads runs; workers claim them (`jobs.py`) and
append events. Every event gets the next sequence number of its run inside the
transaction that writes it, so a run's history has no gaps and a watcher that
polls `events_after` sees every event exactly once.

A run holds a reference on its dataset version in the dataset service. The
reference is added before the run's row exists, so a pending-reference row
records the intent first; the run's insert deletes it in the same transaction.
What a crash in between leaves is a reference whose referrer is neither a run
nor a fresh intent: `unjustified_referrers` finds those for the sweep.

Workers advertise their hardware in the workers table (`workers.py`). The
database gets these tables from the revisions in `migrations/`: a change here
needs a revision there (`tests/test_metadata_migrations.py` compares the two).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from loraforge.services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from loraforge.services.common.metadata import open_database
from loraforge.services.common.updates import changed_meanwhile, check_etag, etag
from loraforge.services.trainer import migrations
from loraforge.services.trainer.hardware import Requirements


class State(enum.StrEnum):
    QUEUED = "QUEUED"
    TRAINING = "TRAINING"
    UPLOADING = "UPLOADING"
    TRAINED = "TRAINED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ACTIVE_STATES = (State.QUEUED, State.TRAINING, State.UPLOADING)
RUNNING_STATES = (State.TRAINING, State.UPLOADING)
FINAL_STATES = (State.TRAINED, State.FAILED, State.CANCELLED)

# The seed platform's numeric codes, kept so code written against it reads the same numbers.
STATUS_CODES = {
    State.QUEUED: 21103,
    State.TRAINING: 21101,
    State.UPLOADING: 21104,
    State.TRAINED: 21100,
    State.FAILED: 21106,
    State.CANCELLED: 0,
}
CODE_TOLERANCE_EXCEEDED = 21119


def version_prefix(name: str) -> str:
    """Object-store prefix of a run's checkpoints and adapter: the trainer writes only under `trainer/`."""
    return f"trainer/{name}"


class EventKind(enum.StrEnum):
    STATE = "state"
    PROGRESS = "progress"
    LOG = "log"


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    app: Mapped[str] = mapped_column(String(80), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    model_type: Mapped[str] = mapped_column(String(100))
    latest_trained_version: Mapped[str] = mapped_column(String(300), default="")
    create_time: Mapped[float] = mapped_column(Float)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The default inference parameters a user set, as canonical JSON (sorted keys); NULL: none.
    default_inference_params: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The version chosen as the model's best (a TRAINED version of it); NULL: none chosen.
    best_version: Mapped[str | None] = mapped_column(String(400), nullable=True)


class VersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model", "request_id", name="uq_version_request"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(400), unique=True)
    model: Mapped[str] = mapped_column(String(300), index=True)
    template: Mapped[str] = mapped_column(String(200))
    dataset_version: Mapped[str] = mapped_column(String(400))
    description: Mapped[str] = mapped_column(Text, default="")
    param_overrides: Mapped[dict[str, Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), index=True)
    status_code: Mapped[int] = mapped_column(Integer)
    failure_reason: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    base_model: Mapped[str] = mapped_column(Text, default="")
    adapter_prefix: Mapped[str] = mapped_column(Text, default="")
    checkpoint_prefix: Mapped[str] = mapped_column(Text, default="")
    adapter_bytes: Mapped[int] = mapped_column(Integer, default=0)
    create_time: Mapped[float] = mapped_column(Float)
    start_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    request_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Job-queue columns: who runs it, until when, and where it can resume from.
    worker_id: Mapped[str] = mapped_column(String(200), default="")
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_key: Mapped[str] = mapped_column(Text, default="")
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)
    # Unused; kept because existing databases declare it NOT NULL.
    references_dataset: Mapped[bool] = mapped_column(Boolean, default=True)
    # What a worker needs to claim it (`hardware.Requirements`); NULL on runs from before
    # workers advertised their hardware: any worker may claim those.
    needs_cuda: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    needs_gptq: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    needs_gpu_memory_gib: Mapped[float | None] = mapped_column(Float, nullable=True)
    # While queued: why no live worker can take it, as last written to its events (NULL: none).
    wait_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A continued run: the version whose adapter it starts from (copied under its own prefix
    # as `init-adapter/` when it was created); NULL: it starts from a fresh adapter.
    from_model_version: Mapped[str | None] = mapped_column(Text, nullable=True)
    # How many times the run was retried with a smaller memory plan after an out-of-memory kill.
    memory_retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class WorkerRow(Base):
    """A training worker and the hardware it advertised; live until `last_seen + ttl_seconds`."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    cuda: Mapped[bool] = mapped_column(Boolean)
    gpu_memory_gib: Mapped[float] = mapped_column(Float)
    gptq: Mapped[bool] = mapped_column(Boolean)
    started: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    ttl_seconds: Mapped[float] = mapped_column(Float)
    # The memory the worker trains within (its limit, or the machine's RAM); NULL: not advertised.
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class TrainCalibrationRow(Base):
    """A training throughput a worker measured at its start (`calibration.py`): what an
    estimate uses for a base model no TRAINED run has measured yet on that kind of worker."""

    __tablename__ = "train_calibrations"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # What decides the figures: the model's shape, the template's defaults, the machine.
    signature: Mapped[str] = mapped_column(String(64), index=True)
    base_model: Mapped[str] = mapped_column(Text)
    worker_kind: Mapped[str] = mapped_column(String(10))
    worker_id: Mapped[str] = mapped_column(String(200))
    machine: Mapped[str] = mapped_column(Text)
    threads: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    # [[sequence length, tokens per second], ...], shortest first.
    points: Mapped[list[Any]] = mapped_column(JSON)
    load_seconds: Mapped[float] = mapped_column(Float)
    measured_at: Mapped[float] = mapped_column(Float, index=True)
    # The share of its threads' time the measurement had (other processes were busy below 1).
    cpu_share: Mapped[float] = mapped_column(Float)


class PendingReferenceRow(Base):
    """A dataset-version reference being added for a run whose row is not inserted yet."""

    __tablename__ = "pending_dataset_references"

    referrer: Mapped[str] = mapped_column(String(400), primary_key=True)
    dataset_version: Mapped[str] = mapped_column(String(400))
    since: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    __tablename__ = "events"

    version: Mapped[str] = mapped_column(String(400), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(20))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class EvaluationRow(Base):
    """An evaluation of a model version (or of the base model) on a dataset version."""

    __tablename__ = "evaluations"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(500), unique=True)
    # The model version it scores, or the model whose base model it scores.
    parent: Mapped[str] = mapped_column(String(400), index=True)
    model_version: Mapped[str] = mapped_column(String(400), default="")
    base_model: Mapped[bool] = mapped_column(Boolean, default=False)
    base_model_name: Mapped[str] = mapped_column(Text, default="")
    dataset_version: Mapped[str] = mapped_column(String(400))
    metrics: Mapped[list[str]] = mapped_column(JSON)
    # The predictor's InferenceParams, as protobuf JSON.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_like: Mapped[str] = mapped_column(String(400), default="")
    max_examples: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20), index=True)
    completed_examples: Mapped[int] = mapped_column(Integer, default=0)
    total_examples: Mapped[int] = mapped_column(Integer, default=0)
    primary_score: Mapped[str] = mapped_column(String(40), default="")
    scores: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    # [[reference, predicted, count], ...] with label accuracy.
    confusion: Mapped[list[Any]] = mapped_column(JSON, default=list)
    labels: Mapped[list[str]] = mapped_column(JSON, default=list)
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    failure_reason: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[float] = mapped_column(Float)
    end_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    # While RUNNING: until when the trainer process running it holds it.
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)


class EvaluationResultRow(Base):
    """One example of an evaluation: what was asked, expected and answered, and its scores."""

    __tablename__ = "evaluation_results"

    evaluation: Mapped[str] = mapped_column(String(500), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    input_name: Mapped[str] = mapped_column(String(500))
    prompt: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)
    output: Mapped[str] = mapped_column(Text)
    predicted_label: Mapped[str] = mapped_column(Text, default="")
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str] = mapped_column(String(20), default="")
    # One column per score (NULL: not computed), so results sort by any of them in SQL.
    exact_match: Mapped[float | None] = mapped_column(Float, nullable=True)
    label_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    label_likelihood: Mapped[float | None] = mapped_column(Float, nullable=True)
    rouge1: Mapped[float | None] = mapped_column(Float, nullable=True)
    rouge2: Mapped[float | None] = mapped_column(Float, nullable=True)
    rouge_l: Mapped[float | None] = mapped_column(Float, nullable=True)
    bleu: Mapped[float | None] = mapped_column(Float, nullable=True)
    perplexity: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclass(frozen=True)
class Event:
    sequence: int
    time: float
    kind: EventKind
    payload: dict[str, Any]

    @property
    def is_final_state(self) -> bool:
        return self.kind == EventKind.STATE and self.payload.get("state") in FINAL_STATES


def state_payload(
    state: State, message: str = "", status_code: int | None = None
) -> dict[str, Any]:
    code = STATUS_CODES[state] if status_code is None else status_code
    return {"state": state.value, "status_code": code, "message": message}


def log_payload(message: str, level: str = "INFO") -> dict[str, Any]:
    return {"level": level, "message": message}


def append_event(
    session: Session,
    version: str,
    kind: EventKind,
    payload: dict[str, Any],
    *,
    fence: Any = None,
) -> int | None:
    """Appends an event with the run's next sequence number, inside `session`'s transaction.

    `fence` is an extra WHERE clause on the run's row (e.g. "still owned by this
    worker"); when it does not hold, nothing is written and None is returned.
    Taking the counter with an UPDATE first also takes the row's write lock, so
    concurrent writers of one run serialize and the sequence has no gaps.
    """
    stmt = update(VersionRow).where(VersionRow.name == version)
    if fence is not None:
        stmt = stmt.where(fence)
    result = session.execute(stmt.values(last_sequence=VersionRow.last_sequence + 1))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    seq = session.execute(
        select(VersionRow.last_sequence).where(VersionRow.name == version)
    ).scalar_one()
    session.add(
        EventRow(version=version, sequence=seq, time=time.time(), kind=kind.value, payload=payload)
    )
    return int(seq)


def model_etag(row: ModelRow) -> str:
    """Weak: over what UpdateModel changes; training (the latest version) leaves it as it is."""
    return etag(
        "model",
        row.name,
        row.create_time,
        row.description or "",
        row.notes or "",
        row.default_inference_params or "",
        weak=True,
    )


# The columns of a model UpdateModel may change.
MODEL_UPDATABLE = ("description", "notes", "default_inference_params")


def _page(items: Sequence[Any], size: int) -> tuple[list[Any], bool]:
    return list(items[:size]), len(items) > size


class TrainerStore:
    """Models, model versions and events in the trainer's own database."""

    def __init__(self, url: str) -> None:
        self.engine, self.sessions = open_database(url, migrations.REVISIONS)

    # Models.

    def create_model(
        self,
        app: str,
        model_id: str,
        description: str,
        model_type: str,
        *,
        notes: str | None = None,
        default_inference_params: str | None = None,
    ) -> ModelRow:
        name = f"apps/{app}/models/{model_id}"
        row = ModelRow(
            name=name,
            app=app,
            description=description,
            model_type=model_type,
            latest_trained_version="",
            create_time=time.time(),
            notes=notes or None,
            default_inference_params=default_inference_params,
        )
        try:
            with self.sessions.begin() as s:
                s.add(row)
        except IntegrityError:
            raise AlreadyExists(f"model {name!r} already exists", reason="MODEL_EXISTS") from None
        return row

    def get_model(self, name: str) -> ModelRow:
        with self.sessions() as s:
            row = s.execute(select(ModelRow).where(ModelRow.name == name)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND")
        return row

    def update_model(self, name: str, changes: dict[str, str | None], etag: str = "") -> ModelRow:
        """Sets the columns in `changes` (of MODEL_UPDATABLE); with `etag`, only if it is current.

        The UPDATE checks the columns the etag covers again, so of two updates from one etag
        exactly one wins and the other is Aborted.
        """
        what = f"model {name!r}"
        with self.sessions.begin() as s:
            row = s.execute(select(ModelRow).where(ModelRow.name == name)).scalar_one_or_none()
            if row is None:
                raise NotFound(f"{what} not found", reason="MODEL_NOT_FOUND")
            check_etag(what, etag, model_etag(row))
            values = {k: v for k, v in changes.items() if v != getattr(row, k)}
            if values:
                stmt = update(ModelRow).where(ModelRow.seq == row.seq).values(**values)
                if etag:
                    stmt = stmt.where(
                        *(
                            getattr(ModelRow, column).is_not_distinct_from(getattr(row, column))
                            for column in MODEL_UPDATABLE
                        )
                    )
                if not s.execute(stmt).rowcount:  # type: ignore[attr-defined]
                    raise changed_meanwhile(what)
        return self.get_model(name)

    def list_models(self, app: str, size: int, after_seq: int) -> tuple[list[ModelRow], bool]:
        with self.sessions() as s:
            rows = (
                s.execute(
                    select(ModelRow)
                    .where(ModelRow.app == app, ModelRow.seq > after_seq)
                    .order_by(ModelRow.seq)
                    .limit(size + 1)
                )
                .scalars()
                .all()
            )
        return _page(rows, size)

    def delete_model(self, name: str, force: bool) -> list[VersionRow]:
        """Deletes a model (and with `force` its finished versions); returns the versions deleted."""
        with self.sessions.begin() as s:
            model = s.execute(select(ModelRow).where(ModelRow.name == name)).scalar_one_or_none()
            if model is None:
                raise NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND")
            versions = s.execute(select(VersionRow).where(VersionRow.model == name)).scalars().all()
            if versions and not force:
                raise FailedPrecondition(
                    f"model {name!r} has {len(versions)} version(s); delete them first or set force",
                    reason="MODEL_HAS_VERSIONS",
                )
            active = [v.name for v in versions if v.state in ACTIVE_STATES]
            if active:
                raise FailedPrecondition(
                    f"model {name!r} has runs that are still queued or training ({', '.join(active)}); "
                    "cancel them first",
                    reason="MODEL_HAS_ACTIVE_VERSIONS",
                )
            for v in versions:
                s.execute(delete(EventRow).where(EventRow.version == v.name))
                s.delete(v)
            delete_evaluations(s, [name, *(v.name for v in versions)])
            s.delete(model)
        return list(versions)

    # Model versions.

    def find_by_request_id(self, model: str, request_id: str) -> VersionRow | None:
        with self.sessions() as s:
            return s.execute(
                select(VersionRow).where(
                    VersionRow.model == model, VersionRow.request_id == request_id
                )
            ).scalar_one_or_none()

    def version_exists(self, name: str) -> bool:
        with self.sessions() as s:
            return (
                s.execute(select(VersionRow.seq).where(VersionRow.name == name)).first() is not None
            )

    def create_version(self, row: VersionRow) -> VersionRow:
        """Inserts a run QUEUED with its first event, ending its pending reference.

        AlreadyExists on a name or request_id clash, NotFound when the model is gone.
        """
        row.state = State.QUEUED.value
        row.status_code = STATUS_CODES[State.QUEUED]
        row.create_time = time.time()
        row.last_sequence = 0
        row.attempts = 0
        try:
            with self.sessions.begin() as s:
                if (
                    s.execute(select(ModelRow.seq).where(ModelRow.name == row.model)).first()
                    is None
                ):
                    raise NotFound(f"model {row.model!r} not found", reason="MODEL_NOT_FOUND")
                s.add(row)
                s.flush()
                s.execute(
                    delete(PendingReferenceRow).where(PendingReferenceRow.referrer == row.name)
                )
                append_event(
                    s,
                    row.name,
                    EventKind.STATE,
                    state_payload(State.QUEUED, "waiting for a worker"),
                )
        except IntegrityError:
            raise AlreadyExists(
                f"model version {row.name!r} already exists", reason="VERSION_EXISTS"
            ) from None
        return self.get_version(row.name)

    def get_version(self, name: str) -> VersionRow:
        with self.sessions() as s:
            row = s.execute(select(VersionRow).where(VersionRow.name == name)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"model version {name!r} not found", reason="VERSION_NOT_FOUND")
        return row

    def list_versions(
        self, model: str, size: int, before_seq: int | None
    ) -> tuple[list[VersionRow], bool]:
        with self.sessions() as s:
            query = select(VersionRow).where(VersionRow.model == model)
            if before_seq is not None:
                query = query.where(VersionRow.seq < before_seq)
            rows = s.execute(query.order_by(VersionRow.seq.desc()).limit(size + 1)).scalars().all()
        return _page(rows, size)

    def delete_version(self, name: str) -> VersionRow:
        with self.sessions.begin() as s:
            row = s.execute(select(VersionRow).where(VersionRow.name == name)).scalar_one_or_none()
            if row is None:
                raise NotFound(f"model version {name!r} not found", reason="VERSION_NOT_FOUND")
            if row.state in ACTIVE_STATES:
                raise FailedPrecondition(
                    f"model version {name!r} is {row.state}; cancel it first",
                    reason="VERSION_ACTIVE",
                )
            s.execute(delete(EventRow).where(EventRow.version == name))
            delete_evaluations(s, [name])
            s.delete(row)
            s.flush()
            refresh_latest_trained(s, row.model)
        return row

    def cancel_version(self, name: str) -> VersionRow:
        """Moves a queued or running run to CANCELLED; its worker notices at its next heartbeat."""
        with self.sessions.begin() as s:
            seq = append_event(
                s,
                name,
                EventKind.STATE,
                state_payload(State.CANCELLED, "cancelled by a user"),
                fence=VersionRow.state.in_([st.value for st in ACTIVE_STATES]),
            )
            if seq is not None:
                s.execute(
                    update(VersionRow)
                    .where(VersionRow.name == name)
                    .values(
                        state=State.CANCELLED.value,
                        status_code=STATUS_CODES[State.CANCELLED],
                        end_time=time.time(),
                        lease_expires=None,
                    )
                )
        return self.get_version(name)

    def queued_waits(self) -> list[tuple[str, Requirements, str]]:
        """Every queued run, oldest first, with its requirements and its recorded wait reason."""
        with self.sessions() as s:
            rows = s.execute(
                select(
                    VersionRow.name,
                    VersionRow.needs_cuda,
                    VersionRow.needs_gptq,
                    VersionRow.needs_gpu_memory_gib,
                    VersionRow.wait_reason,
                )
                .where(VersionRow.state == State.QUEUED.value)
                .order_by(VersionRow.seq)
            ).all()
        return [
            (name, requirements_of(cuda, gptq, memory), reason or "")
            for name, cuda, gptq, memory, reason in rows
        ]

    def note_waiting(self, name: str, reason: str) -> bool:
        """Records why the queued run `name` waits ('' : it no longer does).

        A new reason is also a warning in its log, so watchers see it; the same reason
        again writes nothing. False when nothing changed (same reason, or not queued).
        """
        changed = and_(
            VersionRow.state == State.QUEUED.value,
            VersionRow.wait_reason.is_distinct_from(reason or None),
        )
        with self.sessions.begin() as s:
            if not reason:
                result = s.execute(
                    update(VersionRow)
                    .where(VersionRow.name == name, changed)
                    .values(wait_reason=None)
                )
                return bool(result.rowcount)  # type: ignore[attr-defined]
            if append_event(s, name, EventKind.LOG, log_payload(reason, "WARNING"), fence=changed):
                s.execute(
                    update(VersionRow).where(VersionRow.name == name).values(wait_reason=reason)
                )
                return True
        return False

    # Events.

    def events_after(
        self, name: str, after: int, limit: int = 1000, kind: EventKind | None = None
    ) -> list[Event]:
        with self.sessions() as s:
            query = select(EventRow).where(EventRow.version == name, EventRow.sequence > after)
            if kind is not None:
                query = query.where(EventRow.kind == kind.value)
            rows = s.execute(query.order_by(EventRow.sequence).limit(limit)).scalars().all()
        return [Event(r.sequence, r.time, EventKind(r.kind), r.payload) for r in rows]

    def version_state(self, name: str) -> str | None:
        with self.sessions() as s:
            return s.execute(
                select(VersionRow.state).where(VersionRow.name == name)
            ).scalar_one_or_none()

    # Dataset-version references.

    def begin_reference(self, referrer: str, dataset_version: str, now: float) -> None:
        """Records that a reference for the future run `referrer` is about to be added."""
        with self.sessions.begin() as s:
            s.merge(
                PendingReferenceRow(referrer=referrer, dataset_version=dataset_version, since=now)
            )

    def end_reference(self, referrer: str) -> None:
        """Forgets a pending reference (its run was not created and the reference is removed)."""
        with self.sessions.begin() as s:
            s.execute(delete(PendingReferenceRow).where(PendingReferenceRow.referrer == referrer))

    def unjustified_referrers(self, referrers: Sequence[str], fresh_since: float) -> list[str]:
        """Those of `referrers` that are no run and have no pending reference since `fresh_since`."""
        with self.sessions() as s:
            runs = set(
                s.execute(select(VersionRow.name).where(VersionRow.name.in_(referrers))).scalars()
            )
            pending = set(
                s.execute(
                    select(PendingReferenceRow.referrer).where(
                        PendingReferenceRow.referrer.in_(referrers),
                        PendingReferenceRow.since >= fresh_since,
                    )
                ).scalars()
            )
        return [r for r in referrers if r not in runs and r not in pending]

    def forget_pending_references(self, before: float) -> int:
        """Deletes pending references older than `before` (their creation died); returns how many."""
        with self.sessions.begin() as s:
            result = s.execute(
                delete(PendingReferenceRow).where(PendingReferenceRow.since < before)
            )
        return int(result.rowcount)  # type: ignore[attr-defined]


def requirements_of(
    cuda: bool | None, gptq: bool | None, gpu_memory_gib: float | None
) -> Requirements:
    """A run's stored requirements (NULL, on runs from before they were stored: none)."""
    return Requirements(cuda=bool(cuda), gptq=bool(gptq), gpu_memory_gib=gpu_memory_gib or 0.0)


def delete_evaluations(session: Session, parents: Sequence[str]) -> None:
    """Deletes the evaluations of `parents` (versions, or models for their base model's) and
    their results; one still running stops at its next write, which finds it gone."""
    names = select(EvaluationRow.name).where(EvaluationRow.parent.in_(parents))
    session.execute(delete(EvaluationResultRow).where(EvaluationResultRow.evaluation.in_(names)))
    session.execute(delete(EvaluationRow).where(EvaluationRow.parent.in_(parents)))


def refresh_latest_trained(session: Session, model: str) -> None:
    """Points the model at its newest TRAINED version (or none)."""
    latest = session.execute(
        select(VersionRow.name)
        .where(VersionRow.model == model, VersionRow.state == State.TRAINED.value)
        .order_by(VersionRow.seq.desc())
        .limit(1)
    ).scalar_one_or_none()
    session.execute(
        update(ModelRow).where(ModelRow.name == model).values(latest_trained_version=latest or "")
    )

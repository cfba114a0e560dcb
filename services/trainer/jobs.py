"""The job queue: workers claim queued runs, hold them with a lease, and report through it.

A worker claims only runs whose requirements (stored on the run when it is
created: CUDA, GPTQModel, GPU memory) the hardware it advertised in the workers
table meets; the others stay queued for a worker that has it.

A claim is one conditional UPDATE (`... WHERE state = 'QUEUED'`), so of several
workers racing for a run exactly one wins; on PostgreSQL the candidate is also
picked with `SELECT ... FOR UPDATE SKIP LOCKED` so racing workers pick
different runs instead of colliding. The winner holds a lease it renews with
heartbeats. Every write a worker makes is fenced on "this worker still owns
this run and it is still running": after a cancel, or after a lost lease was
handed to another worker, the old worker's writes change nothing and it stops.

A run whose lease expired (its worker died) is requeued to resume from its last
checkpoint, until `max_attempts` starts; then it fails. Lease times come from
an injectable `clock` (seconds, `time.time` by default) so lease expiry can be
tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, false, or_, select, update

from loraforge.services.trainer.hardware import Capabilities
from loraforge.services.trainer.store import (
    CODE_TOLERANCE_EXCEEDED,
    RUNNING_STATES,
    STATUS_CODES,
    EventKind,
    State,
    TrainerStore,
    VersionRow,
    append_event,
    log_payload,
    refresh_latest_trained,
    state_payload,
)
from loraforge.services.trainer.workers import capabilities_of

# Losses a progress event carries only when its step measured them.
LOSSES = ("train_loss", "eval_loss")


@dataclass(frozen=True)
class ClaimedJob:
    """A run a worker now owns, with what it needs to start or resume it."""

    name: str
    params: dict[str, Any]
    template: str
    dataset_version: str
    attempt: int
    checkpoint_step: int
    checkpoint_key: str
    # A continued run: the version whose adapter (copied under `init-adapter/`) it starts from.
    from_model_version: str = ""
    # Times the run was retried with a smaller memory plan after an out-of-memory kill.
    memory_retries: int = 0

    @property
    def starts(self) -> int:
        """Starts that count against the worker's `max_attempts` (not the memory retries)."""
        return self.attempt - self.memory_retries


Clock = Callable[[], float]


def _not(column: Any) -> Any:
    """`column` is false, or NULL (a run from before requirements were stored)."""
    return or_(column.is_(None), column == false())


def _trainable_by(has: Capabilities) -> list[Any]:
    """WHERE clauses on the runs a worker with `has` meets the requirements of."""
    clauses = []
    if has.cuda:
        clauses.append(
            or_(
                VersionRow.needs_gpu_memory_gib.is_(None),
                VersionRow.needs_gpu_memory_gib <= has.gpu_memory_gib,
            )
        )
    else:
        clauses.append(_not(VersionRow.needs_cuda))
    if not has.gptq:
        clauses.append(_not(VersionRow.needs_gptq))
    return clauses


class JobQueue:
    def __init__(self, store: TrainerStore, clock: Clock = time.time) -> None:
        self.store = store
        self.clock = clock

    def claim(self, worker_id: str, lease_seconds: float) -> ClaimedJob | None:
        """Claims the oldest queued run `worker_id` can train, or returns None if there is none.

        What it can train is what its entry in the workers table advertises
        (`workers.Workers.advertise`); a worker without an entry takes only runs that
        need neither CUDA nor GPTQModel.
        """
        for _ in range(5):  # another worker may win a candidate; try the next one
            with self.store.sessions.begin() as s:
                has = capabilities_of(s, worker_id)
                candidate = s.execute(
                    select(VersionRow.name)
                    .where(VersionRow.state == State.QUEUED.value, *_trainable_by(has))
                    .order_by(VersionRow.seq)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).scalar_one_or_none()
                if candidate is None:
                    return None
                now = self.clock()
                won = s.execute(
                    update(VersionRow)
                    .where(VersionRow.name == candidate, VersionRow.state == State.QUEUED.value)
                    .values(
                        state=State.TRAINING.value,
                        status_code=STATUS_CODES[State.TRAINING],
                        worker_id=worker_id,
                        lease_expires=now + lease_seconds,
                        attempts=VersionRow.attempts + 1,
                        start_time=now,
                        wait_reason=None,
                    )
                ).rowcount  # type: ignore[attr-defined]
                if won != 1:
                    continue
                row = s.execute(select(VersionRow).where(VersionRow.name == candidate)).scalar_one()
                resume = (
                    f" resuming from checkpoint step {row.checkpoint_step}"
                    if row.checkpoint_step
                    else ""
                )
                smaller = (
                    " with a smaller memory plan after an out-of-memory kill"
                    if row.memory_retries
                    else ""
                )
                append_event(
                    s,
                    candidate,
                    EventKind.STATE,
                    state_payload(
                        State.TRAINING,
                        f"attempt {row.attempts} on worker {worker_id}{resume}{smaller}",
                    ),
                )
                return ClaimedJob(
                    name=row.name,
                    params=row.params,
                    template=row.template,
                    dataset_version=row.dataset_version,
                    attempt=row.attempts,
                    checkpoint_step=row.checkpoint_step,
                    checkpoint_key=row.checkpoint_key,
                    from_model_version=row.from_model_version or "",
                    memory_retries=row.memory_retries or 0,
                )
        return None

    def reap_expired(self, max_attempts: int) -> list[str]:
        """Requeues (or fails, after `max_attempts`) runs whose worker stopped renewing its lease."""
        now = self.clock()
        with self.store.sessions() as s:
            expired = s.execute(
                select(
                    VersionRow.name,
                    VersionRow.worker_id,
                    VersionRow.attempts,
                    VersionRow.checkpoint_step,
                    VersionRow.memory_retries,
                ).where(
                    VersionRow.state.in_([st.value for st in RUNNING_STATES]),
                    VersionRow.lease_expires < now,
                )
            ).all()
        reaped = []
        for name, worker_id, claims, step, memory_retries in expired:
            # Retries after an out-of-memory kill are not starts a dead worker used up.
            attempts = claims - (memory_retries or 0)
            fence = and_(
                VersionRow.worker_id == worker_id,
                VersionRow.state.in_([st.value for st in RUNNING_STATES]),
                VersionRow.lease_expires < now,
            )
            with self.store.sessions.begin() as s:
                lost = f"worker {worker_id} stopped reporting (its lease expired)"
                if attempts >= max_attempts:
                    reason = f"{lost} on attempt {attempts} of {max_attempts}; giving up"
                    seq = append_event(
                        s, name, EventKind.STATE, state_payload(State.FAILED, reason), fence=fence
                    )
                    values: dict[str, Any] = {
                        "state": State.FAILED.value,
                        "status_code": STATUS_CODES[State.FAILED],
                        "failure_reason": reason,
                        "end_time": now,
                    }
                else:
                    where = f"from checkpoint step {step}" if step else "from the start"
                    seq = append_event(
                        s,
                        name,
                        EventKind.STATE,
                        state_payload(State.QUEUED, f"{lost}; requeued to resume {where}"),
                        fence=fence,
                    )
                    values = {
                        "state": State.QUEUED.value,
                        "status_code": STATUS_CODES[State.QUEUED],
                    }
                if seq is not None:
                    s.execute(
                        update(VersionRow)
                        .where(VersionRow.name == name)
                        .values(worker_id="", lease_expires=None, **values)
                    )
                    reaped.append(name)
        return reaped


class JobReporter:
    """Everything a worker writes about one claimed run, fenced on its ownership."""

    def __init__(
        self, store: TrainerStore, name: str, worker_id: str, clock: Clock = time.time
    ) -> None:
        self.store = store
        self.name = name
        self.worker_id = worker_id
        self.clock = clock

    def _fence(self, states: tuple[State, ...] = RUNNING_STATES) -> Any:
        return and_(
            VersionRow.worker_id == self.worker_id, VersionRow.state.in_([s.value for s in states])
        )

    def _write(
        self, kind: EventKind, payload: dict[str, Any], values: dict[str, Any] | None = None
    ) -> bool:
        with self.store.sessions.begin() as s:
            if append_event(s, self.name, kind, payload, fence=self._fence()) is None:
                return False
            if values:
                s.execute(update(VersionRow).where(VersionRow.name == self.name).values(**values))
        return True

    def heartbeat(self, lease_seconds: float) -> bool:
        """Renews the lease; False when this worker no longer owns a running run (cancelled, lost)."""
        with self.store.sessions.begin() as s:
            renewed = s.execute(
                update(VersionRow)
                .where(VersionRow.name == self.name, self._fence())
                .values(lease_expires=self.clock() + lease_seconds)
            ).rowcount  # type: ignore[attr-defined]
        return bool(renewed == 1)

    def log(self, message: str, level: str = "INFO") -> bool:
        return self._write(EventKind.LOG, log_payload(message, level))

    def progress(self, progress: dict[str, Any]) -> bool:
        """Appends a progress event with what its step measured; the run's latest progress
        is that event plus the last loss of each kind that the event does not carry."""
        with self.store.sessions.begin() as s:
            if (
                append_event(s, self.name, EventKind.PROGRESS, progress, fence=self._fence())
                is None
            ):
                return False
            previous = s.execute(
                select(VersionRow.progress).where(VersionRow.name == self.name)
            ).scalar_one()
            kept = {k: v for k, v in (previous or {}).items() if k in LOSSES and k not in progress}
            s.execute(
                update(VersionRow)
                .where(VersionRow.name == self.name)
                .values(progress={**progress, **kept})
            )
        return True

    def checkpoint(self, step: int, key: str, checkpoint_prefix: str) -> bool:
        return self._write(
            EventKind.LOG,
            log_payload(f"checkpoint at step {step} saved to {key}"),
            {
                "checkpoint_step": step,
                "checkpoint_key": key,
                "checkpoint_prefix": checkpoint_prefix,
            },
        )

    def uploading(self) -> bool:
        return self._write(
            EventKind.STATE,
            state_payload(State.UPLOADING, "training done; uploading the adapter"),
            {"state": State.UPLOADING.value, "status_code": STATUS_CODES[State.UPLOADING]},
        )

    def trained(
        self, *, adapter_prefix: str, base_model: str, adapter_bytes: int, metrics: dict[str, float]
    ) -> bool:
        with self.store.sessions.begin() as s:
            seq = append_event(
                s,
                self.name,
                EventKind.STATE,
                state_payload(State.TRAINED, f"adapter ready at {adapter_prefix}"),
                fence=self._fence((State.UPLOADING,)),
            )
            if seq is None:
                return False
            s.execute(
                update(VersionRow)
                .where(VersionRow.name == self.name)
                .values(
                    state=State.TRAINED.value,
                    status_code=STATUS_CODES[State.TRAINED],
                    adapter_prefix=adapter_prefix,
                    base_model=base_model,
                    adapter_bytes=adapter_bytes,
                    metrics=metrics,
                    end_time=self.clock(),
                    lease_expires=None,
                )
            )
            model = s.execute(
                select(VersionRow.model).where(VersionRow.name == self.name)
            ).scalar_one()
            refresh_latest_trained(s, model)
        return True

    def release(self, message: str) -> bool:
        """Hands the run back to the queue (worker shutting down, dependency down); it resumes later."""
        return self._requeue(message)

    def retry_smaller(self, message: str) -> bool:
        """Requeues the run after an out-of-memory kill, to train again with a smaller memory
        plan (`ClaimedJob.memory_retries` counts these; they are not starts `max_attempts`
        limits) from its last checkpoint."""
        return self._requeue(message, memory_retries=VersionRow.memory_retries + 1)

    def _requeue(self, message: str, **values: Any) -> bool:
        with self.store.sessions.begin() as s:
            seq = append_event(
                s,
                self.name,
                EventKind.STATE,
                state_payload(State.QUEUED, message),
                fence=self._fence(),
            )
            if seq is None:
                return False
            s.execute(
                update(VersionRow)
                .where(VersionRow.name == self.name)
                .values(
                    state=State.QUEUED.value,
                    status_code=STATUS_CODES[State.QUEUED],
                    worker_id="",
                    lease_expires=None,
                    **values,
                )
            )
        return True

    def failed(self, reason: str, *, tolerance_exceeded: bool = False) -> bool:
        code = CODE_TOLERANCE_EXCEEDED if tolerance_exceeded else STATUS_CODES[State.FAILED]
        with self.store.sessions.begin() as s:
            seq = append_event(
                s,
                self.name,
                EventKind.STATE,
                state_payload(State.FAILED, reason, code),
                fence=self._fence(),
            )
            if seq is None:
                return False
            s.execute(
                update(VersionRow)
                .where(VersionRow.name == self.name)
                .values(
                    state=State.FAILED.value,
                    status_code=code,
                    failure_reason=reason,
                    end_time=self.clock(),
                    lease_expires=None,
                )
            )
        return True

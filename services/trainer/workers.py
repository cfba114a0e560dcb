"""The workers table: each training worker advertises its hardware and renews its entry.

A worker writes its entry (`advertise`) when it starts and again at every poll
and heartbeat, and removes it when it stops (`forget`). An entry is live until
`last_seen + ttl_seconds`; the worker's lease time is its ttl, so a worker
counts as gone exactly when its runs' leases would expire. The job queue
reads a worker's entry to hand it only runs it can train (`jobs.JobQueue.claim`),
and the trainer API reads the live entries to say why a queued run waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from loraforge.services.trainer.hardware import Capabilities, LiveWorker
from loraforge.services.trainer.store import TrainerStore, WorkerRow


def capabilities_of(session: Session, worker_id: str) -> Capabilities:
    """What `worker_id` advertised; nothing (a CPU without GPTQModel) when it has no entry."""
    row = session.execute(
        select(WorkerRow).where(WorkerRow.worker_id == worker_id)
    ).scalar_one_or_none()
    if row is None:
        return Capabilities()
    return Capabilities(
        cuda=row.cuda,
        gpu_memory_gib=row.gpu_memory_gib,
        gptq=row.gptq,
        memory_bytes=row.memory_bytes,
    )


class Workers:
    def __init__(self, store: TrainerStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def advertise(self, worker_id: str, has: Capabilities, ttl_seconds: float) -> None:
        """Writes or renews `worker_id`'s entry: live for `ttl_seconds` from now."""
        now = self.clock()
        values = {
            "cuda": has.cuda,
            "gpu_memory_gib": has.gpu_memory_gib,
            "gptq": has.gptq,
            "memory_bytes": has.memory_bytes,
            "last_seen": now,
            "ttl_seconds": ttl_seconds,
        }
        with self.store.sessions.begin() as s:
            renewed = s.execute(
                update(WorkerRow).where(WorkerRow.worker_id == worker_id).values(**values)
            ).rowcount  # type: ignore[attr-defined]
            if not renewed:
                s.add(WorkerRow(worker_id=worker_id, started=now, **values))

    def forget(self, worker_id: str) -> None:
        """Removes the entry of a worker that stops."""
        with self.store.sessions.begin() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.worker_id == worker_id))

    def live(self) -> list[LiveWorker]:
        """The workers whose entry has not expired, by id."""
        now = self.clock()
        with self.store.sessions() as s:
            rows = (
                s.execute(
                    select(WorkerRow)
                    .where(WorkerRow.last_seen + WorkerRow.ttl_seconds >= now)
                    .order_by(WorkerRow.worker_id)
                )
                .scalars()
                .all()
            )
        return [
            LiveWorker(r.worker_id, Capabilities(r.cuda, r.gpu_memory_gib, r.gptq, r.memory_bytes))
            for r in rows
        ]

    def forget_expired(self, before: float) -> int:
        """Deletes entries that expired before `before` (workers that died); returns how many."""
        with self.store.sessions.begin() as s:
            result = s.execute(
                delete(WorkerRow).where(WorkerRow.last_seen + WorkerRow.ttl_seconds < before)
            )
        return int(result.rowcount)  # type: ignore[attr-defined]

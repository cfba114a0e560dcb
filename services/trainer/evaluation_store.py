"""Evaluations and their per-example results in the trainer's database (tables in `store.py`).

An evaluation is RUNNING while the trainer process that runs it renews its lease; every
write of a running evaluation is fenced on it still being RUNNING, so a deleted or
failed evaluation takes no more results. An evaluation whose lease expired (its process
stopped) is failed by `fail_expired`, which any trainer process runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from loraforge.services.trainer.store import EvaluationResultRow, EvaluationRow, TrainerStore

RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
# Score names and the result columns that hold them.
SCORE_COLUMNS = {
    "exact_match": EvaluationResultRow.exact_match,
    "label_accuracy": EvaluationResultRow.label_accuracy,
    "label_likelihood": EvaluationResultRow.label_likelihood,
    "rouge1": EvaluationResultRow.rouge1,
    "rouge2": EvaluationResultRow.rouge2,
    "rougeL": EvaluationResultRow.rouge_l,
    "bleu": EvaluationResultRow.bleu,
    "perplexity": EvaluationResultRow.perplexity,
}


@dataclass(frozen=True)
class Result:
    """One example's result as stored."""

    index: int
    input_name: str
    prompt: str
    reference: str
    output: str
    scores: dict[str, float]
    predicted_label: str = ""
    completion_tokens: int = 0
    finish_reason: str = ""


def _result(row: EvaluationResultRow) -> Result:
    scores = {
        name: float(value)
        for name, column in SCORE_COLUMNS.items()
        if (value := getattr(row, column.key)) is not None
    }
    return Result(
        row.idx,
        row.input_name,
        row.prompt,
        row.reference,
        row.output,
        scores,
        row.predicted_label,
        row.completion_tokens,
        row.finish_reason,
    )


def _not_found(name: str) -> NotFound:
    return NotFound(f"evaluation {name!r} not found", reason="EVALUATION_NOT_FOUND")


class EvaluationStore:
    def __init__(self, store: TrainerStore) -> None:
        self.sessions = store.sessions

    def create(self, row: EvaluationRow) -> EvaluationRow:
        try:
            with self.sessions.begin() as s:
                s.add(row)
        except IntegrityError:
            raise AlreadyExists(
                f"evaluation {row.name!r} already exists", reason="EVALUATION_EXISTS"
            ) from None
        return self.get(row.name)

    def get(self, name: str) -> EvaluationRow:
        with self.sessions() as s:
            row = s.execute(
                select(EvaluationRow).where(EvaluationRow.name == name)
            ).scalar_one_or_none()
        if row is None:
            raise _not_found(name)
        return row

    def page(
        self, parent: str, size: int, before_seq: int | None
    ) -> tuple[list[EvaluationRow], bool]:
        with self.sessions() as s:
            query = select(EvaluationRow).where(EvaluationRow.parent == parent)
            if before_seq is not None:
                query = query.where(EvaluationRow.seq < before_seq)
            rows = (
                s.execute(query.order_by(EvaluationRow.seq.desc()).limit(size + 1)).scalars().all()
            )
        return list(rows[:size]), len(rows) > size

    def delete(self, name: str) -> None:
        with self.sessions.begin() as s:
            row = s.execute(
                select(EvaluationRow).where(EvaluationRow.name == name)
            ).scalar_one_or_none()
            if row is None:
                raise _not_found(name)
            if row.state == RUNNING:
                raise FailedPrecondition(
                    f"evaluation {name!r} is RUNNING; delete it once it has ended",
                    reason="EVALUATION_RUNNING",
                )
            s.execute(delete(EvaluationResultRow).where(EvaluationResultRow.evaluation == name))
            s.delete(row)

    def start(self, name: str, **values: Any) -> bool:
        """Sets what a running evaluation found out (metrics, totals); False if it is not RUNNING."""
        with self.sessions.begin() as s:
            result = s.execute(
                update(EvaluationRow)
                .where(EvaluationRow.name == name, EvaluationRow.state == RUNNING)
                .values(**values)
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def add_results(self, name: str, results: Sequence[Result], lease_expires: float) -> bool:
        """Stores a batch of results and the progress; False (nothing stored) if not RUNNING."""
        with self.sessions.begin() as s:
            moved = s.execute(
                update(EvaluationRow)
                .where(EvaluationRow.name == name, EvaluationRow.state == RUNNING)
                .values(
                    completed_examples=EvaluationRow.completed_examples + len(results),
                    lease_expires=lease_expires,
                )
            )
            if not moved.rowcount:  # type: ignore[attr-defined]
                return False
            for r in results:
                row = EvaluationResultRow(
                    evaluation=name,
                    idx=r.index,
                    input_name=r.input_name,
                    prompt=r.prompt,
                    reference=r.reference,
                    output=r.output,
                    predicted_label=r.predicted_label,
                    completion_tokens=r.completion_tokens,
                    finish_reason=r.finish_reason,
                )
                for score, value in r.scores.items():
                    setattr(row, SCORE_COLUMNS[score].key, value)
                s.add(row)
        return True

    def renew(self, name: str, lease_expires: float) -> bool:
        return self.start(name, lease_expires=lease_expires)

    def succeed(
        self,
        name: str,
        scores: dict[str, float],
        labels: list[str],
        confusion: list[list[Any]],
        warnings: list[str],
    ) -> bool:
        return self._end(
            name,
            state=SUCCEEDED,
            scores=scores,
            labels=labels,
            confusion=confusion,
            warnings=warnings,
        )

    def fail(self, name: str, reason: str) -> bool:
        return self._end(name, state=FAILED, failure_reason=reason)

    def cancel(self, name: str) -> EvaluationRow:
        """Moves a RUNNING evaluation to CANCELLED; its task stops at its next write."""
        if not self._end(name, state=CANCELLED):
            row = self.get(name)
            raise FailedPrecondition(
                f"evaluation {name!r} is {row.state}; only a RUNNING evaluation can be cancelled",
                reason="EVALUATION_NOT_RUNNING",
            )
        return self.get(name)

    def _end(self, name: str, **values: Any) -> bool:
        return self.start(name, end_time=time.time(), lease_expires=None, **values)

    def fail_expired(self, now: float, reason: str) -> list[str]:
        """Fails every RUNNING evaluation whose lease ended before `now`; returns their names."""
        with self.sessions.begin() as s:
            names = list(
                s.execute(
                    select(EvaluationRow.name).where(
                        EvaluationRow.state == RUNNING,
                        func.coalesce(EvaluationRow.lease_expires, 0.0) < now,
                    )
                ).scalars()
            )
            if names:
                s.execute(
                    update(EvaluationRow)
                    .where(EvaluationRow.name.in_(names), EvaluationRow.state == RUNNING)
                    .values(state=FAILED, failure_reason=reason, end_time=now, lease_expires=None)
                )
        return names

    def results(
        self, name: str, score: str, descending: bool, offset: int, size: int
    ) -> tuple[list[Result], int]:
        """A page of results ordered by `score` (worst first; '' : dataset order) and the total."""
        with self.sessions() as s:
            where = EvaluationResultRow.evaluation == name
            total = s.execute(select(func.count()).select_from(EvaluationResultRow).where(where))
            query = select(EvaluationResultRow).where(where)
            if score:
                column = SCORE_COLUMNS[score]
                query = query.order_by(column.desc() if descending else column.asc())
            rows = (
                s.execute(query.order_by(EvaluationResultRow.idx).offset(offset).limit(size))
                .scalars()
                .all()
            )
            return [_result(r) for r in rows], int(total.scalar_one())

    def all_results(self, name: str) -> list[Result]:
        with self.sessions() as s:
            rows = (
                s.execute(
                    select(EvaluationResultRow)
                    .where(EvaluationResultRow.evaluation == name)
                    .order_by(EvaluationResultRow.idx)
                )
                .scalars()
                .all()
            )
        return [_result(r) for r in rows]

"""Request ids: a retried create returns what its first call did.

A client that retries UploadInputs, AddInputs or CreateDatasetVersion (its connection
dropped before the answer came, say) sends the same `request_id` again. The first call
claims the id in its app, in the same transaction as what it writes, and records what it
returned; a retry finds the claim and answers with that instead of writing again. When two
calls race with one id, the unique key on (app, request id) lets one claim it; the other's
whole transaction rolls back, so nothing is written twice, and it then answers from the
winner's claim.

An id is bound to the method and dataset of its first call: reusing it for another call is
refused, since answering with the other call's result would be wrong. An upload's claim
lasts as long as its upload: one that fails or is cancelled stores nothing and frees its id,
so a retry does the upload. A version whose build failed (its server stopped, the store was
unreachable) is built again by a retry, under the same name. Claims go with their dataset
when it is deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from loraforge.services.common.errors import FieldViolation, InvalidArgument
from loraforge.services.dataset.domain import RowError, SourceFormat, UploadReport
from loraforge.services.dataset.tables import apps, datasets, request_ids

ADD_INPUTS = "AddInputs"
UPLOAD_INPUTS = "UploadInputs"
CREATE_DATASET_VERSION = "CreateDatasetVersion"


@dataclass(frozen=True)
class Claim:
    """A request id's first call: which upload it runs (uploads), and what it returned."""

    upload_pk: int | None
    result: dict[str, Any] | None


@dataclass(frozen=True)
class RequestKey:
    """Who asks: the request id, the method and dataset it comes with, and its field's path."""

    request_id: str
    method: str
    app_pk: int
    dataset_pk: int
    field: str = "request_id"


def find(conn: Connection, key: RequestKey) -> Claim | None:
    """The claim on `key.request_id` in its app, if any; InvalidArgument if another call made it."""
    row = conn.execute(
        select(request_ids).where(
            request_ids.c.app_pk == key.app_pk, request_ids.c.request_id == key.request_id
        )
    ).first()
    if row is None:
        return None
    if row.method != key.method or row.dataset_pk != key.dataset_pk:
        other = conn.execute(
            select(apps.c.app_id, datasets.c.dataset_id)
            .join(apps, apps.c.pk == datasets.c.app_pk)
            .where(datasets.c.pk == row.dataset_pk)
        ).one()
        description = (
            f"{key.request_id!r} was already sent with {row.method} on "
            f"`apps/{other.app_id}/datasets/{other.dataset_id}`; a request id names one request, "
            "so send a new one (a fresh UUID) for this call"
        )
        raise InvalidArgument(
            f"{key.field}: {description}",
            reason="REQUEST_ID_REUSED",
            field_violations=[FieldViolation(key.field, description)],
        )
    return Claim(row.upload_pk, json.loads(row.result) if row.result is not None else None)


def claim(
    conn: Connection,
    key: RequestKey,
    *,
    now: float,
    upload_pk: int | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    """Claims the id for this call; the caller's transaction fails if another call has it."""
    conn.execute(
        insert(request_ids).values(
            app_pk=key.app_pk,
            request_id=key.request_id,
            method=key.method,
            dataset_pk=key.dataset_pk,
            upload_pk=upload_pk,
            result=json.dumps(result) if result is not None else None,
            create_time=now,
        )
    )


def record_upload_result(conn: Connection, upload_pk: int, report: UploadReport) -> None:
    """Stores a finished upload's whole report with its claim, for retries to return."""
    conn.execute(
        update(request_ids)
        .where(request_ids.c.upload_pk == upload_pk)
        .values(result=json.dumps(report_to_json(report)))
    )


def release_upload(conn: Connection, upload_pk: int) -> None:
    """Frees the id of an upload that stored nothing, so a retry does it again."""
    conn.execute(delete(request_ids).where(request_ids.c.upload_pk == upload_pk))


def delete_for_dataset(conn: Connection, dataset_pk: int) -> None:
    conn.execute(delete(request_ids).where(request_ids.c.dataset_pk == dataset_pk))


def report_to_json(report: UploadReport) -> dict[str, Any]:
    return {
        "upload_id": report.upload_id,
        "detected_format": report.detected_format.name,
        "rows_read": report.rows_read,
        "rows_accepted": report.rows_accepted,
        "rows_rejected": report.rows_rejected,
        "duplicate_rows": report.duplicate_rows,
        "row_errors": [[e.line, e.code, e.reason, e.excerpt] for e in report.row_errors],
        "row_errors_truncated": report.row_errors_truncated,
        "bytes_read": report.bytes_read,
        "rows_by_markup": report.rows_by_markup,
    }


def report_from_json(doc: dict[str, Any]) -> UploadReport:
    return UploadReport(
        upload_id=doc["upload_id"],
        detected_format=SourceFormat[doc["detected_format"]],
        rows_read=doc["rows_read"],
        rows_accepted=doc["rows_accepted"],
        rows_rejected=doc["rows_rejected"],
        duplicate_rows=doc["duplicate_rows"],
        row_errors=[RowError(*e) for e in doc["row_errors"]],
        row_errors_truncated=doc["row_errors_truncated"],
        bytes_read=doc["bytes_read"],
        rows_by_markup=dict(doc["rows_by_markup"]),
    )

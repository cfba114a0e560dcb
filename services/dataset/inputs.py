"""A dataset's inputs, and the life of the uploads that store them.

An upload is a row in `uploads`: RUNNING while its inputs are written (through
`input_writer.py`), then DONE, or FAILED once what it stored is removed again. A running
upload holds a lease (`leases.py`) for the replica writing it. Its inputs are seen by no
one (listing, counting, deleting, versions) until it is DONE, although long uploads
commit them in parts; the transaction that commits the last part marks it DONE and
counts its inputs into the dataset. Running uploads whose lease has expired were cut off
mid-way (their replica stopped) and are undone by `recover_uploads`.

AddInputs and uploads may carry a request id (`requests.py`): a retry answers with what
the first call stored instead of storing it again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Row, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.errors import Aborted
from loraforge.services.common.resources import new_id
from loraforge.services.dataset import leases, requests
from loraforge.services.dataset.catalog import dataset_row
from loraforge.services.dataset.domain import (
    ExampleKind,
    InputRecord,
    Markup,
    NewExample,
    SourceFormat,
    UploadReport,
)
from loraforge.services.dataset.input_writer import BulkStatements, InputWriter
from loraforge.services.dataset.leases import Leases
from loraforge.services.dataset.pages import Page, next_page_token
from loraforge.services.dataset.tables import (
    IN_LIST_CHUNK,
    UPLOAD_DONE,
    UPLOAD_FAILED,
    UPLOAD_RUNNING,
    content_hash,
    datasets,
    inputs,
    json_column,
    uploads,
)
from loraforge.services.dataset.tables import leases as lease_rows

log = logging.getLogger("loraforge.dataset.inputs")


@dataclass(frozen=True)
class UploadHandle:
    """An upload in progress: its row, public id and target dataset."""

    upload_pk: int
    upload_id: str
    dataset_pk: int
    request_id: str = ""


def _input_record(row: Any) -> InputRecord:
    return InputRecord(
        input_id=row.pk,
        kind=ExampleKind(row.kind),
        prompt=row.prompt,
        completion=row.completion,
        raw=row.raw,
        source_format=SourceFormat(row.source_format),
        markup=Markup(row.markup),
        source_line=row.source_line,
        upload_id=row.upload_id or "",
        concepts=tuple(json.loads(row.concepts)) if row.concepts else (),
        metadata=json.loads(row.metadata) if row.metadata else {},
        create_time=row.create_time,
    )


def visible(dataset_pk: int) -> ColumnElement[bool]:
    """Inputs anyone may see: added directly, or stored by a finished upload."""
    running = select(uploads.c.pk).where(
        uploads.c.dataset_pk == dataset_pk, uploads.c.state == UPLOAD_RUNNING
    )
    return or_(inputs.c.upload_pk.is_(None), inputs.c.upload_pk.not_in(running))


def _abort_upload(conn: Connection, upload_pk: int, dataset_pk: int, *, counted: bool) -> int:
    """Fails a running upload and removes its inputs; `counted`: they are in `input_count`."""
    failed = conn.execute(
        update(uploads)
        .where(uploads.c.pk == upload_pk, uploads.c.state == UPLOAD_RUNNING)
        .values(state=UPLOAD_FAILED, end_time=time.time())
    ).rowcount
    if not failed:  # finished, or already undone by someone else
        return 0
    requests.release_upload(conn, upload_pk)
    deleted = conn.execute(
        delete(inputs).where(inputs.c.dataset_pk == dataset_pk, inputs.c.upload_pk == upload_pk)
    ).rowcount
    if counted:
        conn.execute(
            update(datasets)
            .where(datasets.c.pk == dataset_pk)
            .values(input_count=datasets.c.input_count - deleted)
        )
    return deleted


def recover_uploads(engine: Engine, owner: Leases) -> int:
    """Undoes the running uploads whose lease has expired (any replica's); returns how many.

    Each in its own transaction, which first takes the lease over, so a live owner's
    upload is never touched.
    """
    now = owner.clock()
    with engine.connect() as conn:
        candidates = conn.execute(
            select(uploads.c.pk, uploads.c.dataset_pk, uploads.c.upload_id, lease_rows.c.ref_pk)
            .outerjoin(
                lease_rows,
                (lease_rows.c.kind == leases.UPLOAD) & (lease_rows.c.ref_pk == uploads.c.pk),
            )
            .where(
                uploads.c.state == UPLOAD_RUNNING,
                or_(lease_rows.c.ref_pk.is_(None), lease_rows.c.expires_at < now),
            )
        ).all()
    undone = 0
    for row in candidates:
        with engine.begin() as conn:
            if not owner.take_over(conn, leases.UPLOAD, row.pk):
                continue  # its owner renewed the lease meanwhile
            # An upload from before leases has none, and counted its inputs as it went.
            removed = _abort_upload(conn, row.pk, row.dataset_pk, counted=row.ref_pk is None)
        undone += 1
        log.warning(
            "upload %s was cut off (its server stopped before finishing it); removed its %d inputs",
            row.upload_id,
            removed,
        )
    with engine.begin() as conn:  # leases of uploads deleted with their dataset
        conn.execute(
            delete(lease_rows).where(
                lease_rows.c.kind == leases.UPLOAD,
                lease_rows.c.expires_at < now,
                lease_rows.c.ref_pk.not_in(select(uploads.c.pk)),
            )
        )
    return undone


class Inputs:
    """Blocking operations on inputs and uploads."""

    def __init__(self, engine: Engine, leases_: Leases) -> None:
        self.engine = engine
        self.leases = leases_
        self._statements = BulkStatements(engine.dialect)

    def add_inputs(
        self,
        app_id: str,
        dataset_id: str,
        examples: Sequence[NewExample],
        request_id: str = "",
    ) -> list[InputRecord]:
        """Stores the examples in one transaction; with a request id, once per id."""
        try:
            return self._add_inputs(app_id, dataset_id, examples, request_id)
        except IntegrityError:
            if not request_id:
                raise
            # A concurrent call with the same request id claimed it first: answer as it did.
            with self.engine.connect() as conn:
                key = self._request_key(conn, app_id, dataset_id, request_id, requests.ADD_INPUTS)
                claimed = requests.find(conn, key)
                if claimed is None:
                    raise
                return self._replay_added(conn, claimed)

    @staticmethod
    def _request_key(
        conn: Connection, app_id: str, dataset_id: str, request_id: str, method: str
    ) -> requests.RequestKey:
        ds = dataset_row(conn, app_id, dataset_id)
        field = "header.request_id" if method == requests.UPLOAD_INPUTS else "request_id"
        return requests.RequestKey(request_id, method, ds.app_pk, ds.pk, field)

    @staticmethod
    def _replay_added(conn: Connection, claimed: requests.Claim) -> list[InputRecord]:
        """The inputs a first AddInputs call stored, in its order, less those deleted since."""
        ids: list[int] = (claimed.result or {}).get("input_ids", [])
        found: dict[int, InputRecord] = {}
        for i in range(0, len(ids), IN_LIST_CHUNK):
            rows = conn.execute(
                select(inputs, uploads.c.upload_id)
                .outerjoin(uploads, uploads.c.pk == inputs.c.upload_pk)
                .where(inputs.c.pk.in_(ids[i : i + IN_LIST_CHUNK]))
            ).all()
            found.update((r.pk, _input_record(r)) for r in rows)
        return [found[pk] for pk in ids if pk in found]

    def _add_inputs(
        self, app_id: str, dataset_id: str, examples: Sequence[NewExample], request_id: str
    ) -> list[InputRecord]:
        now = time.time()
        params = [
            {
                "kind": int(e.kind),
                "prompt": e.prompt,
                "completion": e.completion,
                "raw": e.raw,
                "source_format": int(SourceFormat.STRUCTURED),
                "markup": int(Markup.STRUCTURED),
                "source_line": 0,
                "upload_pk": None,
                "concepts": json_column(list(e.concepts)),
                "metadata": json_column(e.metadata),
                "content_hash": content_hash(e.kind, e.prompt, e.completion),
                "create_time": now,
            }
            for e in examples
        ]
        with self.engine.begin() as conn:
            ds = dataset_row(conn, app_id, dataset_id)
            key = None
            if request_id:
                key = requests.RequestKey(request_id, requests.ADD_INPUTS, ds.app_pk, ds.pk)
                claimed = requests.find(conn, key)
                if claimed is not None:
                    return self._replay_added(conn, claimed)
            for p in params:
                p["dataset_pk"] = ds.pk
            result = conn.execute(
                insert(inputs).returning(inputs.c.pk, sort_by_parameter_order=True), params
            )
            ids = [r.pk for r in result]
            conn.execute(
                update(datasets)
                .where(datasets.c.pk == ds.pk)
                .values(input_count=datasets.c.input_count + len(ids))
            )
            if key is not None:
                requests.claim(conn, key, now=now, result={"input_ids": ids})
        return [
            InputRecord(
                input_id=pk,
                kind=e.kind,
                prompt=e.prompt,
                completion=e.completion,
                raw=e.raw,
                source_format=SourceFormat.STRUCTURED,
                markup=Markup.STRUCTURED,
                source_line=0,
                upload_id="",
                concepts=tuple(e.concepts),
                metadata=dict(e.metadata),
                create_time=now,
            )
            for pk, e in zip(ids, examples, strict=True)
        ]

    def list_inputs(
        self, app_id: str, dataset_id: str, page: Page
    ) -> tuple[list[InputRecord], str, int]:
        with self.engine.connect() as conn:
            ds = dataset_row(conn, app_id, dataset_id)
            rows = conn.execute(
                select(inputs, uploads.c.upload_id)
                .outerjoin(uploads, uploads.c.pk == inputs.c.upload_pk)
                .where(inputs.c.dataset_pk == ds.pk, inputs.c.pk > page.after, visible(ds.pk))
                .order_by(inputs.c.pk)
                .limit(page.size + 1)
            ).all()
        records = [_input_record(r) for r in rows[: page.size]]
        token = next_page_token(rows, page, f"apps/{app_id}/datasets/{dataset_id}")
        return records, token, ds.input_count

    def delete_inputs(self, app_id: str, dataset_id: str, input_ids: Sequence[int] | None) -> int:
        """Deletes the given inputs (ids that do not exist are ignored), or all when None."""
        with self.engine.begin() as conn:
            ds = dataset_row(conn, app_id, dataset_id)
            if input_ids is None:
                deleted = conn.execute(
                    delete(inputs).where(inputs.c.dataset_pk == ds.pk, visible(ds.pk))
                ).rowcount
            else:
                deleted = 0
                unique = sorted(set(input_ids))
                for i in range(0, len(unique), IN_LIST_CHUNK):
                    deleted += conn.execute(
                        delete(inputs).where(
                            inputs.c.dataset_pk == ds.pk,
                            inputs.c.pk.in_(unique[i : i + IN_LIST_CHUNK]),
                            visible(ds.pk),
                        )
                    ).rowcount
            conn.execute(
                update(datasets)
                .where(datasets.c.pk == ds.pk)
                .values(input_count=datasets.c.input_count - deleted)
            )
        return deleted

    def frozen_inputs(self, dataset_pk: int, batch_rows: int = 5000) -> Iterator[list[Row[Any]]]:
        """The dataset's inputs in order, read in one consistent snapshot, in batches.

        Inputs of uploads still running are left out, so a version never holds half a file.
        """
        with self.engine.connect() as conn, conn.begin():
            stmt = (
                select(inputs)
                .where(inputs.c.dataset_pk == dataset_pk, visible(dataset_pk))
                .order_by(inputs.c.pk)
            )
            result = conn.execution_options(yield_per=batch_rows).execute(
                stmt.add_columns(uploads.c.upload_id).outerjoin(
                    uploads, uploads.c.pk == inputs.c.upload_pk
                )
            )
            for part in result.partitions():
                yield list(part)

    # Uploads

    def begin_upload(
        self, app_id: str, dataset_id: str, file_name: str, request_id: str = ""
    ) -> UploadHandle | UploadReport:
        """Starts an upload; with a request id a first upload already finished, its report.

        Aborted while the first upload with the request id is still running.
        """
        try:
            return self._begin_upload(app_id, dataset_id, file_name, request_id)
        except IntegrityError:
            if not request_id:
                raise
            # A concurrent upload with the same request id claimed it first.
            with self.engine.connect() as conn:
                key = self._request_key(
                    conn, app_id, dataset_id, request_id, requests.UPLOAD_INPUTS
                )
                claimed = requests.find(conn, key)
            if claimed is None:
                raise
            return self._replay_upload(claimed, request_id)

    @staticmethod
    def _replay_upload(claimed: requests.Claim, request_id: str) -> UploadReport:
        if claimed.result is None:
            raise Aborted(
                f"an upload with request_id {request_id!r} is still running; wait for it to "
                "finish, then retry to get its report",
                reason="REQUEST_IN_PROGRESS",
            )
        return requests.report_from_json(claimed.result)

    def _begin_upload(
        self, app_id: str, dataset_id: str, file_name: str, request_id: str
    ) -> UploadHandle | UploadReport:
        upload_id = new_id("u")
        now = time.time()
        with self.engine.begin() as conn:
            ds = dataset_row(conn, app_id, dataset_id)
            key = None
            if request_id:
                key = requests.RequestKey(
                    request_id, requests.UPLOAD_INPUTS, ds.app_pk, ds.pk, "header.request_id"
                )
                claimed = requests.find(conn, key)
                if claimed is not None:
                    return self._replay_upload(claimed, request_id)
            result = conn.execute(
                insert(uploads).values(
                    upload_id=upload_id,
                    dataset_pk=ds.pk,
                    file_name=file_name,
                    state=UPLOAD_RUNNING,
                    start_time=now,
                )
            )
            (upload_pk,) = result.inserted_primary_key or (None,)
            assert upload_pk is not None
            self.leases.take(conn, leases.UPLOAD, int(upload_pk))
            if key is not None:
                requests.claim(conn, key, now=now, upload_pk=int(upload_pk))
        return UploadHandle(int(upload_pk), upload_id, ds.pk, request_id)

    def input_writer(
        self, upload: UploadHandle, source_format: SourceFormat, skip_duplicates: bool
    ) -> InputWriter:
        """A writer for one upload's rows; the caller must `close()` it."""
        return InputWriter(
            self.engine, self._statements, self.leases, upload, source_format, skip_duplicates
        )

    def finish_upload(self, conn: Connection, upload: UploadHandle, report: UploadReport) -> None:
        """Marks the upload DONE and counts its inputs, in the transaction of its last rows
        (`InputWriter.close`), which has renewed its lease."""
        summary = {
            "detected_format": report.detected_format.name if report.detected_format else "",
            "rows_read": report.rows_read,
            "rows_accepted": report.rows_accepted,
            "rows_rejected": report.rows_rejected,
            "duplicate_rows": report.duplicate_rows,
            "bytes_read": report.bytes_read,
        }
        conn.execute(
            update(uploads)
            .where(uploads.c.pk == upload.upload_pk)
            .values(state=UPLOAD_DONE, end_time=time.time(), report=json.dumps(summary))
        )
        conn.execute(
            update(datasets)
            .where(datasets.c.pk == upload.dataset_pk)
            .values(input_count=datasets.c.input_count + report.rows_accepted)
        )
        if upload.request_id:
            requests.record_upload_result(conn, upload.upload_pk, report)
        self.leases.release(conn, leases.UPLOAD, upload.upload_pk)

    def abort_upload(self, upload: UploadHandle) -> int:
        """Removes what a failed or cancelled upload stored; returns how many inputs."""
        with self.engine.begin() as conn:
            self.leases.release(conn, leases.UPLOAD, upload.upload_pk)
            return _abort_upload(conn, upload.upload_pk, upload.dataset_pk, counted=False)

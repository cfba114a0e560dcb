"""The dataset service's metadata store: apps, datasets, inputs, uploads, versions, references.

SQLAlchemy Core on the service's own database (SQLite by default). Every call is blocking;
the servicer runs them off the event loop. Inputs are written in batches with one
`executemany` per batch and no per-row objects, because an upload writes millions of them.

Duplicates are found by `content_hash`, a 64-bit BLAKE2b of (kind, prompt, completion),
indexed per dataset. At 64 bits a false match needs billions of examples in one dataset.

Snapshot objects are content-addressed and may be shared by versions with the same content;
an object is deleted only when the last version row naming it is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from loraforge.services.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from loraforge.services.common.metadata import open_database
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.common.resources import decode_page_token, encode_page_token, new_id
from loraforge.services.dataset.domain import (
    AppRecord,
    DatasetRecord,
    ExampleKind,
    InputRecord,
    LengthStats,
    Markup,
    NewExample,
    SourceFormat,
    UploadReport,
    VersionRecord,
    VersionState,
    VersionStats,
)
from loraforge.services.dataset.parsing import ParsedRow

log = logging.getLogger("loraforge.dataset.store")

METADATA = MetaData()

apps = Table(
    "apps",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("app_id", String(63), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    sqlite_autoincrement=True,
)

datasets = Table(
    "datasets",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("app_pk", Integer, ForeignKey("apps.pk"), nullable=False),
    Column("dataset_id", String(63), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    # Maintained with every insert and delete, so listing datasets never counts rows.
    Column("input_count", BigInteger, nullable=False, default=0),
    UniqueConstraint("app_pk", "dataset_id"),
    sqlite_autoincrement=True,
)

UPLOAD_RUNNING = "RUNNING"
UPLOAD_DONE = "DONE"
UPLOAD_FAILED = "FAILED"

uploads = Table(
    "uploads",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("upload_id", String(32), nullable=False, unique=True),
    Column("dataset_pk", Integer, ForeignKey("datasets.pk"), nullable=False, index=True),
    Column("file_name", Text, nullable=False, default=""),
    Column("state", String(16), nullable=False),
    Column("start_time", Float, nullable=False),
    Column("end_time", Float),
    Column("report", Text),
    sqlite_autoincrement=True,
)

inputs = Table(
    "inputs",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    # No foreign keys on this table: checking them costs every insert of every upload, and
    # inputs are only ever written for a dataset just looked up and deleted before it.
    Column("dataset_pk", Integer, nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("completion", Text, nullable=False),
    Column("raw", Text, nullable=False),
    Column("source_format", SmallInteger, nullable=False),
    Column("markup", SmallInteger, nullable=False),
    Column("source_line", Integer, nullable=False),
    Column("upload_pk", Integer),
    Column("concepts", Text),  # JSON list, NULL when none
    Column("metadata", Text),  # JSON object, NULL when none
    Column("content_hash", BigInteger, nullable=False),
    Column("create_time", Float, nullable=False),
    Index("ix_inputs_dataset_order", "dataset_pk", "pk"),
    Index("ix_inputs_dataset_hash", "dataset_pk", "content_hash"),
    sqlite_autoincrement=True,
)

versions = Table(
    "versions",
    METADATA,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("dataset_pk", Integer, ForeignKey("datasets.pk"), nullable=False),
    Column("version_id", String(63), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("state", SmallInteger, nullable=False),
    Column("failure_reason", Text, nullable=False, default=""),
    Column("stats", Text),  # JSON of VersionStats, set when READY
    Column("content_sha256", String(64), nullable=False, default="", index=True),
    Column("snapshot_key", Text, nullable=False, default=""),
    Column("create_time", Float, nullable=False),
    UniqueConstraint("dataset_pk", "version_id"),
    sqlite_autoincrement=True,
)

version_refs = Table(
    "version_refs",
    METADATA,
    Column("version_pk", Integer, ForeignKey("versions.pk"), primary_key=True),
    Column("referrer", String(512), primary_key=True),
)

_INPUT_COLUMNS = (
    "dataset_pk",
    "kind",
    "prompt",
    "completion",
    "raw",
    "source_format",
    "markup",
    "source_line",
    "upload_pk",
    "concepts",
    "metadata",
    "content_hash",
    "create_time",
)
_HASH_LOOKUP_CHUNK = 900  # under every database's bound-parameter limit
WRITER_CACHE_KIB = 32 * 1024
DEFAULT_CACHE_KIB = 2000  # SQLite's default page cache


def content_hash(kind: int, prompt: str, completion: str) -> int:
    """A signed 64-bit hash of what makes two examples the same."""
    key = f"{kind}:{len(prompt)}:{prompt}{completion}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big", signed=True)


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else None


class _DriverStatement:
    """A statement compiled once, run through the driver with tuples of values.

    The upload path runs these millions of times; going around SQLAlchemy's per-call
    compilation and parameter processing halves its cost. Values are given in `keys`
    order and converted to the dialect's parameter style.
    """

    def __init__(self, compiled: Any, keys: Sequence[str]) -> None:
        self.sql = str(compiled)
        keys = list(keys)
        if compiled.positional:
            order = [keys.index(name) for name in compiled.positiontup or ()]
            self._identity = order == list(range(len(keys)))
            self._convert: Callable[[tuple[Any, ...]], Any] = lambda values: tuple(
                values[i] for i in order
            )
        else:
            self._identity = False
            self._convert = lambda values: dict(zip(keys, values, strict=True))

    def params(self, values: tuple[Any, ...]) -> Any:
        return values if self._identity else self._convert(values)

    def many(self, rows: list[tuple[Any, ...]]) -> Any:
        return rows if self._identity else [self._convert(r) for r in rows]


@dataclass(frozen=True)
class UploadHandle:
    """An upload in progress: its row, public id and target dataset."""

    upload_pk: int
    upload_id: str
    dataset_pk: int


@dataclass(frozen=True)
class Page:
    """Keyset pagination: the page's size, and the key after which it starts."""

    size: int
    after: int


class DatasetStore:
    """Blocking operations on the dataset service's metadata and snapshot objects."""

    def __init__(self, database_url: str, objects: ObjectStore, object_prefix: str) -> None:
        """`objects` is the service's part of the shared store, found there under `object_prefix`."""
        self.engine, self._sessions = open_database(database_url, METADATA)
        self.objects = objects
        self.object_prefix = object_prefix.strip("/")
        self._snapshot_lock = threading.Lock()
        dialect = self.engine.dialect
        self.insert_rows = _DriverStatement(
            insert(inputs).compile(dialect=dialect, column_keys=list(_INPUT_COLUMNS)),
            _INPUT_COLUMNS,
        )
        lookup_keys = ("dataset_pk", *(f"h{i}" for i in range(_HASH_LOOKUP_CHUNK)))
        self.lookup_hashes = _DriverStatement(
            select(inputs.c.content_hash)
            .where(
                inputs.c.dataset_pk == bindparam("dataset_pk"),
                inputs.c.content_hash.in_([bindparam(k) for k in lookup_keys[1:]]),
            )
            .compile(dialect=dialect),
            lookup_keys,
        )

    def close(self) -> None:
        self.engine.dispose()

    # Pagination

    @staticmethod
    def page(page_size: int, page_token: str, parent: str) -> Page:
        state = decode_page_token(page_token)
        if not state:
            return Page(page_size, 0)
        after = state.get("after")
        if not isinstance(after, int) or isinstance(after, bool) or state.get("parent") != parent:
            raise InvalidArgument(
                "page_token: not a token for this list; pass `next_page_token` from the previous "
                "page of the same request",
                reason="INVALID_PAGE_TOKEN",
            )
        return Page(page_size, after)

    @staticmethod
    def _next_token(rows: Sequence[Row[Any]], page: Page, parent: str) -> str:
        if len(rows) <= page.size:
            return ""
        return encode_page_token({"after": rows[page.size - 1].pk, "parent": parent})

    # Apps

    def create_app(self, app_id: str, description: str) -> AppRecord:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(apps).values(app_id=app_id, description=description, create_time=now)
                )
        except IntegrityError:
            raise AlreadyExists(
                f"app `apps/{app_id}` already exists; choose another id", reason="APP_EXISTS"
            ) from None
        return AppRecord(app_id, description, now)

    def _app_row(self, conn: Connection, app_id: str) -> Row[Any]:
        row = conn.execute(select(apps).where(apps.c.app_id == app_id)).first()
        if row is None:
            raise NotFound(f"app `apps/{app_id}` does not exist", reason="APP_NOT_FOUND")
        return row

    def get_app(self, app_id: str) -> AppRecord:
        with self.engine.connect() as conn:
            row = self._app_row(conn, app_id)
        return AppRecord(row.app_id, row.description, row.create_time)

    def list_apps(self, page: Page) -> tuple[list[AppRecord], str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(apps).where(apps.c.pk > page.after).order_by(apps.c.pk).limit(page.size + 1)
            ).all()
        records = [AppRecord(r.app_id, r.description, r.create_time) for r in rows[: page.size]]
        return records, self._next_token(rows, page, "")

    def delete_app(self, app_id: str, force: bool) -> None:
        released: list[str] = []
        with self.engine.begin() as conn:
            app = self._app_row(conn, app_id)
            dataset_rows = conn.execute(
                select(datasets.c.pk, datasets.c.dataset_id).where(datasets.c.app_pk == app.pk)
            ).all()
            if dataset_rows and not force:
                names = ", ".join(f"`{r.dataset_id}`" for r in dataset_rows[:5])
                raise FailedPrecondition(
                    f"app `apps/{app_id}` still has {len(dataset_rows)} dataset(s) ({names}); delete "
                    "them first, or set `force` to delete the app with all its data",
                    reason="APP_NOT_EMPTY",
                )
            for ds in dataset_rows:
                released += self._delete_dataset_rows(conn, ds.pk)
            conn.execute(delete(apps).where(apps.c.pk == app.pk))
        self._release_snapshots(released)

    # Datasets

    def _dataset_row(self, conn: Connection, app_id: str, dataset_id: str) -> Row[Any]:
        row = conn.execute(
            select(datasets, apps.c.app_id)
            .join(apps, apps.c.pk == datasets.c.app_pk)
            .where(apps.c.app_id == app_id, datasets.c.dataset_id == dataset_id)
        ).first()
        if row is None:
            self._app_row(conn, app_id)  # NOT_FOUND for the app when that is what is missing
            raise NotFound(
                f"dataset `apps/{app_id}/datasets/{dataset_id}` does not exist",
                reason="DATASET_NOT_FOUND",
            )
        return row

    def _dataset_record(self, conn: Connection, row: Row[Any]) -> DatasetRecord:
        version_count = conn.execute(
            select(func.count()).select_from(versions).where(versions.c.dataset_pk == row.pk)
        ).scalar_one()
        return DatasetRecord(
            row.app_id,
            row.dataset_id,
            row.description,
            row.create_time,
            row.input_count,
            version_count,
        )

    def create_dataset(self, app_id: str, dataset_id: str, description: str) -> DatasetRecord:
        now = time.time()
        try:
            with self.engine.begin() as conn:
                app = self._app_row(conn, app_id)
                conn.execute(
                    insert(datasets).values(
                        app_pk=app.pk,
                        dataset_id=dataset_id,
                        description=description,
                        create_time=now,
                        input_count=0,
                    )
                )
        except IntegrityError:
            raise AlreadyExists(
                f"dataset `apps/{app_id}/datasets/{dataset_id}` already exists; choose another id",
                reason="DATASET_EXISTS",
            ) from None
        return DatasetRecord(app_id, dataset_id, description, now, 0, 0)

    def get_dataset(self, app_id: str, dataset_id: str) -> DatasetRecord:
        with self.engine.connect() as conn:
            return self._dataset_record(conn, self._dataset_row(conn, app_id, dataset_id))

    def list_datasets(self, app_id: str, page: Page) -> tuple[list[DatasetRecord], str]:
        with self.engine.connect() as conn:
            app = self._app_row(conn, app_id)
            rows = conn.execute(
                select(datasets, apps.c.app_id)
                .join(apps, apps.c.pk == datasets.c.app_pk)
                .where(datasets.c.app_pk == app.pk, datasets.c.pk > page.after)
                .order_by(datasets.c.pk)
                .limit(page.size + 1)
            ).all()
            records = [self._dataset_record(conn, r) for r in rows[: page.size]]
        return records, self._next_token(rows, page, f"apps/{app_id}")

    def delete_dataset(self, app_id: str, dataset_id: str, force: bool) -> None:
        with self.engine.begin() as conn:
            ds = self._dataset_row(conn, app_id, dataset_id)
            if not force:
                refs = conn.execute(
                    select(versions.c.version_id, version_refs.c.referrer)
                    .join(version_refs, version_refs.c.version_pk == versions.c.pk)
                    .where(versions.c.dataset_pk == ds.pk)
                    .limit(5)
                ).all()
                if refs:
                    used = ", ".join(f"version `{r.version_id}` by `{r.referrer}`" for r in refs)
                    raise FailedPrecondition(
                        f"dataset `apps/{app_id}/datasets/{dataset_id}` has versions in use ({used}); "
                        "delete what uses them first, or set `force`",
                        reason="DATASET_VERSION_REFERENCED",
                    )
            released = self._delete_dataset_rows(conn, ds.pk)
        self._release_snapshots(released)

    def _delete_dataset_rows(self, conn: Connection, dataset_pk: int) -> list[str]:
        """Deletes a dataset and all it holds; returns snapshot keys no version names any more."""
        version_rows = conn.execute(
            select(versions.c.pk, versions.c.content_sha256, versions.c.snapshot_key).where(
                versions.c.dataset_pk == dataset_pk
            )
        ).all()
        pks = [v.pk for v in version_rows]
        if pks:
            conn.execute(delete(version_refs).where(version_refs.c.version_pk.in_(pks)))
            conn.execute(delete(versions).where(versions.c.pk.in_(pks)))
        conn.execute(delete(inputs).where(inputs.c.dataset_pk == dataset_pk))
        conn.execute(delete(uploads).where(uploads.c.dataset_pk == dataset_pk))
        conn.execute(delete(datasets).where(datasets.c.pk == dataset_pk))
        return self._unshared_snapshots(conn, version_rows)

    # Inputs

    def _input_rows(self, conn: Connection, stmt: Any) -> Sequence[Row[Any]]:
        return conn.execute(
            stmt.add_columns(uploads.c.upload_id).outerjoin(
                uploads, uploads.c.pk == inputs.c.upload_pk
            )
        ).all()

    @staticmethod
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

    def add_inputs(
        self, app_id: str, dataset_id: str, examples: Sequence[NewExample]
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
                "concepts": _json_or_none(list(e.concepts)),
                "metadata": _json_or_none(e.metadata),
                "content_hash": content_hash(e.kind, e.prompt, e.completion),
                "create_time": now,
            }
            for e in examples
        ]
        with self.engine.begin() as conn:
            ds = self._dataset_row(conn, app_id, dataset_id)
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
            ds = self._dataset_row(conn, app_id, dataset_id)
            rows = self._input_rows(
                conn,
                select(inputs)
                .where(inputs.c.dataset_pk == ds.pk, inputs.c.pk > page.after)
                .order_by(inputs.c.pk)
                .limit(page.size + 1),
            )
        records = [self._input_record(r) for r in rows[: page.size]]
        token = self._next_token(rows, page, f"apps/{app_id}/datasets/{dataset_id}")
        return records, token, ds.input_count

    def delete_inputs(self, app_id: str, dataset_id: str, input_ids: Sequence[int] | None) -> int:
        """Deletes the given inputs (ids that do not exist are ignored), or all when None."""
        with self.engine.begin() as conn:
            ds = self._dataset_row(conn, app_id, dataset_id)
            if input_ids is None:
                deleted = conn.execute(delete(inputs).where(inputs.c.dataset_pk == ds.pk)).rowcount
            else:
                deleted = 0
                unique = sorted(set(input_ids))
                for i in range(0, len(unique), _HASH_LOOKUP_CHUNK):
                    deleted += conn.execute(
                        delete(inputs).where(
                            inputs.c.dataset_pk == ds.pk,
                            inputs.c.pk.in_(unique[i : i + _HASH_LOOKUP_CHUNK]),
                        )
                    ).rowcount
            conn.execute(
                update(datasets)
                .where(datasets.c.pk == ds.pk)
                .values(input_count=datasets.c.input_count - deleted)
            )
        return deleted

    # Uploads

    def begin_upload(self, app_id: str, dataset_id: str, file_name: str) -> UploadHandle:
        upload_id = new_id("u")
        with self.engine.begin() as conn:
            ds = self._dataset_row(conn, app_id, dataset_id)
            result = conn.execute(
                insert(uploads).values(
                    upload_id=upload_id,
                    dataset_pk=ds.pk,
                    file_name=file_name,
                    state=UPLOAD_RUNNING,
                    start_time=time.time(),
                )
            )
            (upload_pk,) = result.inserted_primary_key or (None,)
        assert upload_pk is not None
        return UploadHandle(int(upload_pk), upload_id, ds.pk)

    def input_writer(
        self, upload: UploadHandle, source_format: SourceFormat, skip_duplicates: bool
    ) -> InputWriter:
        """A writer for one upload's rows; the caller must `close()` it."""
        return InputWriter(self, upload, source_format, skip_duplicates)

    def finish_upload(self, upload: UploadHandle, report: UploadReport) -> None:
        summary = {
            "detected_format": report.detected_format.name if report.detected_format else "",
            "rows_read": report.rows_read,
            "rows_accepted": report.rows_accepted,
            "rows_rejected": report.rows_rejected,
            "duplicate_rows": report.duplicate_rows,
            "bytes_read": report.bytes_read,
        }
        with self.engine.begin() as conn:
            conn.execute(
                update(uploads)
                .where(uploads.c.pk == upload.upload_pk)
                .values(state=UPLOAD_DONE, end_time=time.time(), report=json.dumps(summary))
            )

    def abort_upload(self, upload: UploadHandle) -> int:
        """Removes what a failed or cancelled upload stored; returns how many inputs."""
        with self.engine.begin() as conn:
            return self._abort_upload(conn, upload.upload_pk, upload.dataset_pk)

    def _abort_upload(self, conn: Connection, upload_pk: int, dataset_pk: int) -> int:
        deleted = conn.execute(
            delete(inputs).where(inputs.c.dataset_pk == dataset_pk, inputs.c.upload_pk == upload_pk)
        ).rowcount
        conn.execute(
            update(datasets)
            .where(datasets.c.pk == dataset_pk)
            .values(input_count=datasets.c.input_count - deleted)
        )
        conn.execute(
            update(uploads)
            .where(uploads.c.pk == upload_pk)
            .values(state=UPLOAD_FAILED, end_time=time.time())
        )
        return deleted

    def recover(self) -> None:
        """After a restart: undo uploads and fail versions that were cut off mid-way.

        Assumes one dataset service per database (the embedded default).
        """
        with self.engine.begin() as conn:
            for row in conn.execute(
                select(uploads.c.pk, uploads.c.dataset_pk, uploads.c.upload_id).where(
                    uploads.c.state == UPLOAD_RUNNING
                )
            ).all():
                removed = self._abort_upload(conn, row.pk, row.dataset_pk)
                log.warning(
                    "upload %s was cut off by a restart; removed its %d inputs",
                    row.upload_id,
                    removed,
                )
            cut = conn.execute(
                update(versions)
                .where(versions.c.state.in_([VersionState.PENDING, VersionState.IN_PROGRESS]))
                .values(
                    state=VersionState.FAILED,
                    failure_reason="the service stopped while this version was being written; "
                    "create a new version",
                )
            ).rowcount
            if cut:
                log.warning(
                    "%d dataset version(s) were cut off by a restart and marked failed", cut
                )

    # Versions

    def create_version_row(
        self, app_id: str, dataset_id: str, version_id: str, description: str
    ) -> tuple[int, int]:
        """Inserts a PENDING version; returns (version_pk, dataset_pk)."""
        try:
            with self.engine.begin() as conn:
                ds = self._dataset_row(conn, app_id, dataset_id)
                if ds.input_count <= 0:
                    raise FailedPrecondition(
                        f"dataset `apps/{app_id}/datasets/{dataset_id}` has no inputs; upload "
                        "examples before creating a version",
                        reason="DATASET_EMPTY",
                    )
                result = conn.execute(
                    insert(versions).values(
                        dataset_pk=ds.pk,
                        version_id=version_id,
                        description=description,
                        state=VersionState.PENDING,
                        failure_reason="",
                        content_sha256="",
                        snapshot_key="",
                        create_time=time.time(),
                    )
                )
                (version_pk,) = result.inserted_primary_key or (None,)
        except IntegrityError:
            raise AlreadyExists(
                f"version `apps/{app_id}/datasets/{dataset_id}/versions/{version_id}` already "
                "exists; choose another id",
                reason="DATASET_VERSION_EXISTS",
            ) from None
        assert version_pk is not None
        return int(version_pk), ds.pk

    def set_version_state(
        self,
        version_pk: int,
        state: VersionState,
        *,
        failure_reason: str = "",
        stats: VersionStats | None = None,
        content_sha256: str = "",
        snapshot_key: str = "",
    ) -> None:
        values: dict[str, Any] = {"state": state, "failure_reason": failure_reason}
        if stats is not None:
            values.update(
                stats=json.dumps(_stats_to_json(stats)),
                content_sha256=content_sha256,
                snapshot_key=snapshot_key,
            )
        with self.engine.begin() as conn:
            conn.execute(update(versions).where(versions.c.pk == version_pk).values(**values))

    def frozen_inputs(self, dataset_pk: int, batch_rows: int = 5000) -> Iterator[list[Row[Any]]]:
        """The dataset's inputs in order, read in one consistent snapshot, in batches.

        Inputs of uploads still running are left out, so a version never holds half a file.
        """
        with self.engine.connect() as conn, conn.begin():
            running = list(
                conn.execute(
                    select(uploads.c.pk).where(
                        uploads.c.dataset_pk == dataset_pk, uploads.c.state == UPLOAD_RUNNING
                    )
                ).scalars()
            )
            stmt = select(inputs).where(inputs.c.dataset_pk == dataset_pk).order_by(inputs.c.pk)
            if running:
                stmt = stmt.where(
                    (inputs.c.upload_pk.is_(None)) | (inputs.c.upload_pk.not_in(running))
                )
            result = conn.execution_options(yield_per=batch_rows).execute(
                stmt.add_columns(uploads.c.upload_id).outerjoin(
                    uploads, uploads.c.pk == inputs.c.upload_pk
                )
            )
            for part in result.partitions():
                yield list(part)

    def _version_row(
        self, conn: Connection, app_id: str, dataset_id: str, version_id: str
    ) -> Row[Any]:
        ds = self._dataset_row(conn, app_id, dataset_id)
        row = conn.execute(
            select(versions).where(
                versions.c.dataset_pk == ds.pk, versions.c.version_id == version_id
            )
        ).first()
        if row is None:
            raise NotFound(
                f"version `apps/{app_id}/datasets/{dataset_id}/versions/{version_id}` does not exist",
                reason="DATASET_VERSION_NOT_FOUND",
            )
        return row

    def _version_record(
        self, conn: Connection, app_id: str, dataset_id: str, row: Row[Any]
    ) -> VersionRecord:
        refs = conn.execute(
            select(version_refs.c.referrer)
            .where(version_refs.c.version_pk == row.pk)
            .order_by(version_refs.c.referrer)
        ).scalars()
        return VersionRecord(
            app_id=app_id,
            dataset_id=dataset_id,
            version_id=row.version_id,
            description=row.description,
            state=VersionState(row.state),
            failure_reason=row.failure_reason,
            stats=_stats_from_json(json.loads(row.stats)) if row.stats else None,
            content_sha256=row.content_sha256,
            # Stored relative to this service's part of the object store; shown in full.
            snapshot_key=f"{self.object_prefix}/{row.snapshot_key}" if row.snapshot_key else "",
            referenced_by=tuple(refs),
            create_time=row.create_time,
        )

    def get_version(self, app_id: str, dataset_id: str, version_id: str) -> VersionRecord:
        with self.engine.connect() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            return self._version_record(conn, app_id, dataset_id, row)

    def list_versions(
        self, app_id: str, dataset_id: str, page: Page
    ) -> tuple[list[VersionRecord], str]:
        with self.engine.connect() as conn:
            ds = self._dataset_row(conn, app_id, dataset_id)
            rows = conn.execute(
                select(versions)
                .where(versions.c.dataset_pk == ds.pk, versions.c.pk > page.after)
                .order_by(versions.c.pk)
                .limit(page.size + 1)
            ).all()
            records = [self._version_record(conn, app_id, dataset_id, r) for r in rows[: page.size]]
        return records, self._next_token(rows, page, f"apps/{app_id}/datasets/{dataset_id}")

    def delete_version(self, app_id: str, dataset_id: str, version_id: str) -> None:
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            if row.state in (VersionState.PENDING, VersionState.IN_PROGRESS):
                raise FailedPrecondition(
                    "the version is still being written; delete it once it is ready or failed",
                    reason="DATASET_VERSION_BUSY",
                )
            refs = list(
                conn.execute(
                    select(version_refs.c.referrer).where(version_refs.c.version_pk == row.pk)
                ).scalars()
            )
            if refs:
                raise FailedPrecondition(
                    f"version `{version_id}` is used by {', '.join(f'`{r}`' for r in refs[:5])}; "
                    "delete those first (they remove their references), then this version",
                    reason="DATASET_VERSION_REFERENCED",
                    metadata={"referenced_by": ",".join(refs[:20])},
                )
            conn.execute(delete(versions).where(versions.c.pk == row.pk))
            released = self._unshared_snapshots(conn, [row])
        self._release_snapshots(released)

    def add_reference(
        self, app_id: str, dataset_id: str, version_id: str, referrer: str
    ) -> VersionRecord:
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            if row.state != VersionState.READY:
                raise FailedPrecondition(
                    f"version `{version_id}` is {VersionState(row.state).name.lower()}, not ready; only "
                    "a ready version can be used",
                    reason="DATASET_VERSION_NOT_READY",
                )
            exists = conn.execute(
                select(version_refs.c.referrer).where(
                    version_refs.c.version_pk == row.pk, version_refs.c.referrer == referrer
                )
            ).first()
            if exists is None:
                conn.execute(insert(version_refs).values(version_pk=row.pk, referrer=referrer))
            return self._version_record(conn, app_id, dataset_id, row)

    def remove_reference(
        self, app_id: str, dataset_id: str, version_id: str, referrer: str
    ) -> None:
        with self.engine.begin() as conn:
            row = self._version_row(conn, app_id, dataset_id, version_id)
            conn.execute(
                delete(version_refs).where(
                    version_refs.c.version_pk == row.pk, version_refs.c.referrer == referrer
                )
            )

    # Snapshot objects

    def snapshot_lock(self) -> threading.Lock:
        """Held while publishing or releasing a snapshot object, so the two never interleave."""
        return self._snapshot_lock

    @staticmethod
    def _unshared_snapshots(conn: Connection, removed: Iterable[Any]) -> list[str]:
        keys = []
        for row in removed:
            if not row.content_sha256:
                continue
            others = conn.execute(
                select(func.count())
                .select_from(versions)
                .where(versions.c.content_sha256 == row.content_sha256)
            ).scalar_one()
            if others == 0:
                keys.append(row.snapshot_key)
        return keys

    def _release_snapshots(self, keys: Iterable[str]) -> None:
        with self._snapshot_lock:
            for key in keys:
                try:
                    self.objects.delete(key)
                except Exception:  # a leftover object is harmless; a failed delete must not be
                    log.exception("could not delete snapshot object %s", key)


@dataclass
class WriteResult:
    """What one `InputWriter.write` did."""

    stored: int = 0
    duplicates: int = 0
    by_markup: dict[Markup, int] = field(default_factory=dict)


class InputWriter:
    """Stores one upload's rows through one connection, in long transactions.

    A transaction ends every `commit_rows` rows or `commit_seconds`, whichever comes first.
    Long transactions matter for speed: a commit writes every index page it touched, and
    the duplicate index is touched at random, so committing every few thousand rows would
    rewrite most of that index each time. The time bound keeps other writers' waits short.
    """

    def __init__(
        self,
        store: DatasetStore,
        upload: UploadHandle,
        source_format: SourceFormat,
        skip_duplicates: bool,
        *,
        commit_rows: int = 100_000,
        commit_seconds: float = 3.0,
    ) -> None:
        self.upload = upload
        self.source_format = int(source_format)
        self.skip_duplicates = skip_duplicates
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self._store = store
        self._conn = store.engine.connect()
        self._sqlite = store.engine.dialect.name == "sqlite"
        if self._sqlite:
            # Room for the duplicate index of a large dataset, so inserts do not re-read it.
            self._conn.exec_driver_sql(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
            self._conn.commit()
        self._transaction = self._conn.begin()
        self._uncommitted = 0
        self._since = time.monotonic()

    def write(self, rows: Sequence[ParsedRow]) -> WriteResult:
        """Stores a batch of rows (not yet committed).

        A row is a duplicate when its example is already in the dataset, including earlier
        rows of this upload. With `skip_duplicates` duplicates are counted, not stored.
        """
        result = WriteResult()
        if not rows:
            return result
        dataset_pk, upload_pk = self.upload.dataset_pk, self.upload.upload_pk
        now = time.time()
        fmt = self.source_format
        skip = self.skip_duplicates
        hashes = [content_hash(r.kind, r.prompt, r.completion) for r in rows]
        known = self._known_hashes(hashes)
        params: list[tuple[Any, ...]] = []
        append = params.append
        by_markup = result.by_markup
        duplicates = 0
        # The hot loop of every upload: plain tuples, no per-row calls in the common case.
        for row, digest in zip(rows, hashes, strict=True):
            if digest in known:
                duplicates += 1
                if skip:
                    continue
            else:
                known.add(digest)
            line, kind, prompt, completion, raw, markup, concepts, metadata = row
            by_markup[markup] = by_markup.get(markup, 0) + 1
            append(
                (
                    dataset_pk,
                    kind,
                    prompt,
                    completion,
                    raw,
                    fmt,
                    markup,
                    line,
                    upload_pk,
                    _json_or_none(concepts) if concepts else None,
                    _json_or_none(metadata) if metadata else None,
                    digest,
                    now,
                )
            )
        if params:
            statement = self._store.insert_rows
            self._conn.exec_driver_sql(statement.sql, statement.many(params))
            self._uncommitted += len(params)
        result.stored = len(params)
        result.duplicates = duplicates
        if (
            self._uncommitted >= self.commit_rows
            or time.monotonic() - self._since >= self.commit_seconds
        ):
            self.commit()
        return result

    def _known_hashes(self, hashes: list[int]) -> set[int]:
        """Which of `hashes` the dataset already holds (committed or in this transaction)."""
        known: set[int] = set()
        distinct = list(set(hashes))
        statement = self._store.lookup_hashes
        for i in range(0, len(distinct), _HASH_LOOKUP_CHUNK):
            part = distinct[i : i + _HASH_LOOKUP_CHUNK]
            part += [part[0]] * (_HASH_LOOKUP_CHUNK - len(part))  # repeats change nothing
            result = self._conn.exec_driver_sql(
                statement.sql, statement.params((self.upload.dataset_pk, *part))
            )
            known.update(row[0] for row in result)
        return known

    def commit(self) -> None:
        counted = self._conn.execute(
            update(datasets)
            .where(datasets.c.pk == self.upload.dataset_pk)
            .values(input_count=datasets.c.input_count + self._uncommitted)
        ).rowcount
        if counted == 0:
            raise Aborted(
                "the dataset was deleted while this upload was running; nothing was stored",
                reason="DATASET_DELETED",
            )
        self._transaction.commit()
        self._uncommitted = 0
        self._since = time.monotonic()
        self._transaction = self._conn.begin()

    def close(self, *, commit: bool) -> None:
        """Commits (or rolls back) what is pending and gives the connection back."""
        try:
            if commit:
                self.commit()
            self._transaction.rollback()
            if self._sqlite:
                self._conn.exec_driver_sql(f"PRAGMA cache_size=-{DEFAULT_CACHE_KIB}")
        finally:
            self._conn.close()


def _stats_to_json(stats: VersionStats) -> dict[str, Any]:
    def lengths(s: LengthStats) -> list[int]:
        return [s.min, s.median, s.p95, s.max]

    return {
        "example_count": stats.example_count,
        "prompt_chars": lengths(stats.prompt_chars),
        "completion_chars": lengths(stats.completion_chars),
        "examples_by_format": stats.examples_by_format,
        "examples_by_kind": stats.examples_by_kind,
        "snapshot_bytes": stats.snapshot_bytes,
    }


def _stats_from_json(data: dict[str, Any]) -> VersionStats:
    return VersionStats(
        example_count=data["example_count"],
        prompt_chars=LengthStats(*data["prompt_chars"]),
        completion_chars=LengthStats(*data["completion_chars"]),
        examples_by_format=data["examples_by_format"],
        examples_by_kind=data["examples_by_kind"],
        snapshot_bytes=data["snapshot_bytes"],
    )

"""The upload fast path: one upload's rows into the `inputs` table, through the driver.

An upload writes millions of rows, so this path has no per-row objects and no per-call
SQL compilation: two statements are compiled once per database (`BulkStatements`) and
run through the driver with plain tuples, one `executemany` per batch.

Every commit is fenced: it renews the upload's lease in the same transaction and fails
if the lease is gone (another replica undid the upload after this one stopped renewing)
or the dataset was deleted meanwhile, so nothing is ever committed for an upload that
was undone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Dialect, Engine, bindparam, insert, select, update

from loraforge.services.common.errors import Aborted
from loraforge.services.dataset import leases
from loraforge.services.dataset.domain import Markup, SourceFormat
from loraforge.services.dataset.leases import Leases
from loraforge.services.dataset.parsing import ParsedRow
from loraforge.services.dataset.tables import (
    IN_LIST_CHUNK,
    content_hash,
    datasets,
    inputs,
    json_column,
)

if TYPE_CHECKING:
    from loraforge.services.dataset.inputs import UploadHandle

INPUT_COLUMNS = (
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
WRITER_CACHE_KIB = 32 * 1024
ANALYZE_ROWS = 10_000  # PostgreSQL: fresh statistics after this many rows committed
DEFAULT_CACHE_KIB = 2000  # SQLite's default page cache


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


class BulkStatements:
    """The fast path's statements, compiled for one database dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.insert_rows = _DriverStatement(
            insert(inputs).compile(dialect=dialect, column_keys=list(INPUT_COLUMNS)),
            INPUT_COLUMNS,
        )
        lookup_keys = ("dataset_pk", *(f"h{i}" for i in range(IN_LIST_CHUNK)))
        self.lookup_hashes = _DriverStatement(
            select(inputs.c.content_hash)
            .where(
                inputs.c.dataset_pk == bindparam("dataset_pk"),
                inputs.c.content_hash.in_([bindparam(k) for k in lookup_keys[1:]]),
            )
            .compile(dialect=dialect),
            lookup_keys,
        )


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
    rewrite most of that index each time. The time bound keeps other writers' waits short,
    and holds while the client is slow too: the upload's writer thread commits what waits
    once it has been idle that long (`commit_pending`).
    """

    def __init__(
        self,
        engine: Engine,
        statements: BulkStatements,
        leases_: Leases,
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
        self._statements = statements
        self._leases = leases_
        self._conn = engine.connect()
        self._sqlite = engine.dialect.name == "sqlite"
        self._postgresql = engine.dialect.name == "postgresql"
        self._unanalyzed = 0
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
                    json_column(concepts) if concepts else None,
                    json_column(metadata) if metadata else None,
                    digest,
                    now,
                )
            )
        if params:
            statement = self._statements.insert_rows
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
        statement = self._statements.lookup_hashes
        for i in range(0, len(distinct), IN_LIST_CHUNK):
            part = distinct[i : i + IN_LIST_CHUNK]
            part += [part[0]] * (IN_LIST_CHUNK - len(part))  # repeats change nothing
            result = self._conn.exec_driver_sql(
                statement.sql, statement.params((self.upload.dataset_pk, *part))
            )
            known.update(row[0] for row in result)
        return known

    def _fence(self) -> None:
        """In the open transaction: Aborted unless the upload is still ours to write."""
        # A no-op update of the dataset row: it exists, and (PostgreSQL) stays until we commit.
        exists = self._conn.execute(
            update(datasets)
            .where(datasets.c.pk == self.upload.dataset_pk)
            .values(input_count=datasets.c.input_count)
        ).rowcount
        if exists == 0:
            raise Aborted(
                "the dataset was deleted while this upload was running; nothing was stored",
                reason="DATASET_DELETED",
            )
        if not self._leases.renew(self._conn, leases.UPLOAD, self.upload.upload_pk):
            raise Aborted(
                "this upload was stopped and undone while it ran (its server stopped renewing "
                "its lease in time); nothing was stored: send the file again",
                reason="UPLOAD_LEASE_LOST",
            )

    def commit_pending(self) -> None:
        """Commits the rows written since the last commit, if there are any."""
        if self._uncommitted:
            self.commit()

    def commit(self) -> None:
        self._fence()
        self._transaction.commit()
        self._unanalyzed += self._uncommitted
        if self._postgresql and self._unanalyzed >= ANALYZE_ROWS:
            self._unanalyzed = 0
            # The duplicate lookup is planned from the table's statistics; from before this
            # upload they make its dataset look small, and PostgreSQL then reads every row
            # of it for each lookup, slower with every batch. Fresh ones keep it on the index.
            self._conn.exec_driver_sql("ANALYZE inputs")
            self._conn.commit()
        self._uncommitted = 0
        self._since = time.monotonic()
        self._transaction = self._conn.begin()

    def close(self, *, commit: bool, finish: Callable[[Connection], None] | None = None) -> None:
        """Commits (or rolls back) what is pending and gives the connection back.

        `finish` runs in the last transaction, so the upload's end commits with its last rows.
        """
        try:
            if commit:
                self._fence()
                if finish is not None:
                    finish(self._conn)
                self._transaction.commit()
                self._transaction = self._conn.begin()
            self._transaction.rollback()
            if self._sqlite:
                self._conn.exec_driver_sql(f"PRAGMA cache_size=-{DEFAULT_CACHE_KIB}")

        finally:
            self._conn.close()

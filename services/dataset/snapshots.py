"""Snapshot objects: the frozen content of dataset versions, from writing to deletion.

A snapshot is gzip-compressed JSONL, one input per line in input order, stored under
`snapshots/<sha256[:2]>/<sha256>.jsonl.gz` in the dataset service's part of the object
store, where `sha256` is the hash of the uncompressed JSONL. Its key is its content, so
versions with the same content share one object.

- Writing (`freeze`): the lines go to a local temporary file while their hash and stats
  are counted. The version then claims the key in the database (`claim`) and only then
  is the file published (`publish`), always uploaded whole, even when an object with the
  key exists: that object may be damaged, or being deleted. A full or unwritable scratch
  folder, or an object store that cannot be reached or written, is Unavailable with what
  to do about it; the cause stays in the server log.
- Reading (`open_read`) first downloads the object to the scratch folder, checking its
  hash and example count, and streams rows only once they match what the version
  recorded. A missing or damaged object is DataLoss, naming the version and what to do.
- Collection: an object is deleted only when no version row names it. The transaction
  that deletes version rows finds the keys no row names any more (`unshared`); once it
  has committed, `release` checks again and deletes each object inside a transaction
  holding the snapshot lock, which `claim` takes too. So a version that claims a key
  either is seen by that check (and the object stays) or publishes after the deletion.
- Temporary files are locked (flock) while in use; at start and every recovery, those
  no process holds (left by a killed server) are removed, once a minute old (a file is
  locked just after it is made).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from minio.error import MinioException
from sqlalchemy import Connection, Engine, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from urllib3.exceptions import HTTPError

from loraforge.services.common.errors import DataLoss, FailedPrecondition, NotFound, Unavailable
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.dataset.domain import (
    ExampleKind,
    InputRecord,
    Markup,
    SourceFormat,
    VersionStats,
)
from loraforge.services.dataset.stats import StatsCounter
from loraforge.services.dataset.tables import store_locks, versions

log = logging.getLogger("loraforge.dataset.snapshots")

SNAPSHOT_PREFIX = "snapshots"
READ_CHUNK = 1024 * 1024
# A read batch also ends at this many characters, so one response stays well under the
# gRPC message limit whatever the batch size.
MAX_BATCH_CHARS = 8_000_000
# What the object store raises when it cannot be reached or written: the local folder's
# OSError, the S3 client's errors and its HTTP connection's.
OBJECT_STORE_ERRORS = (OSError, MinioException, HTTPError)
SNAPSHOT_LOCK = "snapshots"
_TEMP_PREFIXES = ("snapshot-", "read-")
LEFTOVER_AGE_SECONDS = 60.0
_AFTER_LOSS = (
    "; the dataset's inputs are intact: create a new version of the dataset and use it "
    "instead of this one"
)


@dataclass(frozen=True)
class FrozenSnapshot:
    """A snapshot written to the scratch folder, not yet published."""

    sha256: str
    key: str
    stats: VersionStats
    path: str


def snapshot_key(sha256: str) -> str:
    return f"{SNAPSHOT_PREFIX}/{sha256[:2]}/{sha256}.jsonl.gz"


def _line(row: Any) -> str:
    """One `inputs` row (joined with its upload id) as a snapshot line."""
    record = {
        "id": row.pk,
        "kind": ExampleKind(row.kind).name,
        "prompt": row.prompt,
        "completion": row.completion,
        "raw": row.raw,
        "source_format": SourceFormat(row.source_format).name,
        "markup": Markup(row.markup).name,
        "source_line": row.source_line,
        "upload_id": row.upload_id or "",
        "concepts": json.loads(row.concepts) if row.concepts else [],
        "metadata": json.loads(row.metadata) if row.metadata else {},
        "create_time": row.create_time,
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _input_from_line(line: bytes) -> InputRecord:
    data = json.loads(line)
    return InputRecord(
        input_id=data["id"],
        kind=ExampleKind[data["kind"]],
        prompt=data["prompt"],
        completion=data["completion"],
        raw=data["raw"],
        source_format=SourceFormat[data["source_format"]],
        markup=Markup[data["markup"]],
        source_line=data["source_line"],
        upload_id=data["upload_id"],
        concepts=tuple(data["concepts"]),
        metadata=data["metadata"],
        create_time=data["create_time"],
    )


def _locked_temp(scratch: Path, prefix: str) -> IO[bytes]:
    """A temporary file in `scratch`, deleted on close and locked while open."""
    tmp = tempfile.NamedTemporaryFile(dir=scratch, prefix=prefix, suffix=".jsonl.gz")
    fcntl.flock(tmp.fileno(), fcntl.LOCK_EX)
    return tmp


def lock_snapshots(conn: Connection) -> None:
    """Takes the snapshot lock for the rest of the transaction."""
    conn.execute(
        update(store_locks).where(store_locks.c.name == SNAPSHOT_LOCK).values(name=SNAPSHOT_LOCK)
    )


class Snapshots:
    """Writes, reads and deletes snapshot objects (blocking; run off the event loop)."""

    def __init__(
        self, objects: ObjectStore, object_prefix: str, scratch: Path, engine: Engine
    ) -> None:
        """`objects` is the service's part of the shared store, found there under `object_prefix`;
        `scratch` is a local folder for snapshots being written or checked."""
        self.objects = objects
        self.object_prefix = object_prefix.strip("/")
        self.scratch = scratch
        self.engine = engine
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            with engine.begin() as conn:
                if (
                    conn.execute(
                        select(store_locks).where(store_locks.c.name == SNAPSHOT_LOCK)
                    ).first()
                    is None
                ):
                    conn.execute(insert(store_locks).values(name=SNAPSHOT_LOCK))
        except IntegrityError:
            pass  # another replica made it first

    def public_key(self, key: str) -> str:
        """The key as others find it in the shared store; keys are stored relative to our part."""
        return f"{self.object_prefix}/{key}" if key else ""

    def stored_key(self, public_key: str) -> str:
        return public_key.removeprefix(self.object_prefix + "/")

    def remove_leftovers(self) -> int:
        """Removes temporary files no running process holds (a killed server's); returns how many."""
        removed = 0
        old = time.time() - LEFTOVER_AGE_SECONDS
        for path in self.scratch.iterdir():
            if not path.name.startswith(_TEMP_PREFIXES) or not path.is_file():
                continue
            try:
                if path.stat().st_mtime > old:
                    continue
                with open(path, "rb") as fh:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    path.unlink()
                    removed += 1
            except (BlockingIOError, FileNotFoundError):
                continue  # in use by a running server, or gone already
        if removed:
            log.warning("removed %d temporary snapshot file(s) a stopped server left", removed)
        return removed

    @contextlib.contextmanager
    def freeze(self, batches: Iterable[Sequence[Row[Any]]]) -> Iterator[FrozenSnapshot]:
        """Writes `inputs` rows to a temporary snapshot file, removed when the block ends."""
        digest = hashlib.sha256()
        counter = StatsCounter()
        try:
            tmp = _locked_temp(self.scratch, "snapshot-")
        except OSError as exc:
            raise self._scratch_unavailable(exc) from exc
        with tmp:
            try:
                # No name and mtime=0 keep the compressed bytes a function of the content.
                with gzip.GzipFile(
                    filename="", fileobj=tmp, mode="wb", compresslevel=6, mtime=0
                ) as gz:
                    for batch in batches:
                        lines = []
                        for row in batch:
                            lines.append(_line(row))
                            counter.add(row)
                        data = ("\n".join(lines) + "\n").encode("utf-8")
                        digest.update(data)
                        gz.write(data)
                tmp.flush()
                size = Path(tmp.name).stat().st_size
            except OSError as exc:
                raise self._scratch_unavailable(exc) from exc
            if counter.count == 0:
                raise FailedPrecondition(
                    "the dataset has no finished inputs to freeze (an upload may still be running)",
                    reason="DATASET_EMPTY",
                )
            sha256 = digest.hexdigest()
            yield FrozenSnapshot(sha256, snapshot_key(sha256), counter.stats(size), tmp.name)

    def _scratch_unavailable(self, exc: OSError) -> Unavailable:
        log.warning("could not write a snapshot under %s", self.scratch, exc_info=exc)
        return Unavailable(
            "the dataset service could not write the snapshot to its scratch folder "
            f"({exc.strerror or 'input/output error'}); free space there or fix its "
            "permissions, then create the version again",
            reason="SNAPSHOT_SCRATCH_UNAVAILABLE",
        )

    def publish(self, frozen: FrozenSnapshot) -> None:
        """Uploads a claimed snapshot under its key, replacing any object there."""
        try:
            self.objects.put_file(frozen.key, frozen.path)
        except OBJECT_STORE_ERRORS as exc:
            log.warning("could not publish snapshot %s", frozen.key, exc_info=exc)
            raise Unavailable(
                "the object store did not take the snapshot; check that it is reachable "
                "and has room, then create the version again",
                reason="OBJECT_STORE_UNAVAILABLE",
            ) from exc

    def open_read(
        self, version_name: str, key: str, sha256: str, expected: int, batch_size: int
    ) -> Iterator[list[InputRecord]]:
        """The snapshot's inputs `batch_size` at a time, once the whole object is checked.

        DataLoss if the object is missing or does not match what the version recorded;
        Unavailable if the object store cannot be read.
        """
        try:
            tmp = _locked_temp(self.scratch, "read-")
        except OSError as exc:
            raise self._scratch_unavailable(exc) from exc
        try:
            self._download_checked(tmp, version_name, key, sha256, expected)
        except BaseException:
            tmp.close()
            raise
        return self._batches(tmp, batch_size)

    def _download_checked(
        self, tmp: IO[bytes], version_name: str, key: str, sha256: str, expected: int
    ) -> None:
        digest = hashlib.sha256()
        inflate = zlib.decompressobj(wbits=31)  # gzip container
        lines = 0
        try:
            for chunk in self.objects.iter_chunks(key, READ_CHUNK):
                tmp.write(chunk)
                data = inflate.decompress(chunk)
                digest.update(data)
                lines += data.count(b"\n")
            rest = inflate.flush()
            digest.update(rest)
            lines += rest.count(b"\n")
            tmp.flush()
        except NotFound:
            raise DataLoss(
                f"the snapshot of dataset version `{version_name}` is missing from the object "
                f"store (key {self.public_key(key)})" + _AFTER_LOSS,
                reason="SNAPSHOT_MISSING",
                metadata={"snapshot_key": self.public_key(key)},
            ) from None
        except zlib.error as exc:
            raise self._damaged(version_name, key, f"it is not valid gzip: {exc}") from None
        except OBJECT_STORE_ERRORS as exc:
            log.warning("could not read snapshot %s", key, exc_info=exc)
            raise Unavailable(
                f"the object store did not return the snapshot of `{version_name}`; check that "
                "it is reachable, then read the version again",
                reason="OBJECT_STORE_UNAVAILABLE",
            ) from exc
        if not inflate.eof:
            raise self._damaged(version_name, key, "it is cut short")
        if digest.hexdigest() != sha256 or lines != expected:
            raise self._damaged(
                version_name,
                key,
                f"its content has sha256 {digest.hexdigest()} and {lines} examples; the version "
                f"recorded {sha256} and {expected}",
            )

    def _damaged(self, version_name: str, key: str, why: str) -> DataLoss:
        log.error("snapshot %s of %s is damaged: %s", key, version_name, why)
        return DataLoss(
            f"the snapshot of dataset version `{version_name}` is damaged in the object store "
            f"({why})" + _AFTER_LOSS,
            reason="SNAPSHOT_DAMAGED",
            metadata={"snapshot_key": self.public_key(key)},
        )

    @staticmethod
    def _batches(tmp: IO[bytes], batch_size: int) -> Iterator[list[InputRecord]]:
        with tmp:
            tmp.seek(0)
            with gzip.GzipFile(fileobj=tmp, mode="rb") as gz:
                batch: list[InputRecord] = []
                batch_chars = 0
                for line in gz:
                    record = _input_from_line(line)
                    batch.append(record)
                    batch_chars += len(record.prompt) + len(record.completion) + len(record.raw)
                    if len(batch) >= batch_size or batch_chars >= MAX_BATCH_CHARS:
                        yield batch
                        batch = []
                        batch_chars = 0
                if batch:
                    yield batch

    @staticmethod
    def unshared(conn: Connection, removed: Iterable[Any]) -> list[str]:
        """Keys of the removed version rows' snapshots that no version row names any more.

        Call it in the transaction that deleted the rows, after deleting them.
        """
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

    def release(self, keys: Iterable[str]) -> None:
        """Deletes the objects `unshared` found, once their rows' deletion has committed.

        Each object is deleted inside a transaction that holds the snapshot lock and has
        checked again that no version names it: one that claimed it since keeps it.
        """
        for key in keys:
            try:
                with self.engine.begin() as conn:
                    lock_snapshots(conn)
                    named = conn.execute(
                        select(func.count())
                        .select_from(versions)
                        .where(versions.c.snapshot_key == key)
                    ).scalar_one()
                    if named == 0:
                        self.objects.delete(key)
            except Exception:  # a leftover object is harmless; a failed delete must not be
                log.exception("could not delete snapshot object %s", key)

"""Snapshot objects: the frozen content of dataset versions, from writing to deletion.

A snapshot is gzip-compressed JSONL, one input per line in input order, stored under
`snapshots/<sha256[:2]>/<sha256>.jsonl.gz` in the dataset service's part of the object
store, where `sha256` is the hash of the uncompressed JSONL. Its key is its content, so a
published snapshot never changes and versions with the same content share one object.

- Writing: the lines go to a local temporary file while their hash and stats are counted,
  then the file is published under its final key (unless that object already exists).
  A full or unwritable scratch folder, or an object store that cannot be reached or
  written, is Unavailable with what to do about it; the cause stays in the server log.
- Reading streams the object back, checks the hash and the example count, and fails
  loudly if either differs from what the version recorded.
- Collection: an object is deleted only when the last version row naming it is gone. The
  transaction that deletes version rows finds the keys no row names any more
  (`unshared`); once it has committed, `release` deletes those objects. Publishing and
  releasing hold one lock, so a version never records an object being deleted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from minio.error import MinioException
from sqlalchemy import Connection, Row, func, select
from urllib3.exceptions import HTTPError

from loraforge.services.common.errors import FailedPrecondition, Unavailable
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.dataset.domain import (
    ExampleKind,
    InputRecord,
    Markup,
    SourceFormat,
    VersionStats,
)
from loraforge.services.dataset.stats import StatsCounter
from loraforge.services.dataset.tables import versions

log = logging.getLogger("loraforge.dataset.snapshots")

SNAPSHOT_PREFIX = "snapshots"
READ_CHUNK = 1024 * 1024
# A read batch also ends at this many characters, so one response stays well under the
# gRPC message limit whatever the batch size.
MAX_BATCH_CHARS = 8_000_000
# What the object store raises when it cannot be reached or written: the local folder's
# OSError, the S3 client's errors and its HTTP connection's.
OBJECT_STORE_ERRORS = (OSError, MinioException, HTTPError)


class SnapshotCorrupted(RuntimeError):
    """A stored snapshot does not match what its version recorded: a storage fault, not a user error."""


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


class Snapshots:
    """Writes, reads and deletes snapshot objects (blocking; run off the event loop)."""

    def __init__(self, objects: ObjectStore, object_prefix: str, scratch: Path) -> None:
        """`objects` is the service's part of the shared store, found there under `object_prefix`;
        `scratch` is a local folder for snapshots being written."""
        self.objects = objects
        self.object_prefix = object_prefix.strip("/")
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def public_key(self, key: str) -> str:
        """The key as others find it in the shared store; keys are stored relative to our part."""
        return f"{self.object_prefix}/{key}" if key else ""

    def stored_key(self, public_key: str) -> str:
        return public_key.removeprefix(self.object_prefix + "/")

    def write(self, batches: Iterable[Sequence[Row[Any]]]) -> tuple[str, str, VersionStats]:
        """Freezes `inputs` rows into a published snapshot; returns (sha256, key, stats)."""
        digest = hashlib.sha256()
        counter = StatsCounter()
        try:
            with tempfile.NamedTemporaryFile(
                dir=self.scratch, prefix="snapshot-", suffix=".jsonl.gz"
            ) as tmp:
                # mtime=0 keeps the compressed bytes a function of the content alone.
                with gzip.GzipFile(fileobj=tmp, mode="wb", compresslevel=6, mtime=0) as gz:
                    for batch in batches:
                        lines = []
                        for row in batch:
                            lines.append(_line(row))
                            counter.add(row)
                        data = ("\n".join(lines) + "\n").encode("utf-8")
                        digest.update(data)
                        gz.write(data)
                tmp.flush()
                if counter.count == 0:
                    raise FailedPrecondition(
                        "the dataset has no finished inputs to freeze (an upload may still be "
                        "running)",
                        reason="DATASET_EMPTY",
                    )
                sha256 = digest.hexdigest()
                key = snapshot_key(sha256)
                size = Path(tmp.name).stat().st_size
                self._publish(key, tmp.name)
        except OSError as exc:  # the object store's are turned into Unavailable by _publish
            log.warning("could not write a snapshot under %s", self.scratch, exc_info=exc)
            raise Unavailable(
                "the dataset service could not write the snapshot to its scratch folder "
                f"({exc.strerror or 'input/output error'}); free space there or fix its "
                "permissions, then create the version again",
                reason="SNAPSHOT_SCRATCH_UNAVAILABLE",
            ) from exc
        return sha256, key, counter.stats(size)

    def _publish(self, key: str, path: str) -> None:
        with self._lock:
            try:
                if not self.objects.exists(key):
                    self.objects.put_file(key, path)
            except OBJECT_STORE_ERRORS as exc:
                log.warning("could not publish snapshot %s", key, exc_info=exc)
                raise Unavailable(
                    "the object store did not take the snapshot; check that it is reachable "
                    "and has room, then create the version again",
                    reason="OBJECT_STORE_UNAVAILABLE",
                ) from exc

    def read(
        self, key: str, sha256: str, expected: int, batch_size: int
    ) -> Iterator[list[InputRecord]]:
        """Yields the snapshot's inputs `batch_size` at a time; SnapshotCorrupted at the end
        if its content is not what was recorded."""
        digest = hashlib.sha256()
        inflate = zlib.decompressobj(wbits=31)  # gzip container
        tail = b""
        batch: list[InputRecord] = []
        batch_chars = 0
        count = 0
        for chunk in self.objects.iter_chunks(key, READ_CHUNK):
            data = inflate.decompress(chunk)
            digest.update(data)
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:
                record = _input_from_line(line)
                batch.append(record)
                batch_chars += len(record.prompt) + len(record.completion) + len(record.raw)
                count += 1
                if len(batch) >= batch_size or batch_chars >= MAX_BATCH_CHARS:
                    yield batch
                    batch = []
                    batch_chars = 0
        rest = inflate.flush()
        digest.update(rest)
        tail += rest
        if tail.strip():
            batch.append(_input_from_line(tail))
            count += 1
        if batch:
            yield batch
        if digest.hexdigest() != sha256 or count != expected:
            raise SnapshotCorrupted(
                f"snapshot {key} does not match its version (sha256 {digest.hexdigest()}, "
                f"{count} examples; recorded {sha256}, {expected})"
            )

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
        """Deletes the objects `unshared` found, once their rows' deletion has committed."""
        with self._lock:
            for key in keys:
                try:
                    self.objects.delete(key)
                except Exception:  # a leftover object is harmless; a failed delete must not be
                    log.exception("could not delete snapshot object %s", key)

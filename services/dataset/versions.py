"""Dataset versions: frozen, content-addressed snapshots of a dataset's inputs.

A snapshot is gzip-compressed JSONL, one input per line in input order, stored under
`snapshots/<sha256[:2]>/<sha256>.jsonl.gz` in the dataset service's part of the object
store, where `sha256` is the hash of the uncompressed JSONL. Its key is its content, so a
published snapshot never changes; versions with the same content share one object. The
snapshot is first written to a local temporary file while its hash and stats are computed,
then published under its final key; the version turns READY only after that.

Reading a version streams the object back, checks the hash and the example count, and
fails loudly if either differs from what was recorded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import tempfile
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.services.common.errors import FailedPrecondition, LoraforgeError
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.common.resources import new_id
from loraforge.services.dataset.domain import (
    ExampleKind,
    InputRecord,
    LengthStats,
    Markup,
    SourceFormat,
    VersionRecord,
    VersionState,
    VersionStats,
)
from loraforge.services.dataset.store import DatasetStore

log = logging.getLogger("loraforge.dataset.versions")

SNAPSHOT_PREFIX = "snapshots"
READ_CHUNK = 1024 * 1024
# A read batch also ends at this many characters, so one response stays well under the
# gRPC message limit whatever the batch size.
MAX_BATCH_CHARS = 8_000_000


class SnapshotCorrupted(RuntimeError):
    """A stored snapshot does not match what its version recorded: a storage fault, not a user error."""


def snapshot_key(sha256: str) -> str:
    return f"{SNAPSHOT_PREFIX}/{sha256[:2]}/{sha256}.jsonl.gz"


def length_stats(lengths: array[int]) -> LengthStats:
    """Min, median, 95th percentile (nearest rank) and max."""
    if not lengths:
        return LengthStats(0, 0, 0, 0)
    ordered = sorted(lengths)
    n = len(ordered)
    return LengthStats(
        min=ordered[0],
        median=ordered[(n - 1) // 2],
        p95=ordered[max(0, math.ceil(0.95 * n) - 1)],
        max=ordered[-1],
    )


def _record_json(row: Any) -> dict[str, Any]:
    return {
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


def _input_from_json(data: dict[str, Any]) -> InputRecord:
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


class Versions:
    """Creates, reads and deletes dataset versions (blocking; run off the event loop)."""

    def __init__(self, store: DatasetStore, objects: ObjectStore, scratch: Path) -> None:
        self.store = store
        self.objects = objects
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)

    def create(
        self, app_id: str, dataset_id: str, version_id: str, description: str
    ) -> VersionRecord:
        """Freezes the dataset's inputs now; returns the version READY, or FAILED with a reason."""
        version_id = version_id or new_id("v")
        version_pk, dataset_pk = self.store.create_version_row(
            app_id, dataset_id, version_id, description
        )
        try:
            self.store.set_version_state(version_pk, VersionState.IN_PROGRESS)
            sha256, key, stats = self._write_snapshot(dataset_pk)
            self.store.set_version_state(
                version_pk,
                VersionState.READY,
                stats=stats,
                content_sha256=sha256,
                snapshot_key=key,
            )
        except Exception as exc:
            if isinstance(exc, LoraforgeError):
                reason = exc.message
            else:
                log.exception("writing version %s of %s/%s failed", version_id, app_id, dataset_id)
                reason = (
                    f"writing the snapshot failed ({type(exc).__name__}: {exc}); check the object "
                    "store and create the version again"
                )
            self.store.set_version_state(version_pk, VersionState.FAILED, failure_reason=reason)
        return self.store.get_version(app_id, dataset_id, version_id)

    def _write_snapshot(self, dataset_pk: int) -> tuple[str, str, VersionStats]:
        digest = hashlib.sha256()
        prompt_lengths: array[int] = array("q")
        completion_lengths: array[int] = array("q")
        by_format: Counter[str] = Counter()
        by_kind: Counter[str] = Counter()
        with tempfile.NamedTemporaryFile(
            dir=self.scratch, prefix="snapshot-", suffix=".jsonl.gz"
        ) as tmp:
            # mtime=0 keeps the compressed bytes a function of the content alone.
            with gzip.GzipFile(fileobj=tmp, mode="wb", compresslevel=6, mtime=0) as gz:
                for batch in self.store.frozen_inputs(dataset_pk):
                    lines = []
                    for row in batch:
                        lines.append(
                            json.dumps(_record_json(row), ensure_ascii=False, separators=(",", ":"))
                        )
                        prompt_lengths.append(len(row.prompt))
                        completion_lengths.append(len(row.completion))
                        by_format[SourceFormat(row.source_format).name] += 1
                        by_kind[ExampleKind(row.kind).name] += 1
                    data = ("\n".join(lines) + "\n").encode("utf-8")
                    digest.update(data)
                    gz.write(data)
            tmp.flush()
            count = len(prompt_lengths)
            if count == 0:
                raise FailedPrecondition(
                    "the dataset has no finished inputs to freeze (an upload may still be running)",
                    reason="DATASET_EMPTY",
                )
            sha256 = digest.hexdigest()
            key = snapshot_key(sha256)
            size = Path(tmp.name).stat().st_size
            with self.store.snapshot_lock():
                if not self.objects.exists(key):
                    self.objects.put_file(key, tmp.name)
        stats = VersionStats(
            example_count=count,
            prompt_chars=length_stats(prompt_lengths),
            completion_chars=length_stats(completion_lengths),
            examples_by_format=dict(by_format),
            examples_by_kind=dict(by_kind),
            snapshot_bytes=size,
        )
        return sha256, key, stats

    def read(
        self, app_id: str, dataset_id: str, version_id: str, batch_size: int
    ) -> Iterator[list[InputRecord]]:
        """Yields the version's inputs in frozen order, `batch_size` at a time."""
        version = self.store.get_version(app_id, dataset_id, version_id)
        if version.state is not VersionState.READY or version.stats is None:
            raise FailedPrecondition(
                f"version `{version_id}` is {version.state.name.lower()}, not ready; "
                + (version.failure_reason or "wait until it is ready"),
                reason="DATASET_VERSION_NOT_READY",
            )
        key = version.snapshot_key.removeprefix(self.store.object_prefix + "/")
        return self._read(key, version.content_sha256, version.stats.example_count, batch_size)

    def _read(
        self, key: str, sha256: str, expected: int, batch_size: int
    ) -> Iterator[list[InputRecord]]:
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
                record = _input_from_json(json.loads(line))
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
            batch.append(_input_from_json(json.loads(tail)))
            count += 1
        if batch:
            yield batch
        if digest.hexdigest() != sha256 or count != expected:
            raise SnapshotCorrupted(
                f"snapshot {key} does not match its version (sha256 {digest.hexdigest()}, "
                f"{count} examples; recorded {sha256}, {expected})"
            )

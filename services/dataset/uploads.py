"""Uploads: a stream of file chunks in, stored inputs and a per-row report out.

Parsing (`parsing.py`) and storing (`inputs.py`, `input_writer.py`) run as a two-stage pipeline: this thread
parses while a writer thread inserts the previous batch, so the database's time (which
releases the GIL) overlaps with parsing. The queue between them is short, so memory stays
bounded however large the file. If anything fails, or the client goes away, the inputs
stored so far are removed again: an upload is stored whole or not at all. Whether the
client is still there, and whether the service is stopping, is asked for every piece of
at most 1 MiB of the file and every batch handed to the writer, so an upload given up
inside one large message (a client may send the whole file as one) stops within a piece,
not at the end of the message.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import Connection

from loraforge.services.common.errors import Aborted, Unavailable, invalid_field
from loraforge.services.dataset.domain import RowError, SourceFormat, UploadReport
from loraforge.services.dataset.input_writer import InputWriter
from loraforge.services.dataset.inputs import Inputs, UploadHandle
from loraforge.services.dataset.parsing import (
    FILE_FIELD,
    LabelCompletions,
    ParsedRow,
    UploadParser,
)

log = logging.getLogger("loraforge.dataset.uploads")

DEFAULT_MAX_ROW_ERRORS = 100
MAX_ROW_ERRORS = 10000
_QUEUE_BATCHES = 2
_BATCH_BYTES = 8 * 1024 * 1024
# Messages are parsed this much at a time, so a large one never runs unchecked.
_PIECE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class UploadOptions:
    app_id: str
    dataset_id: str
    file_name: str
    requested_format: SourceFormat | None
    max_row_errors: int
    skip_duplicates: bool
    request_id: str = ""
    labels: LabelCompletions | None = None


class _Writer(threading.Thread):
    """Stores batches of parsed rows from a queue; counts what it stored."""

    def __init__(
        self,
        inputs: Inputs,
        upload: UploadHandle,
        source_format: SourceFormat,
        skip_duplicates: bool,
    ) -> None:
        super().__init__(name=f"upload-writer-{upload.upload_id}", daemon=True)
        self.inputs = inputs
        self.upload = upload
        self.source_format = source_format
        self.skip_duplicates = skip_duplicates
        self.queue: queue.Queue[list[ParsedRow] | None] = queue.Queue(maxsize=_QUEUE_BATCHES)
        self.accepted = 0
        self.duplicates = 0
        self.by_markup: Counter[str] = Counter()
        self.error: BaseException | None = None
        self.input_writer: InputWriter | None = None

    def run(self) -> None:
        try:
            self.input_writer = self.inputs.input_writer(
                self.upload, self.source_format, self.skip_duplicates
            )
            while True:
                try:
                    rows = self.queue.get(timeout=self.input_writer.commit_seconds)
                except queue.Empty:
                    # The client is slow or paused: commit what waits, so its open
                    # transaction does not hold up other writers (SQLite has one at a time).
                    if self.error is None:
                        self.input_writer.commit_pending()
                    continue
                if rows is None:
                    break
                if self.error is not None:
                    continue  # drain, so the producer never blocks on a dead writer
                result = self.input_writer.write(rows)
                self.accepted += result.stored
                self.duplicates += result.duplicates
                for markup, count in result.by_markup.items():
                    self.by_markup[markup.name] += count
        except BaseException as exc:
            self.error = exc
            while self.queue.get() is not None:
                pass

    def put(self, rows: list[ParsedRow]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(rows)

    def drain(self) -> None:
        """Waits until every queued batch is written (not yet committed)."""
        if self.is_alive():
            self.queue.put(None)
            self.join()
        if self.error is not None:
            raise self.error

    def close(self, *, commit: bool, finish: Callable[[Connection], None] | None = None) -> None:
        """After `drain`: commits the last rows (with `finish`), or rolls them back."""
        if self.input_writer is not None:
            writer, self.input_writer = self.input_writer, None
            writer.close(commit=commit, finish=finish)

    def abandon(self) -> None:
        self.error = self.error or RuntimeError("upload abandoned")
        try:
            self.drain()
        except BaseException:
            pass
        self.close(commit=False)


class Uploader:
    """Runs uploads (blocking; the servicer calls `ingest` in a worker thread)."""

    def __init__(self, inputs: Inputs, *, max_example_chars: int, batch_rows: int) -> None:
        self.inputs = inputs
        self.max_example_chars = max_example_chars
        self.batch_rows = batch_rows
        # Set when the service stops: running uploads stop at their next batch and undo.
        self.stopping = threading.Event()
        self._active = 0
        self._idle = threading.Condition()

    def stop(self, timeout: float) -> bool:
        """Stops running uploads; True if all of them had undone their work within `timeout`."""
        self.stopping.set()
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def _pieces(self, chunks: Iterable[bytes], cancelled: Callable[[], bool]) -> Iterator[bytes]:
        for chunk in chunks:
            for start in range(0, len(chunk), _PIECE_BYTES):
                self._check_live(cancelled)
                yield chunk[start : start + _PIECE_BYTES]

    def _check_live(self, cancelled: Callable[[], bool]) -> None:
        if cancelled():
            raise Aborted("the upload was cancelled before it finished", reason="CANCELLED")
        if self.stopping.is_set():
            raise Unavailable(
                "the dataset service is shutting down; nothing of this upload was stored, "
                "send the file again",
                reason="SHUTTING_DOWN",
            )

    def ingest(
        self,
        options: UploadOptions,
        chunks: Iterable[bytes],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> UploadReport:
        """Parses and stores a whole file; `cancelled` is asked after every batch and once
        more before the last commit.

        With a request id that a finished upload already carried, returns that upload's
        report and reads none of `chunks`.
        """
        with self._idle:
            self._active += 1
        try:
            return self._ingest(options, chunks, cancelled)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _ingest(
        self, options: UploadOptions, chunks: Iterable[bytes], cancelled: Callable[[], bool]
    ) -> UploadReport:
        self._check_live(cancelled)
        upload = self.inputs.begin_upload(
            options.app_id, options.dataset_id, options.file_name, options.request_id
        )
        if isinstance(upload, UploadReport):
            log.info(
                "upload with request_id %r into apps/%s/datasets/%s was done already as %s; "
                "answering with its report",
                options.request_id,
                options.app_id,
                options.dataset_id,
                upload.upload_id,
            )
            return upload
        log.info(
            "upload %s into apps/%s/datasets/%s started (%s)",
            upload.upload_id,
            options.app_id,
            options.dataset_id,
            options.file_name,
        )
        parser = UploadParser(
            file_name=options.file_name,
            requested=options.requested_format,
            max_example_chars=self.max_example_chars,
            labels=options.labels,
        )
        report = UploadReport(upload_id=upload.upload_id, detected_format=SourceFormat.PLAIN_TEXT)
        writer: _Writer | None = None
        try:
            pending: list[ParsedRow] = []
            flushed_at = 0
            for batch in parser.batches(self._pieces(chunks, cancelled)):
                self._check_live(cancelled)
                if writer is None:
                    assert parser.detected_format is not None
                    writer = _Writer(
                        self.inputs, upload, parser.detected_format, options.skip_duplicates
                    )
                    writer.start()
                self._record_errors(report, batch.errors, options.max_row_errors)
                pending.extend(batch.rows)
                # A batch ends at `batch_rows` rows or `_BATCH_BYTES` of file, so a file of
                # very long rows does not pile thousands of them up in memory.
                if parser.bytes_read - flushed_at >= _BATCH_BYTES and pending:
                    writer.put(pending)
                    pending, flushed_at = [], parser.bytes_read
                while len(pending) >= self.batch_rows:
                    self._check_live(cancelled)
                    writer.put(pending[: self.batch_rows])
                    pending, flushed_at = pending[self.batch_rows :], parser.bytes_read
            if writer is None:  # no batch at all: nothing was detected
                raise invalid_field(FILE_FIELD, "the file is empty", reason="EMPTY_FILE")
            if pending:
                writer.put(pending)
            writer.drain()
            if parser.rows_read == 0:
                raise invalid_field(
                    FILE_FIELD,
                    "the file has no rows (only a header or blank lines); add at least one example",
                    reason="EMPTY_FILE",
                )
            self._check_live(cancelled)
            assert parser.detected_format is not None
            report.detected_format = parser.detected_format
            report.rows_read = parser.rows_read
            report.rows_accepted = writer.accepted
            report.duplicate_rows = writer.duplicates
            report.rows_by_markup = dict(writer.by_markup)
            report.bytes_read = parser.bytes_read
            writer.close(
                commit=True, finish=lambda conn: self.inputs.finish_upload(conn, upload, report)
            )
        except BaseException:
            if writer is not None:
                writer.abandon()
            removed = self.inputs.abort_upload(upload)
            log.info(
                "upload %s into apps/%s/datasets/%s failed; removed the %d inputs it had stored",
                upload.upload_id,
                options.app_id,
                options.dataset_id,
                removed,
            )
            raise
        log.info(
            "upload %s into apps/%s/datasets/%s: %s, %d rows read, %d stored, %d rejected, %d duplicates",
            upload.upload_id,
            options.app_id,
            options.dataset_id,
            report.detected_format.name,
            report.rows_read,
            report.rows_accepted,
            report.rows_rejected,
            report.duplicate_rows,
        )
        return report

    @staticmethod
    def _record_errors(report: UploadReport, errors: list[RowError], limit: int) -> None:
        if not errors:
            return
        report.rows_rejected += len(errors)
        room = limit - len(report.row_errors)
        if room > 0:
            report.row_errors.extend(errors[:room])
        if len(errors) > max(room, 0):
            report.row_errors_truncated = True

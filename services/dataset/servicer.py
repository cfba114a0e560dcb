"""DatasetService over gRPC: requests to domain calls, domain records to responses.

Nothing here decides anything about data: it checks request fields (naming them in field
violations), calls the store, the uploader or the versions off the event loop, and
converts the results. Domain errors pass through to the error interceptor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import grpc

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from loraforge.services.common.auth import visible_app
from loraforge.services.common.errors import Aborted, FieldViolation, InvalidArgument, invalid_field
from loraforge.services.common.resources import page_size, parse_name, timestamp, validate_id
from loraforge.services.common.rpc import Context
from loraforge.services.common.updates import update_paths
from loraforge.services.common.values import (
    INT32_MAX,
    check_request_id,
    check_text,
    text_problem,
)
from loraforge.services.dataset.domain import (
    AppRecord,
    DatasetRecord,
    ExampleKind,
    InputRecord,
    LengthStats,
    NewExample,
    RowError,
    SourceFormat,
    UploadReport,
    VersionRecord,
)
from loraforge.services.dataset.pages import parse_page
from loraforge.services.dataset.parsing import LabelCompletions
from loraforge.services.dataset.store import DatasetStore
from loraforge.services.dataset.uploads import (
    DEFAULT_MAX_ROW_ERRORS,
    MAX_ROW_ERRORS,
    Uploader,
    UploadOptions,
)
from loraforge.services.dataset.versions import Versions

APP = "apps/{app}"
DATASET = "apps/{app}/datasets/{dataset}"
INPUT = "apps/{app}/datasets/{dataset}/inputs/{input}"
VERSION = "apps/{app}/datasets/{dataset}/versions/{version}"

MAX_DESCRIPTION_CHARS = 10_000
MAX_ADD_INPUTS = 10_000
MAX_REFERRER_CHARS = 512
MAX_FILE_NAME_CHARS = 1024
DEFAULT_READ_BATCH = 500
MAX_READ_BATCH = 10_000

T = TypeVar("T")


def _description(value: str, field: str) -> str:
    return check_text(value, field, MAX_DESCRIPTION_CHARS)


def _request_id(value: str, field: str) -> str:
    return check_request_id(value, field)


# The fields an update may change, by resource; the others are output only or the name.
_UPDATABLE = {"App": ("description",), "Dataset": ("description",)}


def _update_paths(resource: pb.App | pb.Dataset, mask_set: bool, paths: list[str]) -> set[str]:
    return update_paths(resource, mask_set, paths, _UPDATABLE[type(resource).DESCRIPTOR.name])


def app_pb(app: AppRecord) -> pb.App:
    return pb.App(
        name=f"apps/{app.app_id}",
        description=app.description,
        create_time=timestamp(app.create_time),
        etag=app.etag,
    )


def dataset_pb(ds: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        name=f"apps/{ds.app_id}/datasets/{ds.dataset_id}",
        description=ds.description,
        create_time=timestamp(ds.create_time),
        input_count=ds.input_count,
        version_count=ds.version_count,
        etag=ds.etag,
    )


def input_pb(dataset_name: str, record: InputRecord) -> pb.Input:
    return pb.Input(
        name=f"{dataset_name}/inputs/{record.input_id}",
        example=pb.Example(
            prompt=record.prompt,
            completion=record.completion,
            kind=pb.ExampleKind.Value("EXAMPLE_KIND_" + record.kind.name),
        ),
        raw=record.raw,
        source_format=pb.SourceFormat.Value("SOURCE_FORMAT_" + record.source_format.name),
        markup=pb.TextMarkup.Value("TEXT_MARKUP_" + record.markup.name),
        source_line=record.source_line,
        upload_id=record.upload_id,
        concepts=record.concepts,
        metadata=record.metadata,
        create_time=timestamp(record.create_time),
    )


def _lengths_pb(stats: LengthStats) -> pb.LengthStats:
    return pb.LengthStats(min=stats.min, median=stats.median, p95=stats.p95, max=stats.max)


def version_pb(version: VersionRecord) -> pb.DatasetVersion:
    message = pb.DatasetVersion(
        name=f"apps/{version.app_id}/datasets/{version.dataset_id}/versions/{version.version_id}",
        description=version.description,
        state=pb.DatasetVersionState.Value("DATASET_VERSION_STATE_" + version.state.name),
        status_code=version.state.status_code,
        failure_reason=version.failure_reason,
        content_sha256=version.content_sha256,
        snapshot_key=version.snapshot_key,
        referenced_by=version.referenced_by,
        create_time=timestamp(version.create_time),
    )
    if version.stats is not None:
        s = version.stats
        message.stats.CopyFrom(
            pb.DatasetVersionStats(
                example_count=s.example_count,
                prompt_chars=_lengths_pb(s.prompt_chars),
                completion_chars=_lengths_pb(s.completion_chars),
                examples_by_format={
                    "SOURCE_FORMAT_" + k: v for k, v in s.examples_by_format.items()
                },
                examples_by_kind={"EXAMPLE_KIND_" + k: v for k, v in s.examples_by_kind.items()},
                snapshot_bytes=s.snapshot_bytes,
            )
        )
    return message


def _row_error_pb(err: RowError) -> pb.RowError:
    return pb.RowError(line=err.line, reason=err.reason, code=err.code, excerpt=err.excerpt)


def upload_report_pb(report: UploadReport) -> pb.UploadInputsResponse:
    return pb.UploadInputsResponse(
        upload_id=report.upload_id,
        detected_format=pb.SourceFormat.Value("SOURCE_FORMAT_" + report.detected_format.name),
        rows_read=report.rows_read,
        rows_accepted=report.rows_accepted,
        rows_rejected=report.rows_rejected,
        duplicate_rows=report.duplicate_rows,
        row_errors=[_row_error_pb(e) for e in report.row_errors],
        row_errors_truncated=report.row_errors_truncated,
        bytes_read=report.bytes_read,
        rows_by_markup={"TEXT_MARKUP_" + k: v for k, v in report.rows_by_markup.items()},
    )


def _new_example(
    i: int, new: pb.NewInput, max_chars: int
) -> tuple[NewExample | None, list[FieldViolation]]:
    base = f"inputs[{i}]"
    ex = new.example
    problems: list[FieldViolation] = []
    if ex.kind == pb.EXAMPLE_KIND_UNSPECIFIED:
        kind = ExampleKind.PROMPT_COMPLETION if ex.prompt else ExampleKind.TEXT
    elif ex.kind in (pb.EXAMPLE_KIND_PROMPT_COMPLETION, pb.EXAMPLE_KIND_TEXT):
        kind = ExampleKind(ex.kind)
    else:
        return None, [
            FieldViolation(f"{base}.example.kind", f"{ex.kind} is not a known ExampleKind")
        ]
    if kind is ExampleKind.PROMPT_COMPLETION and not ex.prompt.strip():
        problems.append(
            FieldViolation(
                f"{base}.example.prompt",
                "is empty; a PROMPT_COMPLETION example needs a prompt (or use EXAMPLE_KIND_TEXT)",
            )
        )
    if kind is ExampleKind.TEXT and ex.prompt:
        problems.append(
            FieldViolation(
                f"{base}.example.prompt",
                "must be empty for EXAMPLE_KIND_TEXT; put the whole text in `completion`",
            )
        )
    if not ex.completion.strip():
        problems.append(
            FieldViolation(f"{base}.example.completion", "is empty, so there is nothing to learn")
        )
    raw = new.raw or ex.prompt + ex.completion
    texts = [(f"{base}.example.prompt", ex.prompt), (f"{base}.example.completion", ex.completion)]
    texts += [(f"{base}.raw", new.raw)] + [
        (f"{base}.concepts[{j}]", c) for j, c in enumerate(new.concepts)
    ]
    for key, value in new.metadata.items():
        texts += [(f"{base}.metadata", key), (f"{base}.metadata.{key}", value)]
    for path, text in texts:
        if (problem := text_problem(text)) is not None:
            problems.append(FieldViolation(path, problem))
    if len(raw) > max_chars or len(ex.prompt) + len(ex.completion) > max_chars:
        problems.append(
            FieldViolation(
                f"{base}.example",
                f"is longer than the limit of {max_chars:,} characters (max_example_chars)",
            )
        )
    for j, concept in enumerate(new.concepts):
        if not concept.strip():
            problems.append(FieldViolation(f"{base}.concepts[{j}]", "is empty"))
    if problems:
        return None, problems
    return NewExample(
        kind, ex.prompt, ex.completion, raw, tuple(new.concepts), dict(new.metadata)
    ), []


class _ChunkStream:
    """An upload's `chunk` messages, handed one at a time to the parsing thread.

    The thread pulls each chunk from the event loop when it wants the next one, so a slow
    parser slows the client down (flow control) instead of buffering the file.

    The request stream ends both when the client has sent the whole file and when it
    cancels, and grpc reports the cancel itself separately, in no fixed order. A cancelled
    call refuses every later operation, so at the end of the stream the response headers
    are sent: if the call takes them, the client finished the file; if not, it cancelled.
    """

    def __init__(
        self,
        messages: AsyncIterator[pb.UploadInputsRequest],
        context: Context,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._messages = messages
        self._context = context
        self._loop = loop
        # Set when the call ends before we answer: the client cancelled or went away. The
        # uploader asks once more before its final commit.
        self.abandoned = threading.Event()
        self._waiting: concurrent.futures.Future[bytes | None] | None = None
        # types-grpcio declares the callback as a class, which no function matches.
        context.add_done_callback(self._on_done)  # type: ignore[arg-type]

    def _on_done(self, _: Context) -> None:
        self.abandoned.set()
        waiting = self._waiting
        if waiting is not None:
            waiting.cancel()  # wakes the parsing thread: no chunk will come

    async def _next_chunk(self) -> bytes | None:
        message = await anext(self._messages, None)
        if message is None:
            try:
                await self._context.send_initial_metadata(())
            except grpc.aio.BaseError:  # the call is over: cancelled, or the server stopping
                raise _cancelled() from None
            return None
        if message.WhichOneof("payload") == "header":
            raise invalid_field(
                "header",
                "was sent again; send it once, in the first message",
                reason="DUPLICATE_HEADER",
            )
        return message.chunk

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, for the parsing thread; Aborted if the call ends first."""
        while True:
            future = asyncio.run_coroutine_threadsafe(self._next_chunk(), self._loop)
            self._waiting = future
            if self.abandoned.is_set():  # ended before `_waiting` was set, so not woken
                future.cancel()
            try:
                chunk = future.result()
            except concurrent.futures.CancelledError:
                raise _cancelled() from None
            if chunk is None:
                return
            yield chunk


def _cancelled() -> Aborted:
    return Aborted("the upload was cancelled before it finished", reason="CANCELLED")


class DatasetServicer(pb_grpc.DatasetServiceServicer):
    """The DatasetService RPCs."""

    def __init__(
        self,
        store: DatasetStore,
        uploader: Uploader,
        versions: Versions,
        *,
        max_example_chars: int,
        keys_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`keys_changed` is called when an app's keys were revoked (this server's key cache)."""
        self.store = store
        self.keys_changed = keys_changed
        self.uploader = uploader
        self.versions = versions
        self.max_example_chars = max_example_chars

    @staticmethod
    async def _run(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # Apps

    async def CreateApp(
        self, request: pb.CreateAppRequest, context: Context
    ) -> pb.CreateAppResponse:
        app_id = validate_id(request.app_id, "app_id")
        description = _description(request.app.description, "app.description")
        return pb.CreateAppResponse(
            app=app_pb(await self._run(self.store.catalog.create_app, app_id, description))
        )

    async def GetApp(self, request: pb.GetAppRequest, context: Context) -> pb.GetAppResponse:
        name = parse_name(request.name, APP)
        return pb.GetAppResponse(
            app=app_pb(await self._run(self.store.catalog.get_app, name["app"]))
        )

    async def UpdateApp(
        self, request: pb.UpdateAppRequest, context: Context
    ) -> pb.UpdateAppResponse:
        name = parse_name(request.app.name, APP, "app.name")
        paths = _update_paths(
            request.app, request.HasField("update_mask"), list(request.update_mask.paths)
        )
        description = (
            _description(request.app.description, "app.description")
            if "description" in paths
            else None
        )
        record = await self._run(
            partial(
                self.store.catalog.update_app,
                name["app"],
                description=description,
                etag=request.app.etag,
            )
        )
        return pb.UpdateAppResponse(app=app_pb(record))

    async def ListApps(self, request: pb.ListAppsRequest, context: Context) -> pb.ListAppsResponse:
        only = visible_app()  # an app key sees its own app only
        parent = f"apps/{only}" if only else ""
        page = parse_page(page_size(request.page_size), request.page_token, parent, "ListApps")
        records, token = await self._run(self.store.catalog.list_apps, page, only)
        return pb.ListAppsResponse(apps=[app_pb(a) for a in records], next_page_token=token)

    async def DeleteApp(
        self, request: pb.DeleteAppRequest, context: Context
    ) -> pb.DeleteAppResponse:
        name = parse_name(request.name, APP)
        await self._run(self.store.catalog.delete_app, name["app"], request.force)
        self.keys_changed()  # its keys were revoked with it
        return pb.DeleteAppResponse()

    # Datasets

    async def CreateDataset(
        self, request: pb.CreateDatasetRequest, context: Context
    ) -> pb.CreateDatasetResponse:
        parent = parse_name(request.parent, APP, "parent")
        dataset_id = validate_id(request.dataset_id, "dataset_id")
        description = _description(request.dataset.description, "dataset.description")
        record = await self._run(
            self.store.catalog.create_dataset, parent["app"], dataset_id, description
        )
        return pb.CreateDatasetResponse(dataset=dataset_pb(record))

    async def GetDataset(
        self, request: pb.GetDatasetRequest, context: Context
    ) -> pb.GetDatasetResponse:
        name = parse_name(request.name, DATASET)
        record = await self._run(self.store.catalog.get_dataset, name["app"], name["dataset"])
        return pb.GetDatasetResponse(dataset=dataset_pb(record))

    async def UpdateDataset(
        self, request: pb.UpdateDatasetRequest, context: Context
    ) -> pb.UpdateDatasetResponse:
        name = parse_name(request.dataset.name, DATASET, "dataset.name")
        paths = _update_paths(
            request.dataset, request.HasField("update_mask"), list(request.update_mask.paths)
        )
        description = (
            _description(request.dataset.description, "dataset.description")
            if "description" in paths
            else None
        )
        record = await self._run(
            partial(
                self.store.catalog.update_dataset,
                name["app"],
                name["dataset"],
                description=description,
                etag=request.dataset.etag,
            )
        )
        return pb.UpdateDatasetResponse(dataset=dataset_pb(record))

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Context
    ) -> pb.ListDatasetsResponse:
        parent = parse_name(request.parent, APP, "parent")
        page = parse_page(
            page_size(request.page_size), request.page_token, request.parent, "ListDatasets"
        )
        records, token = await self._run(self.store.catalog.list_datasets, parent["app"], page)
        return pb.ListDatasetsResponse(
            datasets=[dataset_pb(d) for d in records], next_page_token=token
        )

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Context
    ) -> pb.DeleteDatasetResponse:
        name = parse_name(request.name, DATASET)
        await self._run(
            self.store.catalog.delete_dataset, name["app"], name["dataset"], request.force
        )
        return pb.DeleteDatasetResponse()

    # Inputs

    def _upload_options(self, header: pb.UploadHeader) -> UploadOptions:
        name = parse_name(header.dataset, DATASET, "header.dataset")
        if header.format not in pb.SourceFormat.values():
            raise invalid_field("header.format", f"{header.format} is not a known SourceFormat")
        if header.format == pb.SOURCE_FORMAT_STRUCTURED:
            raise invalid_field(
                "header.format", "SOURCE_FORMAT_STRUCTURED is for AddInputs, not for files"
            )
        if header.max_row_errors < 0:
            raise invalid_field(
                "header.max_row_errors", f"must not be negative (got {header.max_row_errors})"
            )
        return UploadOptions(
            app_id=name["app"],
            dataset_id=name["dataset"],
            file_name=check_text(header.file_name, "header.file_name", MAX_FILE_NAME_CHARS),
            requested_format=SourceFormat(header.format) if header.format else None,
            max_row_errors=min(header.max_row_errors or DEFAULT_MAX_ROW_ERRORS, MAX_ROW_ERRORS),
            skip_duplicates=header.skip_duplicates,
            request_id=_request_id(header.request_id, "header.request_id"),
            labels=LabelCompletions.checked(
                header.label_completions.instruction_template,
                header.label_completions.separator,
                "header.label_completions",
            )
            if header.HasField("label_completions")
            else None,
        )

    async def UploadInputs(
        self,
        request_iterator: AsyncIterator[pb.UploadInputsRequest],
        context: Context,
    ) -> pb.UploadInputsResponse:
        messages = request_iterator.__aiter__()
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise invalid_field(
                "header",
                "the first message of an upload must carry `header` (the dataset and options); "
                "send the file's bytes in `chunk` messages after it",
                reason="MISSING_HEADER",
            )
        options = self._upload_options(first.header)
        stream = _ChunkStream(messages, context, asyncio.get_running_loop())
        try:
            report = await self._run(
                self.uploader.ingest, options, stream.chunks(), stream.abandoned.is_set
            )
        except asyncio.CancelledError:
            stream.abandoned.set()
            raise
        return upload_report_pb(report)

    async def AddInputs(
        self, request: pb.AddInputsRequest, context: Context
    ) -> pb.AddInputsResponse:
        parent = parse_name(request.parent, DATASET, "parent")
        request_id = _request_id(request.request_id, "request_id")
        if not request.inputs:
            raise invalid_field("inputs", "is empty; send at least one input")
        if len(request.inputs) > MAX_ADD_INPUTS:
            raise invalid_field(
                "inputs",
                f"has {len(request.inputs):,} inputs; at most {MAX_ADD_INPUTS:,} per call (use UploadInputs for files)",
            )
        examples: list[NewExample] = []
        violations: list[FieldViolation] = []
        for i, new in enumerate(request.inputs):
            example, problems = _new_example(i, new, self.max_example_chars)
            violations += problems
            if example is not None:
                examples.append(example)
        if violations:
            raise InvalidArgument(
                f"{len(request.inputs) - len(examples)} of {len(request.inputs)} inputs are invalid, "
                f"so none was added; first: {violations[0].field}: {violations[0].description}",
                reason="INVALID_INPUTS",
                field_violations=violations,
            )
        records = await self._run(
            self.store.inputs.add_inputs, parent["app"], parent["dataset"], examples, request_id
        )
        return pb.AddInputsResponse(inputs=[input_pb(request.parent, r) for r in records])

    async def ListInputs(
        self, request: pb.ListInputsRequest, context: Context
    ) -> pb.ListInputsResponse:
        parent = parse_name(request.parent, DATASET, "parent")
        page = parse_page(
            page_size(request.page_size), request.page_token, request.parent, "ListInputs"
        )
        records, token, total = await self._run(
            self.store.inputs.list_inputs, parent["app"], parent["dataset"], page
        )
        return pb.ListInputsResponse(
            inputs=[input_pb(request.parent, r) for r in records],
            next_page_token=token,
            total_size=total,
        )

    async def DeleteInputs(
        self, request: pb.DeleteInputsRequest, context: Context
    ) -> pb.DeleteInputsResponse:
        parent = parse_name(request.parent, DATASET, "parent")
        if request.all and request.names:
            raise invalid_field("names", "must be empty when `all` is set")
        if not request.all and not request.names:
            raise invalid_field("names", "is empty; name the inputs to delete, or set `all`")
        ids: list[int] | None = None
        if not request.all:
            ids = []
            for i, name in enumerate(request.names):
                parts = parse_name(name, INPUT, f"names[{i}]")
                if (parts["app"], parts["dataset"]) != (parent["app"], parent["dataset"]):
                    raise invalid_field(
                        f"names[{i}]", f"{name!r} is not an input of `{request.parent}`"
                    )
                # Ids are numbers a row key can hold; any other id names nothing.
                if parts["input"].isdigit() and int(parts["input"]) <= INT32_MAX:
                    ids.append(int(parts["input"]))
        deleted = await self._run(
            self.store.inputs.delete_inputs, parent["app"], parent["dataset"], ids
        )
        return pb.DeleteInputsResponse(deleted_count=deleted)

    # Versions

    async def CreateDatasetVersion(
        self, request: pb.CreateDatasetVersionRequest, context: Context
    ) -> pb.CreateDatasetVersionResponse:
        parent = parse_name(request.parent, DATASET, "parent")
        version_id = validate_id(request.version_id, "version_id") if request.version_id else ""
        description = _description(request.description, "description")
        request_id = _request_id(request.request_id, "request_id")
        record = await self._run(
            self.versions.create,
            parent["app"],
            parent["dataset"],
            version_id,
            description,
            request_id,
        )
        return pb.CreateDatasetVersionResponse(dataset_version=version_pb(record))

    async def GetDatasetVersion(
        self, request: pb.GetDatasetVersionRequest, context: Context
    ) -> pb.GetDatasetVersionResponse:
        name = parse_name(request.name, VERSION)
        record = await self._run(
            self.store.version_rows.get_version, name["app"], name["dataset"], name["version"]
        )
        return pb.GetDatasetVersionResponse(dataset_version=version_pb(record))

    async def ListDatasetVersions(
        self, request: pb.ListDatasetVersionsRequest, context: Context
    ) -> pb.ListDatasetVersionsResponse:
        parent = parse_name(request.parent, DATASET, "parent")
        page = parse_page(
            page_size(request.page_size), request.page_token, request.parent, "ListDatasetVersions"
        )
        records, token = await self._run(
            self.store.version_rows.list_versions, parent["app"], parent["dataset"], page
        )
        return pb.ListDatasetVersionsResponse(
            dataset_versions=[version_pb(v) for v in records], next_page_token=token
        )

    async def DeleteDatasetVersion(
        self, request: pb.DeleteDatasetVersionRequest, context: Context
    ) -> pb.DeleteDatasetVersionResponse:
        name = parse_name(request.name, VERSION)
        await self._run(
            self.store.version_rows.delete_version, name["app"], name["dataset"], name["version"]
        )
        return pb.DeleteDatasetVersionResponse()

    async def ReadDatasetVersion(
        self, request: pb.ReadDatasetVersionRequest, context: Context
    ) -> AsyncIterator[pb.ReadDatasetVersionResponse]:
        name = parse_name(request.name, VERSION)
        if request.batch_size < 0:
            raise invalid_field("batch_size", f"must not be negative (got {request.batch_size})")
        batch_size = min(request.batch_size or DEFAULT_READ_BATCH, MAX_READ_BATCH)
        dataset_name = f"apps/{name['app']}/datasets/{name['dataset']}"
        batches = await self._run(
            self.versions.read, name["app"], name["dataset"], name["version"], batch_size
        )

        def next_response() -> pb.ReadDatasetVersionResponse | None:
            batch = next(batches, None)
            if batch is None:
                return None
            return pb.ReadDatasetVersionResponse(inputs=[input_pb(dataset_name, r) for r in batch])

        while (response := await self._run(next_response)) is not None:
            yield response

    def _referrer(self, value: str) -> str:
        if not value.strip():
            raise invalid_field("referrer", "is required, e.g. `apps/a/models/m/versions/v`")
        if len(value) > MAX_REFERRER_CHARS or any(
            c.isspace() or not c.isprintable() for c in value
        ):
            raise invalid_field(
                "referrer",
                f"must be a resource name of at most {MAX_REFERRER_CHARS} characters without spaces",
            )
        return value

    async def AddDatasetVersionReference(
        self, request: pb.AddDatasetVersionReferenceRequest, context: Context
    ) -> pb.AddDatasetVersionReferenceResponse:
        name = parse_name(request.name, VERSION)
        referrer = self._referrer(request.referrer)
        record = await self._run(
            self.store.version_rows.add_reference,
            name["app"],
            name["dataset"],
            name["version"],
            referrer,
        )
        return pb.AddDatasetVersionReferenceResponse(dataset_version=version_pb(record))

    async def RemoveDatasetVersionReference(
        self, request: pb.RemoveDatasetVersionReferenceRequest, context: Context
    ) -> pb.RemoveDatasetVersionReferenceResponse:
        name = parse_name(request.name, VERSION)
        referrer = self._referrer(request.referrer)
        await self._run(
            self.store.version_rows.remove_reference,
            name["app"],
            name["dataset"],
            name["version"],
            referrer,
        )
        return pb.RemoveDatasetVersionReferenceResponse()

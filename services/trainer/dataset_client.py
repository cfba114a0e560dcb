"""Client of the dataset service: the trainer reads dataset versions only through its RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from loraforge.services.common.channels import (
    ChannelSecurity,
    aio_channel,
    service_key_refused,
    sync_channel,
)
from loraforge.services.common.errors import (
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    LoraforgeError,
    NotFound,
    Unavailable,
)
from loraforge.services.trainer.training import TrainingExample

READ_BATCH = 1000
PAGE = 1000
RPC_TIMEOUT = 30.0
# A whole dataset version's stream: long enough for millions of examples, bounded so a
# dataset service that stops answering fails the attempt instead of holding the worker.
READ_TIMEOUT = 3600.0


@dataclass(frozen=True)
class DatasetVersionInfo:
    name: str
    example_count: int
    content_sha256: str


def _reason(err: grpc.RpcError) -> str:
    """The dataset service's ErrorInfo reason of `err`, or ''."""
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError):
        return ""
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def _translate(err: grpc.RpcError, address: str, what: str, field: str) -> LoraforgeError:
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        # The dataset service's message names what is missing (the app, the dataset or the
        # version), so it is the message as it is.
        fallback = "DATASET_VERSION_NOT_FOUND" if "versions/" in what else "NOT_FOUND"
        return NotFound(
            details or f"{what} does not exist",
            reason=_reason(err) or fallback,
            field_violations=[FieldViolation(field, details or "does not exist")],
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(
            f"{what}: {details}", field_violations=[FieldViolation(field, details)]
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"{what}: {details}")
    refused = service_key_refused(err, f"the dataset service at {address}", what)
    if refused is not None:
        return refused
    if code == grpc.StatusCode.DATA_LOSS:  # the version's data is gone: retrying cannot help
        return DataLoss(
            details or f"{what}: its data is lost",
            reason=_reason(err) or "DATASET_VERSION_DATA_LOSS",
        )
    return Unavailable(
        f"the dataset service at {address} did not answer for {what} ({code.name}: {details}); retry later",
        reason="DATASET_SERVICE_UNAVAILABLE",
    )


def _check_configured(address: str) -> None:
    if not address:
        raise Unavailable(
            "the trainer has no dataset service address; set --dataset-address or LORAFORGE_DATASET_ADDRESS",
            reason="DATASET_SERVICE_NOT_CONFIGURED",
        )


class AsyncDatasetClient:
    """Used by the trainer's server: resolve a dataset version, hold and drop references to it."""

    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        self.address = address
        # TLS and the trainer's own key (`security_from(config)`); none: plaintext, no key.
        self.security = security or ChannelSecurity()
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> pb_grpc.DatasetServiceAsyncStub:
        _check_configured(self.address)
        if self._channel is None:
            self._channel = aio_channel(self.address, self.security)
        return pb_grpc.DatasetServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def check_app(self, app: str, field: str) -> None:
        try:
            await self._stub().GetApp(pb.GetAppRequest(name=app), timeout=RPC_TIMEOUT)
        except grpc.RpcError as err:
            raise _translate(err, self.address, f"app {app!r}", field) from None

    async def get_ready_version(self, name: str, field: str) -> DatasetVersionInfo:
        try:
            resp = await self._stub().GetDatasetVersion(
                pb.GetDatasetVersionRequest(name=name), timeout=RPC_TIMEOUT
            )
        except grpc.RpcError as err:
            raise _translate(err, self.address, f"dataset version {name!r}", field) from None
        version = resp.dataset_version
        if version.state != pb.DATASET_VERSION_STATE_READY:
            state = pb.DatasetVersionState.Name(version.state)
            why = f": {version.failure_reason}" if version.failure_reason else ""
            raise FailedPrecondition(
                f"dataset version {name!r} is {state}{why}; only a READY version can be trained on",
                reason="DATASET_VERSION_NOT_READY",
                field_violations=[FieldViolation(field, f"is {state}, not READY")],
            )
        return DatasetVersionInfo(name, version.stats.example_count, version.content_sha256)

    async def read_inputs(self, name: str, field: str) -> AsyncIterator[pb.Input]:
        """Streams a READY dataset version's inputs in their frozen order (evaluations read it)."""
        try:
            async for batch in self._stub().ReadDatasetVersion(
                pb.ReadDatasetVersionRequest(name=name, batch_size=READ_BATCH),
                timeout=READ_TIMEOUT,
            ):
                for inp in batch.inputs:
                    yield inp
        except grpc.RpcError as err:
            raise _translate(err, self.address, f"dataset version {name!r}", field) from None

    async def add_reference(self, name: str, referrer: str) -> None:
        try:
            await self._stub().AddDatasetVersionReference(
                pb.AddDatasetVersionReferenceRequest(name=name, referrer=referrer),
                timeout=RPC_TIMEOUT,
            )
        except grpc.RpcError as err:
            raise _translate(
                err, self.address, f"dataset version {name!r}", "dataset_version"
            ) from None

    async def referenced_versions(self) -> AsyncIterator[tuple[str, tuple[str, ...]]]:
        """Every dataset version that has references, with its referrers (all apps, all pages)."""
        stub = self._stub()

        def apps(token: str) -> Awaitable[Any]:
            return stub.ListApps(
                pb.ListAppsRequest(page_size=PAGE, page_token=token), timeout=RPC_TIMEOUT
            )

        async for app in self._pages(apps, "apps"):

            def datasets(token: str, parent: str = app.name) -> Awaitable[Any]:
                return stub.ListDatasets(
                    pb.ListDatasetsRequest(parent=parent, page_size=PAGE, page_token=token),
                    timeout=RPC_TIMEOUT,
                )

            async for dataset in self._pages(datasets, "datasets"):

                def versions(token: str, parent: str = dataset.name) -> Awaitable[Any]:
                    return stub.ListDatasetVersions(
                        pb.ListDatasetVersionsRequest(
                            parent=parent, page_size=PAGE, page_token=token
                        ),
                        timeout=RPC_TIMEOUT,
                    )

                async for version in self._pages(versions, "dataset_versions"):
                    if version.referenced_by:
                        yield version.name, tuple(version.referenced_by)

    async def _pages(self, call: Callable[[str], Awaitable[Any]], items: str) -> AsyncIterator[Any]:
        token = ""
        while True:
            try:
                response = await call(token)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return  # deleted while we listed it: nothing of it is referenced
                raise _translate(err, self.address, items, items) from None
            for item in getattr(response, items):
                yield item
            token = response.next_page_token
            if not token:
                return

    async def remove_reference(self, name: str, referrer: str) -> None:
        try:
            await self._stub().RemoveDatasetVersionReference(
                pb.RemoveDatasetVersionReferenceRequest(name=name, referrer=referrer),
                timeout=RPC_TIMEOUT,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return  # the version is gone already; nothing left to release
            raise _translate(
                err, self.address, f"dataset version {name!r}", "dataset_version"
            ) from None


def _example(inp: pb.Input) -> TrainingExample:
    ref = f"{inp.name} (line {inp.source_line})" if inp.source_line else inp.name
    return TrainingExample(
        prompt=inp.example.prompt,
        completion=inp.example.completion,
        is_text=inp.example.kind == pb.EXAMPLE_KIND_TEXT,
        ref=ref,
    )


def read_examples(
    address: str, name: str, security: ChannelSecurity | None = None
) -> Iterator[TrainingExample]:
    """Streams a READY dataset version's examples in their frozen order (used by workers).

    `security`: TLS and the worker's own key (`security_from(config)`)."""
    _check_configured(address)
    with sync_channel(address, security or ChannelSecurity()) as channel:
        stub = pb_grpc.DatasetServiceStub(channel)
        try:
            for batch in stub.ReadDatasetVersion(
                pb.ReadDatasetVersionRequest(name=name, batch_size=READ_BATCH),
                timeout=READ_TIMEOUT,
            ):
                for inp in batch.inputs:
                    yield _example(inp)
        except grpc.RpcError as err:
            raise _translate(err, address, f"dataset version {name!r}", "dataset_version") from None

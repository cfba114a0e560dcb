"""The error interceptor, exercised through a real server and channel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from loraforge.services.common import errors
from loraforge.services.common.server import ServiceBinding, create_server


class RaisingServicer(pb_grpc.DatasetServiceServicer):
    """Raises a different error per RPC, to check each mapping end to end."""

    async def GetApp(self, request: pb.GetAppRequest, context: object) -> pb.GetAppResponse:
        raise errors.NotFound(f"app {request.name!r} does not exist", reason="APP_NOT_FOUND")

    async def CreateApp(
        self, request: pb.CreateAppRequest, context: object
    ) -> pb.CreateAppResponse:
        raise errors.invalid_field("app_id", "must be lowercase", reason="INVALID_ID")

    async def DeleteApp(
        self, request: pb.DeleteAppRequest, context: object
    ) -> pb.DeleteAppResponse:
        raise errors.FailedPrecondition("app has datasets; pass force", metadata={"datasets": "2"})

    async def ListApps(self, request: pb.ListAppsRequest, context: object) -> pb.ListAppsResponse:
        raise KeyError("secret internal detail")

    async def UpdateApp(
        self, request: pb.UpdateAppRequest, context: object
    ) -> pb.UpdateAppResponse:
        # Far more than gRPC's response headers hold: every element bad, every text long.
        raise errors.InvalidArgument(
            "é" * 100_000,
            field_violations=[
                errors.FieldViolation(f"items[{i}].{'deep.' * 200}name", "is bad " * 1000)
                for i in range(100_000)
            ],
            metadata={f"key{i}": "v" * 10_000 for i in range(100)},
        )

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: object
    ) -> pb.DeleteDatasetResponse:
        raise NotImplementedError("a code path nobody finished")

    async def ReadDatasetVersion(
        self, request: pb.ReadDatasetVersionRequest, context: object
    ) -> AsyncIterator[pb.ReadDatasetVersionResponse]:
        yield pb.ReadDatasetVersionResponse()
        raise errors.Unavailable("snapshot store went away")


@pytest.fixture
def stub() -> object:
    loop = asyncio.new_event_loop()
    binding = ServiceBinding(
        "loraforge.dataset.v1.DatasetService",
        RaisingServicer(),
        pb_grpc.add_DatasetServiceServicer_to_server,
    )
    running = loop.run_until_complete(create_server([binding]))
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield pb_grpc.DatasetServiceStub(channel)
    channel.close()
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _details(
    err: grpc.RpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    info = bad = None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    return info, bad


def test_not_found_maps_to_not_found_with_error_info(stub: pb_grpc.DatasetServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetApp(pb.GetAppRequest(name="apps/x"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert "apps/x" in exc.value.details()
    info, _ = _details(exc.value)
    assert info is not None and info.reason == "APP_NOT_FOUND"


def test_invalid_field_carries_a_bad_request_field_violation(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.CreateApp(pb.CreateAppRequest(app_id="BAD"))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, bad = _details(exc.value)
    assert bad is not None
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("app_id", "must be lowercase")
    ]


def test_an_error_with_huge_details_stays_invalid_argument_with_the_first_violations(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    """Past gRPC's limit on response headers a caller would get RESOURCE_EXHAUSTED and no
    details: the status is cut to fit, the first violations kept and the rest counted."""
    with pytest.raises(grpc.RpcError) as exc:
        stub.UpdateApp(pb.UpdateAppRequest())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("é" * 100)
    assert "more characters" in exc.value.details()
    info, bad = _details(exc.value)
    assert info is not None and bad is not None
    assert 1 < len(bad.field_violations) <= errors.MAX_FIELD_VIOLATIONS + 1
    assert bad.field_violations[0].field.startswith("items[0].")
    assert "more problems like these" in bad.field_violations[-1].description


def test_failed_precondition_keeps_metadata(stub: pb_grpc.DatasetServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.DeleteApp(pb.DeleteAppRequest(name="apps/x"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = _details(exc.value)
    assert info is not None and info.metadata["datasets"] == "2"


def test_unexpected_error_is_internal_without_leaking_details_and_logged_once(
    stub: pb_grpc.DatasetServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="loraforge.rpc"),
        pytest.raises(grpc.RpcError) as exc,
    ):
        stub.ListApps(pb.ListAppsRequest())
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in exc.value.details() and "Traceback" not in exc.value.details()
    info, _ = _details(exc.value)
    assert info is not None and info.metadata["incident"] in exc.value.details()
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "KeyError" in caplog.text


def test_error_mid_stream_ends_the_stream_with_its_code(stub: pb_grpc.DatasetServiceStub) -> None:
    stream = stub.ReadDatasetVersion(pb.ReadDatasetVersionRequest(name="x"))
    assert next(stream) == pb.ReadDatasetVersionResponse()
    with pytest.raises(grpc.RpcError) as exc:
        next(stream)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unimplemented_method_answers_unimplemented(stub: pb_grpc.DatasetServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.GetDataset(pb.GetDatasetRequest(name="apps/a/datasets/d"))
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_not_implemented_error_inside_a_method_is_internal_not_unimplemented(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.DeleteDataset(pb.DeleteDatasetRequest(name="apps/a/datasets/d"))
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "nobody finished" not in exc.value.details()

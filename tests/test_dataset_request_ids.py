"""Request ids through a real DatasetService: a retried create returns what the first did.

AddInputs, UploadInputs and CreateDatasetVersion take a `request_id`; a retry with the same
id in the same app answers with the first call's result, stored in the service's database
(SQLite, and PostgreSQL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from tests.support import Databases, ServiceProcess, channel, start_service, wait_until
from tests.test_dataset_upload import all_inputs, bad_request, jsonl, upload


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, databases: Databases
) -> Iterator[ServiceProcess]:
    svc = start_service(
        "loraforge.services.dataset",
        tmp_path_factory.mktemp("dataset"),
        args=["--database-url", databases.url("dataset")],
    )
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> pb_grpc.DatasetServiceStub:
    return pb_grpc.DatasetServiceStub(channel(service.address))


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def dataset(stub: pb_grpc.DatasetServiceStub) -> str:
    app = f"rid-{next(_counter)}"
    stub.CreateApp(pb.CreateAppRequest(app_id=app))
    stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id="d"))
    return f"apps/{app}/datasets/d"


def add(
    stub: pb_grpc.DatasetServiceStub, dataset: str, request_id: str, *texts: str
) -> list[pb.Input]:
    request = pb.AddInputsRequest(
        parent=dataset,
        inputs=[pb.NewInput(example=pb.Example(prompt=t, completion="c")) for t in texts],
        request_id=request_id,
    )
    return list(stub.AddInputs(request).inputs)


def input_count(stub: pb_grpc.DatasetServiceStub, dataset: str) -> int:
    return stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count


def test_add_inputs_retried_with_its_request_id_returns_the_first_inputs_and_adds_none(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    first = add(stub, dataset, "req-1", "a", "b")
    again = add(stub, dataset, "req-1", "a", "b")
    assert again == first
    assert input_count(stub, dataset) == 2
    # Without a request id, or with another one, the same examples are added again.
    add(stub, dataset, "", "a")
    add(stub, dataset, "req-2", "a")
    assert input_count(stub, dataset) == 4


def test_a_retry_after_some_inputs_were_deleted_returns_the_ones_left(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    first = add(stub, dataset, "req", "a", "b", "c")
    stub.DeleteInputs(pb.DeleteInputsRequest(parent=dataset, names=[first[1].name]))
    assert add(stub, dataset, "req", "a", "b", "c") == [first[0], first[2]]
    assert input_count(stub, dataset) == 2


def test_concurrent_add_inputs_with_one_request_id_store_the_inputs_once(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    start = threading.Barrier(4)

    def call(_: int) -> list[str]:
        start.wait()
        return [i.name for i in add(stub, dataset, "race", *(f"p{k}" for k in range(200)))]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert all(r == results[0] for r in results)
    assert input_count(stub, dataset) == 200


def test_request_ids_are_scoped_per_app(stub: pb_grpc.DatasetServiceStub) -> None:
    names = []
    for app in ("scope-a", "scope-b"):
        stub.CreateApp(pb.CreateAppRequest(app_id=app))
        stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id="d"))
        names.append(f"apps/{app}/datasets/d")
    a = add(stub, names[0], "shared-id", "x")
    b = add(stub, names[1], "shared-id", "x")
    assert a[0].name.startswith(names[0]) and b[0].name.startswith(names[1])
    assert [input_count(stub, n) for n in names] == [1, 1]


def test_a_request_id_reused_for_another_call_is_invalid_argument_naming_the_first(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    app = dataset.rsplit("/datasets/", 1)[0]
    stub.CreateDataset(pb.CreateDatasetRequest(parent=app, dataset_id="other"))
    add(stub, dataset, "once", "a")
    attempts = [
        (
            "request_id",
            lambda: add(stub, f"{app}/datasets/other", "once", "a"),
        ),
        (
            "request_id",
            lambda: stub.CreateDatasetVersion(
                pb.CreateDatasetVersionRequest(parent=dataset, request_id="once")
            ),
        ),
        (
            "header.request_id",
            lambda: upload(stub, dataset, jsonl({"text": "t"}), "f.jsonl", request_id="once"),
        ),
    ]
    for field, attempt in attempts:
        with pytest.raises(grpc.RpcError) as caught:
            attempt()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value) == ("REQUEST_ID_REUSED", [field])
        assert f"AddInputs on `{dataset}`" in caught.value.details()
    assert input_count(stub, dataset) == 1


@pytest.mark.parametrize("bad", ["x" * 201, "has space", "tab\there"])
def test_a_malformed_request_id_is_refused_with_a_field_violation(
    stub: pb_grpc.DatasetServiceStub, dataset: str, bad: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        add(stub, dataset, bad, "a")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request(caught.value) == ("INVALID_REQUEST_ID", ["request_id"])


def test_an_upload_retried_with_its_request_id_returns_the_first_report_and_stores_nothing(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    data = jsonl(
        {"prompt": "p1", "completion": "c"}, {"prompt": "p2"}, {"prompt": "p3", "completion": "c"}
    )
    first = upload(stub, dataset, data, "f.jsonl", request_id="up-1")
    assert (first.rows_accepted, first.rows_rejected) == (2, 1) and first.row_errors
    again = upload(stub, dataset, data, "f.jsonl", request_id="up-1")
    assert again == first
    assert len(all_inputs(stub, dataset)) == 2


def test_an_upload_that_failed_frees_its_request_id_for_the_retry(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        upload(stub, dataset, b"", "empty.jsonl", request_id="up-2")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    report = upload(stub, dataset, jsonl({"text": "t"}), "f.jsonl", request_id="up-2")
    assert report.rows_accepted == 1 and input_count(stub, dataset) == 1


def test_a_retry_while_the_first_upload_runs_is_aborted_then_gets_its_report(
    stub: pb_grpc.DatasetServiceStub, dataset: str, service: ServiceProcess
) -> None:
    release = threading.Event()

    def held_open() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(
            header=pb.UploadHeader(dataset=dataset, file_name="f.jsonl", request_id="up-3")
        )
        yield pb.UploadInputsRequest(chunk=jsonl({"text": "one"}))
        release.wait()

    future = stub.UploadInputs.future(held_open())
    try:
        assert wait_until(lambda: f"into {dataset} started" in service.log())
        with pytest.raises(grpc.RpcError) as caught:
            upload(stub, dataset, jsonl({"text": "one"}), "f.jsonl", request_id="up-3")
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert bad_request(caught.value)[0] == "REQUEST_IN_PROGRESS"
    finally:
        release.set()
    first = future.result(timeout=60)
    assert upload(stub, dataset, jsonl({"text": "one"}), "f.jsonl", request_id="up-3") == first
    assert input_count(stub, dataset) == 1


def test_create_version_retried_with_its_request_id_returns_the_first_version(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    add(stub, dataset, "", "a")
    first = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, request_id="ver-1")
    ).dataset_version
    assert first.state == pb.DATASET_VERSION_STATE_READY
    add(stub, dataset, "", "b")
    again = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, request_id="ver-1")
    ).dataset_version
    assert again == first and again.stats.example_count == 1
    listed = stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(parent=dataset))
    assert [v.name for v in listed.dataset_versions] == [first.name]
    # A chosen version id is no clash for the retry of the call that created it.
    named = pb.CreateDatasetVersionRequest(parent=dataset, version_id="v9", request_id="ver-2")
    assert (
        stub.CreateDatasetVersion(named).dataset_version
        == stub.CreateDatasetVersion(named).dataset_version
    )


def test_a_retry_of_a_version_deleted_since_is_not_found_and_says_so(
    stub: pb_grpc.DatasetServiceStub, dataset: str
) -> None:
    add(stub, dataset, "", "a")
    request = pb.CreateDatasetVersionRequest(parent=dataset, request_id="ver-3")
    version = stub.CreateDatasetVersion(request).dataset_version
    stub.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(name=version.name))
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateDatasetVersion(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "deleted since" in caught.value.details() and "new request_id" in caught.value.details()


def test_request_ids_survive_a_restart_and_go_with_their_dataset(tmp_path: Path) -> None:
    workdir = tmp_path / "svc"
    svc = start_service("loraforge.services.dataset", workdir)
    try:
        stub = pb_grpc.DatasetServiceStub(channel(svc.address))
        stub.CreateApp(pb.CreateAppRequest(app_id="a"))
        stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/a", dataset_id="d"))
        first = add(stub, "apps/a/datasets/d", "durable", "x")
    finally:
        svc.stop()
    svc = start_service("loraforge.services.dataset", workdir)
    try:
        stub = pb_grpc.DatasetServiceStub(channel(svc.address))
        assert add(stub, "apps/a/datasets/d", "durable", "x") == first
        assert input_count(stub, "apps/a/datasets/d") == 1
        stub.DeleteDataset(pb.DeleteDatasetRequest(name="apps/a/datasets/d"))
        stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/a", dataset_id="d"))
        assert add(stub, "apps/a/datasets/d", "durable", "x") != first
    finally:
        svc.stop()

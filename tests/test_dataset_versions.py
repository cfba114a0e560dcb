"""Dataset versions through a real DatasetService: stats, immutability, references, restarts."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from tests.support import ServiceProcess, channel, start_service

FORMATS = Path("/work/shared/formats")
if not FORMATS.exists():
    FORMATS = Path(__file__).resolve().parents[2] / "shared" / "formats"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "svc"


@pytest.fixture
def service(workdir: Path) -> Iterator[ServiceProcess]:
    svc = start_service("loraforge.services.dataset", workdir)
    yield svc
    svc.stop()


def stub_for(svc: ServiceProcess) -> pb_grpc.DatasetServiceStub:
    return pb_grpc.DatasetServiceStub(channel(svc.address))


def make_dataset(stub: pb_grpc.DatasetServiceStub, app: str = "a", dataset: str = "d") -> str:
    stub.CreateApp(pb.CreateAppRequest(app_id=app))
    stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id=dataset))
    return f"apps/{app}/datasets/{dataset}"


def upload_file(
    stub: pb_grpc.DatasetServiceStub, dataset: str, path: Path
) -> pb.UploadInputsResponse:
    data = path.read_bytes()
    messages = [
        pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name=path.name)),
        pb.UploadInputsRequest(chunk=data),
    ]
    return stub.UploadInputs(iter(messages))


def add(stub: pb_grpc.DatasetServiceStub, dataset: str, *pairs: tuple[str, str]) -> list[pb.Input]:
    inputs = [pb.NewInput(example=pb.Example(prompt=p, completion=c)) for p, c in pairs]
    return list(stub.AddInputs(pb.AddInputsRequest(parent=dataset, inputs=inputs)).inputs)


def read_all(stub: pb_grpc.DatasetServiceStub, name: str, batch_size: int = 0) -> list[pb.Input]:
    out: list[pb.Input] = []
    for response in stub.ReadDatasetVersion(
        pb.ReadDatasetVersionRequest(name=name, batch_size=batch_size)
    ):
        out += response.inputs
    return out


def test_a_version_freezes_the_inputs_with_stats(service: ServiceProcess, workdir: Path) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    upload_file(stub, dataset, FORMATS / "portal_instruction_human_assistant.csv")
    upload_file(stub, dataset, FORMATS / "portal_llama3_chat.csv")
    stub.AddInputs(
        pb.AddInputsRequest(
            parent=dataset, inputs=[pb.NewInput(example=pb.Example(completion="plain"))]
        )
    )
    version = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1", description="first cut")
    ).dataset_version
    assert version.name == f"{dataset}/versions/v1"
    assert version.state == pb.DATASET_VERSION_STATE_READY and version.status_code == 64015
    stats = version.stats
    assert stats.example_count == 22
    assert dict(stats.examples_by_format) == {
        "SOURCE_FORMAT_PORTAL_CSV": 21,
        "SOURCE_FORMAT_STRUCTURED": 1,
    }
    assert dict(stats.examples_by_kind) == {
        "EXAMPLE_KIND_PROMPT_COMPLETION": 21,
        "EXAMPLE_KIND_TEXT": 1,
    }
    examples = read_all(stub, version.name, batch_size=5)
    completions = sorted(len(i.example.completion) for i in examples)
    prompts = sorted(len(i.example.prompt) for i in examples)
    assert (stats.completion_chars.min, stats.completion_chars.max) == (
        completions[0],
        completions[-1],
    )
    assert stats.completion_chars.median == completions[(len(completions) - 1) // 2]
    assert stats.prompt_chars.min == 0 and stats.prompt_chars.max == prompts[-1]
    assert stats.prompt_chars.p95 == prompts[20]  # nearest rank: ceil(0.95 * 22) = 21st
    # The snapshot is content-addressed gzip JSONL in the dataset service's prefix.
    assert (
        version.snapshot_key
        == f"datasets/snapshots/{version.content_sha256[:2]}/{version.content_sha256}.jsonl.gz"
    )
    stored = (workdir / "home" / "objects" / version.snapshot_key).read_bytes()
    assert stats.snapshot_bytes == len(stored)
    content = gzip.decompress(stored)
    assert hashlib.sha256(content).hexdigest() == version.content_sha256
    assert [json.loads(line)["completion"] for line in content.splitlines()] == [
        i.example.completion for i in examples
    ]
    assert [i.name for i in examples] == [
        i.name for i in stub.ListInputs(pb.ListInputsRequest(parent=dataset, page_size=100)).inputs
    ]


def test_versions_are_immutable_when_inputs_change_afterwards(service: ServiceProcess) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    first = add(stub, dataset, ("q1", "a1"), ("q2", "a2"))
    v1 = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1")
    ).dataset_version
    before = read_all(stub, v1.name)

    add(stub, dataset, ("q3", "a3"))
    stub.DeleteInputs(pb.DeleteInputsRequest(parent=dataset, names=[first[0].name]))
    v2 = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v2")
    ).dataset_version

    again = stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=v1.name)).dataset_version
    assert again == v1
    assert read_all(stub, v1.name) == before
    assert [(i.example.prompt, i.example.completion) for i in before] == [
        ("q1", "a1"),
        ("q2", "a2"),
    ]
    assert [i.example.prompt for i in read_all(stub, v2.name)] == ["q2", "q3"]
    assert v2.content_sha256 != v1.content_sha256 and v2.stats.example_count == 2
    listed = stub.ListDatasetVersions(
        pb.ListDatasetVersionsRequest(parent=dataset)
    ).dataset_versions
    assert [v.name for v in listed] == [v1.name, v2.name]
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.version_count == 2


def test_versions_survive_a_restart_and_a_tampered_snapshot_is_caught(workdir: Path) -> None:
    svc = start_service("loraforge.services.dataset", workdir)
    try:
        stub = stub_for(svc)
        dataset = make_dataset(stub)
        upload_file(stub, dataset, FORMATS / "portal_llama3_chat.csv")
        version = stub.CreateDatasetVersion(
            pb.CreateDatasetVersionRequest(parent=dataset)
        ).dataset_version
        assert version.name.startswith(f"{dataset}/versions/")
        before = read_all(stub, version.name)
    finally:
        assert svc.stop() == 0
    svc = start_service("loraforge.services.dataset", workdir)
    try:
        stub = stub_for(svc)
        assert (
            stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=version.name)).dataset_version
            == version
        )
        assert read_all(stub, version.name) == before
        assert len(before) == 11
        # Flip one stored byte: the read must fail instead of handing the trainer wrong data.
        path = workdir / "home" / "objects" / version.snapshot_key
        data = gzip.decompress(path.read_bytes()).replace(b"gato", b"gata", 1)
        path.write_bytes(gzip.compress(data))
        with pytest.raises(grpc.RpcError) as caught:
            read_all(stub, version.name)
        assert caught.value.code() == grpc.StatusCode.DATA_LOSS
        assert "create a new version" in caught.value.details()
    finally:
        svc.stop()


def test_a_version_cut_off_by_a_crash_is_failed_after_restart(workdir: Path) -> None:
    svc = start_service("loraforge.services.dataset", workdir)
    try:
        stub = stub_for(svc)
        dataset = make_dataset(stub)
        add(stub, dataset, ("q", "a"))
        stub.CreateDatasetVersion(pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1"))
    finally:
        svc.stop()
    # What a crash mid-write leaves behind: a version still marked in progress.
    with sqlite3.connect(workdir / "home" / "dataset.db") as db:
        db.execute("UPDATE versions SET state = 2, stats = NULL WHERE version_id = 'v1'")
    svc = start_service("loraforge.services.dataset", workdir)
    try:
        stub = stub_for(svc)
        version = stub.GetDatasetVersion(
            pb.GetDatasetVersionRequest(name=f"{dataset}/versions/v1")
        ).dataset_version
        assert version.state == pb.DATASET_VERSION_STATE_FAILED and version.status_code == 64020
        assert "create a new version" in version.failure_reason
        with pytest.raises(grpc.RpcError) as caught:
            read_all(stub, version.name)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        svc.stop()


def test_a_referenced_version_cannot_be_deleted_until_released(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add(stub, dataset, ("q", "a"))
    version = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1")
    ).dataset_version
    referrer = "apps/a/models/m/versions/1"
    for _ in range(2):  # idempotent
        got = stub.AddDatasetVersionReference(
            pb.AddDatasetVersionReferenceRequest(name=version.name, referrer=referrer)
        ).dataset_version
        assert list(got.referenced_by) == [referrer]
    for call, request in [
        (stub.DeleteDatasetVersion, pb.DeleteDatasetVersionRequest(name=version.name)),
        (stub.DeleteDataset, pb.DeleteDatasetRequest(name=dataset)),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert referrer in caught.value.details()
    for _ in range(2):  # idempotent
        stub.RemoveDatasetVersionReference(
            pb.RemoveDatasetVersionReferenceRequest(name=version.name, referrer=referrer)
        )
    stub.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(name=version.name))
    assert not (workdir / "home" / "objects" / version.snapshot_key).exists()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=version.name))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_versions_with_the_same_content_share_one_snapshot(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add(stub, dataset, ("q", "a"))
    v1 = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1")
    ).dataset_version
    v2 = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v2")
    ).dataset_version
    assert v1.snapshot_key == v2.snapshot_key
    stub.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(name=v1.name))
    assert (workdir / "home" / "objects" / v2.snapshot_key).exists()
    assert len(read_all(stub, v2.name)) == 1
    stub.DeleteDataset(pb.DeleteDatasetRequest(name=dataset))
    assert not (workdir / "home" / "objects" / v2.snapshot_key).exists()


def test_version_requests_that_cannot_work_are_refused(service: ServiceProcess) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    cases = [
        (
            stub.CreateDatasetVersion,
            pb.CreateDatasetVersionRequest(parent=dataset),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            stub.CreateDatasetVersion,
            pb.CreateDatasetVersionRequest(parent=dataset, version_id="Bad Id"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            stub.GetDatasetVersion,
            pb.GetDatasetVersionRequest(name=f"{dataset}/versions/none"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            stub.GetDatasetVersion,
            pb.GetDatasetVersionRequest(name=f"{dataset}/version/x"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            stub.AddDatasetVersionReference,
            pb.AddDatasetVersionReferenceRequest(name=f"{dataset}/versions/none", referrer="x"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            stub.ListDatasetVersions,
            pb.ListDatasetVersionsRequest(parent=dataset, page_token="zz"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for call, request, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == code, request
    add(stub, dataset, ("q", "a"))
    version = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1")
    ).dataset_version
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateDatasetVersion(pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for referrer in ["", "has space", "x" * 600]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.AddDatasetVersionReference(
                pb.AddDatasetVersionReferenceRequest(name=version.name, referrer=referrer)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        read_all(stub, version.name, batch_size=-1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unwritable_storage_fails_the_version_with_a_cause_and_a_remedy(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add(stub, dataset, ("q", "a"))
    # A file where the snapshots' folder belongs: the object store cannot write there.
    in_the_way = workdir / "home" / "objects" / "datasets" / "snapshots"
    in_the_way.parent.mkdir(parents=True, exist_ok=True)
    in_the_way.write_text("a file")
    version = stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1")
    ).dataset_version
    assert version.state == pb.DATASET_VERSION_STATE_FAILED and version.status_code == 64020
    assert version.failure_reason == (
        "the object store did not take the snapshot; check that it is reachable and has room, "
        "then create the version again"
    )
    assert "could not publish snapshot" in service.log()  # the cause is in the server log


def test_an_unexpected_error_while_writing_a_version_is_internal_with_an_incident(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add(stub, dataset, ("q", "a"))
    # A row no code path can write: freezing it fails in a way nobody planned for.
    with sqlite3.connect(workdir / "home" / "dataset.db") as db:
        db.execute("UPDATE inputs SET kind = 99")
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateDatasetVersion(pb.CreateDatasetVersionRequest(parent=dataset, version_id="v1"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "INTERNAL"
    incident = info.metadata["incident"]
    assert incident in caught.value.details() and incident in service.log()
    assert "ExampleKind" not in caught.value.details()
    # The version is not left in progress: it says what happened and can be deleted.
    version = stub.GetDatasetVersion(
        pb.GetDatasetVersionRequest(name=f"{dataset}/versions/v1")
    ).dataset_version
    assert version.state == pb.DATASET_VERSION_STATE_FAILED
    assert "ExampleKind" not in version.failure_reason and "99" not in version.failure_reason
    assert "create the version again" in version.failure_reason
    stub.DeleteDatasetVersion(pb.DeleteDatasetVersionRequest(name=version.name))


def test_a_retry_after_a_crash_mid_build_builds_the_version_it_asked_for(tmp_path: Path) -> None:
    from tests.support import s3_server, wait_until
    from tests.test_dataset_integrity import HangingProxy, add_examples, make_dataset

    with s3_server() as s3:
        proxy = HangingProxy(s3.endpoint)
        # The store never answers while hung, and the service waits for it: the build is
        # under way when the process is killed.
        url = f"s3://loraforge/?endpoint={proxy.endpoint}&secure=false&retries=0"
        args = ["--object-store-url", url, "--lease-seconds", "2"]
        svc = start_service("loraforge.services.dataset", tmp_path / "svc", args=args)
        restarted: ServiceProcess | None = None
        try:
            stub = stub_for(svc)
            dataset = make_dataset(stub)
            add_examples(stub, dataset, 10)
            name = f"{dataset}/versions/v1"
            request = pb.CreateDatasetVersionRequest(
                parent=dataset, version_id="v1", request_id="build-v1"
            )
            proxy.hung.set()
            pending = stub.CreateDatasetVersion.future(request, timeout=300)

            def state(stub: pb_grpc.DatasetServiceStub) -> int:
                try:
                    version = stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=name))
                except grpc.RpcError as err:  # not created yet
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
                    return 0
                return int(version.dataset_version.state)

            assert wait_until(lambda: state(stub) == pb.DATASET_VERSION_STATE_IN_PROGRESS, 120)
            svc.proc.kill()
            svc.proc.wait(timeout=60)
            with pytest.raises(grpc.RpcError):
                pending.result()
            proxy.hung.clear()
            restarted = start_service(
                "loraforge.services.dataset", tmp_path / "svc", args=args, name="restarted"
            )
            stub = stub_for(restarted)
            # The next start finds the build cut off and fails the version.
            assert wait_until(lambda: state(stub) == pb.DATASET_VERSION_STATE_FAILED, 120)
            retried = stub.CreateDatasetVersion(request, timeout=300).dataset_version
            assert retried.name == name
            assert retried.state == pb.DATASET_VERSION_STATE_READY, retried.failure_reason
            assert retried.stats.example_count == 10
            rows = [
                i
                for batch in stub.ReadDatasetVersion(pb.ReadDatasetVersionRequest(name=name))
                for i in batch.inputs
            ]
            assert len(rows) == 10
            # Once built, the request id answers with the version as it is.
            again = stub.CreateDatasetVersion(request).dataset_version
            assert again.state == pb.DATASET_VERSION_STATE_READY
            assert again.content_sha256 == retried.content_sha256
        finally:
            svc.stop()
            if restarted is not None:
                restarted.stop()
            proxy.close()

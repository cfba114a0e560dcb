"""A dataset service that never hands out damaged data or leaves work behind: snapshots
checked before any row is read, uploads that stop when their client goes away, bounded
shutdown, leftover temporary files, and object-store calls with deadlines."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from loraforge.services.common.errors import DataLoss, Unavailable
from loraforge.services.trainer.dataset_client import read_examples
from tests.support import ServiceProcess, channel, free_port, s3_server, start_service, wait_until

DATASET = "loraforge.services.dataset"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "svc"


@pytest.fixture
def service(workdir: Path) -> Iterator[ServiceProcess]:
    svc = start_service(DATASET, workdir)
    yield svc
    svc.stop()


def stub_for(svc: ServiceProcess) -> pb_grpc.DatasetServiceStub:
    return pb_grpc.DatasetServiceStub(channel(svc.address))


def make_dataset(stub: pb_grpc.DatasetServiceStub, app: str = "a") -> str:
    stub.CreateApp(pb.CreateAppRequest(app_id=app))
    stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id="d"))
    return f"apps/{app}/datasets/d"


def add_examples(stub: pb_grpc.DatasetServiceStub, dataset: str, count: int) -> None:
    inputs = [
        pb.NewInput(example=pb.Example(prompt=f"question {i}", completion=f"answer {i} " * 20))
        for i in range(count)
    ]
    stub.AddInputs(pb.AddInputsRequest(parent=dataset, inputs=inputs))


def create_version(
    stub: pb_grpc.DatasetServiceStub, dataset: str, version_id: str
) -> pb.DatasetVersion:
    return stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=dataset, version_id=version_id)
    ).dataset_version


def error_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def jsonl_rows(count: int) -> bytes:
    return "".join(
        json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(count)
    ).encode()


# Snapshots


def test_a_truncated_snapshot_is_data_loss_before_any_row_and_fails_the_version(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add_examples(stub, dataset, 2000)
    version = create_version(stub, dataset, "v1")
    path = workdir / "home" / "objects" / version.snapshot_key
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    received: list[pb.Input] = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in stub.ReadDatasetVersion(
            pb.ReadDatasetVersionRequest(name=version.name, batch_size=100)
        ):
            received += response.inputs
    assert received == []  # nothing of a damaged snapshot reaches the reader
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert error_reason(caught.value) == "SNAPSHOT_DAMAGED"
    details = caught.value.details()
    assert version.name in details and "create a new version" in details
    # The version no longer claims to be ready; it says what happened and what to do.
    again = stub.GetDatasetVersion(pb.GetDatasetVersionRequest(name=version.name)).dataset_version
    assert again.state == pb.DATASET_VERSION_STATE_FAILED
    assert "create a new version" in again.failure_reason


def test_a_deleted_snapshot_is_data_loss_naming_the_version(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add_examples(stub, dataset, 10)
    version = create_version(stub, dataset, "v1")
    (workdir / "home" / "objects" / version.snapshot_key).unlink()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ReadDatasetVersion(pb.ReadDatasetVersionRequest(name=version.name)))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert error_reason(caught.value) == "SNAPSHOT_MISSING"
    assert version.name in caught.value.details()
    assert "inputs are intact" in caught.value.details()


def test_a_new_version_of_an_unchanged_dataset_rewrites_a_damaged_snapshot(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add_examples(stub, dataset, 500)
    v1 = create_version(stub, dataset, "v1")
    path = workdir / "home" / "objects" / v1.snapshot_key
    good = path.read_bytes()
    path.write_bytes(good[:-100])

    v2 = create_version(stub, dataset, "v2")
    assert v2.state == pb.DATASET_VERSION_STATE_READY
    assert v2.snapshot_key == v1.snapshot_key  # same content, same key: rewritten, not reused
    assert path.read_bytes() == good
    rows = [
        i
        for r in stub.ReadDatasetVersion(pb.ReadDatasetVersionRequest(name=v2.name))
        for i in r.inputs
    ]
    assert len(rows) == 500


def test_the_trainer_reading_a_damaged_version_gets_data_loss_not_a_retry_later(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    add_examples(stub, dataset, 50)
    version = create_version(stub, dataset, "v1")
    path = workdir / "home" / "objects" / version.snapshot_key
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataLoss) as caught:
        list(read_examples(service.address, version.name))
    # A worker retries only Unavailable; this one must fail the run once, saying what to do.
    assert not isinstance(caught.value, Unavailable)
    assert caught.value.reason == "SNAPSHOT_DAMAGED"
    assert "did not answer" not in caught.value.message
    assert version.name in caught.value.message and "create a new version" in caught.value.message


# Uploads and shutdown


def committed_rows(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute("SELECT count(*) FROM inputs").fetchone()[0]


def upload_states(database: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return [r[0] for r in db.execute("SELECT state FROM uploads ORDER BY pk")]


ROWS_IN_ONE_MESSAGE = 1_500_000


def test_an_upload_cancelled_inside_one_large_message_stops_and_rolls_back(
    service: ServiceProcess, workdir: Path
) -> None:
    stub = stub_for(service)
    dataset = make_dataset(stub)
    database = workdir / "home" / "dataset.db"
    data = jsonl_rows(ROWS_IN_ONE_MESSAGE)
    assert len(data) < 64 << 20
    release = threading.Event()

    def requests() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="big.jsonl"))
        yield pb.UploadInputsRequest(chunk=data)  # the whole file in one message
        release.wait()

    future = stub.UploadInputs.future(requests())
    try:
        assert wait_until(lambda: committed_rows(database) > 0), "no rows were committed"
        # Stored in parts, but seen by no one until the upload is done.
        assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 0
        assert not stub.ListInputs(pb.ListInputsRequest(parent=dataset)).inputs
        future.cancel()
        assert wait_until(lambda: upload_states(database) == ["FAILED"]), upload_states(database)
    finally:
        release.set()
    assert committed_rows(database) == 0
    assert wait_until(lambda: "failed; removed the" in service.log()), service.log()
    found = re.search(r"failed; removed the (\d+) inputs", service.log())
    assert found, service.log()
    # It stopped within a batch or two of the cancel, not at the end of the message.
    assert int(found.group(1)) < ROWS_IN_ONE_MESSAGE // 2
    assert f"into {dataset}: " not in service.log()


def test_sigterm_during_an_upload_stops_the_process_and_undoes_the_upload(tmp_path: Path) -> None:
    grace = 3.0
    workdir = tmp_path / "svc"
    svc = start_service(
        DATASET,
        workdir,
        args=["--shutdown-grace-seconds", str(grace), "--lease-seconds", "2"],
    )
    stub = stub_for(svc)
    dataset = make_dataset(stub)
    database = workdir / "home" / "dataset.db"
    release = threading.Event()

    def requests() -> Iterator[pb.UploadInputsRequest]:
        yield pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="big.jsonl"))
        yield pb.UploadInputsRequest(chunk=jsonl_rows(ROWS_IN_ONE_MESSAGE))
        release.wait()  # the client is still sending when the server is told to stop

    future = stub.UploadInputs.future(requests())
    try:
        assert wait_until(lambda: committed_rows(database) > 0), "no rows were committed"
        svc.proc.send_signal(signal.SIGTERM)
        # It stops on its own, though the client goes on sending; the wait is a deadline.
        svc.proc.wait(timeout=grace + 120)
    finally:
        release.set()
        svc.stop()
    assert svc.proc.returncode == 0, svc.log()
    with pytest.raises(grpc.RpcError):
        future.result()
    # Nothing of the upload stays visible: undone at shutdown, or by the next start.
    svc = start_service(DATASET, workdir, args=["--lease-seconds", "2"], name="restarted")
    try:
        stub = stub_for(svc)
        assert wait_until(lambda: upload_states(database) == ["FAILED"]), upload_states(database)
        assert committed_rows(database) == 0
        assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 0
    finally:
        svc.stop()


def test_temporary_files_a_killed_server_left_are_removed_at_start(tmp_path: Path) -> None:
    workdir = tmp_path / "svc"
    scratch = workdir / "home" / "tmp" / "dataset"
    scratch.mkdir(parents=True)
    leftover = scratch / "snapshot-killed.jsonl.gz"
    leftover.write_bytes(b"half a snapshot")
    in_use = scratch / "snapshot-live.jsonl.gz"  # held by another running server
    in_use.write_bytes(b"being written")
    fresh = scratch / "read-fresh.jsonl.gz"  # just made, about to be locked
    fresh.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    for path in (leftover, in_use):
        os.utime(path, (an_hour_ago, an_hour_ago))
    with open(in_use, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        svc = start_service(DATASET, workdir)
        try:
            assert not leftover.exists()
            assert in_use.exists() and fresh.exists()
            assert "removed 1 temporary snapshot file" in svc.log()
        finally:
            svc.stop()


# Object store deadlines


class HangingProxy:
    """A TCP proxy to a real server that can be told to stop answering (a hung endpoint)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.hung = threading.Event()
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, dest: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.hung.is_set():
                continue  # swallowed: the endpoint takes requests and never answers
            try:
                dest.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


def test_a_hung_object_store_fails_the_version_saying_the_store_did_not_take_it(
    tmp_path: Path,
) -> None:
    with s3_server() as s3:
        proxy = HangingProxy(s3.endpoint)
        url = (
            f"s3://loraforge/?endpoint={proxy.endpoint}&secure=false"
            "&connect_timeout=2&read_timeout=1&retries=0"
        )
        svc = start_service(DATASET, tmp_path / "svc", args=["--object-store-url", url])
        try:
            stub = stub_for(svc)
            dataset = make_dataset(stub)
            add_examples(stub, dataset, 10)
            assert create_version(stub, dataset, "v1").state == pb.DATASET_VERSION_STATE_READY
            proxy.hung.set()
            # The call's own deadline is far beyond the store's timeouts: an answer at all
            # means the version's write gave up on the hung store, and it says so.
            version = stub.CreateDatasetVersion(
                pb.CreateDatasetVersionRequest(parent=dataset, version_id="v2"), timeout=120
            ).dataset_version
            assert version.state == pb.DATASET_VERSION_STATE_FAILED
            assert "object store did not take the snapshot" in version.failure_reason
        finally:
            svc.stop()
            proxy.close()


def test_an_upload_left_running_by_a_release_without_leases_is_undone_at_start(
    workdir: Path,
) -> None:
    svc = start_service(DATASET, workdir)
    try:
        stub = stub_for(svc)
        dataset = make_dataset(stub)
        add_examples(stub, dataset, 3)
    finally:
        svc.stop()
    # What such a release left: a running upload with no lease, its inputs counted as it went.
    database = workdir / "home" / "dataset.db"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute(
            "INSERT INTO uploads (pk, upload_id, dataset_pk, file_name, state, start_time) "
            "VALUES (99, 'uold', 1, 'f.jsonl', 'RUNNING', 0)"
        )
        db.execute("UPDATE inputs SET upload_pk = 99 WHERE pk IN (SELECT pk FROM inputs LIMIT 2)")
    svc = start_service(DATASET, workdir, name="restarted")
    try:
        stub = stub_for(svc)
        assert upload_states(database) == ["FAILED"]
        assert committed_rows(database) == 1
        assert stub.GetDataset(pb.GetDatasetRequest(name=dataset)).dataset.input_count == 1
        assert len(stub.ListInputs(pb.ListInputsRequest(parent=dataset)).inputs) == 1
    finally:
        svc.stop()

"""Several dataset service replicas on one database: uploads on each at once, a replica
restarted in the middle of another's upload, and snapshot collection racing a new
version, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from loraforge.services.common.errors import Aborted
from loraforge.services.common.objectstore import LocalObjectStore
from loraforge.services.dataset.domain import (
    ExampleKind,
    NewExample,
    SourceFormat,
    UploadReport,
    VersionState,
)
from loraforge.services.dataset.store import DatasetStore
from loraforge.services.dataset.versions import Versions
from tests.support import Databases, ServiceProcess, channel, start_service, wait_until

DATASET = "loraforge.services.dataset"
# Longer than an upload holds the SQLite write lock (3 s), which renewals wait behind.
LEASE_SECONDS = "8"
_names = itertools.count(1)


def jsonl_rows(start: int, count: int) -> bytes:
    return "".join(
        json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n"
        for i in range(start, start + count)
    ).encode()


class Replicas:
    """Dataset service processes sharing one database and one object store."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.database_url = database_url
        self.engine = sqlalchemy.create_engine(database_url)
        self.running: list[ServiceProcess] = []

    def start(self, name: str) -> ServiceProcess:
        svc = start_service(
            DATASET,
            self.root / name,
            args=[
                "--database-url",
                self.database_url,
                "--object-store-url",
                str(self.root / "objects"),
                "--lease-seconds",
                LEASE_SECONDS,
                "--shutdown-grace-seconds",
                "2",
            ],
            name=f"dataset-{next(_names)}",
        )
        self.running.append(svc)
        return svc

    def committed_rows(self, dataset_id: str) -> int:
        """Rows stored for the dataset, seen or not (the service hides unfinished uploads)."""
        with self.engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM inputs JOIN datasets ON datasets.pk = inputs.dataset_pk "
                    "WHERE datasets.dataset_id = :d"
                ),
                {"d": dataset_id},
            ).scalar_one()

    def upload_states(self, dataset_id: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sqlalchemy.text(
                        "SELECT uploads.state FROM uploads JOIN datasets "
                        "ON datasets.pk = uploads.dataset_pk WHERE datasets.dataset_id = :d "
                        "ORDER BY uploads.pk"
                    ),
                    {"d": dataset_id},
                ).scalars()
            )

    def lease_expiry(self, dataset_id: str) -> float:
        """When the lease of the dataset's running upload expires, unless renewed."""
        with self.engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text(
                    "SELECT leases.expires_at FROM leases JOIN uploads ON uploads.pk = leases.ref_pk "
                    "JOIN datasets ON datasets.pk = uploads.dataset_pk "
                    "WHERE leases.kind = 'upload' AND datasets.dataset_id = :d"
                ),
                {"d": dataset_id},
            ).scalar_one()

    def close(self) -> None:
        for svc in self.running:
            svc.stop()
        self.engine.dispose()


@pytest.fixture
def replicas(tmp_path: Path, databases: Databases) -> Iterator[Replicas]:
    group = Replicas(tmp_path, databases.url(f"replicas{next(_names)}"))
    try:
        yield group
    finally:
        group.close()


def stub_for(svc: ServiceProcess) -> pb_grpc.DatasetServiceStub:
    return pb_grpc.DatasetServiceStub(channel(svc.address))


def paused_upload(
    dataset: str, first: bytes, rest: bytes, go: threading.Event
) -> Iterator[pb.UploadInputsRequest]:
    """An upload that sends `first`, waits for `go`, then sends `rest` and ends."""
    yield pb.UploadInputsRequest(header=pb.UploadHeader(dataset=dataset, file_name="f.jsonl"))
    yield pb.UploadInputsRequest(chunk=first)
    go.wait()
    if rest:
        yield pb.UploadInputsRequest(chunk=rest)


def test_a_replica_restarted_mid_upload_of_another_loses_nothing(replicas: Replicas) -> None:
    a = replicas.start("a")
    b = replicas.start("b")
    stub_a, stub_b = stub_for(a), stub_for(b)
    stub_a.CreateApp(pb.CreateAppRequest(app_id="app"))
    for dataset_id in ("da", "db"):
        stub_a.CreateDataset(pb.CreateDatasetRequest(parent="apps/app", dataset_id=dataset_id))
    on_a, on_b = "apps/app/datasets/da", "apps/app/datasets/db"

    # An upload on each replica at once; A's commits part of its rows, then waits.
    go_a, go_b = threading.Event(), threading.Event()
    upload_a = stub_a.UploadInputs.future(
        paused_upload(on_a, jsonl_rows(0, 150_000), jsonl_rows(150_000, 50_000), go_a)
    )
    upload_b = stub_b.UploadInputs.future(paused_upload(on_b, jsonl_rows(0, 120_000), b"", go_b))
    try:
        assert wait_until(lambda: replicas.committed_rows("da") > 0), "A committed nothing"
        assert wait_until(lambda: replicas.committed_rows("db") > 0), "B committed nothing"

        # B restarts while A's upload runs: B's own upload is undone, A's is left alone.
        b.stop()
        b = replicas.start("b")
        stub_b = stub_for(b)
        assert wait_until(lambda: replicas.upload_states("db") == ["FAILED"])
        assert replicas.upload_states("da") == ["RUNNING"]
        assert wait_until(lambda: replicas.committed_rows("db") == 0)

        # While A's upload is still open, B takes a whole upload of its own.
        at_once = threading.Event()
        at_once.set()
        done_b = stub_b.UploadInputs(paused_upload(on_b, jsonl_rows(0, 1000), b"", at_once))
        assert done_b.rows_accepted == 1000
        # A's upload outlives the lease it started with: A renews it, and the recovery
        # B runs every lease time leaves it alone.
        first = replicas.lease_expiry("da")
        assert wait_until(lambda: replicas.lease_expiry("da") > first + float(LEASE_SECONDS))
        assert replicas.upload_states("da") == ["RUNNING"]
        go_a.set()
        report = upload_a.result(timeout=120)
    finally:
        go_a.set()
        go_b.set()
    assert report.rows_accepted == 200_000
    assert upload_b.exception(timeout=30) is not None  # its replica stopped under it

    for stub in (stub_a, stub_b):
        assert stub.GetDataset(pb.GetDatasetRequest(name=on_a)).dataset.input_count == 200_000
        assert stub.GetDataset(pb.GetDatasetRequest(name=on_b)).dataset.input_count == 1000
    assert replicas.committed_rows("da") == 200_000
    assert replicas.committed_rows("db") == 1000
    version = stub_b.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent=on_a, version_id="v1")
    ).dataset_version
    assert version.state == pb.DATASET_VERSION_STATE_READY
    assert version.stats.example_count == 200_000


class DeleteWaits(LocalObjectStore):
    """A local store whose deletes wait a while (or until told to go) before deleting."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.deleting = threading.Event()
        self.go = threading.Event()

    def delete(self, key: str) -> None:
        self.deleting.set()
        self.go.wait(3)  # room for another replica to race the deletion
        super().delete(key)


def test_collection_never_deletes_the_snapshot_a_new_version_on_another_replica_takes(
    tmp_path: Path, databases: Databases
) -> None:
    url = databases.url(f"collect{next(_names)}")
    slow = DeleteWaits(tmp_path / "objects")
    deleting = DatasetStore(url, slow.scoped("datasets"), "datasets", tmp_path / "a")
    creating = DatasetStore(
        url, LocalObjectStore(tmp_path / "objects").scoped("datasets"), "datasets", tmp_path / "b"
    )
    try:
        deleting.catalog.create_app("app", "")
        deleting.catalog.create_dataset("app", "d", "")
        deleting.inputs.add_inputs(
            "app",
            "d",
            [
                NewExample(ExampleKind.PROMPT_COMPLETION, f"q{i}", f"a{i}", f"q{i}a{i}")
                for i in range(20)
            ],
        )
        v1 = Versions(deleting).create("app", "d", "v1", "")
        assert v1.state is VersionState.READY

        failures: list[BaseException] = []

        def run(fn: Callable[[], object]) -> threading.Thread:
            def body() -> None:
                try:
                    fn()
                except BaseException as exc:  # reported by the test below
                    failures.append(exc)

            thread = threading.Thread(target=body)
            thread.start()
            return thread

        # One replica deletes the only version naming the snapshot; once it has decided to
        # delete the object, another creates a version with the same content.
        deleter = run(lambda: deleting.version_rows.delete_version("app", "d", "v1"))
        assert slow.deleting.wait(30)
        created: list[object] = []
        creator = run(lambda: created.append(Versions(creating).create("app", "d", "v2", "")))
        creator.join(timeout=2)
        if not creator.is_alive():
            slow.go.set()  # the version was made before the deletion: let it happen now
        deleter.join(60)
        creator.join(60)
        assert not failures, failures
        v2 = creating.version_rows.get_version("app", "d", "v2")
        assert v2.state is VersionState.READY
        assert v2.snapshot_key == v1.snapshot_key
        rows = [r for batch in Versions(creating).read("app", "d", "v2", 100) for r in batch]
        assert len(rows) == 20
    finally:
        deleting.close()
        creating.close()


def two_stores(tmp_path: Path, url: str) -> tuple[DatasetStore, DatasetStore]:
    def store(name: str) -> DatasetStore:
        objects = LocalObjectStore(tmp_path / "objects").scoped("datasets")
        return DatasetStore(url, objects, "datasets", tmp_path / name, lease_seconds=30)

    return store("a"), store("b")


def test_work_of_a_live_replica_is_left_alone_and_taken_over_only_once_its_lease_expires(
    tmp_path: Path, databases: Databases
) -> None:
    a, b = two_stores(tmp_path, databases.url(f"leases{next(_names)}"))
    try:
        a.catalog.create_app("app", "")
        a.catalog.create_dataset("app", "d", "")
        a.inputs.add_inputs("app", "d", [NewExample(ExampleKind.TEXT, "", "t", "t")])
        upload = a.inputs.begin_upload("app", "d", "f.jsonl")
        created = a.version_rows.create_version_row("app", "d", "v1", "")
        assert isinstance(created, tuple)
        version_pk, _ = created

        b.recover()  # A holds live leases on both
        assert a.version_rows.get_version("app", "d", "v1").state is VersionState.PENDING
        with a.engine.connect() as conn:
            state = conn.execute(sqlalchemy.text("SELECT state FROM uploads")).scalar_one()
        assert state == "RUNNING"

        # A stops renewing; past the lease, by B's clock, B undoes A's work.
        b.leases.clock = lambda: time.time() + 31
        b.recover()
        version = a.version_rows.get_version("app", "d", "v1")
        assert version.state is VersionState.FAILED
        assert "create a new version" in version.failure_reason
        with a.engine.connect() as conn:
            state = conn.execute(sqlalchemy.text("SELECT state FROM uploads")).scalar_one()
        assert state == "FAILED"

        # A, back, can finish neither: its next fenced write fails.
        with pytest.raises(Aborted) as caught:
            a.version_rows.start_build(version_pk)
        assert caught.value.reason == "VERSION_LEASE_LOST"
        assert not isinstance(upload, UploadReport)
        writer = a.inputs.input_writer(upload, SourceFormat.PLAIN_TEXT, False)
        with pytest.raises(Aborted) as caught:
            writer.close(commit=True)
        assert caught.value.reason == "UPLOAD_LEASE_LOST"
    finally:
        a.close()
        b.close()

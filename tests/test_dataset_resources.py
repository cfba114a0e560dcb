"""Apps and datasets through a real DatasetService: ids, names, pagination, deletion rules;
on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as pb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as pb_grpc
from tests.support import Databases, ServiceProcess, channel, start_service


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


def details(err: grpc.RpcError) -> tuple[str, list[tuple[str, str]]]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    reason, violations = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return reason, violations


def test_create_get_and_delete_an_app(stub: pb_grpc.DatasetServiceStub) -> None:
    created = stub.CreateApp(
        pb.CreateAppRequest(app_id="shop-1_x", app=pb.App(description="Shop bot"))
    ).app
    assert created.name == "apps/shop-1_x" and created.description == "Shop bot"
    assert created.create_time.seconds > 0
    assert stub.GetApp(pb.GetAppRequest(name="apps/shop-1_x")).app == created
    stub.DeleteApp(pb.DeleteAppRequest(name="apps/shop-1_x"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetApp(pb.GetAppRequest(name="apps/shop-1_x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)[0] == "APP_NOT_FOUND"


def test_creating_an_existing_app_or_dataset_is_already_exists(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    stub.CreateApp(pb.CreateAppRequest(app_id="dup"))
    stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/dup", dataset_id="d"))
    for call, request in [
        (stub.CreateApp, pb.CreateAppRequest(app_id="dup")),
        (stub.CreateDataset, pb.CreateDatasetRequest(parent="apps/dup", dataset_id="d")),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    "bad_id", ["", "Upper", "has space", "x" * 64, "dots.no", "slash/no", "ünï", "emoji🙂"]
)
def test_bad_ids_are_refused_with_a_field_violation(
    stub: pb_grpc.DatasetServiceStub, bad_id: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateApp(pb.CreateAppRequest(app_id=bad_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, violations = details(caught.value)
    assert reason in ("MISSING_ID", "INVALID_ID")
    assert [field for field, _ in violations] == ["app_id"]


def test_the_longest_allowed_id_is_accepted(stub: pb_grpc.DatasetServiceStub) -> None:
    app_id = "a" * 63
    assert stub.CreateApp(pb.CreateAppRequest(app_id=app_id)).app.name == f"apps/{app_id}"


@pytest.mark.parametrize(
    ("call", "request_", "field"),
    [
        ("GetApp", pb.GetAppRequest(name="apps"), "name"),
        ("GetApp", pb.GetAppRequest(name="app/x"), "name"),
        ("GetApp", pb.GetAppRequest(name="apps/X"), "name"),
        ("GetDataset", pb.GetDatasetRequest(name="apps/a/datasets"), "name"),
        ("GetDataset", pb.GetDatasetRequest(name="apps/a/datasets/d/extra"), "name"),
        ("CreateDataset", pb.CreateDatasetRequest(parent="", dataset_id="d"), "parent"),
        ("CreateDataset", pb.CreateDatasetRequest(parent="apps/a", dataset_id="Bad"), "dataset_id"),
        ("ListDatasets", pb.ListDatasetsRequest(parent="apps/../x"), "parent"),
        ("ListApps", pb.ListAppsRequest(page_size=-1), "page_size"),
        (
            "CreateApp",
            pb.CreateAppRequest(app_id="ok", app=pb.App(description="x" * 10_001)),
            "app.description",
        ),
    ],
)
def test_bad_names_and_fields_are_invalid_argument_naming_the_field(
    stub: pb_grpc.DatasetServiceStub, call: str, request_: object, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(caught.value)[1]] == [field]


def test_missing_parent_app_is_not_found(stub: pb_grpc.DatasetServiceStub) -> None:
    for call, request in [
        (stub.CreateDataset, pb.CreateDatasetRequest(parent="apps/ghost", dataset_id="d")),
        (stub.ListDatasets, pb.ListDatasetsRequest(parent="apps/ghost")),
        (stub.GetDataset, pb.GetDatasetRequest(name="apps/ghost/datasets/d")),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(caught.value)[0] == "APP_NOT_FOUND"


def test_list_apps_pages_through_every_app_oldest_first(stub: pb_grpc.DatasetServiceStub) -> None:
    made = [f"page-{i:02d}" for i in range(7)]
    for app_id in made:
        stub.CreateApp(pb.CreateAppRequest(app_id=app_id))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = stub.ListApps(pb.ListAppsRequest(page_size=3, page_token=token))
        assert len(response.apps) <= 3
        seen += [a.name for a in response.apps]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    mine = [n for n in seen if n.startswith("apps/page-")]
    assert mine == [f"apps/{a}" for a in made]
    assert len(seen) == len(set(seen)) and pages >= 3


def test_list_datasets_paginates_and_counts(stub: pb_grpc.DatasetServiceStub) -> None:
    stub.CreateApp(pb.CreateAppRequest(app_id="lister"))
    for i in range(5):
        stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/lister", dataset_id=f"d{i}"))
    stub.AddInputs(
        pb.AddInputsRequest(
            parent="apps/lister/datasets/d0",
            inputs=[pb.NewInput(example=pb.Example(completion="t"))],
        )
    )
    first = stub.ListDatasets(pb.ListDatasetsRequest(parent="apps/lister", page_size=2))
    assert [d.name for d in first.datasets] == [
        "apps/lister/datasets/d0",
        "apps/lister/datasets/d1",
    ]
    assert first.datasets[0].input_count == 1 and first.datasets[0].version_count == 0
    rest = stub.ListDatasets(
        pb.ListDatasetsRequest(parent="apps/lister", page_token=first.next_page_token)
    )
    assert [d.name.rsplit("/", 1)[1] for d in rest.datasets] == ["d2", "d3", "d4"]
    assert rest.next_page_token == ""


@pytest.mark.parametrize("token", ["%%%", "bm90IGpzb24=", "WzFd", "eyJhZnRlciI6IHRydWV9"])
def test_forged_page_tokens_are_refused(stub: pb_grpc.DatasetServiceStub, token: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListApps(pb.ListAppsRequest(page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[0] == "INVALID_PAGE_TOKEN"


def test_a_page_token_cannot_be_reused_for_another_parent(stub: pb_grpc.DatasetServiceStub) -> None:
    for app_id in ("tok-a", "tok-b"):
        stub.CreateApp(pb.CreateAppRequest(app_id=app_id))
        for i in range(2):
            stub.CreateDataset(pb.CreateDatasetRequest(parent=f"apps/{app_id}", dataset_id=f"d{i}"))
    token = stub.ListDatasets(
        pb.ListDatasetsRequest(parent="apps/tok-a", page_size=1)
    ).next_page_token
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListDatasets(pb.ListDatasetsRequest(parent="apps/tok-b", page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deleting_an_app_with_datasets_needs_force(stub: pb_grpc.DatasetServiceStub) -> None:
    stub.CreateApp(pb.CreateAppRequest(app_id="full"))
    stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/full", dataset_id="d"))
    stub.AddInputs(
        pb.AddInputsRequest(
            parent="apps/full/datasets/d",
            inputs=[pb.NewInput(example=pb.Example(prompt="p", completion="c"))],
        )
    )
    stub.CreateDatasetVersion(
        pb.CreateDatasetVersionRequest(parent="apps/full/datasets/d", version_id="v1")
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.DeleteApp(pb.DeleteAppRequest(name="apps/full"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(caught.value)[0] == "APP_NOT_EMPTY"
    assert "force" in caught.value.details()
    stub.DeleteApp(pb.DeleteAppRequest(name="apps/full", force=True))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetDataset(pb.GetDatasetRequest(name="apps/full/datasets/d"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # The id is free again, and the new app starts empty.
    stub.CreateApp(pb.CreateAppRequest(app_id="full"))
    stub.CreateDataset(pb.CreateDatasetRequest(parent="apps/full", dataset_id="d"))
    assert (
        stub.GetDataset(pb.GetDatasetRequest(name="apps/full/datasets/d")).dataset.input_count == 0
    )


def test_deleting_missing_resources_is_not_found(stub: pb_grpc.DatasetServiceStub) -> None:
    for call, request in [
        (stub.DeleteApp, pb.DeleteAppRequest(name="apps/never")),
        (stub.DeleteDataset, pb.DeleteDatasetRequest(name="apps/never/datasets/d")),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_list_the_dataset_service(service: ServiceProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel(service.address))
    reply = health.Check(
        health_pb2.HealthCheckRequest(service="loraforge.dataset.v1.DatasetService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--max-example-chars", "0"],
            {},
            "error: --max-example-chars (LORAFORGE_MAX_EXAMPLE_CHARS) must be at least 1 (got 0)",
        ),
        (
            [],
            {"LORAFORGE_UPLOAD_BATCH_ROWS": "-3"},
            "error: --upload-batch-rows (LORAFORGE_UPLOAD_BATCH_ROWS) must be at least 1 (got -3)",
        ),
    ],
    ids=["flag", "environment"],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loraforge.services.dataset", *args],
        env={**os.environ, "LORAFORGE_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert (done.stdout + done.stderr).strip() == message


# Updates (AIP-134) and etags (AIP-154)


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def test_update_app_changes_only_the_masked_fields_and_gives_a_new_etag(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    created = stub.CreateApp(
        pb.CreateAppRequest(app_id="upd-app", app=pb.App(description="old"))
    ).app
    assert created.etag.startswith('"') and created.etag.endswith('"')  # strong, RFC 7232
    updated = stub.UpdateApp(
        pb.UpdateAppRequest(
            app=pb.App(name="apps/upd-app", description="new"), update_mask=mask("description")
        )
    ).app
    assert (updated.description, updated.create_time) == ("new", created.create_time)
    assert updated.etag != created.etag
    assert stub.GetApp(pb.GetAppRequest(name="apps/upd-app")).app == updated
    # Without a mask only the fields the request sets change: an empty description is no change.
    same = stub.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="apps/upd-app"))).app
    assert same == updated
    # `*` changes every changeable field, so an empty description clears it.
    cleared = stub.UpdateApp(
        pb.UpdateAppRequest(app=pb.App(name="apps/upd-app"), update_mask=mask("*"))
    ).app
    assert cleared.description == "" and cleared.etag not in (created.etag, updated.etag)


def test_an_update_with_a_stale_etag_is_aborted_and_changes_nothing(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    read = stub.CreateApp(pb.CreateAppRequest(app_id="etag-app", app=pb.App(description="v0"))).app
    first = stub.UpdateApp(
        pb.UpdateAppRequest(
            app=pb.App(name=read.name, description="v1", etag=read.etag),
            update_mask=mask("description"),
        )
    ).app
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateApp(
            pb.UpdateAppRequest(
                app=pb.App(name=read.name, description="v2", etag=read.etag),
                update_mask=mask("description"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert details(caught.value)[0] == "ETAG_MISMATCH"
    assert "get it again" in caught.value.details()
    assert stub.GetApp(pb.GetAppRequest(name=read.name)).app.description == "v1"
    second = stub.UpdateApp(
        pb.UpdateAppRequest(
            app=pb.App(name=read.name, description="v2", etag=first.etag),
            update_mask=mask("description"),
        )
    ).app
    assert second.description == "v2"


def test_update_dataset_keeps_its_etag_across_uploads_and_refuses_a_stale_one(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    stub.CreateApp(pb.CreateAppRequest(app_id="upd-ds"))
    read = stub.CreateDataset(
        pb.CreateDatasetRequest(
            parent="apps/upd-ds", dataset_id="d", dataset=pb.Dataset(description="old")
        )
    ).dataset
    stub.AddInputs(
        pb.AddInputsRequest(
            parent=read.name, inputs=[pb.NewInput(example=pb.Example(completion="t"))]
        )
    )
    now = stub.GetDataset(pb.GetDatasetRequest(name=read.name)).dataset
    # Weak: the counts are not part of it.
    assert now.input_count == 1 and now.etag == read.etag and now.etag.startswith('W/"')
    updated = stub.UpdateDataset(
        pb.UpdateDatasetRequest(
            dataset=pb.Dataset(name=read.name, description="new", etag=read.etag),
            update_mask=mask("description"),
        )
    ).dataset
    assert (updated.description, updated.input_count) == ("new", 1)
    assert updated.etag != read.etag
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateDataset(
            pb.UpdateDatasetRequest(
                dataset=pb.Dataset(name=read.name, description="newer", etag=read.etag),
                update_mask=mask("description"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert stub.GetDataset(pb.GetDatasetRequest(name=read.name)).dataset.description == "new"


def test_an_app_created_again_under_its_name_has_another_etag(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    old = stub.CreateApp(pb.CreateAppRequest(app_id="again", app=pb.App(description="d"))).app
    stub.DeleteApp(pb.DeleteAppRequest(name=old.name))
    new = stub.CreateApp(pb.CreateAppRequest(app_id="again", app=pb.App(description="d"))).app
    assert new.etag != old.etag
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateApp(
            pb.UpdateAppRequest(
                app=pb.App(name=new.name, description="x", etag=old.etag),
                update_mask=mask("description"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED


@pytest.mark.parametrize(
    "paths",
    [["name"], ["create_time"], ["etag"], ["input_count"], ["colour"], ["*", "description"]],
    ids=["name", "create_time", "etag", "input_count", "unknown", "star-and-more"],
)
def test_update_mask_paths_an_update_cannot_change_are_invalid_argument(
    stub: pb_grpc.DatasetServiceStub, paths: list[str], request: pytest.FixtureRequest
) -> None:
    app = f"apps/mask-{request.node.callspec.id.replace('_', '-')}"
    stub.CreateApp(pb.CreateAppRequest(app_id=app.removeprefix("apps/")))
    stub.CreateDataset(pb.CreateDatasetRequest(parent=app, dataset_id="d"))
    dataset = pb.Dataset(name=f"{app}/datasets/d", description="x")
    for call, update in [
        (stub.UpdateApp, pb.UpdateAppRequest(app=pb.App(name=app, description="x"))),
        (stub.UpdateDataset, pb.UpdateDatasetRequest(dataset=dataset)),
    ]:
        update.update_mask.paths.extend(paths)
        with pytest.raises(grpc.RpcError) as caught:
            call(update)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reason, violations = details(caught.value)
        assert (reason, [f for f, _ in violations]) == ("INVALID_UPDATE_MASK", ["update_mask"])
        assert "`description`" in caught.value.details()
    assert stub.GetApp(pb.GetAppRequest(name=app)).app.description == ""
    assert stub.GetDataset(pb.GetDatasetRequest(name=dataset.name)).dataset.description == ""


def test_updating_a_missing_or_misnamed_resource_is_not_found_or_invalid(
    stub: pb_grpc.DatasetServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="apps/nobody", description="x")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateDataset(
            pb.UpdateDatasetRequest(dataset=pb.Dataset(name="apps/nobody", description="x"))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(caught.value)[1]] == ["dataset.name"]
    stub.CreateApp(pb.CreateAppRequest(app_id="long-desc"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateApp(
            pb.UpdateAppRequest(app=pb.App(name="apps/long-desc", description="x" * 10_001))
        )
    assert [f for f, _ in details(caught.value)[1]] == ["app.description"]

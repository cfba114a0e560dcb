"""Models through a real trainer and dataset service: updates with field masks and etags,
the client's and the CLI's update, and errors that say what is missing once. On SQLite and
on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from google.protobuf import field_mask_pb2

from loraforge.client import Client, ClientError
from loraforge.client.cli import main as cli_main
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.services.trainer.store import TrainerStore, model_etag
from loraforge.trainer.v1 import trainer_service_pb2 as pb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tests.support import Databases, ServiceProcess, channel, error_details, start_service

APP = "apps/notes"


@dataclass
class Services:
    dataset: ServiceProcess
    trainer: ServiceProcess
    stub: pb_grpc.TrainerServiceStub
    dataset_stub: dpb_grpc.DatasetServiceStub


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[Services]:
    workdir: Path = tmp_path_factory.mktemp("trainer-models")
    dataset = start_service(
        "loraforge.services.dataset", workdir, args=["--database-url", databases.url("dataset")]
    )
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=[
            "--dataset-address",
            dataset.address,
            "--database-url",
            databases.url("trainer"),
        ],
    )
    dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
    dstub.CreateApp(dpb.CreateAppRequest(app_id="notes"))
    try:
        yield Services(
            dataset, trainer, pb_grpc.TrainerServiceStub(channel(trainer.address)), dstub
        )
    finally:
        trainer.stop()
        dataset.stop()


def _create(services: Services, model_id: str, **fields: object) -> pb.Model:
    return services.stub.CreateModel(
        pb.CreateModelRequest(parent=APP, model_id=model_id, model=pb.Model(**fields))
    ).model


def _update(services: Services, model: pb.Model, *paths: str) -> pb.Model:
    return services.stub.UpdateModel(
        pb.UpdateModelRequest(model=model, update_mask=field_mask_pb2.FieldMask(paths=paths))
    ).model


def test_update_model_changes_only_the_masked_fields_and_gives_a_new_etag(
    services: Services,
) -> None:
    created = _create(services, "masked", description="first", notes="some notes")
    assert created.etag.startswith('W/"') and created.notes == "some notes"
    params = ppb.InferenceParams(temperature=0.5, max_tokens=64, stop=["END"])
    request = pb.Model(
        name=created.name, description="ignored", notes="new notes", default_inference_params=params
    )
    updated = _update(services, request, "notes", "default_inference_params")
    assert (updated.description, updated.notes) == ("first", "new notes")
    assert updated.default_inference_params.temperature == pytest.approx(0.5)
    assert updated.default_inference_params.max_tokens == 64
    assert list(updated.default_inference_params.stop) == ["END"]
    assert not updated.default_inference_params.HasField("top_p")  # unset stays unset
    assert updated.etag != created.etag
    got = services.stub.GetModel(pb.GetModelRequest(name=created.name)).model
    assert got == updated
    # In the mask but unset: the defaults are removed.
    cleared = _update(services, pb.Model(name=created.name), "default_inference_params")
    assert not cleared.HasField("default_inference_params") and cleared.notes == "new notes"
    # Without a mask, the updatable fields the request sets change.
    unmasked = services.stub.UpdateModel(
        pb.UpdateModelRequest(model=pb.Model(name=created.name, description="second"))
    ).model
    assert (unmasked.description, unmasked.notes) == ("second", "new notes")


def test_update_model_with_a_stale_etag_is_aborted_and_changes_nothing(
    services: Services,
) -> None:
    created = _create(services, "etag", description="v1")
    fresh = _update(
        services, pb.Model(name=created.name, description="v2", etag=created.etag), "description"
    )
    with pytest.raises(grpc.RpcError) as info:
        _update(services, pb.Model(name=created.name, notes="lost", etag=created.etag), "notes")
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert error_details(info.value)[0] == "ETAG_MISMATCH"
    assert fresh.etag in (info.value.details() or "")
    got = services.stub.GetModel(pb.GetModelRequest(name=created.name)).model
    assert (got.description, got.notes, got.etag) == ("v2", "", fresh.etag)
    # The etag of a deleted model does not match one created again under its name.
    services.stub.DeleteModel(pb.DeleteModelRequest(name=created.name))
    again = _create(services, "etag", description="v2")
    assert again.etag != fresh.etag


def test_update_model_refuses_bad_masks_and_values_naming_the_field(services: Services) -> None:
    created = _create(services, "refusals")
    cases = [
        (("model_type",), pb.Model(name=created.name), "update_mask", "cannot be changed"),
        (("colour",), pb.Model(name=created.name), "update_mask", "is not a field of Model"),
        (
            ("notes",),
            pb.Model(name=created.name, notes="a\x00b"),
            "model.notes",
            "NUL character",
        ),
        (
            ("default_inference_params",),
            pb.Model(
                name=created.name,
                default_inference_params=ppb.InferenceParams(temperature=float("nan")),
            ),
            "model.default_inference_params.temperature",
            "between 0",
        ),
        (
            ("default_inference_params",),
            pb.Model(name=created.name, default_inference_params=ppb.InferenceParams(top_k=5000)),
            "model.default_inference_params.top_k",
            "1000",
        ),
        (("description",), pb.Model(name="apps/notes/models/x/y"), "model.name", "not a name"),
    ]
    for paths, model, field, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            _update(services, model, *paths)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (paths, info.value.details())
        fields = error_details(info.value)[1]
        assert field in fields and words in fields[field], (field, fields)
    with pytest.raises(grpc.RpcError) as info:
        _update(services, pb.Model(name=f"{APP}/models/missing", notes="x"), "notes")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        _create(services, "nul", description="bad\x00")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.description" in error_details(info.value)[1]
    got = services.stub.GetModel(pb.GetModelRequest(name=created.name)).model
    assert got.etag == created.etag  # nothing changed


def test_the_client_and_the_cli_update_a_model(
    services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    with Client(dataset=services.dataset.address, trainer=services.trainer.address) as client:
        model = client.app("notes").create_model("cli", description="one")
        stale = client.model("notes/cli")
        model.update(notes="how to prompt it", default_inference_params={"temperature": 0.25})
        assert model.pb.notes == "how to prompt it"
        assert model.pb.default_inference_params.temperature == pytest.approx(0.25)
        with pytest.raises(ClientError) as caught:
            stale.update(description="lost update")
        assert caught.value.code == grpc.StatusCode.ABORTED
        assert caught.value.reason == "ETAG_MISMATCH"
        cleared = client.update_model("notes/cli", default_inference_params={})
        assert not cleared.pb.HasField("default_inference_params")
        assert cleared.pb.notes == "how to prompt it"

        addresses = ["--trainer-address", services.trainer.address]
        argv = [*addresses, "models", "update", "notes/cli", "--description", "two"]
        argv += ["--inference-param", "max_tokens=32", "--inference-param", "stop=###"]
        argv += ["--inference-param", "system_prompt=# Be brief: 1, 2"]
        assert cli_main([*argv, "--etag", cleared.pb.etag]) == 0
        got = client.model("notes/cli").pb
        assert got.description == "two" and got.default_inference_params.max_tokens == 32
        assert list(got.default_inference_params.stop) == ["###"]
        assert got.default_inference_params.system_prompt == "# Be brief: 1, 2"
        assert got.etag in capsys.readouterr().out
        assert cli_main([*argv, "--etag", cleared.pb.etag]) == 1  # stale now
        assert "ABORTED" in capsys.readouterr().err
        assert cli_main([*addresses, "models", "update", "notes/cli"]) == 1
        assert "nothing to change" in capsys.readouterr().err
        assert cli_main([*addresses, "models", "show", "notes/cli"]) == 0
        shown = capsys.readouterr().out
        assert "max_tokens=32" in shown and got.etag in shown


def test_a_missing_dataset_version_is_named_once_in_the_not_found_error(
    services: Services,
) -> None:
    _create(services, "nf")
    missing = f"{APP}/datasets/none/versions/v1"
    with pytest.raises(grpc.RpcError) as info:
        services.stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                parent=f"{APP}/models/nf",
                template="templates/HF_SmolLM2_135m_instruct_lora",
                dataset_version=missing,
            )
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    message = info.value.details() or ""
    assert "not found:" not in message
    assert message.count("datasets/none") == 1, message
    reason, fields = error_details(info.value)
    assert reason == "DATASET_NOT_FOUND" and "dataset_version" in fields


def test_a_trainer_database_from_before_notes_gains_the_new_columns(databases: Databases) -> None:
    """A models table made before notes and default inference parameters existed."""
    url = databases.url("before-notes")
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "CREATE TABLE models (seq INTEGER PRIMARY KEY, name VARCHAR(300) NOT NULL UNIQUE, "
                "app VARCHAR(80) NOT NULL, description TEXT NOT NULL, "
                "model_type VARCHAR(100) NOT NULL, latest_trained_version VARCHAR(300) NOT NULL, "
                "create_time FLOAT NOT NULL)"
            )
        )
        conn.execute(
            sqlalchemy.text(
                "INSERT INTO models VALUES (1, 'apps/a/models/old', 'a', 'kept', "
                "'modelTypes/text-to-text', '', 1.5)"
            )
        )
    engine.dispose()
    store = TrainerStore(url)
    try:
        old = store.get_model("apps/a/models/old")
        assert (old.description, old.notes, old.default_inference_params) == ("kept", None, None)
        updated = store.update_model("apps/a/models/old", {"notes": "new"}, model_etag(old))
        assert (updated.description, updated.notes) == ("kept", "new")
    finally:
        store.engine.dispose()


def test_of_concurrent_updates_from_one_etag_exactly_one_wins(services: Services) -> None:
    created = _create(services, "race")

    def attempt(i: int) -> str:
        model = pb.Model(name=created.name, notes=f"writer {i}", etag=created.etag)
        try:
            return _update(services, model, "notes").notes
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.ABORTED, err.details()
            return ""

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    winners = [r for r in results if r]
    assert len(winners) == 1
    got = services.stub.GetModel(pb.GetModelRequest(name=created.name)).model
    assert got.notes == winners[0]

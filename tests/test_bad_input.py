"""Hostile and malformed input through real dataset and trainer services, on SQLite and on
PostgreSQL: each is INVALID_ARGUMENT naming what was wrong (or, in an upload, a rejected
row), never INTERNAL, and never costs good data."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.services.common.pages import encode_token
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from tests.support import (
    Databases,
    ServiceProcess,
    channel,
    error_details,
    free_port,
    start_service,
)

APP = "apps/probe"
DATASET = f"{APP}/datasets/d1"
MODEL = f"{APP}/models/m1"

# The resource each paginated method lists under, as its request names it.
PARENTS: dict[str, dict[str, str]] = {
    "DatasetService.ListApps": {},
    "DatasetService.ListDatasets": {"parent": APP},
    "DatasetService.ListInputs": {"parent": DATASET},
    "DatasetService.ListDatasetVersions": {"parent": DATASET},
    "TrainerService.ListModelTypes": {},
    "TrainerService.ListTemplates": {},
    "TrainerService.ListBaseModels": {},
    "TrainerService.ListModels": {"parent": APP},
    "TrainerService.ListModelVersions": {"parent": MODEL},
    "TrainerService.GetModelVersionLogs": {"name": f"{MODEL}/versions/v1"},
    "TrainerService.ListCheckpoints": {"parent": f"{MODEL}/versions/v1"},
    "TrainerService.ListEvaluations": {"parent": MODEL},
    "TrainerService.ListEvaluationResults": {"parent": f"{MODEL}/evaluations/e1"},
    "TrainerService.CompareEvaluations": {
        "evaluation": f"{MODEL}/evaluations/e1",
        "other": f"{MODEL}/evaluations/e2",
    },
}
OTHER_PARENTS = {
    APP: "apps/other",
    DATASET: "apps/other/datasets/d1",
    MODEL: "apps/other/models/m1",
}


@dataclass
class Services:
    dataset: ServiceProcess
    trainer: ServiceProcess
    dstub: dpb_grpc.DatasetServiceStub
    tstub: tpb_grpc.TrainerServiceStub


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, databases: Databases) -> Iterator[Services]:
    workdir: Path = tmp_path_factory.mktemp("bad-input")
    dataset = start_service(
        "loraforge.services.dataset", workdir, args=["--database-url", databases.url("dataset")]
    )
    trainer = start_service(
        "loraforge.services.trainer",
        workdir,
        args=["--dataset-address", dataset.address, "--database-url", databases.url("trainer")],
    )
    dstub = dpb_grpc.DatasetServiceStub(channel(dataset.address))
    tstub = tpb_grpc.TrainerServiceStub(channel(trainer.address))
    for app in ("probe", "other"):
        dstub.CreateApp(dpb.CreateAppRequest(app_id=app))
        for dataset_id in ("d1", "d2"):
            dstub.CreateDataset(
                dpb.CreateDatasetRequest(parent=f"apps/{app}", dataset_id=dataset_id)
            )
        for model_id in ("m1", "m2"):
            tstub.CreateModel(tpb.CreateModelRequest(parent=f"apps/{app}", model_id=model_id))
    try:
        yield Services(dataset, trainer, dstub, tstub)
    finally:
        trainer.stop()
        dataset.stop()


def _paginated() -> list[tuple[MethodDescriptor, Any]]:
    """Every method of the two services whose request has a `page_token`, with its pb module."""
    found = []
    for module, service in ((dpb, "DatasetService"), (tpb, "TrainerService")):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            if "page_token" in method.input_type.fields_by_name:
                found.append((method, module))
    return found


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def _crafted(method: str, parent: str) -> dict[str, str]:
    """Tokens no call of `method` on `parent` issued, by what is wrong with them."""
    tokens = {
        "not base64": "%%%!!",
        "base64 of bytes": _b64(b"\xff\xfe\x00\x01garbage"),
        "base64 of a JSON array": _b64(b"[1,2,3]"),
        "deep nesting": _b64(b"[" * 150),
        "deep nesting, too long": _b64(b"[" * 5000),
        "a huge integer of the old form": _b64(json.dumps({"after": 10**40}).encode()),
        "the old form": _b64(json.dumps({"after": 1, "parent": parent}).encode()),
        "a very long token": "A" * 100_000,
    }
    for key in ("after", "before", "offset"):
        for label, value in (
            ("2^63", 2**63),
            ("2^63-1", 2**63 - 1),
            ("2^31", 2**31),
            ("-1", -1),
            ("a float", 1e308),
            ("true", True),
            ("a string", "5"),
            ("a nested list", [[[[1]]]]),
        ):
            tokens[f"{key} {label}"] = encode_token(method, parent, {key: value})  # type: ignore[dict-item]
        tokens[f"{key} and an extra key"] = encode_token(method, parent, {key: 1, "x": 1})
    if parent in OTHER_PARENTS:
        tokens["another parent's"] = encode_token(method, OTHER_PARENTS[parent], {"after": 1})
    other = "ListApps" if method != "ListApps" else "ListDatasets"
    tokens["another method's"] = encode_token(other, parent, {"after": 1})
    return tokens


def test_the_predictors_adapter_list_refuses_crafted_page_tokens_as_invalid_argument(
    tmp_path: Path,
) -> None:
    from loraforge.predictor.v1 import predictor_service_pb2 as ppb
    from loraforge.predictor.v1 import predictor_service_pb2_grpc as ppb_grpc
    from tests.test_predictor_helpers import tiny_base

    methods = [
        m.name
        for m in ppb.DESCRIPTOR.services_by_name["PredictorService"].methods
        if "page_token" in m.input_type.fields_by_name
    ]
    assert methods == ["ListAdapters"]
    predictor = start_service(
        "loraforge.services.predictor",
        tmp_path,
        args=[
            "--base-model",
            str(tiny_base(tmp_path)),
            "--engine",
            "transformers",
            "--trainer-address",
            f"127.0.0.1:{free_port()}",
        ],
    )
    try:
        stub = ppb_grpc.PredictorServiceStub(channel(predictor.address))
        tokens = _crafted("ListAdapters", "")
        tokens["ListApps' token"] = encode_token("ListApps", "", {"offset": 0})
        for label, token in tokens.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ListAdapters(ppb.ListAdaptersRequest(page_token=token))
            code, message = info.value.code(), info.value.details() or ""
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (label, code, message)
            assert message.startswith("page_token: not a token from a previous ListAdapters")
        assert not stub.ListAdapters(ppb.ListAdaptersRequest()).next_page_token
    finally:
        predictor.stop()


def test_every_paginated_method_refuses_crafted_page_tokens_as_invalid_argument(
    services: Services,
) -> None:
    methods = _paginated()
    assert {f"{m.containing_service.name}.{m.name}" for m, _ in methods} == set(PARENTS)
    # A token one list really issued, for every other list to refuse.
    real = services.dstub.ListDatasets(
        dpb.ListDatasetsRequest(parent=APP, page_size=1)
    ).next_page_token
    assert real
    for method, module in methods:
        key = f"{method.containing_service.name}.{method.name}"
        fields = PARENTS[key]
        parent = fields.get("parent") or fields.get("name") or ""
        stub = services.dstub if module is dpb else services.tstub
        tokens = _crafted(method.name, parent)
        if key != "DatasetService.ListDatasets":
            tokens["ListDatasets' real token"] = real
        for label, token in tokens.items():
            request = GetMessageClass(method.input_type)(**fields, page_token=token)
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, method.name)(request)
            code, message = info.value.code(), info.value.details() or ""
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, label, code, message)
            assert message.startswith(f"page_token: not a token from a previous {method.name}")
            assert "start without a token" in message
            reason, violations = error_details(info.value)
            assert reason == "INVALID_PAGE_TOKEN" and "page_token" in violations


def test_page_tokens_still_page_through_every_list(services: Services) -> None:
    def all_pages(call: Any, request: Any, items: str) -> list[str]:
        names: list[str] = []
        while True:
            response = call(request)
            names += [getattr(item, "name", "") for item in getattr(response, items)]
            if not response.next_page_token:
                return names
            request.page_token = response.next_page_token

    assert all_pages(
        services.tstub.ListModels, tpb.ListModelsRequest(parent=APP, page_size=1), "models"
    ) == [f"{APP}/models/m1", f"{APP}/models/m2"]
    templates = all_pages(
        services.tstub.ListTemplates, tpb.ListTemplatesRequest(page_size=3), "templates"
    )
    assert len(templates) == len(set(templates)) >= 10
    assert all_pages(services.dstub.ListApps, dpb.ListAppsRequest(page_size=1), "apps") == [
        "apps/probe",
        "apps/other",
    ]


def _upload(services: Services, dataset: str, file_name: str, data: bytes) -> Any:
    header = dpb.UploadHeader(dataset=dataset, file_name=file_name, max_row_errors=100)
    return services.dstub.UploadInputs(
        iter([dpb.UploadInputsRequest(header=header), dpb.UploadInputsRequest(chunk=data)])
    )


def _count(services: Services, dataset: str) -> int:
    return services.dstub.GetDataset(dpb.GetDatasetRequest(name=dataset)).dataset.input_count


def _new_dataset(services: Services, dataset_id: str) -> str:
    return services.dstub.CreateDataset(
        dpb.CreateDatasetRequest(parent=APP, dataset_id=dataset_id)
    ).dataset.name


def test_a_jsonl_row_with_deeply_nested_metadata_is_rejected_and_the_others_stored(
    services: Services,
) -> None:
    dataset = _new_dataset(services, "deep")
    good = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(4)]
    deep = '{"prompt": "q", "completion": "a", "metadata": {"x": ' + "[" * 1000 + "]" * 1000 + "}}"
    nested = json.dumps({"prompt": "q", "completion": "b", "metadata": {"x": [[[[[[1]]]]]]}})
    too_deep = json.dumps(
        {"prompt": "q", "completion": "c", "metadata": {"x": json.loads("[" * 40 + "]" * 40)}}
    )
    lines = [good[0], deep, good[1], too_deep, good[2], nested, good[3]]
    report = _upload(services, dataset, "deep.jsonl", "\n".join(lines).encode())
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (7, 5, 2)
    assert [e.line for e in report.row_errors] == [2, 4]
    assert "deeply" in report.row_errors[0].reason and "flatten" in report.row_errors[0].reason
    assert report.row_errors[1].code == "INVALID_METADATA"
    assert _count(services, dataset) == 5


def test_a_nul_character_in_a_row_rejects_that_row_and_keeps_the_others(
    services: Services,
) -> None:
    dataset = _new_dataset(services, "nul")
    rows = [f'"### Instruction: task {i} ### Response: answer {i}"' for i in range(60)]
    rows[54] = '"### Instruction: with a \x00 NUL ### Response: answer"'
    csv_data = ("input\n" + "\n".join(rows) + "\n").encode()
    report = _upload(services, dataset, "nul.csv", csv_data)
    assert (report.rows_accepted, report.rows_rejected) == (59, 1)
    (error,) = report.row_errors
    assert error.line == 56 and error.code == "NUL_CHARACTER" and "NUL" in error.reason
    escaped = json.dumps({"prompt": "a\x00b", "completion": "c"}) + "\n"
    escaped += json.dumps({"prompt": "fine", "completion": "ok"}) + "\n"
    report = _upload(services, dataset, "nul.jsonl", escaped.encode())
    assert (report.rows_accepted, report.rows_rejected) == (1, 1)
    assert report.row_errors[0].code == "NUL_CHARACTER"
    text = "".join(f"text number {i}\n" for i in range(60)) + "bad \x00 text\n"
    report = _upload(services, dataset, "nul.txt", text.encode())
    assert (report.rows_accepted, report.rows_rejected) == (60, 1)
    assert report.row_errors[0].line == 61
    assert _count(services, dataset) == 120


def _refused(call: Any, request: Any) -> dict[str, str]:
    """The field violations of a call that must be INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return error_details(info.value)[1]


def test_text_a_store_cannot_hold_is_refused_naming_the_field(services: Services) -> None:
    d, t = services.dstub, services.tstub
    fields = _refused(
        d.CreateApp, dpb.CreateAppRequest(app_id="nul", app=dpb.App(description="a\x00"))
    )
    assert "NUL" in fields["app.description"]
    fields = _refused(d.UpdateApp, dpb.UpdateAppRequest(app=dpb.App(name=APP, description="\x00")))
    assert "NUL" in fields["app.description"]
    fields = _refused(
        d.CreateDataset,
        dpb.CreateDatasetRequest(
            parent=APP, dataset_id="x", dataset=dpb.Dataset(description="\x00")
        ),
    )
    assert "dataset.description" in fields
    inputs = [
        dpb.NewInput(example=dpb.Example(prompt="ok", completion="fine")),
        dpb.NewInput(example=dpb.Example(prompt="bad\x00", completion="fine")),
        dpb.NewInput(example=dpb.Example(prompt="ok", completion="fine"), metadata={"k": "v\x00"}),
    ]
    fields = _refused(d.AddInputs, dpb.AddInputsRequest(parent=DATASET, inputs=inputs))
    assert {"inputs[1].example.prompt", "inputs[2].metadata.k"} <= set(fields)
    assert _count(services, DATASET) == 0  # none of the call's inputs was added
    fields = _refused(
        d.CreateDatasetVersion,
        dpb.CreateDatasetVersionRequest(parent=DATASET, description="\x00"),
    )
    assert "description" in fields
    header = dpb.UploadHeader(dataset=DATASET, file_name="a\x00.csv")
    fields = _refused(d.UploadInputs, iter([dpb.UploadInputsRequest(header=header)]))
    assert "header.file_name" in fields
    for request_id in ("r" * 201, "with space", "nul\x00"):
        fields = _refused(
            d.AddInputs,
            dpb.AddInputsRequest(parent=DATASET, inputs=inputs[:1], request_id=request_id),
        )
        assert "request_id" in fields
    for parent in (APP, "apps/missing"):  # refused before the app is looked up
        fields = _refused(
            t.CreateModel,
            tpb.CreateModelRequest(
                parent=parent, model_id="x", model=tpb.Model(description="\x00")
            ),
        )
        assert "model.description" in fields
    for request in (
        tpb.CreateModelVersionRequest(parent=MODEL, request_id="r" * 201),
        tpb.CreateModelVersionRequest(parent=MODEL, description="bad\x00"),
    ):
        assert set(_refused(t.CreateModelVersion, request)) & {"request_id", "description"}


def test_nan_or_infinity_in_param_overrides_is_invalid_argument_naming_the_field(
    services: Services,
) -> None:
    for value in (float("nan"), float("inf"), float("-inf")):
        overrides = struct_pb2.Struct()
        overrides.update({"trainer_config": {"learning_rate": value}})
        fields = _refused(
            services.tstub.CreateModelVersion,
            tpb.CreateModelVersionRequest(
                parent=MODEL,
                template="templates/HF_SmolLM2_135m_instruct_lora",
                dataset_version=f"{DATASET}/versions/v1",
                param_overrides=overrides,
            ),
        )
        assert "finite" in fields["param_overrides.trainer_config.learning_rate"]


def test_numbers_beyond_what_a_store_holds_are_refused_or_name_nothing(services: Services) -> None:
    for after in (2**63 - 1, 2**31):
        fields = _refused(
            lambda r: list(services.tstub.WatchModelVersion(r)),
            tpb.WatchModelVersionRequest(name=f"{MODEL}/versions/v1", after_sequence=after),
        )
        assert "between 0 and" in fields["after_sequence"]
    fields = _refused(
        lambda r: list(services.tstub.WatchModelVersion(r)),
        tpb.WatchModelVersionRequest(name=f"{MODEL}/versions/v1", after_sequence=-1),
    )
    assert "after_sequence" in fields
    dataset = _new_dataset(services, "ids")
    added = services.dstub.AddInputs(
        dpb.AddInputsRequest(
            parent=dataset, inputs=[dpb.NewInput(example=dpb.Example(prompt="p", completion="c"))]
        )
    ).inputs
    huge = [f"{dataset}/inputs/{n}" for n in (2**31, 2**63, 10**40, 10**62)]
    deleted = services.dstub.DeleteInputs(dpb.DeleteInputsRequest(parent=dataset, names=huge))
    assert deleted.deleted_count == 0 and _count(services, dataset) == 1
    deleted = services.dstub.DeleteInputs(
        dpb.DeleteInputsRequest(parent=dataset, names=[*huge, added[0].name])
    )
    assert deleted.deleted_count == 1 and _count(services, dataset) == 0

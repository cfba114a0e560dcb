"""The client library: resources as objects, gRPC errors as one clear `ClientError`."""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import grpc
import yaml
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dgrpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pgrpc
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tgrpc

DEFAULT_ADDRESSES = {
    "dataset": "127.0.0.1:50051",
    "trainer": "127.0.0.1:50052",
    "predictor": "127.0.0.1:50053",
}
UPLOAD_CHUNK = 1 << 20
# Predictor replicas behind Envoy are picked by this header, so one model's adapter stays warm.
MODEL_ROUTING_HEADER = "x-loraforge-model"
FINAL_STATES = {
    tpb.MODEL_VERSION_STATE_TRAINED,
    tpb.MODEL_VERSION_STATE_FAILED,
    tpb.MODEL_VERSION_STATE_CANCELLED,
}

T = TypeVar("T")


class ClientError(Exception):
    """A failed call: the gRPC code, the server's message and the bad fields, in one line."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        fields: list[tuple[str, str]] | None = None,
    ):
        self.code = code
        self.message = message
        self.reason = reason
        self.fields = fields or []
        text = f"{code.name}: {message}"
        extra = [f"{f}: {d}" for f, d in self.fields if f"{f}: {d}" not in message]
        if extra:
            text += " (" + "; ".join(extra) + ")"
        super().__init__(text)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ClientError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        reason, fields = "", []
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except (ValueError, AttributeError):
            status = None
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields = [(v.field, v.description) for v in bad.field_violations]
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in (message or "").lower():
            message = f"{message} — are the services running? (`loraforge up`)"
        return cls(code, message or code.name, reason, fields)


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as err:
        raise ClientError.from_rpc(err) from None


def _stream(iterator: Iterable[T]) -> Iterator[T]:
    try:
        yield from iterator
    except grpc.RpcError as err:
        raise ClientError.from_rpc(err) from None


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )


def _app_name(app_id: str) -> str:
    return app_id if app_id.startswith("apps/") else f"apps/{app_id}"


class Client:
    """Connections to the three services. Addresses default to `LORAFORGE_{DATASET,TRAINER,PREDICTOR}_ADDRESS`."""

    def __init__(
        self, dataset: str | None = None, trainer: str | None = None, predictor: str | None = None
    ):
        self.addresses = {
            svc: addr
            or os.environ.get(f"LORAFORGE_{svc.upper()}_ADDRESS")
            or DEFAULT_ADDRESSES[svc]
            for svc, addr in (("dataset", dataset), ("trainer", trainer), ("predictor", predictor))
        }
        self._channels = {svc: _channel(addr) for svc, addr in self.addresses.items()}
        self.datasets = dgrpc.DatasetServiceStub(self._channels["dataset"])
        self.trainer = tgrpc.TrainerServiceStub(self._channels["trainer"])
        self.predictor = pgrpc.PredictorServiceStub(self._channels["predictor"])

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Apps

    def create_app(self, app_id: str, description: str = "") -> App:
        resp = _call(
            self.datasets.CreateApp,
            dpb.CreateAppRequest(app_id=app_id, app=dpb.App(description=description)),
        )
        return App(self, resp.app)

    def app(self, app_id: str) -> App:
        return App(self, _call(self.datasets.GetApp, dpb.GetAppRequest(name=_app_name(app_id))).app)

    def list_apps(self) -> list[App]:
        out, token = [], ""
        while True:
            resp = _call(
                self.datasets.ListApps, dpb.ListAppsRequest(page_size=1000, page_token=token)
            )
            out += [App(self, a) for a in resp.apps]
            token = resp.next_page_token
            if not token:
                return out

    def delete_app(self, app_id: str, force: bool = False) -> None:
        _call(self.datasets.DeleteApp, dpb.DeleteAppRequest(name=_app_name(app_id), force=force))

    # Templates and model types

    def list_model_types(self) -> list[tpb.ModelType]:
        return list(_call(self.trainer.ListModelTypes, tpb.ListModelTypesRequest()).model_types)

    def list_templates(self) -> list[tpb.Template]:
        return list(
            _call(self.trainer.ListTemplates, tpb.ListTemplatesRequest(page_size=1000)).templates
        )

    def list_base_models(self) -> list[tpb.BaseModel]:
        """The base models a template's `model_config.pretrained_model_name_or_path` may name."""
        out: list[tpb.BaseModel] = []
        token = ""
        while True:
            resp = _call(
                self.trainer.ListBaseModels,
                tpb.ListBaseModelsRequest(page_size=1000, page_token=token),
            )
            out += list(resp.base_models)
            token = resp.next_page_token
            if not token:
                return out

    def get_template(self, template: str) -> tpb.Template:
        name = template if template.startswith("templates/") else f"templates/{template}"
        return _call(self.trainer.GetTemplate, tpb.GetTemplateRequest(name=name)).template

    # Model versions by full name (what the CLI uses)

    def model_version(self, name: str) -> tpb.ModelVersion:
        return _call(
            self.trainer.GetModelVersion, tpb.GetModelVersionRequest(name=name)
        ).model_version

    def watch(self, model_version: str, after_sequence: int = 0) -> Iterator[tpb.TrainingEvent]:
        stream = self.trainer.WatchModelVersion(
            tpb.WatchModelVersionRequest(name=model_version, after_sequence=after_sequence)
        )
        for resp in _stream(stream):
            yield resp.event

    def logs(self, model_version: str) -> list[tpb.TrainingEvent]:
        events, token = [], ""
        while True:
            resp = _call(
                self.trainer.GetModelVersionLogs,
                tpb.GetModelVersionLogsRequest(name=model_version, page_token=token),
            )
            events += list(resp.events)
            token = resp.next_page_token
            if not token:
                return events

    def cancel(self, model_version: str) -> tpb.ModelVersion:
        return _call(
            self.trainer.CancelModelVersion, tpb.CancelModelVersionRequest(name=model_version)
        ).model_version

    # Prediction

    def predict(
        self,
        texts: list[str],
        model: str = "",
        *,
        base_model: bool = False,
        inference_params: dict[str, Any] | None = None,
    ) -> Prediction:
        """Predicts with a model or model version name, or the base model (`base_model=True`)."""
        inputs = [ppb.PredictInput(text=t, id=str(i)) for i, t in enumerate(texts)]
        return self._predict(inputs, model, base_model, inference_params)

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        model: str = "",
        *,
        base_model: bool = False,
        inference_params: dict[str, Any] | None = None,
    ) -> Prediction:
        """Answers chats (lists of `{"role", "content"}`) through the base model's chat template."""
        inputs = [
            ppb.PredictInput(
                id=str(i),
                messages=[ppb.ChatMessage(role=m["role"], content=m["content"]) for m in c],
            )
            for i, c in enumerate(conversations)
        ]
        return self._predict(inputs, model, base_model, inference_params)

    def _predict(
        self,
        inputs: list[ppb.PredictInput],
        model: str,
        base_model: bool,
        inference_params: dict[str, Any] | None,
    ) -> Prediction:
        request = ppb.PredictRequest(
            model=model,
            base_model=base_model,
            inputs=inputs,
            params=_inference_params(inference_params),
        )
        resp = _call(
            self.predictor.Predict, request, metadata=[(MODEL_ROUTING_HEADER, model or "base")]
        )
        return Prediction(resp)

    def predict_stream(
        self,
        text: str,
        model: str = "",
        *,
        base_model: bool = False,
        inference_params: dict[str, Any] | None = None,
    ) -> Iterator[ppb.PredictStreamResponse]:
        request = ppb.PredictStreamRequest(
            model=model,
            base_model=base_model,
            input=ppb.PredictInput(text=text),
            params=_inference_params(inference_params),
        )
        yield from _stream(
            self.predictor.PredictStream(
                request, metadata=[(MODEL_ROUTING_HEADER, model or "base")]
            )
        )


def _inference_params(params: dict[str, Any] | None) -> ppb.InferenceParams:
    msg = ppb.InferenceParams()
    if params:
        try:
            json_format.ParseDict(params, msg)
        except json_format.ParseError as err:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, f"inference_params: {err}"
            ) from None
    return msg


@dataclass
class PredictionOutput:
    """One output, shaped like the seed SDK's: `output.data.text.raw`."""

    data: SimpleNamespace
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    id: str = ""


@dataclass
class Prediction:
    """A Predict response; `outputs[i].data.text.raw` is the i-th generated text."""

    response: ppb.PredictResponse
    outputs: list[PredictionOutput] = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = [
            PredictionOutput(
                data=SimpleNamespace(text=SimpleNamespace(raw=o.text)),
                prompt_tokens=o.prompt_tokens,
                completion_tokens=o.completion_tokens,
                finish_reason=ppb.FinishReason.Name(o.finish_reason)
                .removeprefix("FINISH_REASON_")
                .lower(),
                id=o.id,
            )
            for o in self.response.outputs
        ]


class App:
    """An app: holds datasets and models."""

    def __init__(self, client: Client, pb: dpb.App):
        self.client, self.pb = client, pb
        self.name = pb.name

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    @property
    def app_id(self) -> str:
        return self.name.removeprefix("apps/")

    def create_dataset(self, dataset_id: str, description: str = "") -> Dataset:
        resp = _call(
            self.client.datasets.CreateDataset,
            dpb.CreateDatasetRequest(
                parent=self.name,
                dataset_id=dataset_id,
                dataset=dpb.Dataset(description=description),
            ),
        )
        return Dataset(self.client, resp.dataset)

    def dataset(self, dataset_id: str) -> Dataset:
        resp = _call(
            self.client.datasets.GetDataset,
            dpb.GetDatasetRequest(name=f"{self.name}/datasets/{dataset_id}"),
        )
        return Dataset(self.client, resp.dataset)

    def list_datasets(self) -> list[Dataset]:
        resp = _call(
            self.client.datasets.ListDatasets,
            dpb.ListDatasetsRequest(parent=self.name, page_size=1000),
        )
        return [Dataset(self.client, d) for d in resp.datasets]

    def create_model(
        self, model_id: str, model_type_id: str = "text-to-text", description: str = ""
    ) -> Model:
        model_type = (
            model_type_id
            if model_type_id.startswith("modelTypes/")
            else f"modelTypes/{model_type_id}"
        )
        resp = _call(
            self.client.trainer.CreateModel,
            tpb.CreateModelRequest(
                parent=self.name,
                model_id=model_id,
                model=tpb.Model(model_type=model_type, description=description),
            ),
        )
        return Model(self.client, resp.model)

    def model(self, model_id: str) -> Model:
        resp = _call(
            self.client.trainer.GetModel, tpb.GetModelRequest(name=f"{self.name}/models/{model_id}")
        )
        return Model(self.client, resp.model)

    def list_models(self) -> list[Model]:
        resp = _call(
            self.client.trainer.ListModels, tpb.ListModelsRequest(parent=self.name, page_size=1000)
        )
        return [Model(self.client, m) for m in resp.models]


class Dataset:
    """A dataset: upload examples, freeze versions."""

    def __init__(self, client: Client, pb: dpb.Dataset):
        self.client, self.pb = client, pb
        self.name = pb.name

    def __repr__(self) -> str:
        return f"Dataset({self.name!r})"

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        skip_duplicates: bool = False,
        max_row_errors: int = 100,
        progress: Callable[[int, int, int], None] | None = None,
    ) -> dpb.UploadInputsResponse:
        """Streams a file (any supported format) in 1 MiB chunks.

        `progress(bytes_sent, total_bytes, lines_sent)` is called after each chunk.
        """
        path = Path(path)
        total = path.stat().st_size

        def messages() -> Iterator[dpb.UploadInputsRequest]:
            yield dpb.UploadInputsRequest(
                header=dpb.UploadHeader(
                    dataset=self.name,
                    file_name=path.name,
                    skip_duplicates=skip_duplicates,
                    max_row_errors=max_row_errors,
                )
            )
            sent = lines = 0
            with path.open("rb") as fh:
                while chunk := fh.read(UPLOAD_CHUNK):
                    sent += len(chunk)
                    lines += chunk.count(b"\n")
                    yield dpb.UploadInputsRequest(chunk=chunk)
                    if progress:
                        progress(sent, total, lines)

        return _call(self.client.datasets.UploadInputs, messages())

    def upload_from_csv(
        self, csv_path: str | os.PathLike[str], **kwargs: Any
    ) -> dpb.UploadInputsResponse:
        """The seed SDK's name for an upload; any supported format works."""
        return self.upload_file(csv_path, **kwargs)

    def add_examples(self, examples: list[tuple[str, str]]) -> list[dpb.Input]:
        """Adds (prompt, completion) pairs directly."""
        inputs = [dpb.NewInput(example=dpb.Example(prompt=p, completion=c)) for p, c in examples]
        return list(
            _call(
                self.client.datasets.AddInputs,
                dpb.AddInputsRequest(parent=self.name, inputs=inputs),
            ).inputs
        )

    def create_version(self, version_id: str = "", description: str = "") -> dpb.DatasetVersion:
        resp = _call(
            self.client.datasets.CreateDatasetVersion,
            dpb.CreateDatasetVersionRequest(
                parent=self.name, version_id=version_id, description=description
            ),
        )
        return resp.dataset_version

    def list_versions(self) -> list[dpb.DatasetVersion]:
        resp = _call(
            self.client.datasets.ListDatasetVersions,
            dpb.ListDatasetVersionsRequest(parent=self.name, page_size=1000),
        )
        return list(resp.dataset_versions)


def _template_defaults(template: tpb.Template) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for p in template.parameters:
        node = params
        *groups, leaf = p.path.split(".")
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = (
            json_format.MessageToDict(p.default_value) if p.HasField("default_value") else None
        )
    return params


def _diff(params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        base = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(base, dict):
            sub = _diff(value, base)
            if sub:
                out[key] = sub
        elif value != base:
            out[key] = value
    return out


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


@dataclass
class TrainingStatus:
    """What `training_status` returns: the state in words and the seed's code, progress, logs."""

    state: str
    status_code: int
    description: str
    progress: tpb.TrainingProgress
    metrics: dict[str, float]
    logs: list[str]
    model_version: tpb.ModelVersion


class Model:
    """A model: choose a template, set parameters, train versions, predict."""

    def __init__(self, client: Client, pb: tpb.Model):
        self.client, self.pb = client, pb
        self.name = pb.name
        self.template: str | None = None
        self.params: dict[str, Any] = {}
        self._defaults: dict[str, Any] = {}
        self.dataset_version: str = ""

    def __repr__(self) -> str:
        return f"Model({self.name!r})"

    def list_training_templates(self) -> list[str]:
        return [t.name.removeprefix("templates/") for t in self.client.list_templates()]

    def get_params(
        self, template: str, save_to: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """Selects `template` and returns its parameters with defaults; optionally saves them as YAML."""
        tpl = self.client.get_template(template)
        self.template = tpl.name
        self._defaults = _template_defaults(tpl)
        self.params = copy.deepcopy(self._defaults)
        if save_to:
            doc = {
                "template": tpl.name.removeprefix("templates/"),
                "dataset_version": self.dataset_version,
                **self.params,
            }
            Path(save_to).write_text(yaml.safe_dump(doc, sort_keys=False))
        return copy.deepcopy(self.params)

    def update_params(
        self, params_file: str | os.PathLike[str] | None = None, **updates: Any
    ) -> dict[str, Any]:
        """Updates parameters from a YAML file written by `get_params` and/or keyword groups.

        `dataset_version` and `template` are recognised; everything else is a parameter group
        (e.g. `trainer_config={"num_train_epochs": 2}`) or `invalid_data_tolerance_percent`.
        """
        merged: dict[str, Any] = {}
        if params_file:
            loaded = yaml.safe_load(Path(params_file).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{params_file}: expected a YAML mapping"
                )
            merged.update(loaded)
        _merge(merged, updates)
        template = merged.pop("template", None)
        if template and (
            self.template is None
            or template.removeprefix("templates/") != self.template.removeprefix("templates/")
        ):
            self.get_params(template)
        if self.template is None:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no template chosen: call get_params(template=...) first",
            )
        dataset_version = merged.pop("dataset_version", None)
        if dataset_version is not None:
            self.dataset_version = getattr(dataset_version, "name", dataset_version)
        _merge(self.params, merged)
        return copy.deepcopy(self.params)

    def train(
        self, dataset_version: Any = None, version_id: str = "", description: str = ""
    ) -> str:
        """Starts a training run with the chosen template and parameters; returns the version id."""
        if self.template is None:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no template chosen: call get_params(template=...) first",
            )
        if dataset_version is not None:
            self.dataset_version = getattr(dataset_version, "name", dataset_version)
        overrides = struct_pb2.Struct()
        overrides.update(_diff(self.params, self._defaults))
        resp = _call(
            self.client.trainer.CreateModelVersion,
            tpb.CreateModelVersionRequest(
                parent=self.name,
                version_id=version_id,
                template=self.template,
                dataset_version=self.dataset_version,
                param_overrides=overrides,
                description=description,
                request_id=uuid.uuid4().hex,
            ),
        )
        return resp.model_version.name.rsplit("/", 1)[-1]

    def version_name(self, version_id: str) -> str:
        return (
            version_id if version_id.startswith("apps/") else f"{self.name}/versions/{version_id}"
        )

    def training_status(self, version_id: str, training_logs: bool = False) -> TrainingStatus:
        mv = self.client.model_version(self.version_name(version_id))
        logs = []
        if training_logs:
            logs = [
                e.log.message for e in self.client.logs(mv.name) if e.WhichOneof("kind") == "log"
            ]
        return TrainingStatus(
            state=tpb.ModelVersionState.Name(mv.state).removeprefix("MODEL_VERSION_STATE_"),
            status_code=mv.status_code,
            description=mv.failure_reason
            or tpb.ModelVersionState.Name(mv.state).removeprefix("MODEL_VERSION_STATE_").lower(),
            progress=mv.progress,
            metrics=dict(mv.metrics),
            logs=logs,
            model_version=mv,
        )

    def watch(self, version_id: str) -> Iterator[tpb.TrainingEvent]:
        return self.client.watch(self.version_name(version_id))

    def wait(self, version_id: str, timeout: float = 3600) -> TrainingStatus:
        """Follows the run until it ends; returns its final status."""
        deadline = time.monotonic() + timeout
        for _ in self.watch(version_id):
            if time.monotonic() > deadline:
                raise ClientError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"training did not end within {timeout}s"
                )
        return self.training_status(version_id)

    def predict_by_bytes(
        self,
        input_bytes: bytes,
        input_type: str = "text",
        inference_params: dict[str, Any] | None = None,
        version_id: str = "",
    ) -> Prediction:
        """The seed SDK's call: returns a prediction whose `outputs[0].data.text.raw` is the text."""
        if input_type != "text":
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input_type {input_type!r}: only 'text' is supported",
            )
        try:
            text = input_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, "input_bytes is not valid UTF-8 text"
            ) from None
        target = self.version_name(version_id) if version_id else self.name
        return self.client.predict([text], target, inference_params=inference_params)

    def predict(
        self, texts: list[str], inference_params: dict[str, Any] | None = None
    ) -> Prediction:
        return self.client.predict(texts, self.name, inference_params=inference_params)

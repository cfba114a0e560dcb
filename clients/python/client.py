"""The client library: resources as objects, gRPC errors as one clear `ClientError`.

Names may be given in full (`apps/a/models/m`) or short (`a/m`), as the CLI takes them.
Lists follow every page. Creates that change state carry a request id (one the caller
passes, or a fresh one per call) and are retried with that same id while the service is
unavailable, so a retry never creates twice.

Every call carries an API key as `authorization: Bearer <key>`: the `api_key` argument,
else `LORAFORGE_API_KEY`, else the file `LORAFORGE_API_KEY_FILE` names, else
`{LORAFORGE_HOME or ~/.loraforge}/admin.key` (the admin key `loraforge up` leaves there)
if it exists. With a CA bundle (`tls_ca_file`, else `LORAFORGE_TLS_CA_FILE`) the
channels use TLS; `tls_cert_file`/`tls_key_file` (`LORAFORGE_TLS_CLIENT_CERT_FILE`,
`LORAFORGE_TLS_CLIENT_KEY_FILE`) add a client certificate for services that ask for one.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import grpc
import yaml
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.auth.v1 import auth_service_pb2 as apb
from loraforge.auth.v1 import auth_service_pb2_grpc as agrpc
from loraforge.client.params import load_yaml, merge, overrides, template_defaults
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dgrpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pgrpc
from loraforge.services.common.channels import (
    ChannelSecurity,
    channel_credentials,
    read_key_file,
    sync_channel,
)
from loraforge.services.common.errors import InvalidArgument
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tgrpc

DEFAULT_ADDRESSES = {
    "dataset": "127.0.0.1:50051",
    "trainer": "127.0.0.1:50052",
    "predictor": "127.0.0.1:50053",
}
UPLOAD_CHUNK = 1 << 20
# Items a List call asks for at once (the services' maximum).
PAGE_SIZE = 1000
# Predictor replicas behind Envoy are picked by this header, so one model's adapter stays warm.
MODEL_ROUTING_HEADER = "x-loraforge-model"
FINAL_STATES = {
    tpb.MODEL_VERSION_STATE_TRAINED,
    tpb.MODEL_VERSION_STATE_FAILED,
    tpb.MODEL_VERSION_STATE_CANCELLED,
}

# Words of a failed TLS handshake in gRPC's connection errors.
TLS_WORDS = ("ssl", "handshake", "certificate", "tls")
KEY_HINT = (
    "pass an API key with --api-key or --api-key-file, or set LORAFORGE_API_KEY or "
    "LORAFORGE_API_KEY_FILE; `loraforge up` writes the admin key to ~/.loraforge/admin.key "
    "(HOME/admin.key for `--home HOME`), and an admin makes app keys with `loraforge keys create`"
)

# Pauses between the attempts of a call that carries a request id, while the service is
# unavailable (restarting, or the connection dropped before the answer came).
RETRY_DELAYS = (0.5, 1.0, 2.0)

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
        # A violation the message already says (with or without its field) is not repeated.
        extra = [f"{f}: {d}" for f, d in self.fields if d not in message]
        if extra:
            text += " (" + "; ".join(extra) + ")"
        super().__init__(text)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> ClientError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        reason, fields = "", []
        try:
            status = rpc_status.from_call(err)
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
        low = (message or "").lower()
        if code == grpc.StatusCode.UNAVAILABLE and any(w in low for w in TLS_WORDS):
            message = (
                f"{message} — the TLS handshake failed: does the CA bundle (--tls-ca-file, "
                "LORAFORGE_TLS_CA_FILE) sign the server's certificate, and does the certificate "
                "name this address? A service that asks for client certificates also needs "
                "LORAFORGE_TLS_CLIENT_CERT_FILE and LORAFORGE_TLS_CLIENT_KEY_FILE"
            )
        elif code == grpc.StatusCode.UNAVAILABLE and "connect" in low:
            message = (
                f"{message} — are the services running? (`loraforge up`) If they serve TLS, "
                "pass their CA bundle (--tls-ca-file or LORAFORGE_TLS_CA_FILE)"
            )
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            message = f"{message or 'no valid API key'} — {KEY_HINT}"
        return cls(code, message or code.name, reason, fields)


def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as err:
        raise ClientError.from_rpc(err) from None


def _retrying(fn: Callable[[], T]) -> T:
    """Runs a call that carries a request id, again while the service is unavailable.

    `fn` sends the same request (so the same request id) every time: the service answers a
    retry of a call it already did with that call's result.
    """
    for delay in (*RETRY_DELAYS, None):
        try:
            return fn()
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if delay is None or code != grpc.StatusCode.UNAVAILABLE:
                raise ClientError.from_rpc(err) from None
        time.sleep(delay)
    raise AssertionError("unreachable")


def _request_id(request_id: str | None) -> str:
    return request_id or uuid.uuid4().hex


def _stream(iterator: Iterable[T]) -> Iterator[T]:
    try:
        yield from iterator
    except grpc.RpcError as err:
        raise ClientError.from_rpc(err) from None


def _pages(fn: Callable[..., Any], request: Any, items: str) -> list[Any]:
    """Every item of a List call, page after page."""
    out: list[Any] = []
    while True:
        resp = _call(fn, request)
        out += list(getattr(resp, items))
        if not resp.next_page_token:
            return out
        request.page_token = resp.next_page_token


def _channel(address: str, security: ChannelSecurity, interceptors: Sequence[Any]) -> grpc.Channel:
    channel = sync_channel(address, security)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def home() -> Path:
    """`LORAFORGE_HOME`, else ~/.loraforge: where `loraforge up` keeps its state."""
    return Path(os.environ.get("LORAFORGE_HOME") or Path.home() / ".loraforge")


def discover_api_key(api_key: str | None = None, api_key_file: str | None = None) -> str:
    """The key to send: `api_key`, the file `api_key_file`, `LORAFORGE_API_KEY`, the file
    `LORAFORGE_API_KEY_FILE`, then `{home}/admin.key` if it exists; '' for none.

    An explicit `api_key=""` means no key. A named file that cannot be read is a
    ClientError (INVALID_ARGUMENT) naming it."""
    try:
        if api_key is not None:
            return api_key.strip()
        if api_key_file:
            return read_key_file(api_key_file, "--api-key-file")
        if os.environ.get("LORAFORGE_API_KEY", "").strip():
            return os.environ["LORAFORGE_API_KEY"].strip()
        if os.environ.get("LORAFORGE_API_KEY_FILE"):
            return read_key_file(os.environ["LORAFORGE_API_KEY_FILE"], "LORAFORGE_API_KEY_FILE")
        admin = home() / "admin.key"
        if admin.is_file():
            return read_key_file(str(admin), f"the admin key {admin}")
    except InvalidArgument as exc:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None
    return ""


def client_security(
    api_key: str | None = None,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    *,
    api_key_file: str | None = None,
) -> ChannelSecurity:
    """The key and TLS files a client uses: the arguments, else the `LORAFORGE_*` variables.

    A TLS file that cannot be read is a ClientError (INVALID_ARGUMENT) naming it."""
    env = os.environ.get
    ca = env("LORAFORGE_TLS_CA_FILE", "") if tls_ca_file is None else tls_ca_file
    cert = env("LORAFORGE_TLS_CLIENT_CERT_FILE", "") if tls_cert_file is None else tls_cert_file
    key = env("LORAFORGE_TLS_CLIENT_KEY_FILE", "") if tls_key_file is None else tls_key_file
    security = ChannelSecurity(
        ca_file=ca,
        cert_file=cert if ca else "",
        key_file=key if ca else "",
        api_key=discover_api_key(api_key, api_key_file),
    )
    if security.tls:
        try:
            channel_credentials(security)  # reads the files now: a bad path fails here
        except InvalidArgument as exc:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None
    return security


def resource_name(arg: str, *kinds: str) -> str:
    """A full resource name from a full (`apps/a/datasets/d`) or short (`a/d`) one.

    `kinds` are the name's collections in singular, e.g. `("app", "dataset")`.
    """
    pattern = "/".join(f"{k}s/{{{k}}}" for k in kinds)
    if arg.startswith("apps/"):
        if len(arg.split("/")) != 2 * len(kinds):
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{arg!r}: expected a name like {pattern}"
            )
        return arg
    parts = arg.split("/")
    if len(parts) != len(kinds) or not all(parts):
        raise ClientError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{arg!r}: expected a name like {pattern} (or {'/'.join(kinds)})",
        )
    return "/".join(f"{k}s/{p}" for k, p in zip(kinds, parts, strict=True))


def model_name(arg: str) -> str:
    """A model or model version name from a full or short form (`a/m`, `a/m/v`); '' stays ''."""
    if not arg:
        return ""
    if arg.startswith("apps/"):
        kinds = ("app", "model", "version") if "/versions/" in arg else ("app", "model")
    else:
        kinds = ("app", "model", "version") if arg.count("/") == 2 else ("app", "model")
    return resource_name(arg, *kinds)


def version_name(arg: str) -> str:
    """A model version name from a full or short form (`a/m/v`)."""
    return resource_name(arg, "app", "model", "version")


def version_or_checkpoint_name(arg: str) -> str:
    """A model version or checkpoint name: `a/m/v`, `a/m/v@step` or a full name."""
    if "/checkpoints/" in arg:
        return resource_name(arg, "app", "model", "version", "checkpoint")
    version, at, step = arg.partition("@")
    if at:
        return f"{version_name(version)}/checkpoints/{step}"
    return version_name(arg)


def _app_name(app_id: str) -> str:
    return resource_name(app_id, "app")


def _mask(**fields: Any) -> tuple[dict[str, Any], field_mask_pb2.FieldMask]:
    """The fields an update sets (None: unchanged) and the mask that names them."""
    chosen = {k: v for k, v in fields.items() if v is not None}
    return chosen, field_mask_pb2.FieldMask(paths=sorted(chosen))


class Client:
    """Connections to the three services. Addresses default to `LORAFORGE_{DATASET,TRAINER,PREDICTOR}_ADDRESS`.

    `api_key`: the key every call carries (None: found as the module says; "": none).
    `tls_ca_file`: CA bundle that verifies the services (None: `LORAFORGE_TLS_CA_FILE`;
    "": plaintext). `tls_cert_file`, `tls_key_file`: a client certificate (mTLS).
    `interceptors` (gRPC client interceptors) apply to every call: headers, tracing.
    """

    def __init__(
        self,
        dataset: str | None = None,
        trainer: str | None = None,
        predictor: str | None = None,
        *,
        api_key: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        interceptors: Sequence[Any] = (),
    ):
        self.addresses = {
            svc: addr
            or os.environ.get(f"LORAFORGE_{svc.upper()}_ADDRESS")
            or DEFAULT_ADDRESSES[svc]
            for svc, addr in (("dataset", dataset), ("trainer", trainer), ("predictor", predictor))
        }
        self.security = client_security(api_key, tls_ca_file, tls_cert_file, tls_key_file)
        self._channels = {
            svc: _channel(addr, self.security, interceptors) for svc, addr in self.addresses.items()
        }
        # API keys are the dataset service's (it owns the apps keys belong to).
        self.auth = agrpc.AuthServiceStub(self._channels["dataset"])
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

    # API keys

    def create_api_key(
        self,
        app: str = "",
        scopes: Sequence[str] = (),
        *,
        ttl_seconds: float = 0,
        description: str = "",
    ) -> tuple[apb.ApiKey, str]:
        """A new key (admin only): for `app` with `scopes`, or an admin key (`app` empty,
        scopes `admin`). Returns the key as listed and its secret, which is shown only now."""
        request = apb.CreateApiKeyRequest(
            app=_app_name(app) if app else "", scopes=list(scopes), description=description
        )
        if ttl_seconds:
            request.ttl.FromTimedelta(datetime.timedelta(seconds=ttl_seconds))
        resp = _call(self.auth.CreateApiKey, request)
        return resp.api_key, resp.secret

    def list_api_keys(self, app: str = "", *, show_inactive: bool = False) -> list[apb.ApiKey]:
        """Keys by id and prefix, never a secret, newest first (admin only)."""
        request = apb.ListApiKeysRequest(
            app=_app_name(app) if app else "", show_inactive=show_inactive, page_size=PAGE_SIZE
        )
        return _pages(self.auth.ListApiKeys, request, "api_keys")

    def revoke_api_key(self, name: str) -> apb.ApiKey:
        """Revokes a key by `apiKeys/{id}`, its id or its prefix `lf_{id}` (admin only)."""
        return _call(self.auth.RevokeApiKey, apb.RevokeApiKeyRequest(name=name)).api_key

    def whoami(self) -> apb.Principal:
        """Who this client's key is and what it may do."""
        return _call(self.auth.WhoAmI, apb.WhoAmIRequest()).principal

    # Apps

    def create_app(self, app_id: str, description: str = "") -> App:
        resp = _call(
            self.datasets.CreateApp,
            dpb.CreateAppRequest(app_id=app_id, app=dpb.App(description=description)),
        )
        return App(self, resp.app)

    def app(self, app_id: str) -> App:
        return App(self, _call(self.datasets.GetApp, dpb.GetAppRequest(name=_app_name(app_id))).app)

    def dataset(self, name: str) -> Dataset:
        """A dataset by name: `apps/a/datasets/d` or `a/d`."""
        resp = _call(
            self.datasets.GetDataset,
            dpb.GetDatasetRequest(name=resource_name(name, "app", "dataset")),
        )
        return Dataset(self, resp.dataset)

    def model(self, name: str) -> Model:
        """A model by name: `apps/a/models/m` or `a/m`."""
        resp = _call(
            self.trainer.GetModel, tpb.GetModelRequest(name=resource_name(name, "app", "model"))
        )
        return Model(self, resp.model)

    def list_apps(self, *, page_size: int = PAGE_SIZE) -> list[App]:
        """Every app; `page_size` is how many each call fetches."""
        apps = _pages(self.datasets.ListApps, dpb.ListAppsRequest(page_size=page_size), "apps")
        return [App(self, a) for a in apps]

    def update_app(self, app_id: str, *, description: str | None = None, etag: str = "") -> App:
        """Changes the fields given (None leaves a field as it is).

        With `etag` (from `App.pb.etag`), ABORTED if the app changed since it was read.
        """
        fields, mask = _mask(description=description)
        resp = _call(
            self.datasets.UpdateApp,
            dpb.UpdateAppRequest(
                app=dpb.App(name=_app_name(app_id), etag=etag, **fields), update_mask=mask
            ),
        )
        return App(self, resp.app)

    def delete_app(self, app_id: str, force: bool = False) -> None:
        _call(self.datasets.DeleteApp, dpb.DeleteAppRequest(name=_app_name(app_id), force=force))

    def update_dataset(
        self, name: str, *, description: str | None = None, etag: str = ""
    ) -> Dataset:
        """Changes the fields given (None leaves a field as it is) of `a/d` or its full name.

        With `etag` (from `Dataset.pb.etag`), ABORTED if the dataset changed since it was read.
        """
        fields, mask = _mask(description=description)
        resp = _call(
            self.datasets.UpdateDataset,
            dpb.UpdateDatasetRequest(
                dataset=dpb.Dataset(
                    name=resource_name(name, "app", "dataset"), etag=etag, **fields
                ),
                update_mask=mask,
            ),
        )
        return Dataset(self, resp.dataset)

    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        notes: str | None = None,
        default_inference_params: dict[str, Any] | None = None,
        etag: str = "",
        best_version: str | None = None,
    ) -> Model:
        """Changes the fields given (None leaves a field as it is) of `a/m` or its full name.

        `default_inference_params` (e.g. `{"temperature": 0.7, "max_tokens": 64}`) replaces
        the model's defaults; `{}` removes them. `best_version` (`a/m/v` or a full name; ""
        clears it) must be a TRAINED version of the model. With `etag` (from
        `Model.pb.etag`), ABORTED if the model changed since it was read.
        """
        fields, mask = _mask(
            description=description,
            notes=notes,
            default_inference_params=default_inference_params,
            best_version=version_name(best_version) if best_version else best_version,
        )
        if "default_inference_params" in fields:
            fields["default_inference_params"] = _inference_params(
                fields["default_inference_params"], "default_inference_params"
            )
            if not fields["default_inference_params"].ListFields():
                del fields["default_inference_params"]  # in the mask, unset: cleared
        resp = _call(
            self.trainer.UpdateModel,
            tpb.UpdateModelRequest(
                model=tpb.Model(name=resource_name(name, "app", "model"), etag=etag, **fields),
                update_mask=mask,
            ),
        )
        return Model(self, resp.model)

    # Templates and model types

    def list_model_types(self) -> list[tpb.ModelType]:
        return _pages(
            self.trainer.ListModelTypes,
            tpb.ListModelTypesRequest(page_size=PAGE_SIZE),
            "model_types",
        )

    def list_templates(self) -> list[tpb.Template]:
        return _pages(
            self.trainer.ListTemplates, tpb.ListTemplatesRequest(page_size=PAGE_SIZE), "templates"
        )

    def list_base_models(self) -> list[tpb.BaseModel]:
        """The base models a template's `model_config.pretrained_model_name_or_path` may name."""
        return _pages(
            self.trainer.ListBaseModels,
            tpb.ListBaseModelsRequest(page_size=PAGE_SIZE),
            "base_models",
        )

    def get_template(self, template: str) -> tpb.Template:
        name = template if template.startswith("templates/") else f"templates/{template}"
        return _call(self.trainer.GetTemplate, tpb.GetTemplateRequest(name=name)).template

    # Model versions by name: `apps/a/models/m/versions/v` or `a/m/v`

    def model_version(self, name: str) -> tpb.ModelVersion:
        return _call(
            self.trainer.GetModelVersion, tpb.GetModelVersionRequest(name=version_name(name))
        ).model_version

    def watch(self, model_version: str, after_sequence: int = 0) -> Iterator[tpb.TrainingEvent]:
        request = tpb.WatchModelVersionRequest(
            name=version_name(model_version), after_sequence=after_sequence
        )
        for resp in _stream(self.trainer.WatchModelVersion(request)):
            yield resp.event

    def logs(self, model_version: str) -> list[tpb.TrainingEvent]:
        return _pages(
            self.trainer.GetModelVersionLogs,
            tpb.GetModelVersionLogsRequest(name=version_name(model_version)),
            "events",
        )

    def cancel(self, model_version: str) -> tpb.ModelVersion:
        return _call(
            self.trainer.CancelModelVersion,
            tpb.CancelModelVersionRequest(name=version_name(model_version)),
        ).model_version

    def checkpoints(self, model_version: str) -> list[tpb.Checkpoint]:
        """A run's checkpoints by step (step, epoch, losses); each exports and continues by name."""
        return _pages(
            self.trainer.ListCheckpoints,
            tpb.ListCheckpointsRequest(parent=version_name(model_version)),
            "checkpoints",
        )

    def export(
        self,
        model_version: str,
        dest: str | os.PathLike[str],
        *,
        merged: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[Path, tpb.ExportInfo]:
        """Downloads a TRAINED version as one tar archive; returns where it is and what it holds.

        The archive holds the PEFT adapter and `manifest.json` in one folder, or with `merged`
        the base model with the adapter merged into its weights (safetensors) and its
        tokenizer. `dest` is the file to write, or a folder to write the archive's own name
        into. The file appears only once its size and SHA-256 match the trainer's.
        `progress(bytes_received, total_bytes)` is called after each chunk.
        """
        request = tpb.ExportModelVersionRequest(
            name=version_or_checkpoint_name(model_version), merged=merged
        )
        responses = _stream(self.trainer.ExportModelVersion(request))
        first = next(responses, None)
        if first is None or first.WhichOneof("payload") != "info":
            raise ClientError(grpc.StatusCode.UNKNOWN, "the export stream did not start with info")
        info = first.info
        path = Path(dest)
        if path.is_dir():
            path = path / info.file_name
        part = path.with_name(path.name + ".part")
        digest, received = hashlib.sha256(), 0
        try:
            with part.open("wb") as fh:
                for message in responses:
                    fh.write(message.chunk)
                    digest.update(message.chunk)
                    received += len(message.chunk)
                    if progress:
                        progress(received, info.size_bytes)
            if received != info.size_bytes or digest.hexdigest() != info.sha256:
                raise ClientError(
                    grpc.StatusCode.DATA_LOSS,
                    f"the export of {request.name} arrived damaged ({received:,} of "
                    f"{info.size_bytes:,} bytes, or a different SHA-256); export it again",
                )
            part.replace(path)
        finally:
            part.unlink(missing_ok=True)
        return path, info

    # Prediction

    def predict(
        self,
        texts: list[str],
        model: str = "",
        *,
        base_model: bool = False,
        inference_params: dict[str, Any] | None = None,
    ) -> Prediction:
        """Predicts with a model or model version (`a/m`, `a/m/v` or full names), or the base
        model (`base_model=True`). Unset inference parameters take the predictor's defaults
        (`max_tokens` 256, greedy)."""
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
        model = model_name(model)
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
        model = model_name(model)
        request = ppb.PredictStreamRequest(
            model=model,
            base_model=base_model,
            input=ppb.PredictInput(text=text),
            params=_inference_params(inference_params),
        )
        yield from _stream(
            self.predictor.PredictStream(
                request, metadata=((MODEL_ROUTING_HEADER, model or "base"),)
            )
        )

    # Evaluations: of a model version (`a/m/v`), or of a model's base model (`a/m`)

    def create_evaluation(
        self,
        parent: str,
        dataset_version: str,
        *,
        metrics: Sequence[str] = (),
        inference_params: dict[str, Any] | None = None,
        max_examples: int = 0,
        prompt_like: str = "",
        evaluation_id: str = "",
        label_aliases: Mapping[str, str] | None = None,
    ) -> epb.Evaluation:
        """Starts scoring `parent` on `dataset_version`; returns the evaluation, RUNNING.

        `label_aliases` (alias to label, case-insensitive): words label accuracy reads as
        each label, e.g. `{"neg": "negative"}`.
        """
        request = epb.CreateEvaluationRequest(
            parent=model_name(parent),
            evaluation_id=evaluation_id,
            dataset_version=resource_name(dataset_version, "app", "dataset", "version"),
            metrics=list(metrics),
            params=_inference_params(inference_params),
            max_examples=max_examples,
            prompt_like=version_name(prompt_like) if prompt_like else "",
            label_aliases=dict(label_aliases or {}),
        )
        return _call(self.trainer.CreateEvaluation, request).evaluation

    def evaluation(self, name: str) -> epb.Evaluation:
        return _call(
            self.trainer.GetEvaluation, epb.GetEvaluationRequest(name=evaluation_name(name))
        ).evaluation

    def list_evaluations(self, parent: str) -> list[epb.Evaluation]:
        return _pages(
            self.trainer.ListEvaluations,
            epb.ListEvaluationsRequest(parent=model_name(parent), page_size=PAGE_SIZE),
            "evaluations",
        )

    def cancel_evaluation(self, name: str) -> epb.Evaluation:
        request = epb.CancelEvaluationRequest(name=evaluation_name(name))
        return _call(self.trainer.CancelEvaluation, request).evaluation

    def watch_evaluation(self, name: str, timeout: float = 3600) -> Iterator[epb.Evaluation]:
        """The evaluation now, then each time its progress or state changes, until it ends."""
        request = epb.WatchEvaluationRequest(name=evaluation_name(name))
        for response in _stream(self.trainer.WatchEvaluation(request, timeout=timeout)):
            yield response.evaluation

    def wait_evaluation(self, name: str, timeout: float = 3600) -> epb.Evaluation:
        """Follows an evaluation until it ends; returns it as it ended."""
        updates = list(self.watch_evaluation(name, timeout))
        return updates[-1] if updates else self.evaluation(name)

    def evaluation_results(
        self, name: str, *, order_by: str = "", limit: int = 0
    ) -> list[epb.EvaluationResult]:
        """Per-example results: in dataset order, or worst first by a score (`order_by`)."""
        results: list[epb.EvaluationResult] = []
        token = ""
        while True:
            size = min(PAGE_SIZE, limit - len(results)) if limit else PAGE_SIZE
            page = _call(
                self.trainer.ListEvaluationResults,
                epb.ListEvaluationResultsRequest(
                    parent=evaluation_name(name),
                    order_by=order_by,
                    page_size=size,
                    page_token=token,
                ),
            )
            results.extend(page.results)
            token = page.next_page_token
            if not token or (limit and len(results) >= limit):
                return results

    def compare_evaluations(
        self, evaluation: str, other: str, *, score: str = ""
    ) -> epb.CompareEvaluationsResponse:
        """How `other` did example by example against `evaluation`; every changed example."""
        request = epb.CompareEvaluationsRequest(
            evaluation=evaluation_name(evaluation),
            other=evaluation_name(other),
            score=score,
            page_size=PAGE_SIZE,
        )
        first = _call(self.trainer.CompareEvaluations, request)
        while first.next_page_token:
            request.page_token = first.next_page_token
            page = _call(self.trainer.CompareEvaluations, request)
            first.changes.extend(page.changes)
            first.next_page_token = page.next_page_token
        return first


def evaluation_name(arg: str) -> str:
    """An evaluation name from a full or short form: `a/m/v/e` (of a version), `a/m/e` (base)."""
    if arg.startswith("apps/"):
        return arg
    parts = arg.split("/")
    if len(parts) == 4 and all(parts):
        return f"{version_name('/'.join(parts[:3]))}/evaluations/{parts[3]}"
    if len(parts) == 3 and all(parts):
        return f"{model_name('/'.join(parts[:2]))}/evaluations/{parts[2]}"
    raise ClientError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{arg!r}: expected an evaluation like APP/MODEL/VERSION/EVALUATION, APP/MODEL/EVALUATION "
        "(of the base model) or a full name",
    )


def _inference_params(
    params: dict[str, Any] | None, what: str = "inference_params"
) -> ppb.InferenceParams:
    msg = ppb.InferenceParams()
    if params:
        try:
            json_format.ParseDict(params, msg)
        except json_format.ParseError as err:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {err}") from None
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

    def update(self, *, description: str | None = None, check_etag: bool = True) -> App:
        """Changes the fields given; with `check_etag`, only if nobody changed the app since
        this object read it (ABORTED otherwise). Returns self, refreshed."""
        updated = self.client.update_app(
            self.name, description=description, etag=self.pb.etag if check_etag else ""
        )
        self.pb = updated.pb
        return self

    def list_datasets(self, *, page_size: int = PAGE_SIZE) -> list[Dataset]:
        """Every dataset of the app; `page_size` is how many each call fetches."""
        datasets = _pages(
            self.client.datasets.ListDatasets,
            dpb.ListDatasetsRequest(parent=self.name, page_size=page_size),
            "datasets",
        )
        return [Dataset(self.client, d) for d in datasets]

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

    def list_models(self, *, page_size: int = PAGE_SIZE) -> list[Model]:
        """Every model of the app; `page_size` is how many each call fetches."""
        models = _pages(
            self.client.trainer.ListModels,
            tpb.ListModelsRequest(parent=self.name, page_size=page_size),
            "models",
        )
        return [Model(self.client, m) for m in models]


class Dataset:
    """A dataset: upload examples, freeze versions."""

    def __init__(self, client: Client, pb: dpb.Dataset):
        self.client, self.pb = client, pb
        self.name = pb.name

    def __repr__(self) -> str:
        return f"Dataset({self.name!r})"

    def update(self, *, description: str | None = None, check_etag: bool = True) -> Dataset:
        """Changes the fields given; with `check_etag`, only if nobody changed the dataset
        since this object read it (ABORTED otherwise). Returns self, refreshed."""
        updated = self.client.update_dataset(
            self.name, description=description, etag=self.pb.etag if check_etag else ""
        )
        self.pb = updated.pb
        return self

    def upload_file(
        self,
        path: str | os.PathLike[str],
        *,
        skip_duplicates: bool = False,
        max_row_errors: int = 100,
        progress: Callable[[int, int, int], None] | None = None,
        request_id: str | None = None,
        label_completions: str | None = None,
        label_separator: str = "",
    ) -> dpb.UploadInputsResponse:
        """Streams a file (any supported format) in 1 MiB chunks.

        `progress(bytes_sent, total_bytes, lines_sent)` is called after each chunk. The
        upload is stored once per `request_id` (a fresh one when None), however often it
        is sent: a retry, ours or the caller's, gets the first upload's report.

        `label_completions`, an instruction template with `{input}`, reads a labelled CSV
        (`input,concepts`) as a classifier's data: each row's prompt is its input in the
        template, its completion its concepts (joined by `label_separator`, default ", ").
        """
        path = Path(path)
        total = path.stat().st_size
        request_id = _request_id(request_id)
        labels = (
            dpb.LabelCompletions(instruction_template=label_completions, separator=label_separator)
            if label_completions is not None
            else None
        )

        def messages() -> Iterator[dpb.UploadInputsRequest]:
            yield dpb.UploadInputsRequest(
                header=dpb.UploadHeader(
                    dataset=self.name,
                    file_name=path.name,
                    skip_duplicates=skip_duplicates,
                    max_row_errors=max_row_errors,
                    request_id=request_id,
                    label_completions=labels,
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

        return _retrying(lambda: self.client.datasets.UploadInputs(messages()))

    def upload_from_csv(
        self, csv_path: str | os.PathLike[str], **kwargs: Any
    ) -> dpb.UploadInputsResponse:
        """The seed SDK's name for an upload; any supported format works."""
        return self.upload_file(csv_path, **kwargs)

    def add_examples(
        self, examples: list[tuple[str, str]], *, request_id: str | None = None
    ) -> list[dpb.Input]:
        """Adds (prompt, completion) pairs directly, once per `request_id` (fresh when None)."""
        inputs = [dpb.NewInput(example=dpb.Example(prompt=p, completion=c)) for p, c in examples]
        request = dpb.AddInputsRequest(
            parent=self.name, inputs=inputs, request_id=_request_id(request_id)
        )
        return list(_retrying(lambda: self.client.datasets.AddInputs(request)).inputs)

    def create_version(
        self, version_id: str = "", description: str = "", *, request_id: str | None = None
    ) -> dpb.DatasetVersion:
        """Freezes the dataset's inputs, once per `request_id` (fresh when None)."""
        request = dpb.CreateDatasetVersionRequest(
            parent=self.name,
            version_id=version_id,
            description=description,
            request_id=_request_id(request_id),
        )
        return _retrying(lambda: self.client.datasets.CreateDatasetVersion(request)).dataset_version

    def list_versions(self, *, page_size: int = PAGE_SIZE) -> list[dpb.DatasetVersion]:
        """Every version of the dataset; `page_size` is how many each call fetches."""
        return _pages(
            self.client.datasets.ListDatasetVersions,
            dpb.ListDatasetVersionsRequest(parent=self.name, page_size=page_size),
            "dataset_versions",
        )


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


@dataclass
class SweepCandidate:
    """One run of a sweep: the swept parameters' values, its version, how it ended and, once
    TRAINED and evaluated, its evaluation and primary score."""

    params: dict[str, Any]
    version: str = ""
    state: str = "QUEUED"
    failure_reason: str = ""
    evaluation: epb.Evaluation | None = None
    score: float | None = None


@dataclass
class SweepResult:
    """What `Model.sweep` returns: every candidate, in the order queued; the score they were
    compared by; the best one (None when no candidate was scored)."""

    candidates: list[SweepCandidate]
    primary_score: str = ""
    best: SweepCandidate | None = None


# Scores where lower is better (the evaluation service's `metrics.LOWER_IS_BETTER`).
LOWER_IS_BETTER = frozenset({"perplexity"})
SWEEP_POLL_SECONDS = 1.0


def _check_sweep_value(parameter: tpb.Parameter, key: str, value: Any) -> Any:
    """`value` as the template types `parameter`, or INVALID_ARGUMENT naming the key and value."""
    kind = parameter.type

    def bad(why: str) -> ClientError:
        return ClientError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"--sweep {key}: {value!r} {why}",
            "BAD_SWEEP_VALUE",
            [(f"sweep.{key}", f"{value!r} {why}")],
        )

    if value is None:
        if parameter.nullable:
            return None
        raise bad(f"is not allowed: {parameter.path} needs a value")
    if kind == tpb.PARAMETER_TYPE_BOOL:
        if not isinstance(value, bool):
            raise bad(f"is not true or false, as {parameter.path} is")
    elif kind in (tpb.PARAMETER_TYPE_INT, tpb.PARAMETER_TYPE_FLOAT):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind == tpb.PARAMETER_TYPE_INT and float(value) != int(value)):
            what = "a whole number" if kind == tpb.PARAMETER_TYPE_INT else "a number"
            raise bad(f"is not {what}, as {parameter.path} is")
        value = int(value) if kind == tpb.PARAMETER_TYPE_INT else float(value)
        if parameter.HasField("min") and value < parameter.min:
            raise bad(f"is below {parameter.path}'s minimum, {parameter.min:g}")
        if parameter.HasField("max") and value > parameter.max:
            raise bad(f"is above {parameter.path}'s maximum, {parameter.max:g}")
    elif kind in (tpb.PARAMETER_TYPE_STRING, tpb.PARAMETER_TYPE_CHOICE):
        if not isinstance(value, str):
            value = str(value)
        if kind == tpb.PARAMETER_TYPE_CHOICE and value not in parameter.choices:
            raise bad(f"is not one of {parameter.path}'s choices: {', '.join(parameter.choices)}")
    elif kind == tpb.PARAMETER_TYPE_STRING_LIST:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in items):
            raise bad(f"is not a list of strings, as {parameter.path} is")
        if parameter.choices and any(item not in parameter.choices for item in items):
            raise bad(f"has items that are not {parameter.path}'s choices")
        value = items
    return value


def _sweep_path(parameters: Sequence[tpb.Parameter], key: str, template: str) -> tpb.Parameter:
    """The template parameter `key` names: its path, or a bare name only one parameter has."""
    by_path = {p.path: p for p in parameters}
    if key in by_path:
        return by_path[key]
    named = [p for p in parameters if p.path.rsplit(".", 1)[-1] == key]
    if len(named) == 1:
        return named[0]
    if named:
        why = f"names {len(named)} parameters ({', '.join(p.path for p in named)}); give the path"
    else:
        why = f"is not a parameter of {template}; see `loraforge templates show`"
    raise ClientError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"--sweep {key}: {why}",
        "BAD_SWEEP_KEY",
        [(f"sweep.{key}", why)],
    )


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

    def update(
        self,
        *,
        description: str | None = None,
        notes: str | None = None,
        default_inference_params: dict[str, Any] | None = None,
        check_etag: bool = True,
    ) -> Model:
        """Changes the fields given; with `check_etag`, only if nobody changed the model since
        this object read it (ABORTED otherwise). Returns self, refreshed."""
        updated = self.client.update_model(
            self.name,
            description=description,
            notes=notes,
            default_inference_params=default_inference_params,
            etag=self.pb.etag if check_etag else "",
        )
        self.pb = updated.pb
        return self

    def list_training_templates(self) -> list[str]:
        return [t.name.removeprefix("templates/") for t in self.client.list_templates()]

    def get_params(
        self, template: str, save_to: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """Selects `template` and returns its parameters with defaults; optionally saves them as YAML."""
        tpl = self.client.get_template(template)
        self.template = tpl.name
        self._defaults = template_defaults(tpl)
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
            loaded = load_yaml(Path(params_file).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{params_file}: expected a YAML mapping"
                )
            merged.update(loaded)
        merge(merged, updates)
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
        merge(self.params, merged)
        return copy.deepcopy(self.params)

    def train(
        self,
        dataset_version: Any = None,
        version_id: str = "",
        description: str = "",
        *,
        request_id: str | None = None,
        from_model_version: str = "",
    ) -> str:
        """Starts a training run with the chosen template and parameters; returns the version id.

        One run per `request_id` (a fresh one when None): calling again with the same id,
        say after a timeout, returns the run the first call queued.

        `from_model_version` (`app/model/version` or a full name) continues training: the run
        starts from that TRAINED version's adapter, with the version's parameters changed where
        this model's parameters differ from the template's defaults.
        """
        if self.template is None:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no template chosen: call get_params(template=...) first",
            )
        if dataset_version is not None:
            self.dataset_version = getattr(dataset_version, "name", dataset_version)
        changed = struct_pb2.Struct()
        changed.update(overrides(self.params, self._defaults))
        request = tpb.CreateModelVersionRequest(
            parent=self.name,
            version_id=version_id,
            template=self.template,
            dataset_version=self.dataset_version,
            param_overrides=changed,
            description=description,
            request_id=_request_id(request_id),
            from_model_version=(
                version_or_checkpoint_name(from_model_version) if from_model_version else ""
            ),
        )
        resp = _retrying(lambda: self.client.trainer.CreateModelVersion(request))
        return resp.model_version.name.rsplit("/", 1)[-1]

    def estimate(
        self, dataset_version: Any = None, *, from_model_version: str = ""
    ) -> tpb.EstimateModelVersionResponse:
        """What `train` with the same arguments would do, without queueing anything: the
        examples kept and dropped and why, tokens, steps, time and peak memory."""
        if self.template is None:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no template chosen: call get_params(template=...) first",
            )
        if dataset_version is not None:
            self.dataset_version = getattr(dataset_version, "name", dataset_version)
        changed = struct_pb2.Struct()
        changed.update(overrides(self.params, self._defaults))
        request = tpb.EstimateModelVersionRequest(
            parent=self.name,
            template=self.template,
            dataset_version=self.dataset_version,
            param_overrides=changed,
            from_model_version=(
                version_or_checkpoint_name(from_model_version) if from_model_version else ""
            ),
        )
        return _call(self.client.trainer.EstimateModelVersion, request)

    def version_name(self, version_id: str) -> str:
        """The full name of one of this model's versions, from its id or a full name."""
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
            or mv.status_message
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

    def evaluate(
        self,
        dataset_version: Any,
        *,
        version_id: str = "",
        base_model: bool = False,
        metrics: Sequence[str] = (),
        inference_params: dict[str, Any] | None = None,
        max_examples: int = 0,
        wait: bool = True,
        timeout: float = 3600,
        label_aliases: Mapping[str, str] | None = None,
    ) -> epb.Evaluation:
        """Scores a version (default: the latest trained) on a held-out `dataset_version`.

        `base_model=True` scores the base model instead, prompted the way that version was
        trained, so the two evaluations compare (`client.compare_evaluations`). With
        `wait`, returns the evaluation once it has ended; else at once, RUNNING.
        `label_aliases`: alias to label, for label accuracy (`create_evaluation`).
        """
        name = dataset_version if isinstance(dataset_version, str) else dataset_version.name
        version = self.version_name(version_id) if version_id else self._latest_trained()
        if base_model:
            evaluation = self.client.create_evaluation(
                self.name,
                name,
                metrics=metrics,
                inference_params=inference_params,
                max_examples=max_examples,
                prompt_like=version,
                label_aliases=label_aliases,
            )
        else:
            evaluation = self.client.create_evaluation(
                version,
                name,
                metrics=metrics,
                inference_params=inference_params,
                max_examples=max_examples,
                label_aliases=label_aliases,
            )
        return self.client.wait_evaluation(evaluation.name, timeout) if wait else evaluation

    def set_best_version(self, version_id: str) -> Model:
        """Marks one of this model's TRAINED versions (id or full name) as its best; ""
        clears it. Returns self, refreshed."""
        updated = self.client.update_model(
            self.name, best_version=self.version_name(version_id) if version_id else ""
        )
        self.pb = updated.pb
        return self

    def sweep(
        self,
        grid: Mapping[str, Sequence[Any]],
        eval_dataset_version: Any,
        *,
        dataset_version: Any = None,
        metrics: Sequence[str] = (),
        inference_params: dict[str, Any] | None = None,
        set_best: bool = True,
        timeout: float = 24 * 3600,
        poll_seconds: float = SWEEP_POLL_SECONDS,
        progress: Callable[[list[SweepCandidate]], None] | None = None,
    ) -> SweepResult:
        """Trains one version per combination of `grid`'s values (each key a parameter path,
        `trainer_config.learning_rate`, or a bare name only one of the template's parameters
        has, `learning_rate`), on top of the parameters chosen so far; waits for them; scores
        each TRAINED one on the held-out `eval_dataset_version` (`metrics`, default: the
        evaluation's own defaults); and, with `set_best`, marks the best by the primary score
        as the model's `best_version`.

        Every key and value is checked against the template before anything is queued; a bad
        one is INVALID_ARGUMENT naming it. `progress` is called with the candidates whenever
        one changes state or is scored.
        """
        if self.template is None:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no template chosen: call get_params(template=...) first",
            )
        if dataset_version is not None:
            self.dataset_version = getattr(dataset_version, "name", dataset_version)
        held_out = resource_name(
            getattr(eval_dataset_version, "name", eval_dataset_version),
            "app",
            "dataset",
            "version",
        )
        if self.dataset_version:
            self.dataset_version = resource_name(self.dataset_version, "app", "dataset", "version")
        if held_out == self.dataset_version:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the evaluation dataset version {held_out} is the one the sweep trains on; "
                "score the candidates on a held-out dataset version",
                "DATASET_VERSION_TRAINED_ON",
            )
        candidates = [SweepCandidate(params) for params in self._sweep_grid(grid)]
        # A held-out dataset version that is not there would waste every run: checked first.
        _call(self.client.datasets.GetDatasetVersion, dpb.GetDatasetVersionRequest(name=held_out))
        queued = self._queue_sweep(candidates)
        deadline = time.monotonic() + timeout
        self._wait_sweep(queued, deadline, poll_seconds, progress)
        evaluations: list[tuple[SweepCandidate, epb.Evaluation]] = []
        for candidate in queued:
            if candidate.state != "TRAINED":
                continue
            try:
                evaluations.append(
                    (
                        candidate,
                        self.client.create_evaluation(
                            candidate.version,
                            held_out,
                            metrics=metrics,
                            inference_params=inference_params,
                        ),
                    )
                )
            except ClientError as err:  # e.g. the held-out data holds training rows
                candidate.failure_reason = f"not evaluated: {err}"
        result = SweepResult(queued)
        for candidate, created in evaluations:
            left = max(deadline - time.monotonic(), 1.0)
            done = self.client.wait_evaluation(created.name, left)
            candidate.evaluation = done
            result.primary_score = result.primary_score or done.primary_score
            if done.state == epb.EVALUATION_STATE_SUCCEEDED and done.primary_score in done.scores:
                candidate.score = done.scores[done.primary_score]
            else:
                candidate.failure_reason = done.failure_reason or "the evaluation did not succeed"
            if progress:
                progress(queued)
        scored = [c for c in queued if c.score is not None]
        if scored:
            sign = 1.0 if result.primary_score in LOWER_IS_BETTER else -1.0
            # The best score; of equal ones, the candidate queued first.
            result.best = min(scored, key=lambda c: sign * (c.score or 0.0))
            if set_best:
                self.set_best_version(result.best.version)
        return result

    def _sweep_grid(self, grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
        """Each combination of the grid's values, keyed by parameter path; INVALID_ARGUMENT
        naming a bad key or value."""
        assert self.template is not None
        if not grid:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "a sweep needs a parameter")
        parameters = list(self.client.get_template(self.template).parameters)
        axes: dict[str, list[Any]] = {}
        for key, values in grid.items():
            parameter = _sweep_path(parameters, key, self.template)
            if parameter.path in axes:
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"--sweep {key}: {parameter.path} is swept twice; give its values once",
                    "BAD_SWEEP_KEY",
                )
            checked = [_check_sweep_value(parameter, key, v) for v in values]
            if not checked:
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"--sweep {key}: no values; write {key}=VALUE1,VALUE2",
                    "BAD_SWEEP_VALUE",
                )
            axes[parameter.path] = checked
        return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]

    def _queue_sweep(self, candidates: list[SweepCandidate]) -> list[SweepCandidate]:
        """Queues each candidate as a run of this model; if the trainer refuses one, cancels
        those already queued and raises, naming the candidate."""
        chosen = copy.deepcopy(self.params)
        try:
            for candidate in candidates:
                self.params = copy.deepcopy(chosen)
                for path, value in candidate.params.items():
                    node = self.params
                    *groups, leaf = path.split(".")
                    for group in groups:
                        node = node.setdefault(group, {})
                    node[leaf] = value
                what = ", ".join(f"{k}={v}" for k, v in candidate.params.items())
                try:
                    version_id = self.train(description=f"sweep: {what}")
                except ClientError as err:
                    for queued in candidates:
                        if queued.version:
                            with contextlib.suppress(ClientError):
                                self.client.cancel(queued.version)
                    raise ClientError(
                        err.code, f"sweep candidate {what}: {err.message}", err.reason, err.fields
                    ) from None
                candidate.version = self.version_name(version_id)
        finally:
            self.params = chosen
        return candidates

    def _wait_sweep(
        self,
        candidates: list[SweepCandidate],
        deadline: float,
        poll_seconds: float,
        progress: Callable[[list[SweepCandidate]], None] | None,
    ) -> None:
        """Polls the candidates' runs until each has ended (or the deadline passes)."""
        while True:
            changed = False
            for candidate in candidates:
                if candidate.state in ("TRAINED", "FAILED", "CANCELLED"):
                    continue
                mv = self.client.model_version(candidate.version)
                state = tpb.ModelVersionState.Name(mv.state).removeprefix("MODEL_VERSION_STATE_")
                changed = changed or state != candidate.state
                candidate.state, candidate.failure_reason = state, mv.failure_reason
            if changed and progress:
                progress(candidates)
            if all(c.state in ("TRAINED", "FAILED", "CANCELLED") for c in candidates):
                return
            if time.monotonic() > deadline:
                raise ClientError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the sweep's runs did not all end in time: "
                    + ", ".join(f"{c.version} {c.state}" for c in candidates),
                )
            time.sleep(poll_seconds)

    def _latest_trained(self) -> str:
        latest = _call(
            self.client.trainer.GetModel, tpb.GetModelRequest(name=self.name)
        ).model.latest_trained_version
        if not latest:
            raise ClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.name} has no TRAINED version yet; train one or name version_id",
            )
        return latest

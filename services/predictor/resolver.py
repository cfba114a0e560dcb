"""Model names to adapters, through the TrainerService.

A request names a Model (`apps/{app}/models/{model}`: its latest TRAINED
version), a ModelVersion (`apps/{app}/models/{model}/versions/{version}`) or a
Checkpoint of one (`.../versions/{version}/checkpoints/{step}`: that step's
adapter, prompted the way its version trains; a checkpoint never changes either).
The trainer says which version that is, whether it is trained, its base model
and where its adapter lies in the object store. A TRAINED version never
changes, so its answer is kept; a model's latest version and its default
inference parameters are remembered for `model_ttl` seconds.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import grpc
from google.protobuf import json_format

from loraforge.services.common.channels import ChannelSecurity, aio_channel, service_key_refused
from loraforge.services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    invalid_field,
)
from loraforge.services.common.prompts import PromptFormat
from loraforge.services.common.resources import ID_PATTERN
from loraforge.services.predictor.adapter_cache import AdapterSource
from loraforge.services.predictor.params import RequestedParams
from loraforge.services.predictor.protos import params_from_proto
from loraforge.trainer.v1 import trainer_service_pb2, trainer_service_pb2_grpc

MODEL_PATTERN = "apps/{app}/models/{model}"
VERSION_PATTERN = "apps/{app}/models/{model}/versions/{version}"
CHECKPOINT_PATTERN = VERSION_PATTERN + "/checkpoints/{step}"
_KNOWN_VERSIONS = 4096
_STATE = trainer_service_pb2.ModelVersionState


def _state_name(state: trainer_service_pb2.ModelVersionState.ValueType) -> str:
    return _STATE.Name(state).removeprefix("MODEL_VERSION_STATE_")


def classify_name(name: str, field: str = "model") -> str:
    """'model', 'version' or 'checkpoint' for a well-formed name; InvalidArgument otherwise."""
    parts = name.split("/")
    ok_ids = all(ID_PATTERN.match(p) for p in parts[1::2])
    if len(parts) == 4 and parts[0] == "apps" and parts[2] == "models" and ok_ids:
        return "model"
    if (
        len(parts) == 6
        and parts[0] == "apps"
        and parts[2] == "models"
        and parts[4] == "versions"
        and ok_ids
    ):
        return "version"
    if (
        len(parts) == 8
        and parts[0] == "apps"
        and parts[2] == "models"
        and parts[4] == "versions"
        and parts[6] == "checkpoints"
        and ok_ids
        and parts[7].isdigit()
    ):
        return "checkpoint"
    raise invalid_field(
        field,
        f"{name!r} is neither a model (`{MODEL_PATTERN}`), a model version (`{VERSION_PATTERN}`) "
        f"nor a checkpoint (`{CHECKPOINT_PATTERN}`)",
        reason="INVALID_NAME",
    )


class TrainerResolver:
    """Asks the TrainerService which adapter a model name means."""

    def __init__(
        self,
        address: str,
        *,
        model_ttl: float = 5.0,
        timeout: float = 10.0,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.address = address
        # TLS and the predictor's own key (`security_from(config)`); none: plaintext, no key.
        self.security = security or ChannelSecurity()
        self.model_ttl = model_ttl
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: trainer_service_pb2_grpc.TrainerServiceStub | None = None
        self._versions: collections.OrderedDict[str, AdapterSource] = collections.OrderedDict()
        self._latest: dict[str, tuple[float, str]] = {}
        self._defaults: dict[str, tuple[float, RequestedParams]] = {}

    def _trainer(self) -> trainer_service_pb2_grpc.TrainerServiceStub:
        if not self.address:
            raise FailedPrecondition(
                "this predictor has no trainer address (--trainer-address), so it cannot resolve "
                "model names; use base_model, or restart it with the TrainerService's host:port",
                reason="NO_TRAINER",
            )
        if self._stub is None:
            self._channel = aio_channel(self.address, self.security)
            self._stub = trainer_service_pb2_grpc.TrainerServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def resolve(self, name: str, field: str = "model") -> AdapterSource:
        """The adapter a model, model-version or checkpoint name means now."""
        kind = classify_name(name, field)
        if kind == "version":
            return await self._resolve_version(name)
        if kind == "checkpoint":
            return await self._resolve_checkpoint(name)
        cached = self._latest.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.model_ttl:
            return await self._resolve_version(cached[1])
        model = await self._get_model(name)
        if not model.latest_trained_version:
            raise await self._not_trained_model(name)
        self._latest[name] = (time.monotonic(), model.latest_trained_version)
        return await self._resolve_version(model.latest_trained_version)

    async def defaults(self, name: str) -> RequestedParams:
        """The default inference parameters of the model `name` is (or is a version of)."""
        model_name = name.split("/versions/", 1)[0]
        cached = self._defaults.get(model_name)
        if cached is not None and time.monotonic() - cached[0] < self.model_ttl:
            return cached[1]
        return params_from_proto((await self._get_model(model_name)).default_inference_params)

    async def _get_model(self, name: str) -> Any:
        model = (
            await self._call("GetModel", trainer_service_pb2.GetModelRequest(name=name), name)
        ).model
        self._defaults[name] = (time.monotonic(), params_from_proto(model.default_inference_params))
        return model

    async def _resolve_version(self, name: str) -> AdapterSource:
        known = self._versions.get(name)
        if known is not None:
            self._versions.move_to_end(name)
            return known
        request = trainer_service_pb2.GetModelVersionRequest(name=name)
        version = (await self._call("GetModelVersion", request, name)).model_version
        if version.state != _STATE.MODEL_VERSION_STATE_TRAINED:
            state = _state_name(version.state)
            detail = f" ({version.failure_reason})" if version.failure_reason else ""
            raise FailedPrecondition(
                f"model version {name} is {state}{detail}, not TRAINED; it can serve once training succeeds",
                reason="MODEL_VERSION_NOT_TRAINED",
                metadata={"model_version": name, "state": state},
            )
        if not version.artifacts.adapter_prefix:
            raise FailedPrecondition(
                f"model version {name} is TRAINED but the trainer reports no adapter location",
                reason="ADAPTER_MISSING",
                metadata={"model_version": name},
            )
        source = AdapterSource(
            name,
            version.artifacts.base_model,
            version.artifacts.adapter_prefix,
            PromptFormat.from_params(json_format.MessageToDict(version.params)),
        )
        self._versions[name] = source
        while len(self._versions) > _KNOWN_VERSIONS:
            self._versions.popitem(last=False)
        return source

    async def _resolve_checkpoint(self, name: str) -> AdapterSource:
        known = self._versions.get(name)
        if known is not None:
            self._versions.move_to_end(name)
            return known
        request = trainer_service_pb2.GetCheckpointRequest(name=name)
        checkpoint = (await self._call("GetCheckpoint", request, name)).checkpoint
        version_name = name.split("/checkpoints/", 1)[0]
        version = (
            await self._call(
                "GetModelVersion",
                trainer_service_pb2.GetModelVersionRequest(name=version_name),
                version_name,
            )
        ).model_version
        source = AdapterSource(
            name,
            checkpoint.base_model,
            checkpoint.adapter_prefix,
            PromptFormat.from_params(json_format.MessageToDict(version.params)),
        )
        self._versions[name] = source
        while len(self._versions) > _KNOWN_VERSIONS:
            self._versions.popitem(last=False)
        return source

    async def _not_trained_model(self, name: str) -> FailedPrecondition:
        request = trainer_service_pb2.ListModelVersionsRequest(parent=name, page_size=1)
        versions = (await self._call("ListModelVersions", request, name)).model_versions
        if not versions:
            return FailedPrecondition(
                f"model {name} has no model versions yet; train one first",
                reason="MODEL_NOT_TRAINED",
                metadata={"model": name},
            )
        newest = versions[0]
        state = _state_name(newest.state)
        return FailedPrecondition(
            f"model {name} has no TRAINED version yet; its newest version {newest.name} is {state}",
            reason="MODEL_NOT_TRAINED",
            metadata={"model": name, "model_version": newest.name, "state": state},
        )

    async def _call(self, method: str, request: object, name: str) -> Any:
        stub = self._trainer()
        try:
            return await getattr(stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"{name} does not exist", reason="MODEL_NOT_FOUND", metadata={"model": name}
                ) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"model: {exc.details()}", reason="INVALID_NAME") from None
            refused = service_key_refused(exc, f"the TrainerService at {self.address}", method)
            if refused is not None:
                raise refused from None
            raise Unavailable(
                f"the TrainerService at {self.address} did not answer {method} for {name}: "
                f"{code.name} {exc.details()}",
                reason="TRAINER_UNAVAILABLE",
            ) from None

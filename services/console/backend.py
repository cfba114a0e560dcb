"""The console's gRPC calls: one channel per service, the signed-in user's key on each call.

The console is a client like any other: it reaches the services only through their public
RPCs. The channels carry no key of their own; every call carries the key of the session
it serves (`authorization: Bearer <key>`), so each user sees what their key may see and
the services enforce it. A failed call becomes a `ClientError` (the Python client's), with
the gRPC code, the message and the bad fields.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from loraforge.client.client import MODEL_ROUTING_HEADER, ClientError
from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dgrpc
from loraforge.predictor.v1 import predictor_service_pb2 as ppb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pgrpc
from loraforge.services.common.channels import aio_channel, bearer, security_from
from loraforge.services.console.config import ConsoleConfig
from loraforge.trainer.v1 import evaluation_pb2 as epb
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tgrpc

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
PAGE_SIZE = 1000  # the services' largest page
UPLOAD_CHUNK = 1 << 20
MAX_ROW_ERRORS = 10000  # the dataset service's most


def metadata(api_key: str) -> Metadata:
    return (bearer(api_key),) if api_key else ()


class Backend:
    """Stubs of the three services over channels opened once."""

    def __init__(self, config: ConsoleConfig) -> None:
        # TLS settings only: the key is the user's, per call.
        security = security_from(config).without_key()
        self.timeout = config.call_timeout_seconds
        self._channels = [
            aio_channel(config.dataset_address, security),
            aio_channel(config.trainer_address, security),
            aio_channel(config.predictor_address, security),
        ]
        self.datasets = dgrpc.DatasetServiceStub(self._channels[0])
        self.trainer = tgrpc.TrainerServiceStub(self._channels[1])
        self.predictor = pgrpc.PredictorServiceStub(self._channels[2])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def call(self, method: Callable[..., Awaitable[T]], request: Any, key: str) -> T:
        try:
            return await method(request, metadata=metadata(key), timeout=self.timeout)
        except grpc.aio.AioRpcError as err:
            raise ClientError.from_rpc(err) from None

    async def pages(
        self, method: Callable[..., Awaitable[Any]], request: Any, items: str, key: str
    ) -> list[Any]:
        out: list[Any] = []
        while True:
            resp = await self.call(method, request, key)
            out += list(getattr(resp, items))
            if not resp.next_page_token:
                return out
            request.page_token = resp.next_page_token

    # Data

    async def apps(self, key: str) -> list[dpb.App]:
        return await self.pages(
            self.datasets.ListApps, dpb.ListAppsRequest(page_size=PAGE_SIZE), "apps", key
        )

    async def app(self, name: str, key: str) -> dpb.App:
        return (await self.call(self.datasets.GetApp, dpb.GetAppRequest(name=name), key)).app

    async def create_app(self, app_id: str, description: str, key: str) -> dpb.App:
        request = dpb.CreateAppRequest(app_id=app_id, app=dpb.App(description=description))
        return (await self.call(self.datasets.CreateApp, request, key)).app

    async def delete_app(self, name: str, key: str) -> None:
        await self.call(self.datasets.DeleteApp, dpb.DeleteAppRequest(name=name, force=True), key)

    async def datasets_of(self, app: str, key: str) -> list[dpb.Dataset]:
        request = dpb.ListDatasetsRequest(parent=app, page_size=PAGE_SIZE)
        return await self.pages(self.datasets.ListDatasets, request, "datasets", key)

    async def dataset(self, name: str, key: str) -> dpb.Dataset:
        request = dpb.GetDatasetRequest(name=name)
        return (await self.call(self.datasets.GetDataset, request, key)).dataset

    async def create_dataset(
        self, app: str, dataset_id: str, description: str, key: str
    ) -> dpb.Dataset:
        request = dpb.CreateDatasetRequest(
            parent=app, dataset_id=dataset_id, dataset=dpb.Dataset(description=description)
        )
        return (await self.call(self.datasets.CreateDataset, request, key)).dataset

    async def delete_dataset(self, name: str, key: str) -> None:
        request = dpb.DeleteDatasetRequest(name=name, force=True)
        await self.call(self.datasets.DeleteDataset, request, key)

    async def inputs(self, dataset: str, page_size: int, key: str) -> dpb.ListInputsResponse:
        request = dpb.ListInputsRequest(parent=dataset, page_size=page_size)
        return await self.call(self.datasets.ListInputs, request, key)

    async def upload(
        self,
        dataset: str,
        file_name: str,
        chunks: AsyncIterator[bytes],
        key: str,
        skip_duplicates: bool = False,
    ) -> dpb.UploadInputsResponse:
        """Streams `chunks` (any size) to UploadInputs in pieces of at most 1 MiB."""

        async def messages() -> AsyncIterator[dpb.UploadInputsRequest]:
            yield dpb.UploadInputsRequest(
                header=dpb.UploadHeader(
                    dataset=dataset,
                    file_name=file_name,
                    max_row_errors=MAX_ROW_ERRORS,
                    skip_duplicates=skip_duplicates,
                    request_id=uuid.uuid4().hex,
                )
            )
            async for chunk in chunks:
                for start in range(0, len(chunk), UPLOAD_CHUNK):
                    yield dpb.UploadInputsRequest(chunk=chunk[start : start + UPLOAD_CHUNK])

        try:
            return await self.datasets.UploadInputs(messages(), metadata=metadata(key))
        except grpc.aio.AioRpcError as err:
            raise ClientError.from_rpc(err) from None

    async def versions(self, dataset: str, key: str) -> list[dpb.DatasetVersion]:
        request = dpb.ListDatasetVersionsRequest(parent=dataset, page_size=PAGE_SIZE)
        return await self.pages(self.datasets.ListDatasetVersions, request, "dataset_versions", key)

    async def create_version(self, dataset: str, description: str, key: str) -> dpb.DatasetVersion:
        request = dpb.CreateDatasetVersionRequest(
            parent=dataset, description=description, request_id=uuid.uuid4().hex
        )
        return (await self.call(self.datasets.CreateDatasetVersion, request, key)).dataset_version

    async def app_versions(self, app: str, key: str) -> list[dpb.DatasetVersion]:
        """Every dataset version of an app, newest first."""
        datasets = await self.datasets_of(app, key)
        lists = await asyncio.gather(*(self.versions(d.name, key) for d in datasets))
        out = [v for vs in lists for v in vs]
        out.sort(key=lambda v: v.create_time.ToNanoseconds(), reverse=True)
        return out

    # Training

    async def model_types(self, key: str) -> list[tpb.ModelType]:
        request = tpb.ListModelTypesRequest(page_size=PAGE_SIZE)
        return await self.pages(self.trainer.ListModelTypes, request, "model_types", key)

    async def templates(self, key: str) -> list[tpb.Template]:
        request = tpb.ListTemplatesRequest(page_size=PAGE_SIZE)
        return await self.pages(self.trainer.ListTemplates, request, "templates", key)

    async def template(self, name: str, key: str) -> tpb.Template:
        request = tpb.GetTemplateRequest(name=name)
        return (await self.call(self.trainer.GetTemplate, request, key)).template

    async def models(self, app: str, key: str) -> list[tpb.Model]:
        request = tpb.ListModelsRequest(parent=app, page_size=PAGE_SIZE)
        return await self.pages(self.trainer.ListModels, request, "models", key)

    async def ensure_model(self, app: str, model_id: str, model_type: str, key: str) -> tpb.Model:
        """The model `model_id` of `app`, created (of `model_type`) when it does not exist."""
        try:
            request = tpb.GetModelRequest(name=f"{app}/models/{model_id}")
            return (await self.call(self.trainer.GetModel, request, key)).model
        except ClientError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise
        create = tpb.CreateModelRequest(
            parent=app, model_id=model_id, model=tpb.Model(model_type=model_type)
        )
        try:
            return (await self.call(self.trainer.CreateModel, create, key)).model
        except ClientError as err:
            # `model_id` is the form's "model" field.
            err.fields = [("model" if f == "model_id" else f, d) for f, d in err.fields]
            raise

    async def model_versions(self, model: str, key: str) -> list[tpb.ModelVersion]:
        request = tpb.ListModelVersionsRequest(parent=model, page_size=PAGE_SIZE)
        return await self.pages(self.trainer.ListModelVersions, request, "model_versions", key)

    async def runs(self, app: str, key: str) -> list[tpb.ModelVersion]:
        """Every model version of an app, newest first."""
        models = await self.models(app, key)
        lists = await asyncio.gather(*(self.model_versions(m.name, key) for m in models))
        out = [v for vs in lists for v in vs]
        out.sort(key=lambda v: v.create_time.ToNanoseconds(), reverse=True)
        return out

    async def train(
        self,
        model: str,
        template: str,
        dataset_version: str,
        overrides: dict[str, Any],
        description: str,
        key: str,
    ) -> tpb.ModelVersion:
        changed = struct_pb2.Struct()
        changed.update(overrides)
        request = tpb.CreateModelVersionRequest(
            parent=model,
            template=template,
            dataset_version=dataset_version,
            param_overrides=changed,
            description=description,
            request_id=uuid.uuid4().hex,
        )
        return (await self.call(self.trainer.CreateModelVersion, request, key)).model_version

    async def model_version(self, name: str, key: str) -> tpb.ModelVersion:
        request = tpb.GetModelVersionRequest(name=name)
        return (await self.call(self.trainer.GetModelVersion, request, key)).model_version

    async def cancel(self, name: str, key: str) -> tpb.ModelVersion:
        request = tpb.CancelModelVersionRequest(name=name)
        return (await self.call(self.trainer.CancelModelVersion, request, key)).model_version

    async def watch(
        self, name: str, after_sequence: int, key: str
    ) -> AsyncIterator[tpb.TrainingEvent]:
        """The run's events after `after_sequence`: its history, then live ones until it ends."""
        call = self.trainer.WatchModelVersion(
            tpb.WatchModelVersionRequest(name=name, after_sequence=after_sequence),
            metadata=metadata(key),
        )
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as err:
            raise ClientError.from_rpc(err) from None
        finally:
            call.cancel()

    # Evaluation

    async def create_evaluation(
        self, parent: str, dataset_version: str, max_examples: int, prompt_like: str, key: str
    ) -> epb.Evaluation:
        """Scores `parent` (a version, or a model for its base model prompted like
        `prompt_like`) on `dataset_version`; returns at once, RUNNING."""
        request = epb.CreateEvaluationRequest(
            parent=parent,
            dataset_version=dataset_version,
            max_examples=max_examples,
            prompt_like=prompt_like,
        )
        return (await self.call(self.trainer.CreateEvaluation, request, key)).evaluation

    async def evaluations(self, parent: str, key: str) -> list[epb.Evaluation]:
        request = epb.ListEvaluationsRequest(parent=parent, page_size=PAGE_SIZE)
        return await self.pages(self.trainer.ListEvaluations, request, "evaluations", key)

    async def evaluation(self, name: str, key: str) -> epb.Evaluation:
        request = epb.GetEvaluationRequest(name=name)
        return (await self.call(self.trainer.GetEvaluation, request, key)).evaluation

    async def results(
        self, name: str, page_size: int, key: str
    ) -> epb.ListEvaluationResultsResponse:
        """An evaluation's first results, worst first by its primary score."""
        request = epb.ListEvaluationResultsRequest(
            parent=name, order_by="score", page_size=page_size
        )
        return await self.call(self.trainer.ListEvaluationResults, request, key)

    async def compare(
        self, name: str, other: str, page_size: int, key: str
    ) -> epb.CompareEvaluationsResponse:
        request = epb.CompareEvaluationsRequest(evaluation=name, other=other, page_size=page_size)
        return await self.call(self.trainer.CompareEvaluations, request, key)

    # Prediction

    async def predict_stream(
        self, model: str, text: str, params: ppb.InferenceParams, key: str
    ) -> AsyncIterator[ppb.PredictStreamResponse]:
        """One streamed answer of `model` (a model version), or of the base model for ''."""
        request = ppb.PredictStreamRequest(
            model=model, base_model=not model, input=ppb.PredictInput(text=text), params=params
        )
        routed: Iterable[tuple[str, str]] = (
            *metadata(key),
            (MODEL_ROUTING_HEADER, model or "base"),
        )
        call = self.predictor.PredictStream(request, metadata=tuple(routed))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            raise ClientError.from_rpc(err) from None
        finally:
            call.cancel()

    async def check_key(self, key: str) -> None:
        """Raises ClientError(UNAUTHENTICATED) when the services refuse `key`.

        A key that may not list apps (PERMISSION_DENIED) is still a key they know."""
        try:
            await self.call(self.datasets.ListApps, dpb.ListAppsRequest(page_size=1), key)
        except ClientError as err:
            if err.code != grpc.StatusCode.PERMISSION_DENIED:
                raise

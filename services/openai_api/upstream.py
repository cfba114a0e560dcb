"""The gRPC calls of the HTTP API: completions at the predictor, model lists at the trainer.

The API is a client of the services' public RPCs and nothing else. Completions
are `Predict` and `PredictStream` calls; the streams of one request are read
together (`ChoiceStreams`) and cancelled together, so a client that goes away
aborts every engine request it started. `/v1/models` is built from the dataset
service's apps and the trainer's models and versions, bounded by
`max_listed_models`, and reused for `models_cache_seconds` (by caller: each key sees
what it may list).

No call carries a key of this process: each one forwards its HTTP caller's
`Authorization: Bearer` header, so the services check the caller's own key (a
missing or refused one comes back as UNAUTHENTICATED or PERMISSION_DENIED, which
the routes answer with 401 or 403). The channels use TLS when `tls_ca_file` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc

from loraforge.dataset.v1 import dataset_service_pb2 as dpb
from loraforge.dataset.v1 import dataset_service_pb2_grpc as dpb_grpc
from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common.channels import ChannelSecurity, aio_channel, security_from
from loraforge.services.openai_api.config import OpenAIConfig
from loraforge.services.openai_api.convert import ListedModel
from loraforge.services.predictor.adapter_cache import same_base_model
from loraforge.trainer.v1 import trainer_service_pb2 as tpb
from loraforge.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc

Metadata = tuple[tuple[str, str], ...]
LIST_TIMEOUT = 10.0
PAGE_SIZE = 1000  # the services' largest page
LIST_CONCURRENCY = 8


# The predictor gateway (deploy/k8s/envoy-predictor.yaml) hashes this header onto its
# replicas, so each model's requests reach the replica whose cache has its adapter.
MODEL_ROUTING_HEADER = "x-loraforge-model"


def _routed(metadata: Metadata, model: str) -> Metadata:
    # Metadata is printable ASCII: any other name (no model's, which the predictor says) is
    # routed by its percent-encoding.
    if not (model.isascii() and model.isprintable()):
        model = urllib.parse.quote(model)
    return (*metadata, (MODEL_ROUTING_HEADER, model or "base"))


# Callers whose model lists are remembered at once (the oldest is forgotten first).
CACHED_CALLERS = 1024
V = TypeVar("V")


def _caller(metadata: Metadata) -> str:
    """Who is asking, for the caches: a hash of the `authorization` it sent ('' for none)."""
    auth = next((v for k, v in metadata if k.lower() == "authorization"), "")
    return hashlib.sha256(auth.encode()).hexdigest() if auth else ""


def _remember(cache: dict[str, V], caller: str, value: V) -> None:
    cache.pop(caller, None)
    cache[caller] = value
    while len(cache) > CACHED_CALLERS:
        del cache[next(iter(cache))]


class UpstreamError(Exception):
    """A failed call, with the service it went to (for the error message)."""

    def __init__(self, error: grpc.aio.AioRpcError, service: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.service = service


def merge(messages: Sequence[pb.PredictStreamResponse]) -> pb.PredictStreamResponse:
    """Consecutive messages of one stream as one: their text, the last one's counts and end."""
    if len(messages) == 1:
        return messages[0]
    last = messages[-1]
    return pb.PredictStreamResponse(
        delta="".join(m.delta for m in messages),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        model_version=last.model_version,
    )


class ChoiceStreams:
    """The `PredictStream` calls of one completion, read together as (choice, message)."""

    def __init__(self, calls: Sequence[grpc.aio.UnaryStreamCall[Any, Any]], service: str) -> None:
        self.calls = list(calls)
        self.service = service
        self.first: list[pb.PredictStreamResponse] = []
        self._queue: asyncio.Queue[
            tuple[int, pb.PredictStreamResponse | grpc.aio.AioRpcError | None]
        ] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Waits for every call's first message, so a refused request fails before any output."""
        try:
            for call in self.calls:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise RuntimeError("the predictor ended a stream without a message")
                self.first.append(cast(pb.PredictStreamResponse, message))
        except grpc.aio.AioRpcError as exc:
            self.cancel()
            raise UpstreamError(exc, self.service) from None
        except BaseException:
            self.cancel()
            raise
        if len(self.calls) == 1:
            return  # one stream is read where it is sent, without a reader task
        for i, (call, first) in enumerate(zip(self.calls, self.first, strict=True)):
            if first.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                self._readers.append(asyncio.create_task(self._read(i, call)))

    async def _read(self, index: int, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        try:
            while True:
                read = await call.read()
                if read is grpc.aio.EOF:
                    break
                message = cast(pb.PredictStreamResponse, read)
                self._queue.put_nowait((index, message))
                if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    break
        except grpc.aio.AioRpcError as exc:
            self._queue.put_nowait((index, exc))
            return
        self._queue.put_nowait((index, None))

    async def messages(self) -> AsyncIterator[list[tuple[int, pb.PredictStreamResponse]]]:
        """The messages after the first ones, as they arrive; UpstreamError if a call fails.

        Each batch holds what arrived while the previous one was being sent, a choice's
        messages merged into one: under load a client gets fewer, longer deltas instead of
        falling behind, and an idle stream still gets every token at once."""
        if len(self.calls) == 1:
            async for message in self._single():
                yield [(0, message)]
            return
        open_calls = len(self._readers)
        while open_calls:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            arrived: dict[int, list[pb.PredictStreamResponse]] = {}
            for index, item in items:
                if item is None:
                    open_calls -= 1
                elif isinstance(item, grpc.aio.AioRpcError):
                    raise UpstreamError(item, self.service)
                else:
                    arrived.setdefault(index, []).append(item)
            if arrived:
                yield [(index, merge(ms)) for index, ms in arrived.items()]

    async def _single(self) -> AsyncIterator[pb.PredictStreamResponse]:
        if self.first[0].finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            return
        call = self.calls[0]
        try:
            while True:
                read = await call.read()
                if read is grpc.aio.EOF:
                    return
                message = cast(pb.PredictStreamResponse, read)
                yield message
                if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    return
        except grpc.aio.AioRpcError as exc:
            raise UpstreamError(exc, self.service) from None

    def cancel(self) -> None:
        """Cancels every call (the predictor aborts their engine requests) and reader."""
        for call in self.calls:
            call.cancel()
        for task in self._readers:
            task.cancel()


class Upstream:
    """Channels to the predictor, the trainer and the dataset service, and the calls made."""

    def __init__(self, config: OpenAIConfig) -> None:
        self.config = config
        # TLS to the services from this process's CA (and client certificate) settings. No key
        # of its own: every call carries its HTTP caller's `Authorization: Bearer` header.
        self.security: ChannelSecurity = security_from(config).without_key()
        self.predictor_label = f"the predictor at {config.predictor_address}"
        self._channels: list[grpc.aio.Channel] = []
        self.predictor = pb_grpc.PredictorServiceStub(self._channel(config.predictor_address))
        self.trainer = (
            tpb_grpc.TrainerServiceStub(self._channel(config.trainer_address))
            if config.trainer_address
            else None
        )
        self.datasets = (
            dpb_grpc.DatasetServiceStub(self._channel(config.dataset_address))
            if config.dataset_address
            else None
        )
        # Both by caller (its key): what one key may list is not shown to another.
        self._base_model: dict[str, tuple[float, str]] = {}
        self._models: dict[str, tuple[float, list[ListedModel]]] = {}
        self._models_lock = asyncio.Lock()
        self._started = int(time.time())

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = aio_channel(address, self.security)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _call(self, service: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise UpstreamError(exc, service) from None

    # --- completions --------------------------------------------------------------------

    async def predict(
        self, requests: Sequence[pb.PredictRequest], metadata: Metadata
    ) -> list[pb.PredictResponse]:
        """The requests' answers, all asked at once; the others are cancelled if one fails."""
        timeout = self.config.request_timeout_seconds
        calls = [
            self.predictor.Predict(r, timeout=timeout, metadata=_routed(metadata, r.model))
            for r in requests
        ]
        try:
            return list(await asyncio.gather(*calls))
        except grpc.aio.AioRpcError as exc:
            raise UpstreamError(exc, self.predictor_label) from None
        finally:
            for call in calls:
                call.cancel()  # a no-op for calls that finished

    def predict_stream(
        self, requests: Sequence[pb.PredictStreamRequest], metadata: Metadata
    ) -> ChoiceStreams:
        timeout = self.config.request_timeout_seconds
        calls = [
            self.predictor.PredictStream(r, timeout=timeout, metadata=_routed(metadata, r.model))
            for r in requests
        ]
        return ChoiceStreams(calls, self.predictor_label)

    async def serving_info(self, metadata: Metadata = ()) -> pb.GetServingInfoResponse:
        return cast(
            pb.GetServingInfoResponse,
            await self._call(
                self.predictor_label,
                self.predictor.GetServingInfo(
                    pb.GetServingInfoRequest(), timeout=LIST_TIMEOUT, metadata=metadata
                ),
            ),
        )

    async def base_model(self, metadata: Metadata = ()) -> str:
        """The name of the base model the predictor serves (asked again after a while, since a
        restarted predictor may serve another)."""
        now = time.monotonic()
        caller = _caller(metadata)
        cached = self._base_model.get(caller)
        if cached and now - cached[0] < self.config.models_cache_seconds:
            return cached[1]
        info = await self.serving_info(metadata)
        name = info.base_models[0].base_model if info.base_models else ""
        _remember(self._base_model, caller, (now, name))
        return name

    # --- model lists --------------------------------------------------------------------

    async def list_models(self, metadata: Metadata = ()) -> list[ListedModel]:
        """The base model, then the trained models and versions of its base model."""
        async with self._models_lock:  # concurrent lists share one build
            now = time.monotonic()
            caller = _caller(metadata)
            cached = self._models.get(caller)
            if cached and now - cached[0] < self.config.models_cache_seconds:
                return cached[1]
            models = await self._build_list(metadata)
            _remember(self._models, caller, (time.monotonic(), models))
            return models

    async def _pages(
        self,
        service: str,
        method: Callable[..., Awaitable[Any]],
        make: Callable[[str], Any],
        items: str,
        limit: int,
        metadata: Metadata,
    ) -> list[Any]:
        found: list[Any] = []
        token = ""
        while len(found) < limit:
            reply = await self._call(
                service, method(make(token), timeout=LIST_TIMEOUT, metadata=metadata)
            )
            found.extend(getattr(reply, items))
            token = reply.next_page_token
            if not token:
                break
        return found[:limit]

    async def _build_list(self, metadata: Metadata) -> list[ListedModel]:
        base = await self.base_model(metadata)
        listed = [ListedModel(base, self._started, "loraforge")]
        trainer, datasets = self.trainer, self.datasets
        if trainer is None or datasets is None:
            return listed
        limit = self.config.max_listed_models
        dataset_label = f"the dataset service at {self.config.dataset_address}"
        trainer_label = f"the trainer at {self.config.trainer_address}"
        apps = await self._pages(
            dataset_label,
            datasets.ListApps,
            lambda t: dpb.ListAppsRequest(page_size=PAGE_SIZE, page_token=t),
            "apps",
            limit,
            metadata,
        )
        gate = asyncio.Semaphore(LIST_CONCURRENCY)

        async def models_of(app: str) -> list[Any]:
            async with gate:
                return await self._pages(
                    trainer_label,
                    trainer.ListModels,
                    lambda t: tpb.ListModelsRequest(parent=app, page_size=PAGE_SIZE, page_token=t),
                    "models",
                    limit,
                    metadata,
                )

        async def served(model: Any) -> list[ListedModel]:
            async with gate:
                versions = await self._pages(
                    trainer_label,
                    trainer.ListModelVersions,
                    lambda t: tpb.ListModelVersionsRequest(
                        parent=model.name, page_size=PAGE_SIZE, page_token=t
                    ),
                    "model_versions",
                    limit,
                    metadata,
                )
            owner = model.name.split("/models/", 1)[0]
            trained = [
                v
                for v in versions
                if v.state == tpb.MODEL_VERSION_STATE_TRAINED
                and same_base_model(v.artifacts.base_model, base)
            ]
            out = []
            if any(v.name == model.latest_trained_version for v in trained):
                out.append(ListedModel(model.name, model.create_time.seconds, owner, base))
            out += [ListedModel(v.name, v.create_time.seconds, owner, base) for v in trained]
            return out

        per_app = await asyncio.gather(*(models_of(a.name) for a in apps))
        models = [m for ms in per_app for m in ms if m.latest_trained_version][:limit]
        for entries in await asyncio.gather(*(served(m) for m in models)):
            listed.extend(entries)
        return listed[: limit + 1]


@contextlib.asynccontextmanager
async def open_upstream(config: OpenAIConfig) -> AsyncIterator[Upstream]:
    upstream = Upstream(config)
    try:
        yield upstream
    finally:
        await upstream.close()

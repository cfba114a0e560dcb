"""PredictorService over gRPC: protobuf in and out, the domain (`Predictor`) in between."""

from __future__ import annotations

from collections.abc import AsyncIterator

from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc
from loraforge.services.common.auth import visible_app
from loraforge.services.common.pages import offset_page
from loraforge.services.common.resources import (
    page_size,
    timestamp,
)
from loraforge.services.common.rpc import Context
from loraforge.services.predictor.engines.base import EngineKind, FinishReason
from loraforge.services.predictor.predictor import AdapterView, PredictInput, Predictor
from loraforge.services.predictor.protos import params_from_proto

_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}
_STATE = {
    "downloading": pb.ADAPTER_STATE_DOWNLOADING,
    "on_disk": pb.ADAPTER_STATE_ON_DISK,
    "loaded": pb.ADAPTER_STATE_LOADED,
}
_ENGINE = {EngineKind.VLLM: pb.ENGINE_VLLM, EngineKind.TRANSFORMERS: pb.ENGINE_TRANSFORMERS}


def input_from_proto(i: pb.PredictInput) -> PredictInput:
    return PredictInput(i.text, i.id, tuple((m.role, m.content) for m in i.messages))


def adapter_to_proto(view: AdapterView) -> pb.Adapter:
    return pb.Adapter(
        model_version=view.model_version,
        base_model=view.base_model,
        adapter_id=view.adapter_id,
        state=_STATE[view.state],
        pinned=view.pinned,
        size_bytes=view.size_bytes,
        rank=view.rank,
        last_used_time=timestamp(view.last_used),
        download_count=view.download_count,
        active_requests=view.active_requests,
    )


class PredictorServicer(predictor_service_pb2_grpc.PredictorServiceServicer):
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        inputs = [input_from_proto(i) for i in request.inputs]
        version, outputs = await self.predictor.predict(
            request.model, request.base_model, inputs, params_from_proto(request.params)
        )
        return pb.PredictResponse(
            model_version=version,
            outputs=[
                pb.PredictOutput(
                    id=o.id,
                    text=o.text,
                    prompt_tokens=o.prompt_tokens,
                    completion_tokens=o.completion_tokens,
                    finish_reason=_FINISH[o.finish_reason],
                )
                for o in outputs
            ],
        )

    async def PredictStream(
        self, request: pb.PredictStreamRequest, context: Context
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        item = input_from_proto(request.input)
        events = self.predictor.predict_stream(
            request.model, request.base_model, item, params_from_proto(request.params)
        )
        async for event in events:
            yield pb.PredictStreamResponse(
                delta=event.delta,
                finish_reason=_FINISH[event.finish_reason]
                if event.finish_reason
                else pb.FINISH_REASON_UNSPECIFIED,
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                model_version=event.model_version,
            )

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: Context
    ) -> pb.LoadAdapterResponse:
        view = await self.predictor.load_adapter(request.model, request.pin)
        return pb.LoadAdapterResponse(adapter=adapter_to_proto(view))

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: Context
    ) -> pb.UnloadAdapterResponse:
        await self.predictor.unload_adapter(request.model)
        return pb.UnloadAdapterResponse()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        size = page_size(request.page_size)
        views = await self.predictor.list_adapters()
        app = visible_app()
        if app is not None:  # an app key sees its own app's adapters only
            views = [v for v in views if v.model_version.startswith(f"apps/{app}/")]
        page, token = offset_page(views, size, request.page_token, "ListAdapters", filter=app or "")
        return pb.ListAdaptersResponse(
            adapters=[adapter_to_proto(v) for v in page],
            next_page_token=token,
            cache_bytes_used=self.predictor.cache.used_bytes,
            cache_bytes_limit=self.predictor.cache.byte_limit,
        )

    async def GetServingInfo(
        self, request: pb.GetServingInfoRequest, context: Context
    ) -> pb.GetServingInfoResponse:
        return pb.GetServingInfoResponse(
            base_models=[
                pb.ServedBaseModel(
                    base_model=m.base_model,
                    engine=_ENGINE[m.engine],
                    engine_reason=m.engine_reason,
                    max_loras=m.max_loras,
                    max_lora_rank=m.max_lora_rank,
                    running_requests=m.running_requests,
                    aborted_requests=m.aborted_requests,
                    max_model_len=m.max_model_len,
                    dtype=m.dtype,
                    dtype_reason=m.dtype_reason,
                    source=m.source,
                )
                for m in self.predictor.serving_info()
            ]
        )

"""Client of the predictor: evaluations generate their completions only through its RPCs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc

from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common.channels import ChannelSecurity, aio_channel, service_key_refused
from loraforge.services.common.config import describe
from loraforge.services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoraforgeError,
    Unavailable,
)

log = logging.getLogger("loraforge.trainer.predictor_client")
INFO_TIMEOUT = 30.0
# A predictor that restarts or is briefly overloaded costs a few retries, not the evaluation:
# Predict is safe to repeat. Waits between tries, in seconds.
RETRY_WAITS = (1.0, 2.0, 4.0, 8.0, 16.0)
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# One batch of generations: long enough for a slow CPU engine, bounded so a predictor
# that stops answering fails the evaluation instead of holding it.
PREDICT_TIMEOUT = 1800.0


def _translate(err: grpc.RpcError, address: str) -> LoraforgeError:
    code = err.code()
    details = err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"the predictor refused the request: {details}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        return FailedPrecondition(f"the predictor cannot answer: {details}")
    refused = service_key_refused(err, f"the predictor at {address}")
    if refused is not None:
        return refused
    return Unavailable(
        f"the predictor at {address} did not answer ({code.name}: {details}); retry later",
        reason="PREDICTOR_UNAVAILABLE",
    )


class AsyncPredictorClient:
    """Predictions for the trainer's evaluations, with the trainer's own identity."""

    def __init__(self, address: str, security: ChannelSecurity | None = None) -> None:
        self.address = address
        self.security = security or ChannelSecurity()
        self._channel: grpc.aio.Channel | None = None

    @property
    def configured(self) -> bool:
        return bool(self.address)

    def check_configured(self) -> None:
        if not self.address:
            raise FailedPrecondition(
                "evaluations need a predictor, and this trainer has no predictor address; "
                f"start it with {describe('predictor_address')}",
                reason="PREDICTOR_NOT_CONFIGURED",
            )

    def _stub(self) -> pb_grpc.PredictorServiceAsyncStub:
        self.check_configured()
        if self._channel is None:
            self._channel = aio_channel(self.address, self.security)
        return pb_grpc.PredictorServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def base_model(self) -> str:
        """The base model the predictor serves."""
        try:
            info = await self._stub().GetServingInfo(
                pb.GetServingInfoRequest(), timeout=INFO_TIMEOUT
            )
        except grpc.RpcError as err:
            raise _translate(err, self.address) from None
        return info.base_models[0].base_model if info.base_models else ""

    async def predict(
        self, model: str, prompts: Sequence[str], params: pb.InferenceParams
    ) -> list[pb.PredictOutput]:
        """Completions of `prompts` by model version `model` ('' : the base model), in order."""
        request = pb.PredictRequest(
            model=model,
            base_model=not model,
            inputs=[pb.PredictInput(text=p, id=str(i)) for i, p in enumerate(prompts)],
            params=params,
        )
        waits = iter(RETRY_WAITS)
        while True:
            try:
                response = await self._stub().Predict(request, timeout=PREDICT_TIMEOUT)
                return list(response.outputs)
            except grpc.RpcError as err:
                wait = next(waits, None) if err.code() in RETRIED else None
                if wait is None:
                    raise _translate(err, self.address) from None
                log.info(
                    "the predictor at %s answered %s; retrying in %.0fs",
                    self.address,
                    err.code().name,
                    wait,
                )
                await asyncio.sleep(wait)

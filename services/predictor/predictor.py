"""The predictor's domain: requests in, generations out, knowing nothing of gRPC.

A prediction names a model, a model version, or the base model. The predictor
checks the request, resolves the name through the trainer, takes the adapter
from the cache (downloading it once if cold), renders and tokenizes each
prompt with the base model's tokenizer, and hands token ids to the engine.
All inputs of one request run concurrently, so the engine batches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.services.common.errors import FieldViolation, InvalidArgument
from loraforge.services.common.objectstore import open_object_store
from loraforge.services.predictor.adapter_cache import AdapterCache, CacheEntry, CacheState
from loraforge.services.predictor.config import GiB, PredictorConfig
from loraforge.services.predictor.engines.base import (
    Engine,
    EngineKind,
    FinishReason,
    GenerationRequest,
)
from loraforge.services.predictor.engines.selection import EngineChoice, choose_engine
from loraforge.services.predictor.params import (
    MAX_INPUTS,
    RequestedParams,
    SamplingSettings,
    ValidatedParams,
    check_params,
    raise_if_bad,
)
from loraforge.services.predictor.resolver import TrainerResolver, classify_name

log = logging.getLogger("loraforge.predictor")


@dataclass(frozen=True)
class PredictInput:
    text: str
    id: str = ""


@dataclass(frozen=True)
class PredictOutput:
    id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class StreamEvent:
    """Text since the previous event; the last event has `finish_reason`."""

    delta: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None
    model_version: str


@dataclass(frozen=True)
class AdapterView:
    model_version: str
    base_model: str
    adapter_id: int
    state: str  # "downloading", "on_disk" or "loaded"
    pinned: bool
    size_bytes: int
    rank: int
    last_used: float
    download_count: int
    active_requests: int


@dataclass(frozen=True)
class ServedModel:
    base_model: str
    engine: EngineKind
    engine_reason: str
    max_loras: int
    max_lora_rank: int
    running_requests: int
    aborted_requests: int
    max_model_len: int


class Predictor:
    """Serves one base model and its adapters through one engine."""

    def __init__(
        self,
        engine: Engine,
        choice: EngineChoice,
        tokenizer: Any,
        cache: AdapterCache,
        resolver: TrainerResolver,
    ) -> None:
        self.engine = engine
        self.choice = choice
        self.tokenizer = tokenizer
        self.cache = cache
        self.resolver = resolver

    # --- checks -----------------------------------------------------------------------

    def _check_target(self, model: str, base_model: bool, bad: list[FieldViolation]) -> None:
        if base_model and model:
            bad.append(FieldViolation("model", "must be empty when base_model is set: choose one"))
        elif not base_model and not model:
            bad.append(
                FieldViolation(
                    "model",
                    "is required: a model (`apps/{app}/models/{model}`) or a model version "
                    "(`apps/{app}/models/{model}/versions/{version}`), or set base_model",
                )
            )
        elif model:
            try:
                classify_name(model)
            except InvalidArgument as exc:
                bad.extend(exc.field_violations)

    def _tokenize(
        self,
        inputs: Sequence[PredictInput],
        validated: ValidatedParams,
        field: str,
        bad: list[FieldViolation],
    ) -> list[tuple[list[int], SamplingSettings]]:
        limit = self.engine.max_model_len
        prepared = []
        for i, item in enumerate(inputs):
            name = field if len(inputs) == 1 and field == "input" else f"{field}[{i}]"
            if not item.text:
                bad.append(FieldViolation(f"{name}.text", "is empty; give the prompt text"))
                continue
            ids = list(self.tokenizer(validated.template.render(item.text))["input_ids"])
            if len(ids) >= limit:
                bad.append(
                    FieldViolation(
                        f"{name}.text",
                        f"is {len(ids)} tokens after the prompt template; the model takes at most "
                        f"{limit} tokens of prompt and completion together",
                    )
                )
                continue
            sampling = validated.sampling
            room = limit - len(ids)
            if sampling.max_tokens > room:  # the context window caps the completion
                sampling = SamplingSettings(**{**sampling.__dict__, "max_tokens": room})
            prepared.append((ids, sampling))
        return prepared

    def _prepare(
        self,
        model: str,
        base_model: bool,
        inputs: Sequence[PredictInput],
        params: RequestedParams,
        field: str,
    ) -> list[tuple[list[int], SamplingSettings]]:
        bad: list[FieldViolation] = []
        self._check_target(model, base_model, bad)
        if field == "inputs" and not 1 <= len(inputs) <= MAX_INPUTS:
            bad.append(
                FieldViolation("inputs", f"give 1 to {MAX_INPUTS} inputs (got {len(inputs)})")
            )
        validated, param_bad = check_params(params)
        bad.extend(param_bad)
        prepared = self._tokenize(inputs, validated, field, bad) if not param_bad else []
        raise_if_bad(bad)
        return prepared

    @contextlib.asynccontextmanager
    async def _adapter(self, model: str) -> AsyncIterator[CacheEntry | None]:
        if not model:
            yield None
            return
        source = await self.resolver.resolve(model)
        entry = await self.cache.acquire(source)
        try:
            yield entry
        finally:
            self.cache.release(entry)

    # --- predictions --------------------------------------------------------------------

    async def predict(
        self, model: str, base_model: bool, inputs: Sequence[PredictInput], params: RequestedParams
    ) -> tuple[str, list[PredictOutput]]:
        prepared = self._prepare(model, base_model, inputs, params, "inputs")
        async with self._adapter(model) as entry:
            adapter = entry.ref() if entry else None

            async def run(
                ids: list[int], sampling: SamplingSettings
            ) -> tuple[str, int, FinishReason]:
                request = GenerationRequest(uuid.uuid4().hex, ids, sampling, adapter)
                pieces: list[str] = []
                tokens = 0
                reason = FinishReason.ABORTED
                async for delta in self.engine.generate(request):
                    pieces.append(delta.text)
                    tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        reason = delta.finish_reason
                return "".join(pieces), tokens, reason

            tasks = [asyncio.ensure_future(run(ids, sampling)) for ids, sampling in prepared]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                # One failed or the call was cancelled: stop the others (aborting them in the engine).
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        outputs = []
        for item, (ids, _), (text, tokens, reason) in zip(inputs, prepared, results, strict=True):
            outputs.append(PredictOutput(item.id, text, len(ids), tokens, reason))
        return (entry.model_version if entry else ""), outputs

    async def predict_stream(
        self, model: str, base_model: bool, item: PredictInput, params: RequestedParams
    ) -> AsyncIterator[StreamEvent]:
        ((ids, sampling),) = self._prepare(model, base_model, [item], params, "input")
        async with self._adapter(model) as entry:
            version = entry.model_version if entry else ""
            request = GenerationRequest(
                uuid.uuid4().hex, ids, sampling, entry.ref() if entry else None
            )
            tokens = 0
            stream = self.engine.generate(request)
            try:
                async for delta in stream:
                    tokens += len(delta.token_ids)
                    if delta.text or delta.finish_reason is not None:
                        yield StreamEvent(
                            delta.text, len(ids), tokens, delta.finish_reason, version
                        )
            finally:
                # Close the engine's stream now (not at garbage collection), so an abandoned
                # call aborts its engine request at once.
                await stream.aclose()  # type: ignore[attr-defined]

    # --- adapters -----------------------------------------------------------------------

    async def load_adapter(self, model: str, pin: bool) -> AdapterView:
        bad: list[FieldViolation] = []
        self._check_target(model, False, bad)
        raise_if_bad(bad)
        source = await self.resolver.resolve(model)
        entry = await self.cache.acquire(source)
        try:
            if pin:
                await self.cache.set_pinned(entry.model_version, True)
            await self.engine.load_adapter(entry.ref(), pin=pin)
        finally:
            self.cache.release(entry)
        return self._view(entry, await self.engine.loaded_adapter_ids())

    async def unload_adapter(self, model: str) -> AdapterView:
        bad: list[FieldViolation] = []
        self._check_target(model, False, bad)
        raise_if_bad(bad)
        source = await self.resolver.resolve(model)
        entry = self.cache.get(source.model_version)
        if entry is not None:
            entry.pinned = False
        removed = await self.cache.remove(source.model_version)
        return self._view(removed, set())

    async def list_adapters(self) -> list[AdapterView]:
        loaded = await self.engine.loaded_adapter_ids()
        return [self._view(e, loaded) for e in self.cache.entries()]

    def _view(self, entry: CacheEntry, loaded: set[int]) -> AdapterView:
        if entry.state is CacheState.DOWNLOADING:
            state = "downloading"
        elif entry.adapter_id in loaded:
            state = "loaded"
        else:
            state = "on_disk"
        return AdapterView(
            entry.model_version,
            entry.base_model,
            entry.adapter_id,
            state,
            entry.pinned,
            entry.size_bytes,
            entry.rank,
            entry.last_used,
            entry.download_count,
            entry.active,
        )

    def serving_info(self) -> list[ServedModel]:
        stats = self.engine.stats()
        return [
            ServedModel(
                self.engine.base_model,
                self.engine.kind,
                self.choice.reason,
                self.engine.max_loras,
                self.engine.max_lora_rank,
                stats.running_requests,
                stats.aborted_requests,
                self.engine.max_model_len,
            )
        ]

    async def shutdown(self) -> None:
        await self.resolver.close()
        await self.engine.shutdown()


def build_predictor(config: PredictorConfig) -> Predictor:
    """Chooses and starts the engine, opens the adapter cache and the trainer client."""
    from transformers import AutoTokenizer

    base_model = config.base_model or str(default_base_model(config))
    choice = choose_engine(base_model, config.engine)
    log.info("base model %s (%s): %s", base_model, choice.architecture, choice.reason)
    engine: Engine
    if choice.kind is EngineKind.VLLM:
        from loraforge.services.predictor.engines.vllm_engine import VllmEngine, VllmSettings

        engine = VllmEngine.start(
            VllmSettings(
                base_model=base_model,
                max_loras=config.max_loras,
                max_cpu_loras=config.max_cpu_loras,
                max_lora_rank=config.max_lora_rank,
                max_model_len=config.max_model_len,
                max_num_seqs=config.max_num_seqs,
                kv_cache_bytes=int(config.kv_cache_gib * GiB),
                dtype=config.dtype,
                enforce_eager=config.enforce_eager,
                gpu_memory_utilization=config.gpu_memory_utilization,
            )
        )
    else:
        from loraforge.services.predictor.engines.transformers_engine import (
            TransformersEngine,
            TransformersSettings,
        )

        engine = TransformersEngine.start(
            TransformersSettings(
                base_model=base_model,
                max_lora_rank=config.max_lora_rank,
                max_cpu_loras=config.max_cpu_loras,
                max_model_len=config.max_model_len,
                dtype=config.dtype,
            )
        )
    cache = AdapterCache(
        open_object_store(config.object_store_url_or_default()),
        config.adapter_cache_path(),
        byte_limit=config.adapter_cache_bytes,
        served_base_model=base_model,
        max_lora_rank=config.max_lora_rank,
        on_evict=engine.unload_adapter,
    )
    resolver = TrainerResolver(
        config.trainer_address, model_ttl=config.model_resolution_ttl_seconds
    )
    return Predictor(engine, choice, AutoTokenizer.from_pretrained(base_model), cache, resolver)


def default_base_model(config: PredictorConfig) -> Path:
    """With no base model configured: a tiny local Llama (demos and tests; nothing is downloaded)."""
    from loraforge.services.common.tiny_model import build_tiny_model

    return build_tiny_model(config.home_path() / "base-models" / "tiny-llama")

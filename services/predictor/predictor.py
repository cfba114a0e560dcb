"""The predictor's domain: requests in, generations out, knowing nothing of gRPC.

A prediction names a model, a model version, or the base model. The predictor
checks the request, resolves the name through the trainer, takes the adapter
from the cache (downloading it once if cold), renders and tokenizes each
prompt with the base model's tokenizer, and hands token ids to the engine.
All inputs of one request run concurrently, so the engine batches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import TemplateError

from loraforge.services.common.base_models import DEFAULT_BASE_MODEL, resolve_base_model
from loraforge.services.common.channels import security_from
from loraforge.services.common.errors import FieldViolation, InvalidArgument
from loraforge.services.common.model_access import refuse_model_code
from loraforge.services.common.objectstore import open_object_store
from loraforge.services.common.progress import report as report_progress
from loraforge.services.common.prompts import (
    CHAT,
    CHAT_ROLES,
    PromptFormat,
    encode_rendered,
    has_chat_template,
    render_messages,
    render_prompt,
)
from loraforge.services.predictor.adapter_cache import (
    AdapterCache,
    AdapterSource,
    CacheEntry,
    CacheState,
)
from loraforge.services.predictor.config import GiB, PredictorConfig
from loraforge.services.predictor.engines.base import (
    Engine,
    EngineKind,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    engine_stopped,
)
from loraforge.services.predictor.engines.calibration import (
    MEASURED_KINDS,
    WORKLOADS,
    CalibrationStore,
    engine_name,
    measure_in_background,
    missing_workloads,
)
from loraforge.services.predictor.engines.calibration import signature as calibration_signature
from loraforge.services.predictor.engines.selection import (
    DtypeChoice,
    EngineChoice,
    choose_dtype,
    choose_engine,
)
from loraforge.services.predictor.params import (
    MAX_INPUTS,
    RequestedParams,
    SamplingSettings,
    ValidatedParams,
    check_params,
    raise_if_bad,
    template_violations,
    validate_params,
)
from loraforge.services.predictor.resolver import TrainerResolver, classify_name

log = logging.getLogger("loraforge.predictor")
T = TypeVar("T")


def _input_name(field: str, index: int, count: int) -> str:
    """The request path of input `index`: `input` for PredictStream's one, else `inputs[i]`."""
    return field if count == 1 and field == "input" else f"{field}[{index}]"


@dataclass(frozen=True)
class PredictInput:
    """A prompt text, or chat messages as (role, content) pairs."""

    text: str
    id: str = ""
    messages: tuple[tuple[str, str], ...] = ()


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
    dtype: str
    dtype_reason: str
    source: str


# A token of the vocabularies served is at most this many characters in practice (runs of
# spaces or dashes are the longest), so a prompt past max_model_len times it cannot fit.
CHARS_PER_TOKEN_BOUND = 64


class PromptRenderer:
    """Turns one input into the prompt string the engine gets, the way training rendered it.

    Rendering and tokenizing are CPU work: `run` does them on this renderer's own thread,
    never on the event loop, and only for prompts within the size bound, checked first (a
    prompt of megabytes is refused before any of it is rendered). `max_chars` is that bound
    in characters; 0: the model's context length times `CHARS_PER_TOKEN_BOUND`."""

    def __init__(self, tokenizer: Any, base_model: str, max_chars: int = 0) -> None:
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.max_chars = max_chars
        # One thread: a tokenizer is not safe to call from several threads at once.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prompts")

    def size_violations(
        self,
        inputs: Sequence[PredictInput],
        validated: ValidatedParams,
        field: str,
        max_model_len: int,
    ) -> list[FieldViolation]:
        """The inputs longer than the size bound, template and system prompt included (cheap:
        nothing is rendered)."""
        limit = self.max_chars or max_model_len * CHARS_PER_TOKEN_BOUND
        if limit <= 0:
            return []
        template = validated.template
        around = len(template.template) + len(template.system_prompt)
        bad = []
        for i, item in enumerate(inputs):
            size = around + len(item.text) + sum(len(r) + len(c) for r, c in item.messages)
            if size > limit:
                name = _input_name(field, i, len(inputs))
                where = f"{name}.messages" if item.messages else f"{name}.text"
                bad.append(
                    FieldViolation(
                        where,
                        f"is {size:,} characters with the prompt template, more than this "
                        f"predictor takes ({limit:,}; the model reads at most "
                        "its context length in tokens); shorten the prompt",
                    )
                )
        return bad

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` on the renderer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    def close(self) -> None:
        """Ends the renderer's thread (prompts still queued are not rendered)."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    def render(
        self,
        item: PredictInput,
        name: str,
        validated: ValidatedParams,
        trained: PromptFormat,
        bad: list[FieldViolation],
    ) -> tuple[str, bool] | None:
        """The prompt string for one input and whether it is a chat rendering (None if bad)."""
        template = validated.template
        kind = validated.prompt_format or trained.kind
        system = template.system_prompt or (trained.system_prompt if kind == CHAT else "")
        chat = bool(item.messages) or kind == CHAT
        if chat and not has_chat_template(self.tokenizer):
            where = f"{name}.messages" if item.messages else "params.prompt_format"
            bad.append(
                FieldViolation(
                    where,
                    f"needs a chat template, and the base model {self.base_model} has none; "
                    "send a raw text prompt instead",
                )
            )
            return None
        if item.messages:
            if item.text:
                bad.append(FieldViolation(f"{name}.text", "must be empty when messages are given"))
                return None
            problems = [
                FieldViolation(
                    f"{name}.messages[{j}].role",
                    f"must be one of {', '.join(CHAT_ROLES)} (got {role!r})",
                )
                for j, (role, _) in enumerate(item.messages)
                if role not in CHAT_ROLES
            ]
            if item.messages[-1][0] == "assistant":
                problems.append(
                    FieldViolation(
                        f"{name}.messages",
                        "ends with an assistant turn; end with a user turn for the model to answer",
                    )
                )
            if problems:
                bad.extend(problems)
                return None
            messages = [{"role": role, "content": content} for role, content in item.messages]
            if all(role != "system" for role, _ in item.messages) and system:
                messages.insert(0, {"role": "system", "content": system})
            try:
                return render_messages(self.tokenizer, messages), True
            except TemplateError as exc:  # the template's own checks, e.g. turns must alternate
                bad.append(
                    FieldViolation(
                        f"{name}.messages", f"the base model's chat template refused them: {exc}"
                    )
                )
                return None
        if not item.text:
            bad.append(FieldViolation(f"{name}.text", "is empty; give the prompt text"))
            return None
        bad.extend(template_violations(template, chat))
        if chat:
            fmt = PromptFormat(CHAT, system)
            return render_prompt(self.tokenizer, template.render_user_turn(item.text), fmt), True
        return template.render(item.text), False

    def encode(
        self,
        item: PredictInput,
        validated: ValidatedParams,
        trained: PromptFormat,
        name: str = "input",
        bad: list[FieldViolation] | None = None,
    ) -> list[int] | None:
        """Token ids of the rendered prompt (None, with the reasons in `bad`, if it is invalid)."""
        problems: list[FieldViolation] = [] if bad is None else bad
        rendered = self.render(item, name, validated, trained, problems)
        return None if rendered is None else encode_rendered(self.tokenizer, *rendered)


class Predictor:
    """Serves one base model and its adapters through one engine."""

    def __init__(
        self,
        engine: Engine,
        choice: EngineChoice,
        tokenizer: Any,
        cache: AdapterCache,
        resolver: TrainerResolver,
        *,
        base_model: str = "",
        dtype: DtypeChoice | None = None,
        max_prompt_chars: int = 0,
    ) -> None:
        self.engine = engine
        self.choice = choice
        self.tokenizer = tokenizer
        self.cache = cache
        self.resolver = resolver
        self.base_model = base_model or engine.base_model  # the name users know it by
        self.prompts = PromptRenderer(tokenizer, self.base_model, max_prompt_chars)
        self.dtype = dtype or DtypeChoice("auto", "the engine's default")
        self._in_flight = _InFlight()
        self._switching = asyncio.Lock()
        self._retry_after: int | None = None  # set while the engine is down

    # --- the engine ---------------------------------------------------------------------

    def engine_down(self, retry_after_seconds: int) -> None:
        """The engine has died: requests fail UNAVAILABLE, retry in `retry_after_seconds`."""
        self._retry_after = max(1, retry_after_seconds)

    def engine_up(self) -> None:
        self._retry_after = None

    @property
    def serving(self) -> bool:
        return self._retry_after is None

    def _refuse_while_down(self) -> None:
        if self._retry_after is not None:
            raise engine_stopped(engine_name(self.engine.kind), self._retry_after)

    def stopping(self) -> None:
        """The service has been told to stop (see `Engine.stopping`)."""
        self.engine.stopping()

    async def switch_engine(self, engine: Engine, choice: EngineChoice) -> None:
        """Serves from `engine` (started) from now on, and shuts the engine it replaces down.

        New requests go to `engine` at once; requests running on the old engine finish
        there (or fail UNAVAILABLE, if it has died) before it is shut down. The adapter
        cache evicts from the new engine, and pinned adapters are loaded and pinned in it.
        """
        async with self._switching:
            old = self.engine
            if engine is old:
                return
            self.engine = engine
            self.choice = choice
            self.cache.on_evict = engine.unload_adapter
            await self._load_pinned(engine)
            await self._in_flight.idle(old)
            try:
                await old.shutdown()
            except Exception:  # a dead engine may fail to stop cleanly; its successor serves
                log.warning("the replaced %s engine did not shut down cleanly", old.kind.value)
                log.debug("shutdown failure", exc_info=True)

    async def _load_pinned(self, engine: Engine) -> None:
        for entry in self.cache.entries():
            if entry.pinned and entry.state is CacheState.ON_DISK:
                try:
                    await engine.load_adapter(entry.ref(), pin=True)
                except Exception as exc:  # one adapter's failure must not stop the switch
                    log.warning("pinned adapter %s not loaded: %s", entry.model_version, exc)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """The current engine's stream for `request`, counted as in flight on that engine."""
        self._refuse_while_down()
        engine = self.engine
        stream = engine.generate(request)
        self._in_flight.enter(engine)
        try:
            async for delta in stream:
                yield delta
        finally:
            try:
                await stream.aclose()  # type: ignore[attr-defined]
            finally:
                self._in_flight.leave(engine)

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
        trained: PromptFormat,
        field: str,
    ) -> list[tuple[list[int], SamplingSettings]]:
        limit = self.engine.max_model_len
        prepared = []
        bad: list[FieldViolation] = []
        for i, item in enumerate(inputs):
            name = _input_name(field, i, len(inputs))
            ids = self.prompts.encode(item, validated, trained, name, bad)
            if ids is None:
                continue
            if len(ids) >= limit:
                bad.append(
                    FieldViolation(
                        f"{name}.messages" if item.messages else f"{name}.text",
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
        raise_if_bad(bad)
        return prepared

    async def _prepare(
        self,
        model: str,
        base_model: bool,
        inputs: Sequence[PredictInput],
        params: RequestedParams,
        field: str,
    ) -> tuple[AdapterSource | None, list[tuple[list[int], SamplingSettings]]]:
        """Checks the request, resolves the model, and renders and tokenizes every input."""
        bad: list[FieldViolation] = []
        self._check_target(model, base_model, bad)
        if field == "inputs" and not 1 <= len(inputs) <= MAX_INPUTS:
            bad.append(
                FieldViolation("inputs", f"give 1 to {MAX_INPUTS} inputs (got {len(inputs)})")
            )
        validated, param_bad = check_params(params)
        too_long = self.prompts.size_violations(inputs, validated, field, self.engine.max_model_len)
        raise_if_bad(bad + param_bad + too_long)
        source = await self.resolver.resolve(model) if model else None
        if model:
            # What the request leaves unset, the model's own defaults set.
            validated = validate_params(params.over(await self.resolver.defaults(model)))
            raise_if_bad(
                self.prompts.size_violations(inputs, validated, field, self.engine.max_model_len)
            )
        trained = source.prompt_format if source else PromptFormat()
        prepared = await self.prompts.run(lambda: self._tokenize(inputs, validated, trained, field))
        return source, prepared

    @contextlib.asynccontextmanager
    async def _adapter(self, source: AdapterSource | None) -> AsyncIterator[CacheEntry | None]:
        if source is None:
            yield None
            return
        entry = await self.cache.acquire(source)
        try:
            yield entry
        finally:
            self.cache.release(entry)

    # --- predictions --------------------------------------------------------------------

    async def predict(
        self, model: str, base_model: bool, inputs: Sequence[PredictInput], params: RequestedParams
    ) -> tuple[str, list[PredictOutput]]:
        source, prepared = await self._prepare(model, base_model, inputs, params, "inputs")
        async with self._adapter(source) as entry:
            adapter = entry.ref() if entry else None

            async def run(
                ids: list[int], sampling: SamplingSettings
            ) -> tuple[str, int, FinishReason]:
                request = GenerationRequest(uuid.uuid4().hex, ids, sampling, adapter)
                pieces: list[str] = []
                tokens = 0
                reason = FinishReason.ABORTED
                async for delta in self._generate(request):
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
        source, ((ids, sampling),) = await self._prepare(model, base_model, [item], params, "input")
        async with self._adapter(source) as entry:
            version = entry.model_version if entry else ""
            request = GenerationRequest(
                uuid.uuid4().hex, ids, sampling, entry.ref() if entry else None
            )
            tokens = 0
            stream = self._generate(request)
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
        self._refuse_while_down()
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
        # While a new engine starts, no adapter is loaded in any.
        loaded = await self.engine.loaded_adapter_ids() if self.serving else set()
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
                self.base_model,
                self.engine.kind,
                self.choice.reason,
                self.engine.max_loras,
                self.engine.max_lora_rank,
                stats.running_requests,
                stats.aborted_requests,
                self.engine.max_model_len,
                self.dtype.dtype,
                self.dtype.reason,
                self.engine.base_model,
            )
        ]

    async def shutdown(self) -> None:
        await self.resolver.close()
        await self.cache.settled()
        async with self._switching:
            await self.engine.shutdown()
        self.prompts.close()


class _InFlight:
    """Counts the generations running on each engine, so that an engine being replaced is
    shut down only once its own requests have finished."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._idle: dict[int, asyncio.Event] = {}

    def enter(self, engine: Engine) -> None:
        key = id(engine)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._idle.setdefault(key, asyncio.Event()).clear()

    def leave(self, engine: Engine) -> None:
        key = id(engine)
        self._counts[key] -= 1
        if not self._counts[key]:
            del self._counts[key]
            self._idle.pop(key).set()

    async def idle(self, engine: Engine) -> None:
        event = self._idle.get(id(engine))
        if event is not None:
            await event.wait()


def _start_engine(kind: EngineKind, path: str, config: PredictorConfig) -> Engine:
    dtype = choose_dtype(config.dtype, engine=kind).dtype
    if kind is EngineKind.VLLM:
        from loraforge.services.predictor.engines.vllm_engine import VllmEngine, VllmSettings

        return VllmEngine.start(
            VllmSettings(
                base_model=path,
                max_loras=config.max_loras,
                max_cpu_loras=config.max_cpu_loras,
                max_lora_rank=config.max_lora_rank,
                max_model_len=config.max_model_len,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                kv_cache_bytes=int(config.kv_cache_gib * GiB),
                dtype=dtype,
                enforce_eager=config.enforce_eager,
                gpu_memory_utilization=config.gpu_memory_utilization,
                trust_remote_code=config.trust_remote_code,
                reserved_cpu_cores=config.vllm_reserved_cores,
            )
        )
    from loraforge.services.predictor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )

    return TransformersEngine.start(
        TransformersSettings(
            base_model=path,
            max_lora_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras,
            max_model_len=config.max_model_len,
            dtype=dtype,
            trust_remote_code=config.trust_remote_code,
        )
    )


# The background measurements running (a task is kept only by its references).
_MEASUREMENTS: set[asyncio.Task[None]] = set()


def _engine_by_measurement(
    choice: EngineChoice, path: str, config: PredictorConfig
) -> tuple[EngineChoice, Callable[[Predictor], Coroutine[Any, Any, None]] | None]:
    """`engine: auto` on a CPU where both engines serve the model: the faster with adapters,
    from the stored calibration of this model shape and machine. Without one, the engine
    `choice` names serves at once, and the returned coroutine function measures both in the
    background and switches the predictor to the faster."""
    store = CalibrationStore(config.calibration_path())
    # Keyed by the dtype setting: each engine computes in its own choice of it.
    key = calibration_signature(path, config.dtype)
    stored = store.get(key)
    if stored is not None:
        return EngineChoice(stored.winner(), stored.reason(), choice.architecture), None
    total = len(MEASURED_KINDS) * len(WORKLOADS)
    done = total - missing_workloads(store.figures(key))
    log.info(
        "measuring vLLM and transformers + PEFT with a LoRA adapter on this machine in the "
        "background (once per model shape; kept in %s); serving with %s meanwhile",
        store.path,
        engine_name(choice.kind),
    )
    serving = EngineChoice(
        choice.kind,
        f"measuring vLLM and transformers + PEFT with a LoRA adapter on this machine "
        f"({done} of {total} workloads measured); serving with {engine_name(choice.kind)} "
        f"meanwhile ({choice.reason})",
        choice.architecture,
    )
    settings = {"config": dataclasses.asdict(config), "path": path, "signature": key}

    async def measure_and_switch(predictor: Predictor) -> None:
        try:
            calibration = await measure_in_background(settings, store, key)
        except Exception as exc:
            log.warning(
                "the engine measurement failed (%s); serving with %s",
                exc,
                engine_name(choice.kind),
            )
            predictor.choice = EngineChoice(
                choice.kind,
                f"{choice.reason} (the measurement of the engines on this machine failed; "
                "see the predictor's log)",
                choice.architecture,
            )
            return
        chosen = EngineChoice(calibration.winner(), calibration.reason(), choice.architecture)
        if chosen.kind is predictor.engine.kind:
            predictor.choice = chosen
            return
        log.info("%s; switching to it", chosen.reason)
        engine = await asyncio.to_thread(_start_engine, chosen.kind, path, config)
        try:
            # New requests go to the new engine; running ones finish on the old one.
            await predictor.switch_engine(engine, chosen)
        except BaseException:
            await engine.shutdown()
            raise
        predictor.dtype = choose_dtype(config.dtype, engine=chosen.kind)

    return serving, measure_and_switch


async def build_predictor(config: PredictorConfig) -> Predictor:
    """Chooses and starts the engine, opens the adapter cache and the trainer client."""
    import torch
    from transformers import AutoTokenizer

    base_model = config.base_model or DEFAULT_BASE_MODEL
    choose_dtype(config.dtype)  # a bad setting fails before any model is touched
    report_progress(f"finding the base model {base_model}")
    path = resolve_base_model(base_model)
    # The base model is the operator's; whether its own code may run is the operator's too.
    refuse_model_code(path, config.trust_remote_code, base_model)
    if config.trust_remote_code:
        log.warning("trust_remote_code is on: a base model's own Python code runs in this process")
    choice = choose_engine(path, config.engine, config.trust_remote_code)
    report_progress(f"loading the tokenizer of {base_model}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    measured = (
        config.engine == "auto"
        and config.calibrate_engines
        and choice.kind is EngineKind.VLLM
        and not torch.cuda.is_available()
    )
    measurement: Callable[[Predictor], Coroutine[Any, Any, None]] | None = None
    if measured:
        choice, measurement = _engine_by_measurement(choice, path, config)
    report_progress(f"starting {engine_name(choice.kind)} with {base_model}")
    engine = _start_engine(choice.kind, path, config)
    dtype = choose_dtype(config.dtype, engine=engine.kind)
    log.info(
        "base model %s from %s (%s): %s; dtype %s: %s",
        base_model,
        path,
        choice.architecture,
        choice.reason,
        dtype.dtype,
        dtype.reason,
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
        config.trainer_address,
        model_ttl=config.model_resolution_ttl_seconds,
        security=security_from(config),  # TLS and the predictor's own key
    )
    predictor = Predictor(
        engine,
        choice,
        tokenizer,
        cache,
        resolver,
        base_model=base_model,
        dtype=dtype,
        max_prompt_chars=config.max_prompt_chars,
    )
    if measurement is not None:
        task = asyncio.create_task(measurement(predictor), name="engine-measurement")
        _MEASUREMENTS.add(task)
        task.add_done_callback(_MEASUREMENTS.discard)
    return predictor

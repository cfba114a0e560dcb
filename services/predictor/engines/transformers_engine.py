"""transformers + PEFT: serves base models whose architecture vLLM has no LoRA path for.

One worker thread owns the model, so generation never blocks the event loop
and adapter switches never race a running generation. Requests run one after
another (no continuous batching: that is what vLLM is for); tokens stream
back to the event loop as they are produced, and a cancelled consumer stops
the generation at the next token.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from loraforge.services.common.errors import FailedPrecondition, Unavailable
from loraforge.services.predictor.engines.base import (
    AdapterRef,
    EngineKind,
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
)

log = logging.getLogger("loraforge.predictor.transformers")

_DONE = object()


@dataclass(frozen=True)
class TransformersSettings:
    base_model: str
    max_lora_rank: int = 16
    max_cpu_loras: int = 32
    max_model_len: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False  # the operator's setting; never from a request


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        name, "auto"
    )


class _Streamer:
    """Turns generated token ids into text deltas, holding back what may become a stop string.

    transformers calls `put` from the worker thread: first with the prompt, then
    with each new token.
    """

    def __init__(
        self, tokenizer: Any, stops: tuple[str, ...], emit: Callable[[GenerationDelta], None]
    ) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._emit = emit
        self._prompt_seen = False
        self.ids: list[int] = []
        self._pending_ids: list[int] = []
        self._sent = 0
        self.stopped_by_string = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.stopped_by_string:
            return
        new = [int(t) for t in value.reshape(-1).tolist()]
        self.ids.extend(new)
        self._pending_ids.extend(new)
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped_by_string = True
            self._send(text[:cut])
            return
        safe = len(text) - self._holdback
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > self._sent or self._pending_ids:
            self._emit(
                GenerationDelta(
                    text[self._sent :] if len(text) > self._sent else "", self._pending_ids
                )
            )
            self._sent = max(self._sent, len(text))
            self._pending_ids = []

    def final_text_delta(self) -> str:
        text = str(self._tokenizer.decode(self.ids, skip_special_tokens=True))
        if self.stopped_by_string:
            return ""
        return text[self._sent :]

    def end(self) -> None:
        pass


class TransformersEngine:
    """Serves one base model and its adapters through transformers + PEFT."""

    kind = EngineKind.TRANSFORMERS
    max_loras = 1  # one adapter per forward pass

    def __init__(self, settings: TransformersSettings) -> None:
        self.base_model = settings.base_model
        self.max_lora_rank = settings.max_lora_rank
        self._max_cpu_loras = max(1, settings.max_cpu_loras)
        self._settings = settings
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="transformers-engine"
        )
        self._model: Any = None
        self._peft: Any = None
        self._tokenizer: Any = None
        self._loaded: collections.OrderedDict[int, str] = (
            collections.OrderedDict()
        )  # id -> adapter name, LRU
        self._pinned: set[int] = set()
        self._running = 0
        self._aborted = 0
        self.max_model_len = 0

    @classmethod
    def start(cls, settings: TransformersSettings) -> TransformersEngine:
        engine = cls(settings)
        engine._executor.submit(engine._load).result()
        return engine

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            trust = self._settings.trust_remote_code
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.base_model, trust_remote_code=trust
            )
            model = AutoModelForCausalLM.from_pretrained(
                self.base_model, dtype=_torch_dtype(self._settings.dtype), trust_remote_code=trust
            )
        except (OSError, ValueError) as exc:
            raise Unavailable(
                f"transformers could not load base model {self.base_model!r}: {exc}"
            ) from exc
        model.eval()
        self._model = model
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.max_model_len = min(self._settings.max_model_len or limit, limit)

    # --- adapters (worker thread) -------------------------------------------------

    def _ensure_adapter_sync(self, adapter: AdapterRef) -> str:
        name = f"a{adapter.adapter_id}"
        if adapter.adapter_id in self._loaded:
            self._loaded.move_to_end(adapter.adapter_id)
            return name
        import torch
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self._model, str(adapter.path), adapter_name=name
                )
            else:
                self._peft.load_adapter(str(adapter.path), adapter_name=name)
        except torch.OutOfMemoryError:
            raise  # not the adapter's fault
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            # What PEFT raises for files it cannot read, modules the model lacks or shapes
            # that do not fit the base model.
            raise FailedPrecondition(
                f"PEFT cannot load adapter {adapter.name}: {exc}", reason="ADAPTER_LOAD_FAILED"
            ) from exc
        self._peft.eval()
        self._loaded[adapter.adapter_id] = name
        while len(self._loaded) > self._max_cpu_loras:
            victim = next(
                (i for i in self._loaded if i not in self._pinned and i != adapter.adapter_id), None
            )
            if victim is None:
                break
            self._drop_sync(victim)
        return name

    def _drop_sync(self, adapter_id: int) -> None:
        name = self._loaded.pop(adapter_id, None)
        self._pinned.discard(adapter_id)
        if name is not None and self._peft is not None:
            self._peft.delete_adapter(name)

    # --- generation (worker thread) -----------------------------------------------

    def _generate_sync(
        self,
        request: GenerationRequest,
        emit: Callable[[GenerationDelta], None],
        cancel: threading.Event,
    ) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        s = request.sampling
        streamer = _Streamer(self._tokenizer, s.stop, emit)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = cancel.is_set() or streamer.stopped_by_string
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)

        generation = self._model.generation_config
        eos = (
            generation.eos_token_id
            if generation.eos_token_id is not None
            else self._tokenizer.eos_token_id
        )
        pad = (
            generation.pad_token_id
            if generation.pad_token_id is not None
            else self._tokenizer.pad_token_id
        )
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_tokens,
            "do_sample": not s.greedy,
            "repetition_penalty": s.repetition_penalty,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Stop()]),
        }
        if s.ignore_eos:
            kwargs["min_new_tokens"] = s.max_tokens
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        # One generation at a time (one worker thread), so the global generator is this
        # request's: seeded, it repeats; unseeded, it must not repeat the last seeded one's.
        if s.seed is not None:
            torch.manual_seed(s.seed)
        else:
            torch.seed()
        input_ids = torch.tensor([request.prompt_token_ids], dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            if request.adapter is not None:
                name = self._ensure_adapter_sync(request.adapter)
                self._peft.set_adapter(name)
                self._peft.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            elif self._peft is not None:
                with self._peft.disable_adapter():
                    self._peft.generate(
                        input_ids=input_ids, attention_mask=attention_mask, **kwargs
                    )
            else:
                self._model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        if cancel.is_set():
            reason = FinishReason.ABORTED
        elif streamer.stopped_by_string or (streamer.ids and streamer.ids[-1] in eos_ids):
            reason = FinishReason.STOP
        elif len(streamer.ids) >= s.max_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        emit(GenerationDelta(streamer.final_text_delta(), [], reason))

    # --- Engine -------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(delta: GenerationDelta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        def job() -> None:
            try:
                if cancel.is_set():  # cancelled while waiting for the worker
                    return
                self._generate_sync(request, emit, cancel)
            except BaseException as exc:  # handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        self._running += 1
        future = loop.run_in_executor(self._executor, job)
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                cancel.set()
                self._aborted += 1
            raise
        finally:
            cancel.set()
            self._running -= 1
            del future  # the job ends by itself at its next token once cancelled

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def load_adapter(self, adapter: AdapterRef, *, pin: bool = False) -> None:
        await self._call(self._ensure_adapter_sync, adapter)
        if pin:
            self._pinned.add(adapter.adapter_id)

    async def unload_adapter(self, adapter_id: int) -> None:
        await self._call(self._drop_sync, adapter_id)

    async def loaded_adapter_ids(self) -> set[int]:
        return set(self._loaded)

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._aborted)

    def failure(self) -> str | None:
        return None  # runs in the predictor's own process: it cannot die alone

    def stopping(self) -> None:
        pass  # one process: nothing ends before shutdown

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

"""vLLM `AsyncLLM` with multi-LoRA: requests for different adapters share one batch.

The engine core runs in a child process vLLM starts; this side lives in the
server's event loop. Token deltas come from `RequestOutputKind.DELTA`; a
consumer that stops iterating (a cancelled gRPC call) makes vLLM abort the
request, which frees its batch slot and KV cache at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from loraforge.services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from loraforge.services.predictor.engines.base import (
    AdapterRef,
    EngineKind,
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    engine_stopped,
)
from loraforge.services.predictor.engines.vllm_lifeline import LIFELINE_VARIABLE

log = logging.getLogger("loraforge.predictor.vllm")

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORTED}

# vLLM on a CPU binds its worker's threads to the host's cores less the ones it reserves for
# its engine process (VLLM_CPU_NUM_OF_RESERVED_CPU, one by default). That process spends a
# step waiting on the worker (yielding the core), so on a small host a reserved core is
# mostly idle: on 2 cores, giving the worker both measured 1.3-1.8x the prompt tokens/s
# and 1.2x the output tokens/s (bench/bench_predictor.py workloads).
SMALL_HOST_CPUS = 4
_RESERVED_CPU_VARIABLE = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def host_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reserved_cpu_cores(requested: int) -> int | None:
    """The cores vLLM's CPU worker leaves to its engine process: `requested` when >= 0; for
    -1 (auto), none on a host of up to SMALL_HOST_CPUS CPUs, else vLLM's own choice (None:
    its VLLM_CPU_NUM_OF_RESERVED_CPU where the operator set it, one core otherwise)."""
    if requested >= 0:
        return requested
    if _RESERVED_CPU_VARIABLE in os.environ or host_cpus() > SMALL_HOST_CPUS:
        return None
    return 0


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`values` in os.environ while vLLM starts its engine process (which inherits them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class VllmSettings:
    base_model: str
    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16
    max_model_len: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 0  # a step's token budget; 0: vLLM's default
    kv_cache_bytes: int = 1024**3
    dtype: str = "auto"
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    trust_remote_code: bool = False  # the operator's setting; never from a request
    reserved_cpu_cores: int = -1  # on a CPU; -1: auto (reserved_cpu_cores)


class _StopNotice(logging.Filter):
    """Turns vLLM's report that its engine process has gone into one INFO line once the
    predictor is stopping.

    A stop by a signal to the process group (a cluster's stop, systemd's default) reaches
    vLLM's engine process too, which ends before the predictor shuts vLLM down; vLLM's output
    handler then logs an ERROR with an EngineDeadError traceback. At any other time that
    report is a real failure and stays an ERROR.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        dead = (
            record.exc_info is not None and type(record.exc_info[1]).__name__ == "EngineDeadError"
        )
        if self.stopping and dead and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg, record.args = "vLLM's engine process has stopped with the predictor", None
            record.exc_info, record.exc_text = None, None
        return True


_OUTPUT_HANDLER_LOGGER = "vllm.v1.engine.async_llm"
_WORKER_FAILED = re.compile(r"Worker failed with error '(.*)', please check the stack trace", re.S)


def _utility_failure(exc: Exception, methods: tuple[str, ...]) -> str | None:
    """The cause of a failed engine-core call to one of `methods`, or None for anything else.

    vLLM reports such a failure from its engine process as a bare Exception whose text is
    "Call to <method> method failed: <cause>", the cause often wrapping the worker's own.
    """
    text = str(exc)
    for method in methods:
        prefix = f"Call to {method} method failed: "
        if type(exc) is Exception and text.startswith(prefix):
            cause = text[len(prefix) :]
            inner = _WORKER_FAILED.search(cause)
            return inner.group(1) if inner else cause
    return None


class VllmEngine:
    """Serves one base model and its adapters through vLLM's AsyncLLM."""

    kind = EngineKind.VLLM

    def __init__(self, llm: Any, settings: VllmSettings) -> None:
        self._llm = llm
        self.base_model = settings.base_model
        self._trust_remote_code = settings.trust_remote_code
        self.max_loras = settings.max_loras
        self.max_lora_rank = settings.max_lora_rank
        self.max_model_len = int(llm.model_config.max_model_len)
        self._aborted = 0
        self._tokenizer: Any = None
        self._usable: set[int] = set()  # adapters vLLM has loaded once
        self._shut_down = False
        self._stop_notice = _StopNotice()
        logging.getLogger(_OUTPUT_HANDLER_LOGGER).addFilter(self._stop_notice)

    def _decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.base_model, trust_remote_code=self._trust_remote_code
            )
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))

    @classmethod
    def start(cls, settings: VllmSettings) -> VllmEngine:
        """Builds the engine (tens of seconds: the engine core process loads the model)."""
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        options: dict[str, Any] = {
            "model": settings.base_model,
            "enable_lora": True,
            "max_loras": settings.max_loras,
            "max_cpu_loras": max(settings.max_cpu_loras, settings.max_loras),
            "max_lora_rank": settings.max_lora_rank,
            "max_num_seqs": settings.max_num_seqs,
            "dtype": settings.dtype,
            "enforce_eager": settings.enforce_eager,
            "seed": settings.seed,
            "disable_log_stats": True,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "trust_remote_code": settings.trust_remote_code,
        }
        if settings.max_model_len:
            options["max_model_len"] = settings.max_model_len
        if settings.max_num_batched_tokens:
            options["max_num_batched_tokens"] = settings.max_num_batched_tokens
        # The engine's processes end with this one, even if it is killed (vllm_lifeline).
        environment: dict[str, str] = {LIFELINE_VARIABLE: "1"}
        if not torch.cuda.is_available():
            # On a CPU the KV cache is sized in bytes; on a GPU from memory utilisation.
            options["kv_cache_memory_bytes"] = settings.kv_cache_bytes
            reserved = reserved_cpu_cores(settings.reserved_cpu_cores)
            if reserved is not None:
                environment[_RESERVED_CPU_VARIABLE] = str(reserved)
            log.info(
                "vLLM CPU worker: %s of %d CPUs reserved for its engine process",
                "vLLM's default" if reserved is None else reserved,
                host_cpus(),
            )
        args = AsyncEngineArgs(**options)
        try:
            with _environment(**environment):
                llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise Unavailable(
                f"vLLM could not start for base model {settings.base_model!r}: {exc}"
            ) from exc
        return cls(llm, settings)

    def _sampling_params(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            stop=list(s.stop) or None,
            seed=s.seed,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    def _lora_request(self, adapter: AdapterRef | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.name, adapter.adapter_id, str(adapter.path))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input

        if request.adapter is not None and request.adapter.adapter_id not in self._usable:
            # Loaded once ahead of its first request, so an adapter vLLM cannot use is refused
            # with its cause; afterwards vLLM reloads it by itself if it was evicted.
            await self.load_adapter(request.adapter)
        params = self._sampling_params(request)
        lora = self._lora_request(request.adapter)
        finished = False
        all_ids: list[int] = []
        emitted: list[str] = []
        try:
            stream = self._llm.generate(
                tokens_input(request.prompt_token_ids),
                params,
                request.request_id,
                lora_request=lora,
            )
            async for output in stream:
                completion = output.outputs[0]
                reason = _FINISH.get(completion.finish_reason) if output.finished else None
                text = completion.text
                all_ids += completion.token_ids
                if output.finished:
                    finished = True
                    if completion.stop_reason is None:  # ended by EOS or length, not a stop string
                        text += self._held_back_text(all_ids, "".join(emitted) + text)
                emitted.append(text)
                yield GenerationDelta(text, list(completion.token_ids), reason)
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                # vLLM's generate() has aborted the request in the engine on its way out.
                self._aborted += 1
            raise
        except VLLMClientError as exc:  # vLLM's request validation (e.g. a prompt too long)
            raise InvalidArgument(str(exc), reason="ENGINE_REJECTED_REQUEST") from exc
        except Exception as exc:
            if self._llm.errored:
                raise engine_stopped("vLLM") from exc
            raise  # unexpected: INTERNAL with an incident id

    def _held_back_text(self, token_ids: list[int], emitted: str) -> str:
        """What vLLM's incremental detokenizer kept back at the end (an incomplete UTF-8 sequence).

        Without it, a stream could end shorter than the decoded tokens it reports.
        """
        full = self._decode(token_ids)
        return full[len(emitted) :] if full.startswith(emitted) else ""

    async def load_adapter(self, adapter: AdapterRef, *, pin: bool = False) -> None:
        try:
            await self._llm.add_lora(self._lora_request(adapter))
            if pin:
                await self._llm.pin_lora(adapter.adapter_id)
        except Exception as exc:
            if self._llm.errored:
                raise engine_stopped("vLLM") from exc
            cause = _utility_failure(exc, ("add_lora", "pin_lora"))
            if cause is None or "out of memory" in cause.lower():
                raise  # not the adapter's fault: INTERNAL with an incident id
            raise FailedPrecondition(
                f"vLLM cannot load adapter {adapter.name}: {cause}", reason="ADAPTER_LOAD_FAILED"
            ) from exc
        self._usable.add(adapter.adapter_id)

    async def unload_adapter(self, adapter_id: int) -> None:
        self._usable.discard(adapter_id)
        if adapter_id in await self._llm.list_loras():
            await self._llm.remove_lora(adapter_id)

    async def loaded_adapter_ids(self) -> set[int]:
        return set(await self._llm.list_loras())

    def stats(self) -> EngineStats:
        return EngineStats(self._llm.get_num_unfinished_requests(), self._aborted)

    def failure(self) -> str | None:
        # vLLM marks its client dead when the engine process exits or reports a fatal error
        # (and fails every request it holds); a shutdown of ours is no failure.
        if self._shut_down or not self._llm.errored:
            return None
        return "vLLM's engine process stopped (the log above has its cause)"

    def stopping(self) -> None:
        self._stop_notice.stopping = True

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        self.stopping()  # vLLM's output handler sees the engine process end
        try:
            await asyncio.to_thread(self._llm.shutdown)
            # vLLM cancels its output handler from that thread: let it end before the notice
            # goes, so its last report is still seen as part of the stop.
            handler = getattr(self._llm, "output_handler", None)
            if isinstance(handler, asyncio.Task):
                await asyncio.wait([handler], timeout=5)
            # AsyncLLM.__del__ shuts down again; where the object lives until interpreter exit
            # that call fails on vLLM's emptied module globals with a TypeError traceback.
            self._llm.shutdown = lambda timeout=None: None
        finally:
            logging.getLogger(_OUTPUT_HANDLER_LOGGER).removeFilter(self._stop_notice)

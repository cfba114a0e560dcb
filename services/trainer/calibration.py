"""Training throughput on this machine: measured once per base model, worker kind and machine.

An estimate's time comes from the TRAINED runs of the same base model on the same kind of
worker (`estimates.py`); a new deployment has none. So a worker, at its start, measures
the base model of the template recommended on its hardware, with that template's
defaults: a few optimizer steps of LoRA training on synthetic prompts at two sequence
lengths (SHORT and LONG tokens, the template's micro-batch up to MAX_BATCH rows, a quarter
of each row a completion as in instruct data), and the time to load the model and save an
adapter. For SmolLM2-135M that is about 1,400 training tokens: seconds at the 100 to 200
tokens/s it trains at on 2 quiet cores, plus its loading.

The measurement runs in a child process of low priority (`os.nice(19)`) with at most
MAX_THREADS threads, started from a background thread, so the worker polls and claims
runs as before. When the worker claims a run, the child is stopped at once; the
measurement starts again once the worker is idle (up to MAX_TRIES times).

The figures are kept in a JSON file in the user's cache folder, keyed by everything that
decides them (the model's shape, the template's defaults, the CPU or GPU, the threads, the
library versions), and recorded in the trainer store (`store.TrainCalibrationRow`), where
estimates read them. A later start with a fresh entry (FRESH_SECONDS) measures nothing.

Tokens per second depend on the sequence length and the batch. A row's time is taken as
a fixed part plus a part per token, fitted through the two measured points, and rows of
a larger micro-batch as costing the same each (`Measurement.tokens_per_second`). Beyond
LONG tokens attention's share grows with the length, which this leaves out: for long
rows the time estimated is short until a TRAINED run of the model replaces it. On a
machine other processes keep busy, the figures come from the measurement's CPU time
(`measure`), and the estimate's text says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.store import (
    RUNNING_STATES,
    TrainCalibrationRow,
    TrainerStore,
    VersionRow,
)

if TYPE_CHECKING:
    from loraforge.services.trainer.worker import Worker

log = logging.getLogger("loraforge.worker.calibration")

# Bumped whenever the workload changes what a measurement means.
WORKLOAD_VERSION = 1
SHORT, LONG = 32, 128  # sequence lengths measured, in tokens
WARMUP_STEPS, TIMED_STEPS = 1, 2  # warm-up before the first length; timed at each
MAX_BATCH = 4  # rows per step at most (the template's micro-batch when smaller)
MAX_THREADS = 2
FRESH_SECONDS = 30 * 86400.0
MAX_TRIES = 3
BUSY_SHARE = 0.6  # a measurement with less of its threads' time counts as made on a busy machine
POLL_SECONDS = 0.25
_STOP_SECONDS = 5.0
_LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def default_calibration_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loraforge" / "training-calibration.json"


@dataclass(frozen=True)
class Measurement:
    """Training throughput of one base model with one template's defaults on one machine."""

    signature: str
    base_model: str  # as runs record it: a catalogue or hub name, or a folder's real path
    worker_kind: str  # `cpu` or `cuda`
    worker_id: str  # the worker that measured it
    machine: str  # the CPU (or GPU) and its cores, in words
    threads: int
    batch_size: int
    points: tuple[tuple[int, float], ...]  # (sequence length, tokens/s), shortest first
    load_seconds: float  # loading the tokenizer and the model, saving an adapter
    measured_at: float
    # The share of its threads' time the measurement had (its CPU time over wall time times
    # threads); under BUSY_SHARE the tokens/s are from its CPU time (see `measure`).
    cpu_share: float = 1.0

    def tokens_per_second(self, length: float) -> float:
        """The throughput at rows of `length` tokens: a row's time taken as linear in its
        tokens through the two measured points (a fixed part per row, and a part per token);
        a faster long row than short one (noise) counts as no fixed part."""
        (short, short_rate), (long, long_rate) = self.points[0], self.points[-1]
        # Seconds per row of n tokens: overhead + per_token * n, through both points.
        per_token = 1 / long_rate
        if long > short and long / long_rate > short / short_rate:
            per_token = (long / long_rate - short / short_rate) / (long - short)
        overhead = max(short / short_rate - per_token * short, 0.0)
        length = max(length, 1.0)
        return length / (overhead + per_token * length)

    def describe(self, length: float) -> str:
        rate = self.tokens_per_second(length)
        when = time.strftime("%Y-%m-%d", time.gmtime(self.measured_at))
        measured = ", ".join(f"{r:,.0f} tokens/s at {n} tokens" for n, r in self.points)
        busy = (
            f"; other processes were busy, it had {self.cpu_share:.0%} of its threads' time, "
            "so the figures are from its CPU time"
            if self.cpu_share < BUSY_SHARE
            else ""
        )
        return (
            f"measured on worker {self.worker_id}'s machine at start ({when}, {self.machine}, "
            f"{self.threads} thread(s), micro-batch {self.batch_size}{busy}): {measured}, so "
            f"{rate:,.0f} tokens/s at this run's {length:,.0f} tokens per row, plus "
            f"{self.load_seconds:.0f} s loading and saving; no TRAINED run of this model yet"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Measurement | None:
        try:
            points = tuple((int(n), float(r)) for n, r in data["points"])
            if not points or any(r <= 0 for _, r in points):
                return None
            return cls(
                signature=str(data["signature"]),
                base_model=str(data["base_model"]),
                worker_kind=str(data["worker_kind"]),
                worker_id=str(data["worker_id"]),
                machine=str(data["machine"]),
                threads=int(data["threads"]),
                batch_size=int(data["batch_size"]),
                points=points,
                load_seconds=float(data["load_seconds"]),
                measured_at=float(data["measured_at"]),
                cpu_share=float(data.get("cpu_share", 1.0)),
            )
        except (TypeError, KeyError, ValueError):
            return None


# --- what decides a measurement ---------------------------------------------------------


def machine(cuda: bool) -> str:
    """The processor that trains, in words: the GPU's name, or the CPU's and its cores."""
    if cuda:
        import torch

        return str(torch.cuda.get_device_name(0))
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    return f"{name}, {os.cpu_count() or 1} cores"


def signature(folder: Path, params: TrainingParams, cuda: bool, threads: int) -> str:
    """The model's shape (not its path or weights), the parameters that decide a step's
    work, the processor, the threads and the versions of the libraries doing the work."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    versions = {}
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    pc, trc = params.peft_config, params.trainer_config
    key = {
        "workload": WORKLOAD_VERSION,
        "model": config,
        "dtype": params.model_config.torch_dtype,
        "attention": params.model_config.attn_implementation,
        "lora": [pc.r, sorted(pc.target_modules)],
        "batch": calibration_batch(params),
        "gradient_checkpointing": trc.gradient_checkpointing,
        "machine": machine(cuda),
        "threads": threads,
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def local_folder(name: str) -> Path | None:
    """The folder of base model `name` on this machine (nothing is downloaded or
    converted), or None."""
    from loraforge.services.common.base_models import (
        is_materialised,
        lookup,
        materialised_folder,
    )

    entry = lookup(name)
    if entry is not None:
        return materialised_folder(entry) if is_materialised(entry) else None
    folder = Path(name)
    return folder if folder.is_absolute() and (folder / "config.json").is_file() else None


# --- where the figures are kept -----------------------------------------------------------


class CalibrationCache:
    """A JSON file of measurements by signature, shared by every worker of this machine."""

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
            log.warning("ignoring the training calibration file %s: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str, now: float | None = None) -> Measurement | None:
        """The measurement of `key` if it is fresh (FRESH_SECONDS), else None."""
        found = Measurement.from_json(self._read().get(key))
        now = time.time() if now is None else now
        if found is None or now - found.measured_at > FRESH_SECONDS:
            return None
        return found

    def put(self, measurement: Measurement) -> None:
        with self._locked():
            data = self._read()
            data[measurement.signature] = measurement.to_json()
            tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def record(store: TrainerStore, m: Measurement) -> None:
    """Adds `m` to the trainer store unless a row of the same signature and time is there."""
    with store.sessions.begin() as s:
        known = s.scalars(
            select(TrainCalibrationRow.seq).where(
                TrainCalibrationRow.signature == m.signature,
                TrainCalibrationRow.measured_at == m.measured_at,
            )
        ).first()
        if known is not None:
            return
        s.add(
            TrainCalibrationRow(
                signature=m.signature,
                base_model=m.base_model,
                worker_kind=m.worker_kind,
                worker_id=m.worker_id,
                machine=m.machine,
                threads=m.threads,
                batch_size=m.batch_size,
                points=[list(p) for p in m.points],
                load_seconds=m.load_seconds,
                measured_at=m.measured_at,
                cpu_share=m.cpu_share,
            )
        )


def latest(store: TrainerStore, base_model: str, worker_kind: str) -> Measurement | None:
    """The newest measurement of `base_model` on a `worker_kind` worker, if any."""
    with store.sessions() as s:
        row = s.scalars(
            select(TrainCalibrationRow)
            .where(
                TrainCalibrationRow.base_model == base_model,
                TrainCalibrationRow.worker_kind == worker_kind,
            )
            .order_by(TrainCalibrationRow.measured_at.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return Measurement.from_json(
            {c.name: getattr(row, c.name) for c in TrainCalibrationRow.__table__.columns}
        )


# --- the measurement (in the child process) ------------------------------------------------


def calibration_batch(params: TrainingParams) -> int:
    return min(params.trainer_config.per_device_train_batch_size, MAX_BATCH)


def _synthetic_rows(tokenizer: Any, rows: int, length: int) -> list[list[int]]:
    text = " ".join(
        f"Review {i}: the delivery was on time, the fabric feels sturdy and the colour is "
        f"close to the photos, though the sizing runs small. Sentiment: positive."
        for i in range(8 + rows * length // 16)
    )
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    while len(ids) < rows * 7 + length:
        ids += ids
    return [ids[i * 7 : i * 7 + length] for i in range(rows)]


def measure(
    params: TrainingParams,
    model_path: str,
    lengths: tuple[int, ...] = (SHORT, LONG),
    trust_remote_code: bool = False,
    threads: int = 1,
) -> tuple[list[tuple[int, float]], float, float]:
    """(length, tokens/s) at each of `lengths`, the seconds to load and save, and the share
    of its `threads`' time the process had: the loss, gradients and optimizer step training
    takes, on synthetic prompts whose last quarter is the completion (a batch of the
    template's micro-batch size per step, at most MAX_BATCH).

    A process of the lowest priority on a machine that other processes keep busy gets a
    fraction of its threads' time, so its wall-clock rate says more about them than about
    the machine; a training run is not of low priority. Below BUSY_SHARE of that time, the
    rates are the tokens over the CPU time per thread instead."""
    import tempfile

    import torch

    from loraforge.services.trainer import training

    started = time.monotonic()
    tokenizer = training.load_tokenizer(
        params, model_path=model_path, trust_remote_code=trust_remote_code
    )
    model = training.load_model(params, model_path=model_path, trust_remote_code=trust_remote_code)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and params.quantization_config.quant_method != "gptq":
        model.to(device)
    with tempfile.TemporaryDirectory(prefix="training-calibration-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    load_seconds = time.monotonic() - started
    model.train()
    trc = params.trainer_config
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=trc.learning_rate
    )
    autocast: Any = contextlib.nullcontext()
    if cuda:
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = torch.autocast("cuda", dtype=half)
    batch = calibration_batch(params)
    points: list[tuple[int, float]] = []
    shares: list[float] = []
    for index, length in enumerate(lengths):
        ids = torch.tensor(_synthetic_rows(tokenizer, batch, length), device=device)
        labels = ids.clone()
        labels[:, : length - max(length // 4, 1)] = training.IGNORE_INDEX
        mask = torch.ones_like(ids)
        elapsed = cpu = 0.0
        warmup = WARMUP_STEPS if index == 0 else 0
        for step in range(warmup + TIMED_STEPS):
            if cuda:
                torch.cuda.synchronize()
            began, began_cpu = time.monotonic(), time.process_time()
            with autocast:
                keep = training.labelled_positions(labels)
                if keep is not None and training.takes_logits_to_keep(model):
                    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
                    loss = training.labelled_loss(out.logits, labels[:, keep + 1])
                    loss = loss / (labels[:, 1:] != training.IGNORE_INDEX).sum().clamp(min=1)
                else:
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            if trc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), trc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                elapsed += time.monotonic() - began
                cpu += time.process_time() - began_cpu
        share = 1.0 if cuda else min(cpu / max(elapsed * threads, 1e-9), 1.0)
        shares.append(share)
        seconds = elapsed if share >= BUSY_SHARE else cpu / threads
        points.append((length, batch * length * TIMED_STEPS / max(seconds, 1e-9)))
    return points, load_seconds, min(shares)


def _exit_with_parent() -> None:
    """Ends this process when the worker that started it is gone (killed, not stopped)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> int:
    """The measurement process: its settings (JSON) come on its standard input; the
    measurement goes to the cache file they name."""
    os.nice(19)  # the worker's runs come first
    _exit_with_parent()
    settings = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(int(settings["threads"]))
    params = TrainingParams.from_dict(settings["params"])
    points, load_seconds, share = measure(
        params,
        settings["model_path"],
        trust_remote_code=bool(settings["trust_remote_code"]),
        threads=int(settings["threads"]),
    )
    CalibrationCache(Path(settings["cache"])).put(
        Measurement(
            signature=settings["signature"],
            base_model=settings["base_model"],
            worker_kind=settings["worker_kind"],
            worker_id=settings["worker_id"],
            machine=settings["machine"],
            threads=int(settings["threads"]),
            batch_size=calibration_batch(params),
            points=tuple(points),
            load_seconds=load_seconds,
            measured_at=time.time(),
            cpu_share=share,
        )
    )
    return 0


# --- the worker's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a worker measures: a base model with a template's defaults."""

    template: str
    params: TrainingParams
    base_model: str  # as runs record it
    model_path: str  # what to load
    folder: Path
    cuda: bool
    threads: int


class Calibrator:
    """Measures the throughput of a plan unless a fresh figure is kept, and records it."""

    def __init__(
        self,
        store: TrainerStore,
        worker_id: str,
        stop: threading.Event,
        cache: CalibrationCache | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.stop = stop
        self.cache = cache or CalibrationCache(default_calibration_file())
        self.trust_remote_code = trust_remote_code
        self.paused = threading.Event()  # set once it waited for a run of this worker to end
        self.started: list[float] = []  # when each measurement process started (time.time)

    def busy(self) -> bool:
        """Whether this worker holds a run (claimed and not yet finished); a database that
        does not answer counts as busy, so the measurement waits rather than competes."""
        try:
            with self.store.sessions() as s:
                held = s.scalars(
                    select(VersionRow.seq)
                    .where(
                        VersionRow.worker_id == self.worker_id,
                        VersionRow.state.in_([state.value for state in RUNNING_STATES]),
                    )
                    .limit(1)
                ).first()
        except Exception as exc:
            log.debug("could not read this worker's runs (%s); taking it as busy", exc)
            return True
        return held is not None

    def run(self, plan: Plan) -> Measurement | None:
        """The plan's measurement: the kept one when fresh (recorded in the store if it was
        not), else a new one; None when it could not finish (stopped, or failed)."""
        key = signature(plan.folder, plan.params, plan.cuda, plan.threads)
        kept = self.cache.get(key)
        if kept is not None:
            log.info(
                "training throughput of %s on this machine measured before (%s); not measuring",
                plan.base_model,
                ", ".join(f"{r:,.0f} tokens/s at {n} tokens" for n, r in kept.points),
            )
            record(self.store, kept)
            return kept
        settings = {
            "params": plan.params.to_dict(),
            "model_path": plan.model_path,
            "base_model": plan.base_model,
            "trust_remote_code": self.trust_remote_code,
            "threads": plan.threads,
            "signature": key,
            "cache": str(self.cache.path),
            "worker_id": self.worker_id,
            "worker_kind": "cuda" if plan.cuda else "cpu",
            "machine": machine(plan.cuda),
        }
        for attempt in range(1, MAX_TRIES + 1):
            while self.busy():  # paused while the worker trains
                if not self.paused.is_set():
                    log.info("measuring the training throughput once this worker's run ends")
                    self.paused.set()
                if self.stop.wait(1.0):
                    return None
            if self.stop.is_set():
                return None
            log.info(
                "measuring the training throughput of %s (%s defaults) on this machine in the "
                "background, attempt %d of %d",
                plan.base_model,
                plan.template,
                attempt,
                MAX_TRIES,
            )
            code = self._measure_in_child(settings)
            if code == 0:
                measured = self.cache.get(key)
                if measured is None:
                    log.warning("the training throughput measurement wrote no figures")
                    return None
                record(self.store, measured)
                log.info(
                    "training throughput of %s: %s, %.1f s loading and saving",
                    plan.base_model,
                    ", ".join(f"{r:,.0f} tokens/s at {n} tokens" for n, r in measured.points),
                    measured.load_seconds,
                )
                return measured
            if code is not None:
                log.warning(
                    "the training throughput measurement exited with code %d; estimates "
                    "wait for a TRAINED run instead",
                    code,
                )
                return None
            if self.stop.is_set():
                return None
            log.info("a run was claimed: the training throughput measurement stopped")
        return None

    def _measure_in_child(self, settings: dict[str, Any]) -> int | None:
        """The child's exit code, or None when it was stopped (a run was claimed, or the
        worker is stopping)."""
        self.started.append(time.time())
        child = subprocess.Popen(
            [sys.executable, "-c", f"import sys; from {__name__} import main; sys.exit(main())"],
            stdin=subprocess.PIPE,
        )
        assert child.stdin is not None
        # On its standard input, not its command line: the parameters may be long.
        child.stdin.write(json.dumps(settings).encode())
        child.stdin.close()
        try:
            while True:
                code = child.poll()
                if code is not None:
                    return code
                if self.stop.wait(POLL_SECONDS) or self.busy():
                    return None
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()


def plan_for(worker: Worker) -> Plan | None:
    """The base model and defaults of the template recommended on this worker's hardware;
    None when its base model is not on this machine (nothing is downloaded for this)."""
    from loraforge.services.trainer import templates as tpl
    from loraforge.services.trainer.hardware import unmet

    has = worker.capabilities
    template = next(
        (
            t
            for t in tpl.all_templates()
            if t.recommended and not unmet(tpl.requirements(t, t.defaults()), has)
        ),
        None,
    )
    if template is None:
        return None
    params = template.defaults()
    model_path = worker.models.resolve(params.base_model)
    folder = local_folder(model_path)
    if folder is None:
        log.info("not measuring the training throughput: %s is not on this machine yet", model_path)
        return None
    threads = min(MAX_THREADS, worker.config.cpu_threads or os.cpu_count() or 1)
    return Plan(
        template=template.name,
        params=params,
        base_model=model_path if model_path.startswith("/") else params.base_model,
        model_path=str(folder),
        folder=folder,
        cuda=has.cuda,
        threads=threads,
    )


def start_in_background(worker: Worker) -> threading.Thread:
    """Starts measuring the training throughput of `worker`'s machine in a background thread
    (see the module docstring); it never raises into the worker."""

    def calibrate() -> None:
        try:
            plan = plan_for(worker)
            if plan is not None:
                Calibrator(
                    worker.store,
                    worker.worker_id,
                    worker.stop,
                    trust_remote_code=worker.config.trust_remote_code,
                ).run(plan)
        except Exception:
            log.exception("measuring the training throughput failed; estimates wait for runs")

    thread = threading.Thread(target=calibrate, name="training-calibration", daemon=True)
    thread.start()
    return thread

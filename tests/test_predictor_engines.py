"""Engines in-process: vLLM multi-LoRA equals transformers + PEFT; aborts; the GPT-Neo path."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraforge.services.predictor.engines.base import AdapterRef, FinishReason, GenerationRequest
from loraforge.services.predictor.params import SamplingSettings
from tests.test_predictor_helpers import make_adapter, peft_greedy, tiny_base

PROMPTS = [
    "The quick brown fox",
    "Question: What is the capital of France? Answer:",
    "Net sales increased",
]
GREEDY = SamplingSettings(max_tokens=12)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = tiny_base(root)
    return {
        "base": base,
        "a1": make_adapter(base, root / "a1", seed=11),
        "a2": make_adapter(base, root / "a2", seed=12, targets=["q_proj", "v_proj", "down_proj"]),
    }


async def collect(
    engine: Any, request: GenerationRequest
) -> tuple[list[int], str, FinishReason | None]:
    ids: list[int] = []
    text: list[str] = []
    reason = None
    async for delta in engine.generate(request):
        ids.extend(delta.token_ids)
        text.append(delta.text)
        reason = delta.finish_reason or reason
    return ids, "".join(text), reason


@pytest.fixture(scope="module")
def vllm_engine(llama: dict[str, Path], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    from loraforge.services.predictor.engines.vllm_engine import VllmEngine, VllmSettings

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    async def start() -> VllmEngine:
        return VllmEngine.start(
            VllmSettings(
                str(llama["base"]),
                max_loras=4,
                max_lora_rank=8,
                dtype="float32",
                kv_cache_bytes=1 << 30,
            )
        )

    engine = loop.run_until_complete(start())
    yield engine
    loop.run_until_complete(engine.shutdown())


def _pinned_cpus(pid: int) -> set[int]:
    """The CPUs that threads of process `pid` are bound to one by one (OpenMP's workers)."""
    pinned: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpus = os.sched_getaffinity(int(tid))
        except OSError:  # the thread ended
            continue
        if len(cpus) == 1:
            pinned |= cpus
    return pinned


def test_on_a_small_host_the_vllm_worker_computes_on_every_core(vllm_engine: Any) -> None:
    """vLLM keeps one core from its CPU worker for its engine process by default; on a host
    of a few cores the predictor gives the worker all of them (`--vllm-reserved-cores`)."""
    import psutil

    from loraforge.services.predictor.engines.vllm_engine import SMALL_HOST_CPUS, host_cpus

    if host_cpus() > SMALL_HOST_CPUS:
        pytest.skip(f"{host_cpus()} CPUs: vLLM's own reservation applies")
    workers = [
        p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::Worker")
    ]
    assert len(workers) == 1, [p.name() for p in psutil.Process().children(recursive=True)]
    assert _pinned_cpus(workers[0].pid) == os.sched_getaffinity(0)


def test_the_reserved_cores_setting_wins_then_vllms_own_variable_then_the_host_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loraforge.services.predictor.engines import vllm_engine

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr(vllm_engine, "host_cpus", lambda: 2)
    assert vllm_engine.reserved_cpu_cores(-1) == 0
    assert vllm_engine.reserved_cpu_cores(1) == 1
    monkeypatch.setattr(vllm_engine, "host_cpus", lambda: 32)
    assert vllm_engine.reserved_cpu_cores(-1) is None  # vLLM's own: one core
    assert vllm_engine.reserved_cpu_cores(0) == 0
    monkeypatch.setattr(vllm_engine, "host_cpus", lambda: 2)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert vllm_engine.reserved_cpu_cores(-1) is None  # the operator's variable stands
    assert vllm_engine.reserved_cpu_cores(0) == 0


@pytest.mark.slow
def test_vllm_multi_lora_batch_equals_peft(vllm_engine: Any, llama: dict[str, Path], loop) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama["base"])
    adapters = {
        None: None,
        "a1": AdapterRef(1, "a1", llama["a1"]),
        "a2": AdapterRef(2, "a2", llama["a2"]),
    }
    jobs = [(key, prompt) for prompt in PROMPTS for key in adapters]

    async def run_all() -> list[tuple[list[int], str, FinishReason | None]]:
        # All adapters and the base model in one concurrent batch.
        return await asyncio.gather(
            *[
                collect(
                    vllm_engine,
                    GenerationRequest(
                        uuid.uuid4().hex, tokenizer(p)["input_ids"], GREEDY, adapters[k]
                    ),
                )
                for k, p in jobs
            ]
        )

    results = loop.run_until_complete(run_all())
    by_key: dict[Any, list[list[int]]] = {}
    for (key, prompt), (ids, text, reason) in zip(jobs, results, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        expected = peft_greedy(
            llama["base"], llama[key] if key else None, prompt_ids, GREEDY.max_tokens
        )
        assert ids == expected, f"adapter {key}, prompt {prompt!r}"
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
        assert reason is (
            FinishReason.LENGTH if len(ids) == GREEDY.max_tokens else FinishReason.STOP
        )
        by_key.setdefault(key, []).append(ids)
    assert by_key[None] != by_key["a1"] != by_key["a2"] != by_key[None], (
        "each adapter changes the output"
    )


@pytest.mark.slow
def test_vllm_reusing_adapter_slots_serves_each_adapters_own_weights(
    vllm_engine: Any, llama: dict[str, Path], loop, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Six adapters through an engine of four slots: vLLM loads later adapters into slots
    earlier ones used, rewriting its stacked weights in place, and the CPU LoRA path's packed
    copies must follow. Some adapters skip layers (q and v only), so a slot's layer can hold
    zeros for one adapter and weights for the next."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama["base"])
    root = tmp_path_factory.mktemp("six-adapters")
    paths = [
        make_adapter(
            llama["base"],
            root / f"s{i}",
            seed=40 + i,
            targets=["q_proj", "v_proj"] if i % 2 else None,
        )
        for i in range(6)
    ]
    refs = [AdapterRef(100 + i, f"s{i}", path) for i, path in enumerate(paths)]
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    expected = [peft_greedy(llama["base"], path, prompt, GREEDY.max_tokens) for path in paths]
    assert len({tuple(e) for e in expected}) > 1, "the adapters answer differently"

    async def wave(adapters: list[int]) -> list[list[int]]:
        results = await asyncio.gather(
            *[
                collect(vllm_engine, GenerationRequest(uuid.uuid4().hex, prompt, GREEDY, refs[i]))
                for i in adapters
            ]
        )
        return [ids for ids, _, _ in results]

    for adapters in ([0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5], [1, 2, 3, 4, 5, 0]):
        answers = loop.run_until_complete(wave(adapters))
        for i, ids in zip(adapters, answers, strict=True):
            assert ids == expected[i], f"adapter s{i} in wave {adapters}"


@pytest.mark.slow
def test_vllm_closing_the_stream_aborts_the_request(
    vllm_engine: Any, llama: dict[str, Path], loop
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama["base"])
    before = vllm_engine.stats().aborted_requests

    async def main() -> int:
        request = GenerationRequest(
            uuid.uuid4().hex, tokenizer(PROMPTS[0])["input_ids"], SamplingSettings(max_tokens=400)
        )
        stream = vllm_engine.generate(request)
        got = 0
        async for delta in stream:
            got += len(delta.token_ids)
            if got >= 2:
                break
        await stream.aclose()
        for _ in range(100):
            if vllm_engine.stats().running_requests == 0:
                break
            await asyncio.sleep(0.02)
        return got

    got = loop.run_until_complete(main())
    assert got < 400
    assert vllm_engine.stats().running_requests == 0
    assert vllm_engine.stats().aborted_requests == before + 1


@pytest.mark.slow
def test_vllm_stop_strings_end_generation(vllm_engine: Any, llama: dict[str, Path], loop) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama["base"])
    ids = tokenizer(PROMPTS[0])["input_ids"]
    free = loop.run_until_complete(
        collect(vllm_engine, GenerationRequest("free", ids, SamplingSettings(max_tokens=20)))
    )
    text = free[1]
    stop = text[3:6]
    assert stop.strip(), text
    got = loop.run_until_complete(
        collect(
            vllm_engine,
            GenerationRequest("stop", ids, SamplingSettings(max_tokens=20, stop=(stop,))),
        )
    )
    assert got[2] is FinishReason.STOP
    assert got[1] == text[: text.index(stop)]


# --- transformers + PEFT (GPT-Neo) ------------------------------------------------------------


def eos_first_base(root: Path) -> Path:
    """A copy of the tiny GPT-Neo that always prefers end-of-sequence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_base(root, "gpt_neo")
    dest = root / "neo-eos"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        # The final LayerNorm outputs its bias whatever the input, and only end-of-sequence's
        # row of the head points along it: every step prefers end-of-sequence by a wide margin.
        hidden = model.transformer.ln_f
        hidden.weight.zero_()
        hidden.bias.zero_()
        hidden.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[model.config.eos_token_id, 0] = 100.0
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


@pytest.mark.slow
def test_transformers_engine_serves_gpt_neo_adapters(tmp_path: Path, loop) -> None:
    from transformers import AutoTokenizer

    from loraforge.services.predictor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )

    base = tiny_base(tmp_path, "gpt_neo")
    a1 = make_adapter(base, tmp_path / "neo-a1", seed=21)
    tokenizer = AutoTokenizer.from_pretrained(base)
    engine = TransformersEngine.start(TransformersSettings(str(base), dtype="float32"))
    ids = tokenizer(PROMPTS[1])["input_ids"]

    async def main() -> tuple[Any, Any]:
        with_adapter = collect(engine, GenerationRequest("a", ids, GREEDY, AdapterRef(1, "a1", a1)))
        plain = collect(engine, GenerationRequest("b", ids, GREEDY))
        return await asyncio.gather(with_adapter, plain)

    (adapted, text, reason), (plain, _, _) = loop.run_until_complete(main())
    assert adapted == peft_greedy(base, a1, ids, GREEDY.max_tokens)
    assert plain == peft_greedy(base, None, ids, GREEDY.max_tokens)
    assert adapted != plain
    assert text == tokenizer.decode(adapted, skip_special_tokens=True)
    assert reason is FinishReason.LENGTH
    assert loop.run_until_complete(engine.loaded_adapter_ids()) == {1}

    async def cancel() -> None:
        stream = engine.generate(GenerationRequest("c", ids, SamplingSettings(max_tokens=400)))
        async for _ in stream:
            break
        await stream.aclose()

    loop.run_until_complete(cancel())
    assert engine.stats().aborted_requests == 1
    loop.run_until_complete(engine.shutdown())


@pytest.mark.slow
def test_generation_stops_at_end_of_sequence_unless_told_to_ignore_it(tmp_path: Path, loop) -> None:
    from transformers import AutoTokenizer

    from loraforge.services.predictor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )

    base = eos_first_base(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    engine = TransformersEngine.start(TransformersSettings(str(base), dtype="float32"))
    ids, text, reason = loop.run_until_complete(
        collect(
            engine, GenerationRequest("e", tokenizer(PROMPTS[0])["input_ids"], SamplingSettings())
        )
    )
    assert reason is FinishReason.STOP
    assert ids[-1] == tokenizer.eos_token_id and len(ids) < 256
    assert "</s>" not in text
    # Measurements ask for every token whatever the model says (ignore_eos).
    ids, _, reason = loop.run_until_complete(
        collect(
            engine,
            GenerationRequest(
                "f",
                tokenizer(PROMPTS[0])["input_ids"],
                SamplingSettings(max_tokens=12, ignore_eos=True),
            ),
        )
    )
    assert len(ids) == 12 and reason is FinishReason.LENGTH
    loop.run_until_complete(engine.shutdown())


@pytest.mark.slow
def test_vllm_refuses_an_adapter_it_cannot_read_with_its_cause_and_keeps_serving(
    vllm_engine: Any, llama: dict[str, Path], loop, tmp_path: Path
) -> None:
    from loraforge.services.common.errors import FailedPrecondition

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("adapter_config.json",):
        (broken / name).write_bytes((llama["a1"] / name).read_bytes())
    weights = (llama["a1"] / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    ids = list(range(5, 15))
    request = GenerationRequest(
        uuid.uuid4().hex, ids, GREEDY, AdapterRef(77, "apps/a/models/m/versions/v1", broken)
    )
    with pytest.raises(FailedPrecondition) as err:
        loop.run_until_complete(collect(vllm_engine, request))
    assert err.value.reason == "ADAPTER_LOAD_FAILED"
    assert "apps/a/models/m/versions/v1" in err.value.message
    base = GenerationRequest(uuid.uuid4().hex, ids, GREEDY)
    tokens, _, _ = loop.run_until_complete(collect(vllm_engine, base))
    assert tokens == peft_greedy(llama["base"], None, ids, GREEDY.max_tokens)

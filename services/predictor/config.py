"""Settings of the predictor service (flags `--x-y`, variables `LORAFORGE_X_Y`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.services.common.config import ServerConfig, setting
from loraforge.services.common.model_access import trust_remote_code_setting
from loraforge.services.predictor.engines.calibration import default_calibration_file

GiB = 1024**3


@dataclass
class PredictorConfig(ServerConfig):
    """Settings of the predictor service."""

    base_model: str = setting(
        "",
        "The base model served: a catalogue name (available offline), a hub id or a local "
        "folder. Empty: HuggingFaceTB/SmolLM2-135M-Instruct.",
    )
    trust_remote_code: bool = trust_remote_code_setting()
    trainer_address: str = setting(
        "",
        "host:port of the TrainerService, which resolves model and model-version names.",
        required=True,
    )
    engine: str = setting(
        "auto",
        "Engine: auto (on a CPU, the faster of vLLM and transformers + PEFT with adapters, "
        "as measured on this machine; on a GPU, vLLM; transformers + PEFT where vLLM has no "
        "LoRA path for the architecture), vllm, or transformers.",
        choices=("auto", "vllm", "transformers"),
    )
    calibrate_engines: bool = setting(
        True,
        "With engine auto on a CPU: measure both engines once per model shape and machine "
        "(short LoRA workloads, in a low-priority background process while vLLM serves) and "
        "switch to the faster; off: vLLM wherever it can serve the model.",
    )
    calibration_file: str = setting(
        "",
        "Where engine measurements are kept, shared by the predictors of this machine. "
        "Default ~/.cache/loraforge/engine-calibration.json.",
    )
    dtype: str = setting(
        "auto",
        "Weights dtype: auto (bfloat16 on GPUs and CPUs that compute it natively, else "
        "float32), float32, float16 or bfloat16.",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    max_loras: int = setting(8, "Most distinct adapters in one engine batch.")
    max_cpu_loras: int = setting(32, "Most adapters the engine keeps loaded in host memory.")
    max_lora_rank: int = setting(16, "Largest LoRA rank accepted (vLLM: 8, 16, 32, 64, ...).")
    max_model_len: int = setting(
        0, "Longest prompt plus completion in tokens; 0: the model's own limit."
    )
    max_prompt_chars: int = setting(
        0,
        "Longest prompt in characters (template and system prompt included), refused before "
        "it is tokenized; 0: max_model_len times 64.",
        minimum=0,
    )
    max_num_seqs: int = setting(64, "Most sequences the engine runs at once.")
    max_num_batched_tokens: int = setting(
        0,
        "vLLM: most tokens one engine step computes; longer prompts are prefilled in chunks. "
        "0: vLLM's default.",
        minimum=0,
    )
    engine_restart_attempts: int = setting(
        3,
        "Starts of a new engine tried after the engine dies, before the predictor exits "
        "(non-zero) for its process manager to restart it.",
        minimum=1,
    )
    engine_restart_backoff_seconds: float = setting(
        2.0, "Wait before the second start of a new engine; doubled before each further one."
    )
    kv_cache_gib: float = setting(1.0, "KV-cache size in GiB (vLLM).")
    enforce_eager: bool = setting(
        True, "vLLM: run eagerly, without CUDA graphs or compilation (faster start)."
    )
    gpu_memory_utilization: float = setting(0.9, "vLLM on a GPU: share of GPU memory it may use.")
    vllm_reserved_cores: int = setting(
        -1,
        "vLLM on a CPU: cores its worker leaves to its engine process. -1 (auto): none on a "
        "host of up to 4 CPUs (the engine process mostly waits on the worker), else vLLM's "
        "own (VLLM_CPU_NUM_OF_RESERVED_CPU, or one core).",
        minimum=-1,
    )
    adapter_cache_dir: str = setting(
        "", "Local folder of downloaded adapters. Default `home`/adapter-cache."
    )
    adapter_cache_bytes: int = setting(
        2 * GiB, "Most bytes the adapter disk cache may use (LRU eviction)."
    )
    model_resolution_ttl_seconds: float = setting(
        5.0,
        "How long a model's latest TRAINED version is remembered before asking the trainer again.",
    )

    def calibration_path(self) -> Path:
        return Path(self.calibration_file) if self.calibration_file else default_calibration_file()

    def adapter_cache_path(self) -> Path:
        return (
            Path(self.adapter_cache_dir)
            if self.adapter_cache_dir
            else self.home_path() / "adapter-cache"
        )

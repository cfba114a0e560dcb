"""Predictor service: multi-LoRA serving through vLLM, with a transformers + PEFT fallback."""

"""Engines that generate text for a base model and its LoRA adapters."""

"""Prompt formats shared by training and serving, so both build the same string.

`raw`: the prompt is used as it is (`### Instruction: …`, Llama-3 header tokens, or
plain text) and the tokenizer adds its own special tokens (e.g. BOS).

`chat`: the prompt becomes the user turn of the base model's own chat template
(with an optional system turn), ending with the template's generation prompt, so
the completion is the assistant's answer. The rendered string already holds every
special token the template wants, so the tokenizer adds none.

The trainer renders training prompts with `render_prompt`/`encode_prompt` and the
predictor renders prediction prompts with the same functions and the model
version's stored `tokenizer_config.prompt_format` and `system_prompt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RAW = "raw"
CHAT = "chat"
PROMPT_FORMATS = (RAW, CHAT)
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are wrapped; `system_prompt` only applies to `chat`."""

    kind: str = RAW
    system_prompt: str = ""

    @property
    def is_chat(self) -> bool:
        return self.kind == CHAT

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PromptFormat:
        """The format stored in a run's parameters (runs without one are raw)."""
        tc = params.get("tokenizer_config") or {}
        return cls(str(tc.get("prompt_format") or RAW), str(tc.get("system_prompt") or ""))


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template, so `chat` cannot be rendered."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """Chat messages through the tokenizer's chat template, ready for the assistant's turn."""
    if not has_chat_template(tokenizer):
        raise NoChatTemplate("the base model's tokenizer has no chat template")
    return str(
        tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
    )


def chat_messages(prompt: str, system_prompt: str = "") -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": prompt}]


def render_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat) -> str:
    """The string the model sees before its completion."""
    if not fmt.is_chat:
        return prompt
    return render_messages(tokenizer, chat_messages(prompt, fmt.system_prompt))


def encode_rendered(tokenizer: Any, rendered: str, chat: bool) -> list[int]:
    """Token ids of a rendered prompt; a chat rendering already carries its special tokens."""
    return list(tokenizer(rendered, add_special_tokens=not chat)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat) -> list[int]:
    return encode_rendered(tokenizer, render_prompt(tokenizer, prompt, fmt), fmt.is_chat)

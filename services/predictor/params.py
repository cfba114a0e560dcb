"""Inference parameters: defaults, bounds, and the prompt template.

A request's parameters arrive with every field optional; `validate_params`
applies the defaults, checks every bound and reports all bad fields at once
(`params.top_p: must be greater than 0 and at most 1 (got 1.5)`), so a client
fixes its request in one round trip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from loraforge.services.common.errors import FieldViolation, InvalidArgument, summarize
from loraforge.services.common.prompts import PROMPT_FORMATS

DEFAULT_MAX_TOKENS = 256
MAX_MAX_TOKENS = 4096
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_TOP_K = 1000
MAX_INPUTS = 128
PROMPT_PLACEHOLDER = "{prompt}"
SYSTEM_PLACEHOLDER = "{system_prompt}"


@dataclass(frozen=True)
class RequestedParams:
    """Parameters as a client sent them; None means "not set"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    system_prompt: str = ""
    prompt_template: str = ""
    prompt_format: str | None = None  # "raw", "chat", or None: the model's own

    def over(self, defaults: RequestedParams) -> RequestedParams:
        """These parameters, with what they leave unset taken from `defaults` (a model's)."""
        return RequestedParams(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) not in (None, "", ())
                else getattr(defaults, f.name)
                for f in dataclasses.fields(self)
            }
        )


@dataclass(frozen=True)
class SamplingSettings:
    """Validated sampling settings every engine understands. Temperature 0 is greedy."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Generate all `max_tokens` whatever the model says (benchmarks: equal work per request).
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PromptTemplate:
    """Wraps an input's text: `{prompt}` becomes the text, `{system_prompt}` the system prompt."""

    template: str = ""
    system_prompt: str = ""

    def render(self, text: str) -> str:
        if not self.template:
            return f"{self.system_prompt}\n\n{text}" if self.system_prompt else text
        # Replace rather than str.format: braces in user text or template stay literal.
        rendered = self.template.replace(SYSTEM_PLACEHOLDER, self.system_prompt)
        return rendered.replace(PROMPT_PLACEHOLDER, text)

    def render_user_turn(self, text: str) -> str:
        """The user turn of a chat: the template around the text; the system prompt has its own turn."""
        if not self.template:
            return text
        return self.template.replace(SYSTEM_PLACEHOLDER, "").replace(PROMPT_PLACEHOLDER, text)


@dataclass(frozen=True)
class ValidatedParams:
    sampling: SamplingSettings
    template: PromptTemplate
    prompt_format: str | None = None  # None: the model's own


def _bad_float(value: float) -> bool:
    return math.isnan(value) or math.isinf(value)


def check_params(
    params: RequestedParams, prefix: str = "params"
) -> tuple[ValidatedParams, list[FieldViolation]]:
    """Applies defaults and bounds; returns the result and every violation found."""
    bad: list[FieldViolation] = []

    def violation(name: str, description: str) -> None:
        bad.append(FieldViolation(f"{prefix}.{name}", description))

    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    if not 1 <= max_tokens <= MAX_MAX_TOKENS:
        violation("max_tokens", f"must be between 1 and {MAX_MAX_TOKENS} (got {max_tokens})")

    temperature = 0.0 if params.temperature is None else params.temperature
    if _bad_float(temperature) or not 0.0 <= temperature <= 2.0:
        violation("temperature", f"must be between 0 (greedy) and 2 (got {temperature:g})")

    top_p = 1.0 if params.top_p is None else params.top_p
    if _bad_float(top_p) or not 0.0 < top_p <= 1.0:
        violation("top_p", f"must be greater than 0 and at most 1 (got {top_p:g})")

    top_k = 0 if params.top_k is None else params.top_k
    if not 0 <= top_k <= MAX_TOP_K:
        violation("top_k", f"must be between 0 (all tokens) and {MAX_TOP_K} (got {top_k})")

    repetition_penalty = 1.0 if params.repetition_penalty is None else params.repetition_penalty
    if _bad_float(repetition_penalty) or not 0.0 < repetition_penalty <= 2.0:
        violation(
            "repetition_penalty",
            f"must be greater than 0 and at most 2; 1 means no penalty (got {repetition_penalty:g})",
        )

    if len(params.stop) > MAX_STOP_STRINGS:
        violation("stop", f"at most {MAX_STOP_STRINGS} stop strings (got {len(params.stop)})")
    # Past the bound each string is not looked at: one violation says what to fix.
    for i, stop in enumerate(params.stop[: MAX_STOP_STRINGS + 1]):
        if not stop:
            violation(f"stop[{i}]", "is empty; a stop string needs at least one character")
        elif len(stop) > MAX_STOP_CHARS:
            violation(f"stop[{i}]", f"is longer than {MAX_STOP_CHARS} characters")

    if params.seed is not None and params.seed < 0:
        violation("seed", f"must not be negative (got {params.seed})")

    if params.prompt_template and PROMPT_PLACEHOLDER not in params.prompt_template:
        violation(
            "prompt_template",
            "has no `{prompt}` placeholder, so the input's text would be dropped; "
            "e.g. `### Instruction: {system_prompt}\\n### Input: {prompt}\\n### Response:`",
        )
    if params.prompt_format not in (None, *PROMPT_FORMATS):
        violation("prompt_format", f"must be one of {', '.join(PROMPT_FORMATS)}")

    validated = ValidatedParams(
        sampling=SamplingSettings(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            stop=tuple(params.stop),
            seed=params.seed,
        ),
        template=PromptTemplate(params.prompt_template, params.system_prompt),
        prompt_format=params.prompt_format,
    )
    return validated, bad


def template_violations(
    template: PromptTemplate, chat: bool, prefix: str = "params"
) -> list[FieldViolation]:
    """A raw prompt needs a `{system_prompt}` place for a system prompt; a chat has its own turn."""
    if chat or not template.system_prompt or not template.template:
        return []
    if SYSTEM_PLACEHOLDER in template.template:
        return []
    return [
        FieldViolation(
            f"{prefix}.system_prompt",
            "is set but `prompt_template` has no `{system_prompt}` placeholder to put it in "
            "(or use prompt_format chat, which gives the system prompt its own turn)",
        )
    ]


def raise_if_bad(violations: list[FieldViolation]) -> None:
    """One InvalidArgument naming every bad field, or nothing."""
    if not violations:
        return
    raise InvalidArgument(
        summarize(violations), reason="INVALID_INFERENCE_PARAMS", field_violations=violations
    )


def validate_params(params: RequestedParams, prefix: str = "params") -> ValidatedParams:
    validated, bad = check_params(params, prefix)
    raise_if_bad(bad)
    return validated

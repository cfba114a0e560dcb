"""OpenAI's HTTP JSON to the predictor's protobuf messages and back.

Requests: `parse_request` checks a `/v1/chat/completions` or `/v1/completions` body
field by field (OpenAI's names, types and `null` as "not set"; unknown fields are
ignored as OpenAI ignores them) and `predict_requests` / `stream_requests` turn it
into predictor requests: chat `messages` become `PredictInput.messages` (the base
model's chat template applies, as in training with `prompt_format: chat`), each
completion `prompt` one `PredictInput.text`. `n` choices are `n` predictions of each
prompt; with a `seed`, choice `j` samples with `seed + j`, so choices differ and each
is reproducible. Fields left unset take the model's default inference parameters,
then the predictor's (greedy, 256 tokens).

Responses: OpenAI's `chat.completion` and `text_completion` objects, their stream
chunks (`StreamBuilder`), model objects, and errors as
`{"error": {"message", "type", "param", "code"}}` with the HTTP status of the gRPC
code (`error_from_rpc`). Field paths the predictor names (`params.top_p`,
`input.messages[1].role`) are given back as the request's own (`top_p`,
`messages[1].role`).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraforge.predictor.v1 import predictor_service_pb2 as pb
from loraforge.services.common.errors import RETRY_AFTER_SECONDS, InvalidArgument
from loraforge.services.predictor.params import MAX_INPUTS
from loraforge.services.predictor.resolver import classify_name

Kind = Literal["chat", "text"]
CHAT: Kind = "chat"
TEXT: Kind = "text"
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# OpenAI's name for the system turn in newer models; the same turn here.
ROLE_ALIASES = {"developer": "system"}
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_param(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# --- requests --------------------------------------------------------------------------

# Deepest nesting of arrays and objects a request body may have (OpenAI's requests need 4).
MAX_JSON_DEPTH = 32


def too_large(limit: int) -> ApiError:
    """The 413 for a request body over `limit` bytes."""
    return ApiError(
        413,
        f"the request body is larger than this API accepts ({limit:,} bytes); send a "
        "shorter prompt or fewer messages",
        code="request_too_large",
    )


def _not_json(why: str) -> ApiError:
    return ApiError(
        400,
        f"the request body is not valid JSON ({why}); send a JSON object with "
        "Content-Type: application/json",
        code="invalid_json",
    )


def parse_body(raw: bytes) -> Any:
    """A request body's JSON: ApiError (400) for one that is not JSON, is nested more than
    `MAX_JSON_DEPTH` deep, or holds text that is not Unicode (a lone UTF-16 surrogate such
    as `\\ud800`, which JSON can spell but no prompt can hold)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(
            400,
            f"the request body is nested too deeply; JSON arrays and objects may nest at most "
            f"{MAX_JSON_DEPTH} levels",
            code="invalid_json",
        ) from None
    except UnicodeDecodeError:
        raise _not_json("it is not UTF-8") from None
    except ValueError as exc:
        raise _not_json(str(exc)) from None
    _check_json(body)
    return body


def _check_json(body: Any) -> None:
    """Walks `body` without recursion: its depth and every string (keys too)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ApiError(
                400,
                f"the request body is nested too deeply at {path or 'the top'}; JSON arrays "
                f"and objects may nest at most {MAX_JSON_DEPTH} levels",
                param=path or None,
                code="invalid_json",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                _check_text(key, where)
                stack.append((item, where, depth + 1))
        else:
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        # The path may hold the surrogate itself (a key): escaped, so the answer is text.
        path = path.encode(errors="backslashreplace").decode()
        raise ApiError(
            400,
            f"{path or 'the request body'}: holds a lone UTF-16 surrogate (\\u{ord(bad):04x}) "
            f"at character {exc.start}, which is not text; send valid Unicode (a surrogate "
            "must be one of a pair)",
            param=path or None,
            code="invalid_unicode",
        ) from None


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completion request, in OpenAI's terms."""

    kind: Kind
    model: str
    inputs: tuple[pb.PredictInput, ...]  # one per prompt (a chat is one prompt)
    params: pb.InferenceParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens_field: str = "max_tokens"  # the field that set max_tokens, for errors

    @property
    def choices(self) -> int:
        return len(self.inputs) * self.n


@dataclass(frozen=True)
class Target:
    """What the predictor is asked for: a model or model version, or the base model."""

    model: str = ""
    base_model: bool = False


_MISSING = object()


def _get(body: dict[str, Any], name: str) -> Any:
    """The field's value; `_MISSING` when absent or null (OpenAI reads null as "not set")."""
    value = body.get(name)
    return _MISSING if value is None else value


def _int(body: dict[str, Any], name: str, low: int, high: int = INT32_MAX) -> int | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_param(name, f"must be a whole number (got {value!r})", "invalid_type")
    if not low <= value <= high:
        raise bad_param(name, f"must be between {low} and {high} (got {value})")
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = _get(body, name)
    if value is _MISSING:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_param(name, f"must be a number (got {value!r})", "invalid_type")
    if math.isnan(value) or math.isinf(value):
        raise bad_param(name, f"must be a finite number (got {value!r})")
    return float(value)


def _bool(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = _get(body, name)
    if value is _MISSING:
        return False
    if not isinstance(value, bool):
        raise bad_param(param or name, f"must be true or false (got {value!r})", "invalid_type")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = _get(body, "stop")
    if value is _MISSING:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise bad_param("stop", "must be a string or a list of strings", "invalid_type")


def _content(value: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_param(param, "must be a string or a list of text parts", "invalid_type")
    texts = []
    for k, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_param(
                f"{param}[{k}]",
                f"only text parts are accepted (got {kind!r}): these models read text only",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_param(f"{param}[{k}].text", "must be a string", "invalid_type")
        texts.append(text)
    return "\n".join(texts)


def _messages(body: dict[str, Any]) -> pb.PredictInput:
    value = _get(body, "messages")
    if value is _MISSING:
        raise bad_param(
            "messages",
            'is required: the chat so far, e.g. [{"role": "user", "content": "Hello"}]',
            "missing_required_parameter",
        )
    if not isinstance(value, list) or not value:
        raise bad_param("messages", "must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad_param(f"messages[{i}]", "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_param(f"messages[{i}].role", "is required: system, user or assistant")
        if message.get("content") is None:
            raise bad_param(f"messages[{i}].content", "is required: the message's text")
        content = _content(message["content"], f"messages[{i}].content")
        messages.append(pb.ChatMessage(role=ROLE_ALIASES.get(role, role), content=content))
    return pb.PredictInput(messages=messages)


def _prompts(body: dict[str, Any]) -> list[pb.PredictInput]:
    value = _get(body, "prompt")
    if value is _MISSING:
        raise bad_param(
            "prompt", "is required: a string, or a list of strings", "missing_required_parameter"
        )
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts:
        raise bad_param("prompt", "must be a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise bad_param(
            "prompt", "must be a string or a list of strings; token ids are not accepted"
        )
    return [pb.PredictInput(text=p) for p in prompts]


def _refuse_unsupported(body: dict[str, Any], kind: Kind) -> None:
    """Known OpenAI fields asking for what these models cannot give: refused, not ignored."""
    wanted = {
        "logprobs": "log probabilities are not returned",
        "top_logprobs": "log probabilities are not returned",
        "tools": "tool calls are not supported",
        "functions": "function calls are not supported",
    }
    if kind == TEXT:
        wanted |= {"echo": "the prompt is not echoed", "suffix": "suffixes are not supported"}
    for name, why in wanted.items():
        if body.get(name) not in (None, False, 0, "", []):
            raise bad_param(name, f"{why}; leave it out", "unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name) not in (None, 0.0):
            raise bad_param(
                name,
                "is not supported; use repetition_penalty (1 = none, up to 2)",
                "unsupported_parameter",
            )
    best_of = _int(body, "best_of", 1)
    if best_of is not None and best_of > 1:
        raise bad_param("best_of", "is not supported; use n", "unsupported_parameter")


def parse_request(body: Any, kind: Kind) -> CompletionRequest:
    """Checks a completion request body; ApiError (400) names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model")
    if model is _MISSING or not isinstance(model, str) or not model:
        raise bad_param(
            "model",
            "is required: a model (`apps/{app}/models/{model}`), a model version "
            "(`apps/{app}/models/{model}/versions/{version}`) or the base model's name; "
            "GET /v1/models lists them",
            "missing_required_parameter",
        )
    _refuse_unsupported(body, kind)
    inputs = [_messages(body)] if kind == CHAT else _prompts(body)
    n = _int(body, "n", 1, MAX_INPUTS) or 1
    if len(inputs) * n > MAX_INPUTS:
        raise bad_param("n", f"{len(inputs)} prompts times n={n} is more than {MAX_INPUTS} choices")
    params = pb.InferenceParams()
    max_tokens_field = "max_tokens"
    max_tokens = _int(body, "max_tokens", 1)
    if kind == CHAT:
        newer = _int(body, "max_completion_tokens", 1)
        if newer is not None:
            if max_tokens is not None and max_tokens != newer:
                raise bad_param(
                    "max_tokens",
                    f"and max_completion_tokens differ ({max_tokens} and {newer}); give one",
                )
            max_tokens, max_tokens_field = newer, "max_completion_tokens"
    if max_tokens is not None:
        params.max_tokens = max_tokens
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            setattr(params, name, value)
    top_k = _int(body, "top_k", -1)
    if top_k is not None:
        params.top_k = max(top_k, 0)  # vLLM's -1 ("all tokens") is 0 here
    params.stop.extend(_stop(body))
    seed = _int(body, "seed", -(2**63), INT64_MAX)
    if seed is not None:
        params.seed = seed
    stream = _bool(body, "stream")
    options = _get(body, "stream_options")
    include_usage = False
    if options is not _MISSING:
        if not isinstance(options, dict):
            raise bad_param("stream_options", "must be an object", "invalid_type")
        if not stream:
            raise bad_param("stream_options", "is only allowed when stream is true")
        include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    return CompletionRequest(
        kind, model, tuple(inputs), params, n, stream, include_usage, max_tokens_field
    )


def target(model: str, base_model: str) -> Target:
    """The predictor's target for the `model` a request names; ApiError 404 if it is none."""
    if model == base_model:
        return Target(base_model=True)
    if model.startswith("apps/"):
        try:
            classify_name(model)
        except InvalidArgument as exc:
            raise model_not_found(model, base_model, exc.field_violations[0].description) from None
        return Target(model=model)
    raise model_not_found(model, base_model)


def model_not_found(model: str, base_model: str, why: str = "") -> ApiError:
    detail = f" ({why})" if why else ""
    return ApiError(
        404,
        f"The model `{model}` does not exist{detail}. Name a model "
        "(`apps/{app}/models/{model}`: its latest trained version), a model version "
        f"(`apps/{{app}}/models/{{model}}/versions/{{version}}`) or the base model "
        f"`{base_model}`; GET /v1/models lists them.",
        param="model",
        code="model_not_found",
    )


def _params_for(request: CompletionRequest, choice: int) -> pb.InferenceParams:
    params = pb.InferenceParams()
    params.CopyFrom(request.params)
    if choice and params.HasField("seed"):
        params.seed = (params.seed + choice) % (INT64_MAX + 1)
    return params


def predict_requests(request: CompletionRequest, where: Target) -> list[pb.PredictRequest]:
    """One `Predict` per choice number `j`, with every prompt as an input."""
    return [
        pb.PredictRequest(
            model=where.model,
            base_model=where.base_model,
            inputs=request.inputs,
            params=_params_for(request, j),
        )
        for j in range(request.n)
    ]


def stream_requests(request: CompletionRequest, where: Target) -> list[pb.PredictStreamRequest]:
    """One `PredictStream` per choice, in choice order (prompt by prompt, `n` each)."""
    return [
        pb.PredictStreamRequest(
            model=where.model,
            base_model=where.base_model,
            input=item,
            params=_params_for(request, j),
        )
        for item in request.inputs
        for j in range(request.n)
    ]


# --- responses -------------------------------------------------------------------------


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


def _finish(reason: pb.FinishReason.ValueType) -> str:
    if reason == pb.FINISH_REASON_ABORTED:
        raise ApiError(
            503,
            "the predictor aborted the generation before it finished (it may be shutting "
            "down); retry the request",
            type="server_error",
            code="aborted",
        )
    return _FINISH.get(reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def answered_model(model_version: str, base_model: str) -> str:
    """The `model` of a response: the model version that answered, or the base model."""
    return model_version or base_model


def completion_response(
    request: CompletionRequest,
    responses: Sequence[pb.PredictResponse],
    base_model: str,
    created: int | None = None,
) -> dict[str, Any]:
    """`chat.completion` or `text_completion` from the `Predict` answers of `predict_requests`."""
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for i in range(len(request.inputs)):
        for j, response in enumerate(responses):
            out = response.outputs[i]
            completion_tokens += out.completion_tokens
            choice: dict[str, Any] = {"index": i * request.n + j}
            if request.kind == CHAT:
                choice["message"] = {"role": "assistant", "content": out.text, "refusal": None}
            else:
                choice["text"] = out.text
            choice["logprobs"] = None
            choice["finish_reason"] = _finish(out.finish_reason)
            choices.append(choice)
    # A prompt's tokens count once, however many choices answer it.
    prompt_tokens = sum(o.prompt_tokens for o in responses[0].outputs)
    return {
        "id": new_id(request.kind),
        "object": "chat.completion" if request.kind == CHAT else "text_completion",
        "created": created or int(time.time()),
        "model": answered_model(responses[0].model_version, base_model),
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


@dataclass
class StreamBuilder:
    """The chunks of one streamed completion, from the messages of its `PredictStream` calls."""

    request: CompletionRequest
    base_model: str
    id: str = ""
    created: int = 0
    model: str = ""
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.request.kind)
        self.created = self.created or int(time.time())

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.request.kind == CHAT else "text_completion",
            "created": self.created,
            "model": self.model or self.base_model,
            "choices": choices,
        }
        if self.request.kind == CHAT:
            chunk["system_fingerprint"] = None
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.request.kind == CHAT:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def start(self, model_version: str) -> list[dict[str, Any]]:
        """The opening chunks: a chat's assistant role for every choice."""
        self.model = answered_model(model_version, self.base_model)
        if self.request.kind != CHAT:
            return []
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(self.request.choices)
        ]

    def message(self, index: int, message: pb.PredictStreamResponse) -> list[dict[str, Any]]:
        """Chunks for one stream message of choice `index`: its text, then its end."""
        chunks = []
        self.completion_tokens[index] = message.completion_tokens
        if message.delta:
            chunks.append(self._chunk([self._choice(index, message.delta, None)]))
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.prompt_tokens[index // self.request.n] = message.prompt_tokens
            finish = _finish(message.finish_reason)
            chunks.append(self._chunk([self._choice(index, None, finish)]))
        return chunks

    def end(self) -> list[dict[str, Any]]:
        """With `stream_options.include_usage`: the usage chunk, with no choices."""
        if not self.request.include_usage:
            return []
        chunk = self._chunk([])
        chunk["usage"] = usage(
            sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
        )
        return [chunk]


@dataclass(frozen=True)
class ListedModel:
    """A model `/v1/models` lists: the base model, a trained model or a model version."""

    id: str
    created: int
    owned_by: str
    parent: str | None = None  # the base model an adapter applies to


def model_object(model: ListedModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "root": model.parent or model.id,
        "parent": model.parent,
    }


def model_list(models: Sequence[ListedModel]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in models]}


# --- errors ----------------------------------------------------------------------------

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
_INDEXED_INPUT = re.compile(r"^inputs?(\[\d+\])?\.")


def request_param(request: CompletionRequest | None, path: str) -> str | None:
    """The request field a predictor field path (`params.top_p`, `input.text`) comes from."""
    if path == "model":
        return "model"
    if path.startswith("params."):
        name = path.removeprefix("params.")
        if name == "max_tokens" and request is not None:
            return request.max_tokens_field
        if name.startswith("stop"):
            return "stop"
        if name in ("prompt_format", "prompt_template", "system_prompt"):
            return None  # not request fields: a model's own settings
        return name
    match = _INDEXED_INPUT.match(path)
    if match:
        rest = path[match.end() :]
        if rest.startswith("messages"):
            return rest
        if request is not None and request.kind == CHAT:
            return "messages"
        index = match.group(1) if request is not None and len(request.inputs) > 1 else ""
        return f"prompt{index or ''}"
    return None


def _details(exc: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], dict[str, str]]:
    """ErrorInfo reason and metadata, and BadRequest field violations (path -> description)."""
    reason, metadata, fields = "", {}, {}
    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
    return reason, metadata, fields


def error_from_rpc(
    exc: grpc.aio.AioRpcError, request: CompletionRequest | None, service: str
) -> ApiError:
    """OpenAI's error for a failed call to `service` (e.g. `the predictor at host:port`)."""
    code = exc.code()
    reason, metadata, fields = _details(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _exhausted(exc, reason, metadata, service)
    status, kind = _STATUS.get(code, (500, "server_error"))
    if status == 500:
        incident = metadata.get("incident", "")
        where = f" (incident {incident})" if incident else ""
        return ApiError(
            500,
            f"{service} failed{where}: {exc.details()}; its log has the details",
            type="server_error",
            code="internal_error",
        )
    message = exc.details() or code.name
    param = None
    if fields:
        mapped = [(request_param(request, f), d) for f, d in fields.items()]
        param = next((p for p, _ in mapped if p), None)
        message = "; ".join(f"{p}: {d}" if p else d for p, d in mapped)
    elif code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) and (
        reason.startswith("MODEL") or "model" in metadata or "model_version" in metadata
    ):
        param = "model"
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        message = f"{service} is not reachable ({message}); retry once it is up"
    headers = None
    if code == grpc.StatusCode.UNAVAILABLE and RETRY_AFTER_SECONDS in metadata:
        headers = {"Retry-After": str(_retry_after(metadata[RETRY_AFTER_SECONDS]))}
    return ApiError(
        status, message, type=kind, param=param, code=reason.lower() or None, headers=headers
    )


def _retry_after(seconds: str) -> int:
    """A service's `retry_after_seconds` as whole seconds for a Retry-After header."""
    try:
        return max(1, math.ceil(float(seconds)))
    except (ValueError, OverflowError):
        return 1


def _exhausted(
    exc: grpc.aio.AioRpcError, reason: str, metadata: dict[str, str], service: str
) -> ApiError:
    """RESOURCE_EXHAUSTED as OpenAI's error: 429 with Retry-After only for a limit that
    passes; a call too large for gRPC (no reason of ours) is the request's own 400; any
    other limit is the server's (its operator's setting), 503 saying so."""
    message = exc.details() or "RESOURCE_EXHAUSTED"
    if RETRY_AFTER_SECONDS in metadata:
        return ApiError(
            429,
            message,
            type="rate_limit_error",
            code=reason.lower() or "rate_limit_exceeded",
            headers={"Retry-After": str(_retry_after(metadata[RETRY_AFTER_SECONDS]))},
        )
    if not reason:
        return ApiError(
            400,
            f"the request is larger than {service} accepts ({message}); send a shorter "
            "prompt or fewer prompts",
            code="request_too_large",
        )
    return ApiError(503, message, type="server_error", code=reason.lower())

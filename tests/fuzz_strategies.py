"""Hypothesis strategies for hostile requests, shared by the fuzz tests and bench/bench_fuzz.py.

- `message(descriptor, names)`: any request message of the contracts, built from its
  protobuf descriptor alone: every scalar type at its edges, strings that are empty,
  long, full of control characters, path-like (`../`) or resource names in the AIP forms,
  enums with values the contract does not define, bounded repeated fields and maps,
  nested messages, one field of each oneof, and the well-known types (Struct, Timestamp,
  Duration, FieldMask) with values in and out of their ranges.
- `openai_body(kind)`: raw HTTP bodies for the OpenAI-compatible API, from its request
  shapes: values of the right and wrong types, huge numbers, NaN, deep nesting, extra
  fields, lone surrogates written as `\\ud800` escapes, invalid UTF-8, non-JSON.
- `console_form(fields)`: url-encoded or multipart bodies for the console's forms.

Protobuf strings must be valid UTF-8, so `message` draws no surrogates; the HTTP bodies do.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

# Deep enough for every request of the contracts (PredictRequest.inputs.messages), not so
# deep that a draw takes long.
MAX_DEPTH = 4
MAX_REPEATED = 4
LONG = 20_000  # characters in a "huge-ish" string: far past any name's limit, well inside gRPC's

INT_BOUNDS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

# Shapes of names that reach past the first check of a name: traversal, AIP forms with odd
# segments, separators and encodings.
ODD_NAMES = [
    "",
    "/",
    "apps",
    "apps/",
    "apps//datasets/d",
    "../../etc/passwd",
    "apps/../../etc/passwd",
    "apps/a/../b",
    "apps/a/datasets/../../../x",
    "apps/x/datasets/y/versions/z",
    "apps/x/models/y/versions/z",
    "apps/x/models/y/versions/z/checkpoints/c",
    "apps/x/models/y/evaluations/e",
    "apps/x/datasets/y/versions/z/extra/segments",
    "apps/%2e%2e/datasets/y",
    "apps/a b/datasets/c",
    "apps/A/datasets/Ü",
    "apps/a\x00/datasets/b",
    "apps/a\n/models/m",
    "templates/../../secrets",
    "templates/",
    "base_models/x",
    "/etc/passwd",
    "file:///etc/passwd",
    "http://127.0.0.1:1/x",
    "s3://bucket/key",
    "C:\\Windows\\system32",
    "*",
    "-",
    "lf_",
    "lf_000000000000",
    "a" * 64,
    "a" * 65,
    "apps/" + "a" * 300,
    "x" * LONG,
]

_SAFE_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_CONTROL = st.text(st.characters(min_codepoint=0, max_codepoint=0x1F), min_size=1, max_size=8)


def odd_strings(names: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Strings a client might send where a name, an id or a text goes (valid UTF-8)."""
    known = [*names, *ODD_NAMES]
    return st.one_of(
        st.sampled_from(known),
        _SAFE_TEXT,
        _CONTROL,
        st.builds(lambda a, b: f"{a}/{b}", st.sampled_from(known), _SAFE_TEXT),
        st.sampled_from(["\u202e", "\ufeff", "\U0001f600" * 50, "\u0301" * 100, "\uffff"]),
        st.integers(1, LONG).map(lambda n: "y" * n),
    )


def _integers(kind: int) -> st.SearchStrategy[int]:
    low, high = INT_BOUNDS[kind]
    edges = [low, high, 0, 1, -1, 2, 10, 255, 256, 4096, 2**31 - 1, 2**31, 2**32, 2**53]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(max(low, -1000), min(high, 1000)),
        st.integers(low, high),
    )


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 1e30, -1e30, math.inf, -math.inf, math.nan]
    return st.one_of(st.sampled_from(edges), st.floats(width=width))  # type: ignore[arg-type]


def _enums(field: FieldDescriptor) -> st.SearchStrategy[int]:
    assert field.enum_type is not None
    known = [v.number for v in field.enum_type.values]
    # proto3 enums are open: a number the contract does not name arrives as it is.
    return st.one_of(st.sampled_from(known), st.sampled_from([-1, max(known) + 1, 2**31 - 1]))


def _json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(2**40), 2**40),
        odd_strings(),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(_SAFE_TEXT, inner, max_size=4),
        ),
        max_leaves=12,
    )


def _struct(parent_keys: Sequence[str]) -> st.SearchStrategy[struct_pb2.Struct]:
    """A Struct whose keys are mostly ones the server reads (`parent_keys`), nested the way
    the templates' parameters are (`peft_config.r`)."""
    keys = st.one_of(st.sampled_from(list(parent_keys) or ["x"]), _SAFE_TEXT)
    values = st.recursive(
        _json_values(),
        lambda inner: st.dictionaries(keys, inner, max_size=5),
        max_leaves=16,
    )

    def build(d: dict[str, Any]) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(d)
        return s

    return st.dictionaries(keys, values, max_size=6).map(build)


# Keys of the trainer's parameter Structs and of inference parameters: reaching past "unknown
# key" into each value's own checks.
STRUCT_KEYS = [
    "model_config",
    "peft_config",
    "tokenizer_config",
    "trainer_config",
    "pretrained_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "model_max_length",
    "prompt_format",
    "system_prompt",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "per_device_train_batch_size",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "seed",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "stop",
]


@st.composite
def _well_known(draw: st.DrawFn, descriptor: Descriptor, field_names: Sequence[str]) -> Message:
    cls: Any = GetMessageClass(descriptor)
    name = descriptor.full_name
    if name == "google.protobuf.Struct":
        return draw(_struct(STRUCT_KEYS))
    if name == "google.protobuf.Value":
        value = struct_pb2.Value()
        value.struct_value.update({"v": draw(_json_values())})
        return value
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        # In range, and far outside it (the wire carries any int64 and int32).
        seconds = draw(
            st.one_of(
                st.integers(-(10**6), 10**10),
                st.sampled_from([-(2**63), 2**63 - 1, 253402300800, -62135596801]),
            )
        )
        nanos = draw(st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 2**31 - 1])))
        timed: Message = cls(seconds=seconds, nanos=nanos)
        return timed
    if name == "google.protobuf.FieldMask":
        paths = draw(
            st.lists(
                st.one_of(st.sampled_from(list(field_names) or ["x"]), odd_strings()), max_size=4
            )
        )
        mask: Message = cls(paths=paths)
        return mask
    if name == "google.protobuf.Any":
        packed: Message = cls(type_url=draw(odd_strings()), value=draw(st.binary(max_size=64)))
        return packed
    wrapped = descriptor.fields_by_name.get("value")  # the wrappers: Int32Value, StringValue...
    message: Any = cls()
    if wrapped is not None:
        message.value = draw(_scalar(wrapped, ()))
    wrapper: Message = message
    return wrapper


def _scalar(field: FieldDescriptor, names: Sequence[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_BOUNDS:
        return _integers(kind)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _floats(32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _floats(64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enums(field)
    if kind == FieldDescriptor.TYPE_STRING:
        return odd_strings(names)
    if kind == FieldDescriptor.TYPE_BYTES:
        return upload_bytes()
    raise AssertionError(f"no strategy for {field.full_name} of type {kind}")


def upload_bytes() -> st.SearchStrategy[bytes]:
    """Bytes a file chunk may hold: random, and rows of CSV and JSON Lines with odd values."""
    rows = st.lists(
        st.tuples(odd_strings(), odd_strings()).map(
            lambda pc: json.dumps({"prompt": pc[0], "completion": pc[1]}) + "\n"
        ),
        max_size=4,
    ).map(lambda lines: "".join(lines).encode())
    csv = st.lists(_SAFE_TEXT, max_size=5).map(
        lambda cells: ("input.data.text.raw\n" + "\n".join(f'"{c}"' for c in cells)).encode()
    )
    return st.one_of(
        st.binary(max_size=256),
        rows,
        csv,
        st.sampled_from(
            [b"\xff\xfe\x00", b'{"prompt": "\xed\xa0\x80"}\n', b"[" * 5000, b"\x00" * 1024]
        ),
    )


@st.composite
def _message(
    draw: st.DrawFn, descriptor: Descriptor, names: tuple[str, ...], depth: int
) -> Message:
    if descriptor.full_name.startswith("google.protobuf."):
        return draw(_well_known(descriptor, [f.name for f in descriptor.fields]))
    message = GetMessageClass(descriptor)()
    chosen = {
        oneof.name: draw(st.sampled_from([None, *oneof.fields]))
        for oneof in descriptor.oneofs
        # proto3 `optional` fields are synthetic oneofs of one field: drawn as fields.
        if not (len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name)
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in chosen:
            if chosen[oneof.name] is not field:
                continue
        elif not draw(st.booleans()):
            continue
        _fill(draw, message, field, names, depth)
    return message


def _fill(
    draw: st.DrawFn, message: Message, field: FieldDescriptor, names: tuple[str, ...], depth: int
) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        entries = draw(st.integers(0, MAX_REPEATED))
        for _ in range(entries):
            key = draw(_scalar(key_field, names))
            if value_field.message_type is not None:
                if depth >= MAX_DEPTH:
                    continue
                target[key].CopyFrom(draw(_message(value_field.message_type, names, depth + 1)))
            else:
                target[key] = draw(_scalar(value_field, names))
        return
    repeated = field.is_repeated
    count = draw(st.integers(0, MAX_REPEATED)) if repeated else 1
    for _ in range(count):
        if field.message_type is not None:
            if depth >= MAX_DEPTH:
                return
            value = draw(_message(field.message_type, names, depth + 1))
            if repeated:
                target.add().CopyFrom(value)
            else:
                target.CopyFrom(value)
        else:
            scalar = draw(_scalar(field, names))
            if repeated:
                target.append(scalar)
            else:
                setattr(message, field.name, scalar)


def _mutate_one(draw: st.DrawFn, target: Message, names: tuple[str, ...], depth: int) -> None:
    """Redraws one field somewhere in `target`: a field of its own, or one inside a
    message it holds."""
    if not target.DESCRIPTOR.fields:
        return
    fields = cast(list[FieldDescriptor], list(target.DESCRIPTOR.fields))
    field = draw(st.sampled_from(fields))
    value = getattr(target, field.name)
    nested = (
        field.message_type is not None
        and not field.message_type.GetOptions().map_entry
        and not field.message_type.full_name.startswith("google.protobuf.")
    )
    if nested and depth < MAX_DEPTH and draw(st.booleans()):
        if field.is_repeated and len(value):
            _mutate_one(draw, draw(st.sampled_from(list(value))), names, depth + 1)
            return
        if not field.is_repeated and target.HasField(field.name):
            _mutate_one(draw, value, names, depth + 1)
            return
    target.ClearField(field.name)
    if field.message_type is None and not field.is_repeated and draw(st.booleans()):
        # A plausible value half of the time, so a request often stays valid and gets
        # past the checks into the code behind them (a sampler with this seed, say).
        setattr(target, field.name, draw(_plausible(field, names)))
        return
    _fill(draw, target, field, names, depth)


def _plausible(field: FieldDescriptor, names: Sequence[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_BOUNDS:
        low, high = INT_BOUNDS[kind]
        return st.integers(max(low, 0), min(high, 64)) | st.integers(
            max(low, -(2**31)), min(high, 2**32)
        )
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(0, 2)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.sampled_from(list(names) or [""]) | _SAFE_TEXT
    return _scalar(field, names)


@st.composite
def _mutated(draw: st.DrawFn, bases: tuple[Message, ...], names: tuple[str, ...]) -> Message:
    base = draw(st.sampled_from(bases))
    out = type(base)()
    out.CopyFrom(base)
    for _ in range(draw(st.integers(0, 3))):
        _mutate_one(draw, out, names, 0)
    return out


def message(
    descriptor: Descriptor, names: Sequence[str] = (), valid: Sequence[Message] = ()
) -> st.SearchStrategy[Message]:
    """Any message of type `descriptor`; string fields draw from `names` (resources that
    exist, so a request gets past NOT_FOUND) as well as from odd strings. With `valid`
    requests, most draws are one of them with up to three fields redrawn anywhere inside,
    so that requests get past the first check and into the code behind it."""
    anything = _message(descriptor, tuple(names), 0)
    if not valid:
        return anything
    near = _mutated(tuple(valid), tuple(names))
    return st.one_of(anything, near, near, near)


# ----- HTTP bodies --------------------------------------------------------------------------


@dataclass(frozen=True)
class RawBody:
    """One HTTP request body as sent: its bytes and its Content-Type."""

    content: bytes
    content_type: str

    def __repr__(self) -> str:
        shown = self.content[:300]
        more = f"... ({len(self.content)} bytes)" if len(self.content) > 300 else ""
        return f"RawBody({shown!r}{more}, {self.content_type!r})"


_HUGE_NUMBERS = ["1e400", "-1e400", "1" + "0" * 400, "NaN", "Infinity", "-Infinity", "1e-400"]


def _wrong_types() -> st.SearchStrategy[Any]:
    return st.one_of(
        _json_values(),
        st.sampled_from([[], {}, "", "1", 1.5, -1, 0, True, None, 2**64, -(2**63) - 1]),
    )


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


def _message_shapes() -> st.SearchStrategy[Any]:
    roles = st.one_of(
        st.sampled_from(["system", "user", "assistant", "developer", "tool", "function", ""]),
        _wrong_types(),
    )
    content = st.one_of(
        odd_strings(),
        st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url", "input_audio", "x"])},
                optional={"text": st.one_of(odd_strings(), _wrong_types())},
            ),
            max_size=3,
        ),
        _wrong_types(),
    )
    one = st.one_of(
        st.fixed_dictionaries(
            {"role": roles, "content": content}, optional={"name": odd_strings()}
        ),
        _wrong_types(),
    )
    return st.one_of(st.lists(one, max_size=4), _wrong_types())


def _field_values(name: str) -> st.SearchStrategy[Any]:
    numbers = {
        "max_tokens": st.integers(-5, 40),
        "max_completion_tokens": st.integers(-5, 40),
        "n": st.integers(-1, 4),
        "temperature": st.floats(-1, 3),
        "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-2, 100),
        "repetition_penalty": st.floats(-1, 3),
        "seed": st.one_of(st.integers(-(2**63), 2**64), st.integers(0, 100)),
        "frequency_penalty": st.floats(-3, 3),
        "presence_penalty": st.floats(-3, 3),
        "best_of": st.integers(-1, 3),
        "logprobs": st.one_of(st.booleans(), st.integers(-1, 6)),
    }
    if name in numbers:
        return st.one_of(numbers[name], _wrong_types())
    if name == "stop":
        return st.one_of(odd_strings(), st.lists(odd_strings(), max_size=5), _wrong_types())
    if name == "stream":
        return st.one_of(st.booleans(), _wrong_types())
    if name == "stream_options":
        return st.one_of(
            st.fixed_dictionaries(
                {}, optional={"include_usage": st.one_of(st.booleans(), _wrong_types())}
            ),
            _wrong_types(),
        )
    if name == "prompt":
        return st.one_of(
            odd_strings(),
            st.lists(odd_strings(), max_size=3),
            st.lists(st.integers(), max_size=4),
            _wrong_types(),
        )
    if name == "messages":
        return _message_shapes()
    return _wrong_types()


COMPLETION_FIELDS = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "echo",
    "suffix",
    "best_of",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "user",
]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in ("echo", "suffix", "best_of")] + [
    "max_completion_tokens",
    "tools",
    "functions",
    "response_format",
]


def openai_json(kind: str, models: Sequence[str]) -> st.SearchStrategy[Any]:
    """A JSON value shaped like a request of `kind` (`chat` or `completions`), mostly."""
    main = "messages" if kind == "chat" else "prompt"
    model = st.one_of(st.sampled_from(list(models)), odd_strings(), _wrong_types())
    fields = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    shaped = st.fixed_dictionaries(
        {"model": model, main: _field_values(main)},
        optional={
            **{f: _field_values(f) for f in fields},
            "extra_field": _wrong_types(),
        },
    )
    # Well-formed requests the engine must answer, seeded and not: these reach generation.
    prompt = st.text(st.characters(codec="utf-8"), max_size=30)
    valid = st.fixed_dictionaries(
        {
            "model": st.sampled_from(list(models)),
            main: prompt.map(lambda p: [{"role": "user", "content": p}])
            if kind == "chat"
            else prompt,
            "max_tokens": st.integers(1, 8),
        },
        optional={
            "seed": st.integers(0, 2**31),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.05, 1),
            "n": st.integers(1, 3),
            "stream": st.booleans(),
        },
    )
    return st.one_of(
        valid,
        shaped,
        shaped.map(lambda d: {k: v for k, v in d.items() if k != "model"}),
        _wrong_types(),
    )


def _json_text(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


@st.composite
def _mangled(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> RawBody:
    """A JSON body made hostile in its text: a value replaced by a huge number, NaN, a
    lone surrogate escape or deep nesting, invalid UTF-8, or cut short."""
    text = _json_text(draw(base))
    how = draw(st.sampled_from(["number", "surrogate", "deep", "utf8", "cut", "duplicate"]))
    if how == "number":
        token = draw(st.sampled_from(_HUGE_NUMBERS))
        return RawBody(text.replace("1", token, 1).encode(), "application/json")
    if how == "surrogate":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\udc00\\ud800"]))
        # Into a string if there is one, else as a whole string value.
        out = text.replace('"', '"' + escape, 1) if '"' in text else f'"{escape}"'
        return RawBody(out.encode(), "application/json")
    if how == "deep":
        depth = draw(st.sampled_from([64, 1000, 5000, 100_000]))
        return RawBody(("[" * depth + "]" * depth).encode(), "application/json")
    if how == "utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
        raw = text.encode()
        at = raw.find(b'"') + 1
        return RawBody(raw[:at] + junk + raw[at:], "application/json")
    if how == "cut":
        raw = text.encode()
        return RawBody(raw[: draw(st.integers(0, max(0, len(raw) - 1)))], "application/json")
    return RawBody(text.replace("{", '{"model": 1, "model": "x", ', 1).encode(), "application/json")


def openai_body(kind: str, models: Sequence[str]) -> st.SearchStrategy[RawBody]:
    """Any body a client might POST to the chat (`chat`) or text (`completions`) endpoint."""
    shaped = openai_json(kind, models)
    plain = shaped.map(lambda v: RawBody(_json_text(v).encode(), "application/json"))
    other_types = st.builds(
        RawBody,
        st.one_of(shaped.map(lambda v: _json_text(v).encode()), st.binary(max_size=200)),
        st.sampled_from(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                "",
                "application/json; charset=latin-1",
            ]
        ),
    )
    return st.one_of(
        plain,
        plain,
        _mangled(shaped),
        other_types,
        st.binary(max_size=200).map(lambda b: RawBody(b, "application/json")),
    )


def console_form(fields: Sequence[str]) -> st.SearchStrategy[RawBody]:
    """A form post for a console page: its own `fields` with odd values, extra fields,
    repeated fields, bad percent-encoding, invalid UTF-8 and the wrong content type."""
    values = st.one_of(
        odd_strings(),
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(
            # Numbers past int32 and int64; "²" is a digit to str.isdigit but not to int().
            ["on", "nan", "inf", "-0", "1e999", "2147483648", "35306400862", "9" * 30, "²", "１２"]
        ),
    )
    pairs = st.lists(
        st.tuples(st.one_of(st.sampled_from(list(fields) or ["x"]), _SAFE_TEXT), values), max_size=8
    )
    encoded = pairs.map(
        lambda p: RawBody(urllib.parse.urlencode(p).encode(), "application/x-www-form-urlencoded")
    )
    broken = st.sampled_from(
        [
            RawBody(b"a=%zz&b=%", "application/x-www-form-urlencoded"),
            RawBody(b"app_id=\xff\xfe", "application/x-www-form-urlencoded"),
            RawBody(b"=" * 1000, "application/x-www-form-urlencoded"),
            RawBody(b"&" * 10_000, "application/x-www-form-urlencoded"),
            RawBody(
                b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--",
                "multipart/form-data; boundary=x",
            ),
            RawBody(b"garbage", "multipart/form-data"),
            RawBody(b"garbage", "multipart/form-data; boundary="),
            RawBody(b'{"app_id": "x"}', "application/json"),
        ]
    )
    multipart = pairs.map(_multipart)
    return st.one_of(encoded, encoded, multipart, broken)


def _multipart(pairs: list[tuple[str, str]]) -> RawBody:
    boundary = "fuzzboundary7MA4YWxkTrZu0gW"
    parts = []
    for name, value in pairs:
        quoted = name.replace('"', "%22")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{quoted}"\r\n\r\n{value}\r\n'.encode(
                "utf-8", "surrogatepass"
            )
        )
    return RawBody(
        b"".join(parts) + f"--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )

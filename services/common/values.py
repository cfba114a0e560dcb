"""Values every metadata store can hold, checked where a request enters the domain.

SQLite and PostgreSQL differ in what they refuse: PostgreSQL text cannot hold a NUL
character, its VARCHAR(n) refuses longer strings, its integers are 32 or 64 bits, and JSON
has no NaN or Infinity. A value that one database would refuse deep in a write is refused
here instead, with the field it came in and what to send, the same on both.
"""

from __future__ import annotations

import math
from typing import Any

from loraforge.services.common.errors import FieldViolation, InvalidArgument, invalid_field

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# Deeper JSON than any real metadata or parameter file nests; it only costs recursion.
MAX_JSON_DEPTH = 32

NUL = "\x00"


def text_problem(value: str, max_chars: int | None = None) -> str | None:
    """Why `value` cannot be stored as text, or None."""
    if NUL in value:
        return (
            f"contains a NUL character (U+0000) at position {value.index(NUL)}; "
            "remove it (text fields cannot hold one)"
        )
    if max_chars is not None and len(value) > max_chars:
        return f"is {len(value):,} characters; at most {max_chars:,}"
    return None


def check_text(value: str, field: str, max_chars: int | None = None) -> str:
    """`value` if it can be stored as text; InvalidArgument naming `field` otherwise."""
    problem = text_problem(value, max_chars)
    if problem is not None:
        raise invalid_field(field, problem)
    return value


MAX_REQUEST_ID_CHARS = 200


def check_request_id(value: str, field: str = "request_id") -> str:
    """A request id (AIP-155): at most 200 printable characters without spaces; '' is none."""
    if len(value) > MAX_REQUEST_ID_CHARS or any(c.isspace() or not c.isprintable() for c in value):
        raise invalid_field(
            field,
            f"must be at most {MAX_REQUEST_ID_CHARS} printable characters without spaces "
            "(a UUID is a good choice)",
            reason="INVALID_REQUEST_ID",
        )
    return value


def check_int(value: int, field: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """`value` if it is within [minimum, maximum]; InvalidArgument naming `field` otherwise."""
    if not minimum <= value <= maximum:
        raise invalid_field(field, f"must be between {minimum:,} and {maximum:,} (got {value:,})")
    return value


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether lists and dicts in `value` nest deeper than `limit` levels (without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def json_problems(
    value: Any, field: str, *, max_depth: int = MAX_JSON_DEPTH
) -> list[FieldViolation]:
    """What in a JSON-like value a store cannot hold: NaN, Infinity, NUL, nesting too deep.

    Walks without recursion, so no depth of nesting can exhaust the stack.
    """
    problems: list[FieldViolation] = []
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= max_depth:
                problems.append(
                    FieldViolation(path, f"nests deeper than {max_depth} levels; flatten it")
                )
                continue
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str) and NUL in key:
                    problems.append(FieldViolation(path, "has a key with a NUL character"))
                    continue
                child_path = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
                stack.append((child, child_path, depth + 1))
        elif isinstance(item, float) and not math.isfinite(item):
            problems.append(
                FieldViolation(path, f"is {item}; send a finite number (NaN and Infinity are not)")
            )
        elif isinstance(item, str) and NUL in item:
            problems.append(FieldViolation(path, "contains a NUL character (U+0000); remove it"))
    problems.sort(key=lambda v: v.field)
    return problems


def check_json(value: Any, field: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`value` if a store can hold it as JSON; InvalidArgument naming every bad part otherwise."""
    problems = json_problems(value, field, max_depth=max_depth)
    if problems:
        first = problems[0]
        raise InvalidArgument(
            f"{first.field}: {first.description}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            reason="INVALID_FIELD",
            field_violations=problems,
        )
    return value

"""Resource ids, resource names (AIP-122) and page tokens, shared by all services."""

from __future__ import annotations

import re
import secrets
from typing import overload

from google.protobuf.timestamp_pb2 import Timestamp

from loraforge.services.common.errors import invalid_field

ID_PATTERN = re.compile(r"^[a-z0-9_-]{1,63}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def validate_id(value: str, field: str) -> str:
    """Checks a user-chosen id: lowercase letters, digits, `-`, `_`, 1 to 63 characters."""
    if not value:
        raise invalid_field(field, "is required", reason="MISSING_ID")
    if not ID_PATTERN.match(value):
        raise invalid_field(
            field,
            f"{value!r} is not a valid id: use 1 to 63 lowercase letters, digits, '-' or '_'",
            reason="INVALID_ID",
        )
    return value


def new_id(prefix: str = "") -> str:
    """A fresh, URL-safe, lowercase id."""
    return prefix + secrets.token_hex(6)


def parse_name(name: str, pattern: str, field: str = "name") -> dict[str, str]:
    """Parses `name` against a pattern like `apps/{app}/datasets/{dataset}`.

    Returns the variables; raises InvalidArgument naming `field` if it does not match.
    """
    if not name:
        raise invalid_field(field, f"is required (a name like `{pattern}`)", reason="MISSING_NAME")
    parts = name.split("/")
    pattern_parts = pattern.split("/")
    if len(parts) != len(pattern_parts):
        raise invalid_field(
            field, f"{name!r} is not a name like `{pattern}`", reason="INVALID_NAME"
        )
    values: dict[str, str] = {}
    for got, want in zip(parts, pattern_parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not ID_PATTERN.match(got):
                raise invalid_field(
                    field,
                    f"{name!r}: {got!r} is not a valid {want[1:-1]} id (1 to 63 lowercase letters, digits, '-' or '_')",
                    reason="INVALID_NAME",
                )
            values[want[1:-1]] = got
        elif got != want:
            raise invalid_field(
                field, f"{name!r} is not a name like `{pattern}`", reason="INVALID_NAME"
            )
    return values


def page_size(value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """Validates a request's `page_size`: 0 means the default; negative is an error; capped."""
    if value < 0:
        raise invalid_field("page_size", f"must not be negative (got {value})")
    if value == 0:
        return default
    return min(value, maximum)


@overload
def timestamp(seconds: float) -> Timestamp: ...
@overload
def timestamp(seconds: None) -> None: ...
def timestamp(seconds: float | None) -> Timestamp | None:
    """A protobuf Timestamp from seconds since the epoch (None stays None: the field is left unset)."""
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts

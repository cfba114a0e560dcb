"""Page tokens of every List method (AIP-158), and keyset pages over primary keys.

A token is issued by one method for one parent (and one filter, where the method has one)
and holds the position the next page starts after: whole numbers such as the last row's
key. Decoding checks all of it: a token that is not one this server issued, that another
method or parent issued, or whose position is not a whole number in range is refused as
INVALID_ARGUMENT before anything reads the database. Tokens are not secret: a client that
crafts one can only ask for a position it could ask for anyway.

Keyset pages hold the primary key of the last row of the previous page, so a page never
skips or repeats a row when rows are added or deleted between calls.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.services.common.errors import FieldViolation, InvalidArgument
from loraforge.services.common.values import INT32_MAX

# Longer than any token this server issues; a longer one was not issued by it.
MAX_TOKEN_CHARS = 256


def _scope(method: str, parent: str, filter: str) -> str:
    key = json.dumps([method, parent, filter], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def encode_token(method: str, parent: str, position: dict[str, int], *, filter: str = "") -> str:
    """The token of the page after `position`, for `method` on `parent` (and `filter`)."""
    doc = {"s": _scope(method, parent, filter), "k": position}
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def invalid_token(method: str, parent: str) -> InvalidArgument:
    where = " for this parent" if parent else ""
    description = (
        f"not a token from a previous {method} call{where}; start without a token "
        "(or pass the `next_page_token` of the page before)"
    )
    return InvalidArgument(
        f"page_token: {description}",
        reason="INVALID_PAGE_TOKEN",
        field_violations=[FieldViolation("page_token", description)],
    )


def decode_token(
    token: str,
    method: str,
    parent: str,
    keys: Sequence[str],
    *,
    filter: str = "",
    minimum: int = 0,
    maximum: int = INT32_MAX,
) -> dict[str, int] | None:
    """The position in `token` (None for '', the first page), or INVALID_ARGUMENT.

    `keys` are the position's fields; each must be a whole number in [minimum, maximum]
    (by default what the 32-bit key columns the lists page over can hold).
    """
    if not token:
        return None
    bad = invalid_token(method, parent)
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc: Any = json.loads(raw)
    except (ValueError, binascii.Error, RecursionError):
        raise bad from None
    if not isinstance(doc, dict) or doc.get("s") != _scope(method, parent, filter):
        raise bad
    position = doc.get("k")
    if not isinstance(position, dict) or set(position) != set(keys):
        raise bad
    for value in position.values():
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
        if not minimum <= value <= maximum:
            raise bad
    return position


@dataclass(frozen=True)
class Page:
    """A keyset page: its size, the key after which it starts, and the method it lists for."""

    size: int
    after: int
    method: str = ""


def parse_page(page_size: int, page_token: str, parent: str, method: str = "") -> Page:
    """The page a request of `method` on `parent` asks for; INVALID_ARGUMENT for a bad token."""
    position = decode_token(page_token, method, parent, ("after",))
    return Page(page_size, position["after"] if position else 0, method)


def next_page_token(rows: Sequence[Any], page: Page, parent: str) -> str:
    """The token of the page after `rows`, which were read with one row more than a page."""
    if len(rows) <= page.size:
        return ""
    return encode_token(page.method, parent, {"after": rows[page.size - 1].pk})


def offset_page(
    items: Sequence[Any], size: int, token: str, method: str, *, filter: str = ""
) -> tuple[list[Any], str]:
    """A page of a short list held in memory (templates, model types): by offset."""
    position = decode_token(token, method, "", ("offset",), filter=filter)
    start = position["offset"] if position else 0
    chunk = list(items[start : start + size])
    more = start + size < len(items)
    return chunk, encode_token(method, "", {"offset": start + size}, filter=filter) if more else ""

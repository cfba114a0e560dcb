"""Keyset pagination of the dataset service's lists, and its page tokens.

A token holds the primary key of the last row of the previous page and the parent it
listed, so a page never skips or repeats a row when rows are added or deleted between
calls, and a token of one list cannot be used for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row

from loraforge.services.common.errors import InvalidArgument
from loraforge.services.common.resources import decode_page_token, encode_page_token


@dataclass(frozen=True)
class Page:
    """Keyset pagination: the page's size, and the key after which it starts."""

    size: int
    after: int


def parse_page(page_size: int, page_token: str, parent: str) -> Page:
    """The page a request asks for; InvalidArgument for a token of another list."""
    state = decode_page_token(page_token)
    if not state:
        return Page(page_size, 0)
    after = state.get("after")
    if not isinstance(after, int) or isinstance(after, bool) or state.get("parent") != parent:
        raise InvalidArgument(
            "page_token: not a token for this list; pass `next_page_token` from the previous "
            "page of the same request",
            reason="INVALID_PAGE_TOKEN",
        )
    return Page(page_size, after)


def next_page_token(rows: Sequence[Row[Any]], page: Page, parent: str) -> str:
    """The token of the page after `rows`, which were read with one row more than a page."""
    if len(rows) <= page.size:
        return ""
    return encode_page_token({"after": rows[page.size - 1].pk, "parent": parent})

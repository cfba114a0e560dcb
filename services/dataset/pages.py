"""The dataset service's lists page by primary key, with the tokens of `common.pages`.

Every list reads one row more than a page (`Page.size + 1`) ordered by `pk` after
`Page.after`, and `next_page_token` turns that extra row into the next page's token.
"""

from __future__ import annotations

from loraforge.services.common.pages import Page, next_page_token, parse_page

__all__ = ["Page", "next_page_token", "parse_page"]

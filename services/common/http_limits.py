"""A bound on HTTP request bodies, for every HTTP face (the OpenAI-compatible API, the console).

`BodyLimit` wraps an ASGI app. A request whose `Content-Length` is over the bound is refused
before any of its body is read; one without (chunked) is counted as it arrives and cut off
the moment it passes the bound. The refusal is the app's own response (`refuse`), sent
with `Connection: close` so the rest of the body is never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1024**2
# A declared body up to this many times the bound is read and discarded before the refusal,
# for at most DRAIN_SECONDS (see `BodyLimit._refuse`).
DRAIN_FACTOR = 4
DRAIN_SECONDS = 5.0


class BodyTooLarge(Exception):
    """A request body passed its bound while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit:,} bytes")
        self.limit = limit


def declared_length(scope: Scope) -> int | None:
    """The request's `Content-Length`; None if it sends none (or one that is no number)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimit:
    """Refuses request bodies over `limit_for(scope)` bytes (None: that request has no bound)
    with `refuse(limit)`.

    An app that reads the body itself sees `BodyTooLarge` from `receive` once the bound is
    passed; if it lets that escape before answering, the refusal is sent here."""

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[Scope], int | None],
        refuse: Callable[[int], Response],
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(limit, scope, receive, send)
            return
        received = 0
        cut_off = False

        async def counted() -> Message:
            nonlocal received, cut_off
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut_off = True
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cut_off:  # the app answered the refusal itself: the rest is never read
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"connection", b"close")],
                    }
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(limit, scope, receive, send)

    async def _refuse(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        # A socket closed with unread data in it is reset, and a client still sending can lose
        # the answer to that reset. A body not much over the bound (what a careless client
        # sends) is read and thrown away first, within a few seconds, so the client gets its
        # 413; a larger one is refused at once.
        declared = declared_length(scope)
        if declared is not None and declared <= DRAIN_FACTOR * limit:
            with contextlib.suppress(TimeoutError, BodyTooLarge):
                await asyncio.wait_for(_drain(receive, DRAIN_FACTOR * limit), DRAIN_SECONDS)
        response = self.refuse(limit)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


async def _drain(receive: Receive, most: int) -> None:
    """Reads and discards the request body, up to `most` bytes."""
    read = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if read > most:
            raise BodyTooLarge(most)
        if not message.get("more_body", False):
            return

"""The console answers only for host names it serves: a guard against DNS rebinding.

A page on another site whose domain is made to resolve to this machine would reach the
console from the user's own browser as if same-origin: with auth off, every action is
open to it. Its requests carry that domain in `Host`, so a request whose Host names
neither this machine's loopback names, nor the host the console listens on, nor the
address the connection reached, nor a name in `allowed_hosts` (a proxy's public name, say)
is refused with 421 and what to do, before any page runs. `/health` stays open to probes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from loraforge.services.common.config import describe

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
OPEN_PATHS = ("/health",)


def parse_allowed_hosts(value: str) -> tuple[str, ...]:
    """The names of `allowed_hosts` (comma-separated; `*` allows any), lower-cased."""
    return tuple(n.strip().lower().rstrip(".") for n in value.split(",") if n.strip())


def host_name(header: str) -> str:
    """The name of a Host header without its port: `example.com:8080` -> `example.com`,
    `[::1]:80` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header[1:]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class AllowedHosts:
    """ASGI middleware: refuses a request whose Host the console does not serve."""

    def __init__(self, app: ASGIApp, bound_host: str, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.any = "*" in allowed
        names = {*LOOPBACK_NAMES, *allowed}
        if bound_host.strip().lower() not in WILDCARD_HOSTS:
            names.add(host_name(bound_host) if bound_host.startswith("[") else bound_host.lower())
        self.names = frozenset(names)

    def serves(self, host_header: str, server: tuple[str, int] | None) -> bool:
        name = host_name(host_header).rstrip(".")
        if not name:
            return False
        if self.any or name in self.names or name.endswith(".localhost"):
            return True
        # The address the connection reached, as a literal: no name was resolved to get here.
        return server is not None and _same_address(name, str(server[0]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.serves(host, scope.get("server")):
            await self.app(scope, receive, send)
            return
        shown = repr(host) if host else "no Host header"
        body = (
            f"This console does not serve {shown}. Open it by the name it listens on "
            f"(or localhost), or, if it is reached through a proxy or a DNS name of your own, "
            f"add that name to the console's {describe('allowed_hosts')} setting.\n"
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 421,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

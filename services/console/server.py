"""Runs the console (`common.http_server`), as the OpenAI-compatible API runs: HTTPS with
`tls_cert_file` and `tls_key_file` (and, with `tls_client_ca_file`, only for clients with a
certificate it signed); plain HTTP on a loopback host only, unless `insecure` is set (a
proxy in front terminates TLS): the API keys users sign in with would otherwise cross the
network readable. Behind HTTPS the session cookie is Secure. SIGTERM or SIGINT stops
accepting, gives running requests `shutdown_grace_seconds` (open event streams are closed
then, which cancels their watches and predictions) and closes the gRPC channels.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import PlainTextResponse, Response

from loraforge.services.common.http_limits import BodyLimit, MiB, Scope
from loraforge.services.common.http_server import bind, serve_http, tls_settings
from loraforge.services.console.app import create_app
from loraforge.services.console.backend import Backend
from loraforge.services.console.config import ConsoleConfig

LABEL = "console"


def body_limit(config: ConsoleConfig) -> Callable[[Scope], int | None]:
    """An upload's body may be a whole file (and its multipart framing); any other request's
    is at most `max_request_bytes`."""

    def limit_for(scope: Scope) -> int | None:
        if scope["method"] == "POST" and scope["path"].endswith("/upload"):
            return config.max_upload_bytes + MiB
        return config.max_request_bytes

    return limit_for


def too_large(limit: int) -> Response:
    return PlainTextResponse(
        f"This request is larger than the console accepts ({limit:,} bytes); send less.",
        status_code=413,
    )


async def serve(config: ConsoleConfig) -> None:
    tls = tls_settings(config, "the API keys users sign in with")
    if tls:
        config.secure_cookies = True
    sock = bind(config.host, config.port)
    backend = Backend(config)
    try:
        app = BodyLimit(create_app(config, backend), body_limit(config), too_large)
        await serve_http(app, config, tls, sock, label=LABEL)
    finally:
        await backend.close()

"""Runs the HTTP API (`common.http_server`): HTTPS with the TLS settings, plain HTTP on a
loopback host only unless `insecure`; SIGTERM or SIGINT gives running requests
`shutdown_grace_seconds` (streams still open then are closed, which cancels their
predictor calls), then closes the gRPC channels.
"""

from __future__ import annotations

from loraforge.services.common.http_server import bind, serve_http, tls_settings
from loraforge.services.openai_api.app import create_app
from loraforge.services.openai_api.config import OpenAIConfig
from loraforge.services.openai_api.upstream import open_upstream

LABEL = "openai"


async def serve(config: OpenAIConfig) -> None:
    tls = tls_settings(config, "callers' API keys")
    sock = bind(config.host, config.port)
    async with open_upstream(config) as upstream:
        await serve_http(create_app(upstream), config, tls, sock, label=LABEL, path="/v1")

"""Health check CLI for containers: `python -m loraforge.services.common.healthcheck ADDRESS [SERVICE]`.

Asks a server's standard health service (`grpc.health.v1.Health/Check`) about the
whole server (no SERVICE) or one service (e.g. `loraforge.dataset.v1.DatasetService`).
Exit status 0 when the answer is SERVING, 1 otherwise (NOT_SERVING while draining,
an unknown service, an unreachable address, a timeout), 2 for bad arguments. Meant
for docker compose `healthcheck:` and anywhere a gRPC probe is not built in.

Health needs no API key. A server that serves TLS is checked over TLS with
`--tls-ca-file` (default: `LORAFORGE_TLS_CA_FILE`, the setting the process in the
same container uses for its own calls); one that verifies clients (mTLS) also takes
`--tls-client-cert-file` and `--tls-client-key-file`. `--tls-server-name` checks
the certificate for that name instead of ADDRESS's host (a probe of 127.0.0.1 in a
container whose certificate names the service).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraforge.services.common.channels import ChannelSecurity, sync_channel
from loraforge.services.common.errors import InvalidArgument


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    security: ChannelSecurity | None = None,
    server_name: str = "",
) -> tuple[bool, str]:
    """Returns (serving, a one-line description of the answer).

    `security`: its TLS files (any key in it is not sent: health is open)."""
    tls = (security or ChannelSecurity()).without_key()
    options: list[tuple[str, Any]] = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    try:
        channel = sync_channel(address, tls, options=options)
    except InvalidArgument as exc:
        return False, f"INVALID_ARGUMENT: {exc.message}"
    try:
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "ERROR"
        return False, f"{name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraforge.services.common.healthcheck",
        description="Exit 0 if the gRPC server at ADDRESS reports SERVING, else 1.",
    )
    parser.add_argument("address", help="host:port of the server, e.g. 127.0.0.1:50051")
    parser.add_argument(
        "service", nargs="?", default="", help="service name; empty means the whole server"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    env = os.environ.get
    parser.add_argument(
        "--tls-ca-file",
        default=env("LORAFORGE_TLS_CA_FILE", ""),
        help="CA bundle (PEM) of a server that serves TLS [env LORAFORGE_TLS_CA_FILE]; "
        "empty: plaintext",
    )
    parser.add_argument(
        "--tls-client-cert-file",
        default=env("LORAFORGE_TLS_CLIENT_CERT_FILE", ""),
        help="client certificate (PEM) for a server that verifies clients "
        "[env LORAFORGE_TLS_CLIENT_CERT_FILE]",
    )
    parser.add_argument(
        "--tls-client-key-file",
        default=env("LORAFORGE_TLS_CLIENT_KEY_FILE", ""),
        help="private key (PEM) of the client certificate [env LORAFORGE_TLS_CLIENT_KEY_FILE]",
    )
    parser.add_argument(
        "--tls-server-name",
        default="",
        help="name the server's certificate must hold, if not ADDRESS's host",
    )
    args = parser.parse_args(argv)
    security = ChannelSecurity(
        ca_file=args.tls_ca_file,
        cert_file=args.tls_client_cert_file if args.tls_ca_file else "",
        key_file=args.tls_client_key_file if args.tls_ca_file else "",
    )
    serving, description = check(
        args.address, args.service, args.timeout, security, args.tls_server_name
    )
    target = f"{args.address} {args.service}".rstrip()
    print(f"{target}: {description}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

"""Health check CLI for containers: `python -m loraforge.services.common.healthcheck ADDRESS [SERVICE]`.

Asks a server's standard health service (`grpc.health.v1.Health/Check`) about the
whole server (no SERVICE) or one service (e.g. `loraforge.dataset.v1.DatasetService`).
Exit status 0 when the answer is SERVING, 1 otherwise (NOT_SERVING while draining,
an unknown service, an unreachable address, a timeout), 2 for bad arguments. Meant
for docker compose `healthcheck:` and anywhere a gRPC probe is not built in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Returns (serving, a one-line description of the answer)."""
    try:
        with grpc.insecure_channel(address) as channel:
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
    args = parser.parse_args(argv)
    serving, description = check(args.address, args.service, args.timeout)
    target = f"{args.address} {args.service}".rstrip()
    print(f"{target}: {description}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

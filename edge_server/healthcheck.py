"""Container health probe: ``python -m edge_server.healthcheck [--address HOST:PORT] [--timeout S]``.

Exit status 0 iff the server's grpc.health.v1 service answers SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout: float = 3.0, service: str = "") -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_server.healthcheck")
    p.add_argument("--address", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--service", default="", help="service name ('' = overall)")
    args = p.parse_args(argv)
    ok = check(args.address, args.timeout, args.service)
    print("SERVING" if ok else "NOT_SERVING", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

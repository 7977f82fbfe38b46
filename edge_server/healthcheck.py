"""Container health probe: ``python -m edge_server.healthcheck [--address HOST:PORT] [--timeout S]
[--tls-ca PEM]``.

Exit status 0 iff the server's grpc.health.v1 service answers SERVING, 1 otherwise. ``--tls-ca``: the
server serves TLS (``--tls-cert``); verify it with this CA. The health service needs no token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout: float = 3.0, service: str = "", tls_ca: bytes | None = None) -> bool:
    """True iff the health service at ``address`` says SERVING within ``timeout`` s (TLS if ``tls_ca``)."""
    if tls_ca is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca))
    else:
        channel = grpc.insecure_channel(address)
    with channel:
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
    p.add_argument("--tls-ca", metavar="PEM", help="the server serves TLS: verify its certificate with this CA")
    args = p.parse_args(argv)
    try:
        ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    except OSError as e:
        print(f"NOT_SERVING (cannot read --tls-ca: {e})", flush=True)
        return 1
    ok = check(args.address, args.timeout, args.service, ca)
    print("SERVING" if ok else "NOT_SERVING", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

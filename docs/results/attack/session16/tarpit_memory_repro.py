"""Refused unary calls waiting in the tarpit held their requests (attack16).

    PYTHONPATH=$PWD python docs/results/attack/session16/tarpit_memory_repro.py 250 7340032 notoken|badmsg

Starts `coinfer-edge serve --auth-tokens F --memory-mb 1024 --threads 1` (a subprocess) and sends N unary calls of
SIZE bytes, 20 ms apart, each left waiting: `notoken` a Hello without a token (UNAUTHENTICATED), `badmsg` a
QueryWeights with alice's token and a bad hash (INVALID_ARGUMENT). Past the tarpit's burst (100) the answers go one per
0.1 s; the server's RSS while they wait is what the waiting answers hold.
"""

import sys
import time

import grpc
from alice_server import ALICE, alice_server  # beside this script

from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg


def main() -> None:
    n_calls, size, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    with alice_server() as (addr, ps):
        rss0 = ps.memory_info().rss
        ch = grpc.insecure_channel(addr, options=[("grpc.max_send_message_length", 16 << 20)])
        stub = pbg.EdgeServiceStub(ch)
        body = "x" * size
        futs = []
        t0 = time.monotonic()
        for _ in range(n_calls):
            time.sleep(0.02)  # spaced: what stays is what the server holds, not what arrives at once
            if mode == "notoken":
                futs.append(stub.Hello.future(pb.HelloRequest(client_version=body), timeout=600))
            else:
                req = pb.QueryWeightsRequest(sha256=["zz" + body])
                futs.append(stub.QueryWeights.future(req, metadata=ALICE, timeout=600))
        peak, samples = rss0, []
        while time.monotonic() - t0 < 40 and not all(f.done() for f in futs):
            r = ps.memory_info().rss
            peak = max(peak, r)
            time.sleep(0.2)
            if not samples or time.monotonic() - samples[-1][0] >= 2:
                samples.append((time.monotonic(), r, sum(f.done() for f in futs)))
        print("t s, RSS MiB, answered:", [(round(t - t0), round(r / 2**20), d) for t, r, d in samples])
        codes: dict[str, int] = {}
        for f in futs:
            if f.done():
                try:
                    f.result()
                    c = "OK"
                except grpc.RpcError as e:
                    c = e.code().name
                codes[c] = codes.get(c, 0) + 1
        answered = sum(f.done() for f in futs)
        print(f"{mode}: {n_calls} calls of {size / 2**20:.1f} MiB: server RSS {rss0 / 2**20:.0f} -> peak "
              f"{peak / 2**20:.0f} MiB; {answered} answered in {time.monotonic() - t0:.0f} s {codes}")
        for f in futs:
            f.cancel()
        ch.close()


if __name__ == "__main__":
    main()

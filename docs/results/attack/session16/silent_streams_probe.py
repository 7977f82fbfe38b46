"""Session / UploadWeights streams that never send their first message (attack16 probe, not fixed).

    PYTHONPATH=$PWD python docs/results/attack/session16/silent_streams_probe.py 2000

A tenant with a valid token opens N Session streams on one connection and sends nothing: the servicer waits for
OpenSession with no deadline (the idle timeout starts only once a session exists), and no quota counts a stream that
has not opened a session. Prints the server's RSS before and 10 s after, and whether the streams are still open.
"""

import sys
import threading
import time

import grpc
from alice_server import ALICE, alice_server  # beside this script

from protos.coinfer.v1 import coinfer_pb2_grpc as pbg


def main() -> None:
    n = int(sys.argv[1])
    stop = threading.Event()

    def never():
        stop.wait()
        return
        yield

    with alice_server() as (addr, ps):
        rss0 = ps.memory_info().rss
        ch = grpc.insecure_channel(addr)
        stub = pbg.EdgeServiceStub(ch)
        calls = [stub.Session(never(), metadata=ALICE) for _ in range(n)]
        time.sleep(10)
        rss1 = ps.memory_info().rss
        alive = sum(c.is_active() for c in calls)
        print(f"{n} silent Session streams: server RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB after 10 s, "
              f"{alive} still open")
        stop.set()
        for c in calls:
            c.cancel()
        ch.close()


if __name__ == "__main__":
    main()

"""break44: a raw gRPC Session client built from the checked-in protos (no ue_client behaviour).

``RawSession(channel, token)``: a bidi Session stream fed from a queue; ``send(SessionRequest)``,
``recv(timeout)``; ``open(...)`` sends OpenSession and waits for SessionOpened.
"""

from __future__ import annotations

import json
import queue
import threading

import grpc

from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pbg

_END = object()


def channel(address: str) -> grpc.Channel:
    """Its own TCP connection (no shared subchannel)."""
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ],
    )


def md(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else []


class RawSession:
    def __init__(self, ch: grpc.Channel, token: str | None = None) -> None:
        self.stub = pbg.EdgeServiceStub(ch)
        self._q: queue.Queue = queue.Queue()
        self.responses: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._call = self.stub.Session(self._gen(), metadata=md(token))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.opened = None

    def _gen(self):
        while True:
            m = self._q.get()
            if m is _END:
                return
            yield m

    def _read(self) -> None:
        try:
            for r in self._call:
                self.responses.put(r)
        except grpc.RpcError as e:
            self.error = e
        self.responses.put(None)

    def send(self, msg: pb.SessionRequest) -> None:
        self._q.put(msg)

    def recv(self, timeout: float = 30.0):
        return self.responses.get(timeout=timeout)

    def open(
        self,
        tenant: str = "t",
        graph_json: str | None = None,
        uplink: float = 50.0,
        rtt: float = 5.0,
        slice_spec: dict | None = None,
        timeout: float = 60.0,
        **kw,
    ):
        prof = None
        if graph_json is not None:
            prof = pb.UeProfile(cost_graph_json=graph_json.encode(), uplink_mbps=uplink, rtt_ms=rtt)
        o = pb.OpenSession(
            tenant=tenant,
            model_id="m",
            profile=prof,
            slice_spec_json=json.dumps(slice_spec).encode() if slice_spec else b"",
            **kw,
        )
        self.send(pb.SessionRequest(open=o))
        r = self.recv(timeout)
        if r is None:
            raise RuntimeError(f"session ended before opened: {self.error}")
        self.opened = r.opened
        return r.opened

    def profile(
        self, uplink: float = 0.0, graph_json: str = "", weight: float = 0.0, send_mbps: float = 0.0, rtt: float = 0.0
    ) -> None:
        self.send(
            pb.SessionRequest(
                profile=pb.UeProfile(
                    cost_graph_json=graph_json.encode(),
                    uplink_mbps=uplink,
                    weight=weight,
                    send_mbps=send_mbps,
                    rtt_ms=rtt,
                )
            )
        )

    def close(self) -> None:
        self._q.put(_END)

    def cancel(self) -> None:
        self._call.cancel()

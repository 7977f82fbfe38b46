"""A gRPC proxy in front of a real edge server that lies to the client on the Session stream.

The client trusts nothing the server sends (DESIGN §10 works both ways: an edge box may be compromised, or not the one
the user meant). To test that from outside, as a hostile server would behave, this proxy forwards every call of
``coinfer.v1.EdgeService`` and the health service unchanged to a real server, except the Session stream's responses,
which pass through ``rewrite(response) -> responses to send instead`` (any number, possibly slowed down; ``END``:
the stream ends there), and the answers of the unary calls named in ``unary`` (``{"Hello": fn, "ProfileGraph": fn,
...}``), which pass through ``fn(response) -> response`` (the generated message of that call's answer, changed in
place or replaced). The client talks to the proxy's address exactly as it talks to a server.

Threads: gRPC's server pool runs one handler per call; a Session handler forwards the client's messages upstream
through gRPC's own request iterator and yields the rewritten responses on its thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc

from protos.coinfer.v1 import coinfer_pb2 as pb

SERVICE = "coinfer.v1.EdgeService"
HEALTH = "grpc.health.v1.Health"
Rewrite = Callable[[pb.SessionResponse], Iterable[pb.SessionResponse]]
END = pb.SessionResponse()
"""A rewrite that yields this (the object itself) ends the Session stream there, with status OK."""


def _identity(b: bytes) -> bytes:
    return b


class LiarProxy:
    """A proxy on a free loopback port: every call forwarded to ``upstream``, the Session stream's responses
    through ``rewrite``; ``open_session(msg)`` may change the client's OpenSession (e.g. ask for outputs as
    separate chunks) before it goes up; ``unary`` maps a unary method's name (``"Hello"``, ``"ProfileGraph"``,
    ``"QueryWeights"``) to ``fn(answer) -> answer`` (its generated response message). Use as a context manager;
    ``address`` is what the client dials."""

    def __init__(self, upstream: str, rewrite: Rewrite,
                 open_session: Callable[[pb.OpenSession], None] | None = None,
                 unary: dict[str, Callable[[Any], Any]] | None = None):
        self._channel = grpc.insecure_channel(upstream, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                 ("grpc.max_send_message_length", 64 << 20)])
        self._rewrite, self._open_session, self._unary = rewrite, open_session, dict(unary or {})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                   options=[("grpc.max_receive_message_length", 64 << 20),
                                            ("grpc.max_send_message_length", 64 << 20)])
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.rewritten = 0
        """Session responses the rewrite was given."""

    def _handlers(self) -> grpc.GenericRpcHandler:
        ch = self._channel
        methods = {}
        for m in pb.DESCRIPTOR.services_by_name["EdgeService"].methods:
            path = f"/{SERVICE}/{m.name}"
            if m.name == "Session":
                methods[path] = grpc.stream_stream_rpc_method_handler(self._session, _identity, _identity)
            elif m.client_streaming:
                up = ch.stream_unary(path, _identity, _identity)
                methods[path] = grpc.stream_unary_rpc_method_handler(
                    lambda it, ctx, up=up: up(it, metadata=_metadata(ctx)), _identity, _identity)
            else:
                up = ch.unary_unary(path, _identity, _identity)
                out = getattr(pb, m.output_type.name)

                def call(req, ctx, up=up, name=m.name, out=out):
                    raw = up(req, metadata=_metadata(ctx))
                    fn = self._unary.get(name)
                    return raw if fn is None else fn(out.FromString(raw)).SerializeToString()

                methods[path] = grpc.unary_unary_rpc_method_handler(call, _identity, _identity)
        for name in ("Check",):
            up = ch.unary_unary(f"/{HEALTH}/{name}", _identity, _identity)
            methods[f"/{HEALTH}/{name}"] = grpc.unary_unary_rpc_method_handler(
                lambda req, ctx, up=up: up(req, metadata=_metadata(ctx)), _identity, _identity)

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):
                return methods.get(details.method)

        return Handler()

    def _session(self, requests: Iterator[bytes], ctx) -> Iterator[bytes]:
        up = self._channel.stream_stream(f"/{SERVICE}/Session", _identity, _identity)

        def forwarded() -> Iterator[bytes]:
            for raw in requests:
                if self._open_session is not None:
                    msg = pb.SessionRequest.FromString(raw)
                    if msg.WhichOneof("msg") == "open":
                        self._open_session(msg.open)
                        raw = msg.SerializeToString()
                yield raw

        call = up(forwarded(), metadata=_metadata(ctx))
        ctx.add_callback(call.cancel)
        for raw in call:
            self.rewritten += 1
            for r in self._rewrite(pb.SessionResponse.FromString(raw)):
                if not ctx.is_active() or r is END:
                    return
                yield r.SerializeToString()

    def __enter__(self) -> LiarProxy:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)
        self._channel.close()


def _metadata(ctx) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata to send upstream (gRPC's own headers left to gRPC)."""
    return tuple((k, v) for k, v in ctx.invocation_metadata() if k not in ("user-agent",) and not k.startswith(":"))

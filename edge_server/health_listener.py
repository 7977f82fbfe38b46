"""The health service on a listener of its own (``coinfer-edge serve --health-port``), for the operator's probers.

Why (break26 F1, F2): on the server's port every call's receive window is ~1 MiB (``--read-window-kb``, for weight
streaming) and counts in a budget, and the health calls read their request in two server-wide reading slots; a
stranger holding one silent health call (HEADERS, no request) on each of many addresses, reopened as it ends, keeps
that budget full and the slots going round (34 hosts: 62-64 of 65-66 tokenless probes refused; 20 hosts: 1 s probes
timed out 8 of 12). One silent call per address cannot be told from a probe at admission. A k8s gRPC probe cannot
carry a token or speak TLS either. The usual answer in the field is a port of the probes' own: the orchestrator and
the load balancer probe it, and only they need reach it (a NetworkPolicy or firewall).

What this listener is: a second ``grpc.aio`` server serving only ``grpc.health.v1.Health`` (the EdgeService is
UNIMPLEMENTED there), in plain text (status only: no tokens, no data; a TLS main port is unaffected), with the same
status as the server's port (one :class:`~edge_server.health_service.BoundedHealthServicer` of its own, set with the
server's). It needs none of the main port's reading bounds, because nothing big can be pending on it:

- a message over :data:`MAX_REQUEST_BYTES` is refused by grpc (RESOURCE_EXHAUSTED), and BDP probing is off, so a
  stream's receive window stays grpc's initial 64 KiB: an unread call holds at most that (:data:`CALLS` x 64 KiB =
  32 MiB server-wide at the very worst), with no budget to fill and no reading slot to wait for;
- a call's request within :data:`FIRST_MESSAGE_S` (an honest probe sends it with its headers; k8s's default probe
  timeout is 1 s), :data:`CALLS_PER_HOST` calls open per peer host and :data:`CALLS` over all (the call gate,
  ``edge_server.calls.CallGate``, keys ``peer:HOST``), and each host's calls paced after a burst (the GCRA of
  ``edge_server.tarpit``, :data:`~edge_server.health_admission.HEALTH_BURST` then
  :data:`~edge_server.health_admission.HEALTH_RATE` a second);
- at :data:`CALLS` a newcomer ends a call that has been silent for ``IDLE_WINDOW_S`` (its request not come) or
  waits for its pacing turn, else the oldest call of a host holding two more than its own
  (``edge_server.idle_windows.crowded_victim``), and a host whose call was just ended for another's takes only its
  own for a second (``TakenFrom``): a probe's host, whose calls send their request, is never the one taken from.

Measured (README, ``docs/results/attack/session27/``): 48-64 hosts x 16 silent calls, or 530 hosts x 1, reopened as
they end: every probe answered. A flood of complete calls costs grpc's per-call CPU (~1.2 cores at 10-100 hosts on
2 cores) and slows the probes to a few hundred ms; behind a firewall that admits only the probers, nothing a stranger
does reaches it.
"""

from __future__ import annotations

import logging

import grpc

from edge_server.health_admission import HEALTH_BURST, HEALTH_RATE
from edge_server.health_service import BoundedHealthServicer
from edge_server.idle_windows import IDLE_WINDOW_S
from edge_server.tarpit import Tarpit
from edge_server.wire import add_health_service

logger = logging.getLogger(__name__)

__all__ = ["CALLS", "CALLS_PER_HOST", "FIRST_MESSAGE_S", "MAX_REQUEST_BYTES", "ProbePacing", "start_health_listener"]

MAX_REQUEST_BYTES = 1024
"""A health request's size limit on the listener (bytes): a service name of at most 256 characters
(``edge_server.health_service.MAX_SERVICE_NAME``) takes ~260."""
FIRST_MESSAGE_S = 1.0
"""Seconds a call on the listener has to send its request (the gate's first-message deadline)."""
CALLS_PER_HOST = 16
"""Health calls open at once from one peer host on the listener."""
CALLS = 512
"""Health calls open at once on the listener over all hosts."""


class ProbePacing:
    """Every caller's health calls on the listener paced per host (all are tokenless there): the admission
    ``edge_server.wire.add_health_service`` waits on (:meth:`pace`)."""

    def __init__(self, rate: float = HEALTH_RATE, burst: int = HEALTH_BURST) -> None:
        self.pacing = Tarpit(rate, burst, what="health calls (health port)")

    async def pace(self, key: str) -> None:
        """Wait for caller ``key``'s slot (at once within its burst). Cancellable."""
        await self.pacing.hold(key)


async def start_health_listener(address: str, servicer: BoundedHealthServicer,
                                on_refused=None) -> tuple[grpc.aio.Server, int]:
    """Bind and start the health listener on ``address`` ("host:port"; port 0: any free one), serving ``servicer``
    (module docstring). ``on_refused(method, status name)``: called for each call its gate refuses or ends (the
    server's metrics). Returns the started server and its port. Raises OSError if the address cannot be bound."""
    from edge_server.calls import CallGate

    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", 4096),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_concurrent_streams", CALLS_PER_HOST),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ])
    gate = CallGate(max_calls=CALLS_PER_HOST, max_waiting=CALLS_PER_HOST, first_message_s=FIRST_MESSAGE_S,
                    on_refused=on_refused, max_peer_calls=CALLS, take_calls=True, idle_window_s=IDLE_WINDOW_S)
    add_health_service(servicer, server, gate, auth=None, admission=ProbePacing())
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot bind the health port {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot bind the health port {address}")
    await server.start()
    logger.info("health service (grpc.health.v1, plain text) on %s, port %d", address, port)
    return server, port

"""The standard ``grpc.health.v1`` service with bounds a stranger cannot pass (DESIGN §10: resource bounds).

The health service needs no token (probes and load balancers call it), so every bound of the coinfer
service (the interceptor, quotas, the tarpit, ``--memory-mb``) is absent in front of it. grpcio's own
``health.aio.HealthServicer`` keeps each ``Watch`` call's request, and a condition per service name, for as
long as the stream stays open; a name may be as long as the server's message limit (8 MiB). Before session 15
a client without a token opened 40 ``Watch`` streams with 7 MiB names and the server's RSS went from 349 to
1524 MiB under ``--memory-mb 1024`` (each stream kept its request), and nothing stopped it opening more.

:class:`BoundedHealthServicer` answers as grpcio's servicer does, except:

- a service name longer than :data:`MAX_SERVICE_NAME` characters is INVALID_ARGUMENT (``Check`` and ``Watch``;
  the names this server serves are ``""`` and ``coinfer.v1.EdgeService``);
- at most :data:`MAX_WATCHES` ``Watch`` streams are open at once server-wide, and at most
  :data:`MAX_WATCHES_PER_PEER` from one peer host (:func:`edge_server.tarpit.peer_host`: IPv4 host, IPv6 /64);
  one more is RESOURCE_EXHAUSTED at once (before any answer) and the open ones go on.
"""

from __future__ import annotations

import collections
import logging

import grpc
from grpc_health.v1 import health

from edge_server.tarpit import peer_host

__all__ = ["BoundedHealthServicer", "MAX_SERVICE_NAME", "MAX_WATCHES", "MAX_WATCHES_PER_PEER"]

logger = logging.getLogger(__name__)

MAX_SERVICE_NAME = 256
"""Characters of a health request's service name; a longer one is INVALID_ARGUMENT (gRPC service names are
short: ``package.Service``)."""
MAX_WATCHES = 64
"""``Watch`` streams open at once, server-wide."""
MAX_WATCHES_PER_PEER = 8
"""``Watch`` streams open at once from one peer host."""


class BoundedHealthServicer(health.aio.HealthServicer):
    """grpcio's asyncio health servicer with a bounded service name and bounded concurrent ``Watch`` streams
    (module docstring). Runs on the server's event loop only (its counters take no lock).

    ``max_watches`` / ``max_watches_per_peer``: the two caps (defaults :data:`MAX_WATCHES`,
    :data:`MAX_WATCHES_PER_PEER`); each must be >= 1 (``ValueError``)."""

    def __init__(self, max_watches: int = MAX_WATCHES, max_watches_per_peer: int = MAX_WATCHES_PER_PEER) -> None:
        if max_watches < 1 or max_watches_per_peer < 1:
            raise ValueError(f"watch caps must be >= 1, got {max_watches} and {max_watches_per_peer}")
        super().__init__()
        self.max_watches = max_watches
        self.max_watches_per_peer = max_watches_per_peer
        self._watching = 0
        self._by_peer: collections.Counter[str] = collections.Counter()

    @property
    def watching(self) -> int:
        """``Watch`` streams open now."""
        return self._watching

    async def _check_name(self, request, context) -> None:
        if len(request.service) > MAX_SERVICE_NAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"health service name of {len(request.service)} characters (at most {MAX_SERVICE_NAME})",
            )

    async def Check(self, request, context):
        await self._check_name(request, context)
        return await super().Check(request, context)

    async def Watch(self, request, context):
        await self._check_name(request, context)
        host = peer_host(context.peer())
        if self._watching >= self.max_watches or self._by_peer[host] >= self.max_watches_per_peer:
            logger.info(
                "health Watch from %s refused: %d open (%d from that host; caps %d, %d per host)",
                host, self._watching, self._by_peer[host], self.max_watches, self.max_watches_per_peer,
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many health Watch streams open (at most {self.max_watches}, "
                f"{self.max_watches_per_peer} per host): use Check",
            )
        self._watching += 1
        self._by_peer[host] += 1
        try:
            await super().Watch(request, context)
        finally:
            self._watching -= 1
            self._by_peer[host] -= 1
            if self._by_peer[host] <= 0:
                del self._by_peer[host]

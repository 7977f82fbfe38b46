"""The health service's own admission budget: strangers' other calls cannot starve a tokenless prober (session 25).

Why: with ``--auth-tokens``, callers without a valid token (keys ``peer:HOST``) share one pool of the ``--memory-mb``
budget (``MemoryBudget.pool``, 1/8 of it; review23 F1): the receive windows of their refused calls waiting in the
tarpit and, until session 25, of their health calls. A client sending bad-token (or tokenless) calls without waiting
for the answers filled the pool within its tarpit burst, and from then on every health ``Check`` without a token (a
load balancer's or a k8s probe: they carry none) was RESOURCE_EXHAUSTED "... callers without a token may hold at
most 42 MiB together": 9 of 16 probes (every one after the pool filled) at 50 bad-token Hellos per s from 127.0.0.1,
the prober on the same address (``docs/results/attack/session25/``). An operator's probe must not depend on what
strangers do with the EdgeService.

The rule, when the server has tokens (strangers exist), for a health call without a valid token:

- **its own budget.** Its receive window (and a decoded request of 64 KiB or more, none of an honest probe's) is held
  in the health service's budget (:attr:`HealthAdmission.budget`), :data:`HEALTH_WINDOWS` windows, carved off the
  ``--memory-mb`` budget for work in flight at start (at most 1/8 of it), one peer host at most
  :data:`HEALTH_HOST_FRACTION` of it (8 windows: its 16 calls open at once, ``edge_server.wire.health_gate``, hold at
  most half of them with windows); one more is RESOURCE_EXHAUSTED at once. Nothing else holds it: the EdgeService's
  calls, refused or not, from any address, never touch it, and the health calls never touch the strangers' pool.
- **its own rate.** A host's health calls are paced by a GCRA of their own (:class:`edge_server.tarpit.Tarpit`):
  :data:`HEALTH_BURST` at once, then :data:`HEALTH_RATE` per second, every call counted (the answer is the same
  constant-cost lookup, success or not). A call past that waits for its slot before its request is read (an
  ``asyncio.sleep``: no CPU, no reading slot; it keeps its window and its place among its host's calls), so a health
  flood slows itself to :data:`HEALTH_RATE` answers per second per host (a sequential one: as many calls as answers;
  a parallel one runs into its host's calls and windows, refused at once) and cannot itself become the flood. A
  probe a second, or ten, never waits.

A health call with a valid token is its tenant's (session 23: a UE's pings on its channel), in the tenant's share of
the server's budget, never paced. Without ``--auth-tokens`` every client is tokenless, the UEs too (their pings, up
to ~7 a second each while a request runs, all from one address on loopback): health calls then stay in the server's
budget under their address, as before, and are not paced.

What it does not do: a health flood from the prober's own address takes that host's share and slots, which the
probe shares (nothing tells the two apart: give the probers addresses of their own, or refuse strangers in front,
mTLS); since session 26 a call whose window does not fit takes one from a call only holding its own
(``edge_server.idle_windows``), so a few hosts' silent calls or held Watch streams, reopened as they end, no longer
hold a host's share or the budget against a probe; one silent call on each of more hosts than the budget has windows
(34) still does (break26 F1, ``docs/results/attack/session26/``): the operator's probers get a listener of their own
for that (``--health-port``, ``edge_server.health_listener``, session 27). A ``Watch``
stream holds its window only until its client closes its side with its one request (``edge_server.wire._half_closed``;
break25 F1: held for the stream's life, 8 streams from each of 4 addresses held the whole budget). Used only on the
server's event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_server.memory import MemoryBudget
from edge_server.tarpit import PEER_KEY, Tarpit

if TYPE_CHECKING:
    from edge_server.memory import Reservation

__all__ = ["HEALTH_BURST", "HEALTH_HOST_FRACTION", "HEALTH_RATE", "HEALTH_WINDOWS", "HealthAdmission"]

HEALTH_WINDOWS = 32
"""Receive windows (``--read-window-kb`` less grpc's default 64 KiB, 960 KiB by default: 30 MiB) the health budget
holds, server-wide; at most 1/8 of the ``--memory-mb`` budget for work in flight."""
HEALTH_HOST_FRACTION = 0.25
"""Of the health budget, what one peer host may hold (8 of 32 windows): two hosts holding silent calls leave half
to the others' probes (review22b's two-host case)."""
HEALTH_RATE = 10.0
"""Health calls per second a host gets once its burst is spent (a stranger's; the GCRA of ``edge_server.tarpit``)."""
HEALTH_BURST = 20
"""Health calls a host gets at once before its next ones wait for their slot."""


class HealthAdmission:
    """The health service's admission (module docstring): its memory budget, with which it stands in for the server's
    budget in the health call gate (:meth:`reserve`), and its pacing (:meth:`pace`).

    ``memory``: the server's budget for work in flight (a health call with a valid token, and every one without
    ``strangers``, is held there); ``window_bytes``: what a call's receive window holds of a budget (0: none counted,
    no budget of its own); ``strangers``: the server has tokens (callers without one are strangers: their health
    calls get the budget and the pacing). The health budget's bytes are taken off ``memory``'s limit here, at start
    (:attr:`budget_bytes`; call it before anything is reserved or sized from that limit)."""

    def __init__(self, memory: MemoryBudget, window_bytes: int, *, strangers: bool, windows: int = HEALTH_WINDOWS,
                 host_fraction: float = HEALTH_HOST_FRACTION, rate: float = HEALTH_RATE,
                 burst: int = HEALTH_BURST) -> None:
        self.memory = memory
        self.budget: MemoryBudget | None = None
        """The tokenless health calls' own budget (None: they are held in ``memory``, without tokens or windows)."""
        self.budget_bytes = 0
        """Its size, taken off ``memory``'s limit."""
        if strangers and window_bytes > 0:
            nbytes = windows * window_bytes
            if memory.limit_bytes:
                nbytes = min(nbytes, memory.limit_bytes // 8)
                memory.limit_bytes -= nbytes
            self.budget_bytes = nbytes
            self.budget = MemoryBudget(nbytes, holder_fraction=host_fraction)
        self.pacing: Tarpit | None = Tarpit(rate, burst, what="health calls") if strangers and rate > 0 else None
        """The GCRA of strangers' health calls per host (None: not paced)."""

    def _budget_of(self, holder: str) -> MemoryBudget:
        return self.budget if self.budget is not None and holder.startswith(PEER_KEY) else self.memory

    def reserve(self, holder: str, nbytes: int, what: str) -> Reservation:
        """``MemoryBudget.reserve`` in the health budget for a ``peer:`` holder, else in the server's. Raises
        ResourceExhausted."""
        return self._budget_of(holder).reserve(holder, nbytes, what)

    def fits(self, holder: str, nbytes: int) -> bool:
        """``MemoryBudget.fits`` in the budget :meth:`reserve` would use."""
        return self._budget_of(holder).fits(holder, nbytes)

    def charge(self, holder: str, nbytes: int) -> Reservation:
        """``MemoryBudget.charge`` in the budget :meth:`reserve` would use."""
        return self._budget_of(holder).charge(holder, nbytes)

    def held(self) -> int:
        """Bytes the health budget holds now (0 without one)."""
        return 0 if self.budget is None else self.budget.stats().reserved_bytes

    async def pace(self, key: str) -> None:
        """Wait for the health call slot of caller ``key`` (a ``peer:`` key's, when paced; at once otherwise).
        Cancellable: a cancelled wait gives its slot back."""
        if self.pacing is not None and key.startswith(PEER_KEY):
            await self.pacing.hold(key)

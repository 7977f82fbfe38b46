"""The tarpit: a caller whose calls keep failing gets its error answers late, so a flood slows itself.

Why (issue 11, the ``fuzz`` attack of ``bench/bench_attacks.py``): a client that sends malformed
messages one after another, each as soon as the last is answered, made about 325 calls per second, and
each costs the server grpcio's own per-call floor (~660 us of CPU, ``bench/bench_call_cost.py``)
before any check of ours runs: refusing faster cannot bound it. Answering a failing caller later can,
because a gRPC client waits for an answer before its next call on that stream: a sequential flood then
makes as many calls as it gets answers.

The rule is a generic cell rate algorithm (GCRA; the ATM Forum's virtual scheduling, ITU-T I.371) per
key: ``burst`` error answers go out at once, after that one every ``1 / rate`` seconds, in order, over
all of the key's calls together (an error answer waits for its key's next slot; an ``asyncio.sleep``
costs no CPU). A key that got at most ``burst`` errors plus ``rate`` per second since is never delayed,
so the ordinary errors of an honest UE (a refused upload, a session the server closed, a full server it
backs off from) never trip it; a caller's successful answers are never delayed at all. Many calls in
flight do not multiply the rate: they queue for the same slots, so a client with P calls waiting gets
each answer after about P / ``rate`` seconds, and its call rate stays ``rate``.

Keys (:func:`caller_key`): the tenant of a valid bearer token (a tenant's flood slows only that
tenant's error answers); otherwise the peer's address (IPv4 host, IPv6 /64 prefix: one host's
addresses), since an unauthenticated caller can name any tenant. On loopback without ``--auth-tokens``
every client is one key; only errors wait, so a client whose calls succeed is not slowed by another's
flood.

What it does not bound: a flood of *valid* calls (e.g. ``Hello``), an attacker with more addresses
than ``max_keys`` (keys beyond it are forgotten oldest first, each then starting with a full burst),
and the server's receive cost of the calls that do arrive: per-connection limits and address
reputation belong in front of the daemon (a proxy; mTLS refuses a stranger in the handshake).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

__all__ = ["CLIENT_ERRORS", "Tarpit", "caller_key", "peer_host"]

CLIENT_ERRORS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "DEADLINE_EXCEEDED",
    }
)
"""Status names that count as the caller's failure (the server's own, INTERNAL / UNAVAILABLE /
UNKNOWN, never do: a bug of ours must not slow its victims)."""


class Tarpit:
    """Delays of error answers per key (GCRA: ``burst`` at once, then one per ``1 / rate`` s).

    ``rate``: error answers per second a key gets once its burst is spent (> 0; 0 is "off": use no
    tarpit). ``burst``: error answers a fresh key gets at once (>= 1). ``max_keys``: keys remembered
    (a key whose slots are all in the past is forgotten first; beyond the bound the oldest go).
    ``clock``: seconds, monotonic (tests pass their own). ``on_delay(seconds)``: called for each delayed
    answer (the server's metrics). ``what``: what it paces, for its log line (the health service paces every
    answer of a stranger's health calls with one of its own: ``edge_server.health_admission``).

    Thread-unsafe by design: used only on the server's event loop.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        on_delay: Callable[[float], None] | None = None,
        what: str = "error answers",
    ) -> None:
        if not rate > 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"Tarpit needs rate > 0, burst >= 1, max_keys >= 1 (got {rate}, {burst}, {max_keys})")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_keys = int(max_keys)
        self._clock = clock
        self._interval = 1.0 / self.rate
        self._tolerance = (self.burst - 1) * self._interval
        self._tat: dict[str, float] = {}
        """key -> theoretical arrival time of its next error answer (GCRA's TAT), seconds."""
        self._reported: set[str] = set()
        """Keys already logged as delayed (once per episode: a key is logged again after it is forgotten)."""
        self.delayed = 0
        """Error answers that waited, since start."""
        self.delayed_s = 0.0
        """Their waits, summed (s)."""
        self._on_delay = on_delay
        self.what = what

    def reserve(self, key: str) -> float:
        """Count one error answer of ``key`` and return how long it must wait (s, 0: answer now)."""
        now = self._clock()
        tat = self._tat.pop(key, now)  # pop + insert: the dict's order is the keys' last use
        tat = max(tat, now)
        delay = max(0.0, tat - self._tolerance - now)
        self._tat[key] = tat + self._interval
        if len(self._tat) > self.max_keys:
            self._forget(now)
        if delay > 0:
            self.delayed += 1
            self.delayed_s += delay
            if self._on_delay is not None:
                self._on_delay(delay)
            if key not in self._reported:
                self._reported.add(key)
                logger.info(
                    "tarpit: %s got more than %d %s at over %g per s: its %s are delayed",
                    key,
                    self.burst,
                    self.what,
                    self.rate,
                    self.what,
                )
        return delay

    async def hold(self, key: str) -> None:
        """Wait until ``key``'s error answer may go (see :meth:`reserve`). Cancellable: a cancelled wait
        (the caller's deadline passed, or it cancelled) gives its slot back (:meth:`release`)."""
        delay = self.reserve(key)
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                self.release(key)
                raise

    def release(self, key: str) -> None:
        """Give back one slot of ``key`` whose answer will never go (its call was cancelled while it
        waited). Without it a caller that abandons its failing calls (a short deadline on each, never
        waiting for an answer) booked one slot per call, 300 calls at rate 5 a minute of slots, and every
        other client of its key (on loopback without tokens: all of them) waited behind them for its next
        error answer. With it the key's booked slots are at most its calls still waiting. Answers already
        scheduled keep their times; the key's total stays one answer per ``1 / rate`` s past its burst."""
        tat = self._tat.get(key)
        if tat is not None:
            self._tat[key] = max(self._clock(), tat - self._interval)

    def keys(self) -> int:
        """Keys remembered now."""
        return len(self._tat)

    def _forget(self, now: float) -> None:
        for k in [k for k, t in self._tat.items() if t <= now]:  # back to a full burst: nothing to keep
            del self._tat[k]
            self._reported.discard(k)
        while len(self._tat) > self.max_keys:
            k = next(iter(self._tat))  # least recently used
            del self._tat[k]
            self._reported.discard(k)


def peer_host(peer: str | None) -> str:
    """The host part of a gRPC peer string, the unit a stranger is known by: ``ipv4:1.2.3.4:5`` ->
    ``1.2.3.4``; ``ipv6:[2001:db8::1]:5`` -> ``2001:db8::/64`` (one host usually owns a /64);
    ``unix:...`` -> ``unix``; anything else as given (``?`` if empty)."""
    if not peer:
        return "?"
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return rest.rsplit(":", 1)[0]
    if scheme == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if addr.is_loopback:
            return str(addr)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    if scheme == "unix" or scheme == "unix-abstract":
        return "unix"
    return peer


PEER_KEY = "peer:"
"""The prefix of a caller key without a token (``peer:HOST``); tenants' keys are ``tenant:NAME``."""


def caller_key(tenant: str | None, peer: str | None) -> str:
    """The tarpit key of a call: ``tenant:NAME`` for a caller authenticated by its token (``tenant``
    None otherwise), else ``peer:HOST`` (:func:`peer_host`)."""
    if tenant is not None:
        return f"tenant:{tenant}"
    return f"{PEER_KEY}{peer_host(peer)}"

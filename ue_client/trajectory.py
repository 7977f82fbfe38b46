"""Following ``auto``'s prefetch plan as a trajectory instead of re-planning every request.

A prefetch plan (``planning.PlanChoice.prefetch``, from ``planning._prefetch_best``) is a trajectory over the
requests left: run m requests locally while the warm target's missing weights go up in need order, x bytes
per request (the processor-sharing send rate over one local run), then the target cold, then warm. Each of
those requests used to plan again from scratch, because the upload it plans for moves what the server holds
(``DecisionCache.key``) and parks the rest in flight; on a UE with 10 % of a core each such re-plan cost
1.4-2.6 ms of CPU and, waiting for a CFS quota the UE's sending had spent, 11-100 ms of the request's wall
time (mobilenet_v2, 20 Mbit/s, session 10: 5 of 8 requests over 5 % of their latency in planning).

:class:`Trajectory` keeps what the plan assumed, and :meth:`Trajectory.follow` gives the next prefetch step
without a search while the state stays on it: same target, prefetch requests of the plan left after this
one, the same discrete inputs (policy, shares, refusals), no drift of the link or cost estimates (the
caller's check, ``DecisionCache.drift``: link 25 %, cost scales 30 %, send cost 50 %), fewer requests left
than when it was planned, the target's uploaded bytes no more than ``TOLERANCE`` of one request's planned
upload behind where the plan put them (ahead is allowed: the upload went faster than planned, so the state
is further along the same trajectory), and more than one request's upload of the plan's prefetch still to go
after this request's (so this is not the plan's last prefetch request). The step it gives is the one the
plan had for this request: local, what the target still lacks in need order behind it (``background``),
predicted ``ell + s x``. Off the trajectory, at the plan's last prefetch request and at its turning point
(where the plan goes remote) the caller plans in full.

Why this is the full search's answer on the trajectory: with the state where the plan put it, the same
link and costs, the search over "m' local requests prefetching, then the target" from request k + 1 is the
tail of the search from k (the per-request upload x is the same, so every (m' + 1)-prefetch plan from k is
"this step, then an m'-prefetch plan from k + 1" and their totals differ by this step's ``ell + s x``): the
plan's tail is the best of that family, and it still beats staying local by the investment margin
(``total - (ell + s x) < (1 - margin) h l - l``). Plans outside the family can differ: at the plan's last
prefetch request the weights already held can make a cold split on part of the target cheaper than local
(mobilenet_v2, UE 3x, 100 Mbit/s: the search goes remote on 95 of the target's 153 ops one request early),
so that request and the turning point are planned in full; only the prefetch requests with more than
one request's upload of the plan after them are followed. tests/test_trajectory.py walks the captured
graphs (UE 3x / 10x / 30x, 5-400 Mbit/s, three send costs, horizons 8 and 30, the upload per request 10 or
20 % behind the plan or 0-200 % ahead of it) and asserts the followed step is the full search's choice for
that request (local while the same target's weights go up, the same bytes, prediction and upload list) at
every step it follows (709 steps there; with "half a request's upload left" instead of one, 29 of 617
differed: the search went remote on a split of what was held).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import filterfalse

from partitioner.state import ServerState

TOLERANCE = 0.25
"""How far (fraction of one request's planned upload ``x``) the target's uploaded bytes may be behind where
the plan put them and the plan still be followed."""

@dataclass(frozen=True)
class Trajectory:
    """What one prefetch plan assumed (``from_choice``); immutable, owned by ``DecisionCache``."""

    key: tuple
    """``DecisionCache.key`` of the plan without what the server holds and what is in flight."""
    choice: object
    """The plan (``planning.PlanChoice``)."""
    remaining: int
    """Requests left, the planned one included, when it was made."""
    sizes: tuple[tuple[str, int], ...]
    """(weight, bytes still to send then) of the target, need order."""
    x: float
    """Bytes the plan sends per prefetch request (the first request's; the last sends what is left)."""
    m: int
    """Prefetch requests in the plan (the planned one included)."""
    local_ms: float
    """The local run's prediction the plan used (``ell``)."""
    send_ms_per_byte: float
    _size_of: dict[str, int] | None = field(init=False, repr=False, compare=False)
    """weight -> its bytes of ``sizes`` (None when ``sizes`` names a weight twice: ``sent`` then sums per entry)."""
    _total: int = field(init=False, repr=False, compare=False)
    """The bytes of ``sizes``, summed."""
    _held_sum: list = field(init=False, repr=False, compare=False)
    """[the held set ``sent`` last saw, the bytes of ``sizes`` it holds]: the next request's held set grows it (the
    acknowledgements only add), so only the weights it added are summed (googlenet's followed prefetch requests
    passed over the target's 287 weights at each of ``sent``, ``planned_sent`` x 3 and the bytes left: 0.1-0.15 ms
    of a full core inside the window, session 21's ``bench_request_plan.py``)."""

    def __post_init__(self) -> None:
        size_of = dict(self.sizes)
        object.__setattr__(self, "_size_of", size_of if len(size_of) == len(self.sizes) else None)
        object.__setattr__(self, "_total", sum(b for _, b in self.sizes))
        object.__setattr__(self, "_held_sum", [None, 0])

    @classmethod
    def from_choice(cls, choice, key: tuple, remaining: int | None, state: ServerState,
                    weights: dict[str, int]) -> Trajectory | None:
        """The trajectory of a prefetch ``choice`` made with ``state`` and ``remaining`` requests left (None
        when it is no prefetch plan, has no horizon, or lacks the numbers to follow it)."""
        d = choice.details
        if not choice.prefetch or remaining is None or "prefetch_bytes" not in d or "send_ms_per_byte" not in d:
            return None
        m, x = int(d.get("prefetch_requests", 0)), float(d["prefetch_bytes"])
        s = float(d["send_ms_per_byte"])
        if m < 3 or x <= 0:  # only prefetch requests with another one after them are followed
            return None
        held, infl = state.held, state.in_flight  # (``ServerState.remaining_bytes``, inline)
        sizes = tuple((w, 0 if w in held else int(infl.get(w, weights[w]))) for w in choice.background if w in weights)
        local = choice.predicted_ms - s * x - float(d.get("ue_overhead_ms", 0.0))
        tr = cls(key=key, choice=choice, remaining=remaining, sizes=sizes, x=x, m=m, local_ms=local,
                 send_ms_per_byte=s)
        tr._held_sum[:] = [held, 0]  # (``sizes`` counts the weights held now as 0 bytes: ``sent`` grows from here)
        return tr

    def planned_sent(self, j: int) -> float:
        """Bytes of the target the plan has sent after its first ``j`` requests."""
        return min(float(self._total), j * self.x)

    def sent(self, state: ServerState) -> float:
        """Bytes of the target uploaded since the plan (held, or in flight with fewer bytes left)."""
        held, infl = state.held, state.in_flight  # (``ServerState.remaining_bytes``, inline: once per request)
        size_of = self._size_of
        if size_of is None:
            return float(sum(b if w in held else b - min(b, int(infl.get(w, b))) for w, b in self.sizes))
        # held: all of its bytes (summed over what the held set added since the last call); in flight and not
        # held: what went (never more than the plan's bytes); neither: nothing
        memo = self._held_sum
        if memo[0] is not held:
            last = memo[0]
            if last is not None and last <= held:
                got = memo[1] + sum(map(size_of.__getitem__, size_of.keys() & (held - last)))
            else:
                got = sum(map(size_of.__getitem__, size_of.keys() & held))
            memo[0], memo[1] = held, got
        sent = memo[1]
        for w, left in infl.items():
            b = size_of.get(w)
            if b is not None and w not in held:
                sent += b - min(b, int(left))
        return float(sent)

    def follow(self, key: tuple, remaining: int | None, state: ServerState):
        """The plan's step for a request with ``key`` (without held / in flight), ``remaining`` requests left
        and the server at ``state``: (choice, '') when the state is on the trajectory and the plan says
        "prefetch" for it; (None, why not) otherwise (the caller plans in full)."""
        if key != self.key:
            return None, "inputs"
        if remaining is None or remaining >= self.remaining:
            return None, "horizon"
        j = self.remaining - remaining  # requests of the plan done
        sent, planned = self.sent(state), self.planned_sent(j)
        if planned - sent > TOLERANCE * self.x:  # behind the plan (ahead is fine: nearer the turn)
            return None, f"upload {sent / 1e6:.2f} MB behind the planned {planned / 1e6:.2f}"
        if self.planned_sent(self.m) - sent <= self.x + 1:  # the plan's last prefetch request, or past it (+1: a
            # weight cut mid-way counts its bytes left rounded up)
            return None, "last prefetch request"
        left = float(self._total) - sent
        c = self.choice
        x_now = min(left, self.x)
        oh = float(c.details.get("ue_overhead_ms", 0.0))
        now = self.local_ms + self.send_ms_per_byte * x_now + oh
        m_left = self.m - j
        reason = (f"prefetch (followed, request {j + 1} of the plan's {self.m} local): "
                  f"{x_now / 1e6:.1f} MB of the target go up in this one, {left / 1e6:.1f} MB left")
        details = {**c.details, "prefetch_requests": m_left, "prefetch_bytes": x_now, "followed": j,
                   "mean_ms": now}
        if "prefetch_total_ms" in details:  # the plan's total less the steps done (each planned at x)
            details["prefetch_total_ms"] -= j * (self.local_ms + self.send_ms_per_byte * self.x + oh)
        background = tuple(filterfalse(state.held.__contains__, c.background))  # what the target still lacks
        return replace(c, predicted_ms=now, reason=reason, details=details, background=background), ""

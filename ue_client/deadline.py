"""How long a split request waits for the server before it completes locally.

A bare multiple of the prediction (the old ``4 x predicted``) gave up on requests that were late but
moving: a cold upload over a link slower than its estimate, or a server busier than its profile. The
rule here uses the prediction's spread and the progress the request shows:

- ``expected_s = (predicted + Z * sigma) / 1000``: before it, the client never gives up (unless the
  server reports a failure). ``sigma`` combines the op-time variances of the split's ops (the
  profile's per-op variance, UE ops on the UE, server ops on the server) with a relative spread
  ``REL_SPREAD`` of the whole prediction (link and cost-scale estimates move by that much before the
  client re-plans; ``decisions.DecisionCache.drift``), ``Z = 3``.
- After ``expected_s`` it gives up only when the request made no progress for ``stall_s``: no byte
  of its needed weights or cut tensors left the UE, no needed weight was acknowledged, no output byte
  arrived, and the server reported no progress of it (``RequestProgress``: more of its cut tensors
  received, more of its ops run; a server sends one at most every ``Limits.progress_interval_ms``, 250 ms
  by default, while the request moves). Reports come at op boundaries, one op may run long, and an older
  server sends none, so ``stall_s`` still covers twice the split's expected server compute at the
  session's share, and at least ``min_stall_s`` (the option ``deadline_slack_ms``). Reports count only up to
  what the request truly has (its server ops, its cut tensors' bytes in ``INPUT_STEPS``), so a server that
  reports without end cannot hold it for ever; nor can one trickling output bytes: outputs are taken only under the
  names, dtypes, shapes and sizes the client's capture expects, and count in ``OUTPUT_STEPS`` steps of them (before
  session 25 a server sending 1-byte outputs, each under a new name, held a request for ever). Before the reports
  (session 24) a server slower than its profile was given up while it computed: four server ops each
  0.4 s late, a request silent 1.6 s, fell back at 1 s (``tests/test_progress24.py``).
  Acknowledgements come per weight, so a large weight crossing a slow link shows no progress for a
  while after its last byte left the UE: then one health check on the session's connection (it
  travels behind those bytes; it may take as long as they need at ``MIN_READ_MBPS``) tells whether
  the server is still reading them, for at most ``read_window_s`` of the same unacknowledged bytes.
- An explicit ``deadline_ms`` is a hard deadline, as before.

``Patience.give_up`` is a pure function of elapsed time and the time of the last progress, so the
rule is tested on recorded counters (``tests/test_ue_client_parts.py``), not on wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modelgraph import Split
from partitioner import CostGraph

Z = 3.0
"""Standard deviations of the prediction allowed before the request counts as late."""
REL_SPREAD = 0.25
"""Relative spread of a whole prediction (the drift the decision cache tolerates before re-planning)."""
MIN_READ_MBPS = 1.0
"""A health check behind unacknowledged bytes may take as long as they need at this rate (Mbit/s)."""
INPUT_STEPS = 16
"""A server's reports of a request's cut-tensor bytes received count as progress in this many steps of the whole (and
its reports of ops run in one step per server op): a server reporting without end holds a request for at most
its server ops + ``INPUT_STEPS`` + ``OUTPUT_STEPS`` stall windows (``tests/test_progress24.py``)."""
# Why ops count one step each (not in steps of the split's expected compute, as bytes do): a loaded edge box makes
# every op late by about the same time, not in proportion to its cost, so cheap ops that each end a stall window late
# are an honest server moving; counted in cost steps, a run of them would show no progress and be given up (reasoned
# in session 25, not built: tests/test_progress24.py makes each op 0.45 s late). A server reporting an op per stall
# window without end looks the same, so a liar holds a request at most that many stall windows: resnet18's server
# part has ~70 ops, resnet50's ~175, so ~100 s and ~210 s at the 1 s floor. ``timeout_ms`` is the hard bound.
OUTPUT_STEPS = 16
"""Output bytes arriving count as progress in this many steps of all the request's expected output bytes
(``session.Pending.output_step``): a server trickling output holds a request for at most this many stall windows."""
COMPUTE_STALL_FACTOR = 2.0
"""A silent server is given this many times its expected compute of the split before it counts as stalled."""


@dataclass(frozen=True)
class Patience:
    """When one split request stops waiting; all times in seconds since the request started."""

    expected_s: float
    """Before this, never give up."""
    stall_s: float
    """After ``expected_s``, give up after this long without progress."""
    hard_s: float = math.inf
    """Give up at this time whatever happens (an explicit deadline)."""

    def give_up(self, elapsed_s: float, last_progress_s: float) -> bool:
        """True when the request should complete locally now. ``last_progress_s``: when the request
        last made progress (0.0 if it never did)."""
        if elapsed_s >= self.hard_s:
            return True
        return elapsed_s >= self.expected_s and elapsed_s - last_progress_s >= self.stall_s

    def next_check_s(self, elapsed_s: float, last_progress_s: float) -> float:
        """Seconds from ``elapsed_s`` until ``give_up`` could first turn true without new progress."""
        t = max(self.expected_s, last_progress_s + self.stall_s)
        return max(0.0, min(self.hard_s, t) - elapsed_s)

    def describe(self) -> str:
        if math.isfinite(self.hard_s) and self.hard_s <= self.expected_s:
            return f"deadline {self.hard_s * 1e3:.0f} ms"
        return (f"no progress for {self.stall_s * 1e3:.0f} ms after the expected {self.expected_s * 1e3:.0f} ms")


def prediction_sigma_ms(costs: CostGraph, split: Split, predicted_ms: float) -> float:
    """Standard deviation of a split's predicted latency, ms: the split's per-op variances (UE ops on
    the UE, server ops on the server) plus ``REL_SPREAD`` x the prediction, in quadrature."""
    idx, ops = costs.index, costs.ops
    var = sum(ops[idx[n]].ue_var for n in split.ue_order) + sum(ops[idx[n]].server_var for n in split.server_order)
    return math.sqrt(max(0.0, var) + (REL_SPREAD * predicted_ms) ** 2)


def patience(costs: CostGraph, split: Split, predicted_ms: float, *, share: float, min_stall_ms: float,
             deadline_ms: float | None) -> Patience:
    """The waiting rule of one split request (see the module docstring). ``share``: the session's
    compute share on the server, in (0, 1]."""
    if deadline_ms is not None:
        return patience_of(0.0, 0.0, predicted_ms, share=share, min_stall_ms=min_stall_ms, deadline_ms=deadline_ms)
    idx, ops = costs.index, costs.ops
    var = sum(ops[idx[n]].ue_var for n in split.ue_order) + sum(ops[idx[n]].server_var for n in split.server_order)
    server_ms = sum(ops[idx[n]].server_ms for n in split.server_order)
    return patience_of(var, server_ms, predicted_ms, share=share, min_stall_ms=min_stall_ms, deadline_ms=None)


def patience_of(var_ms2: float, server_ms: float, predicted_ms: float, *, share: float, min_stall_ms: float,
                deadline_ms: float | None) -> Patience:
    """``patience`` from the split's sums: ``var_ms2`` the variance of its op times (UE ops on the UE, server
    ops on the server, ms^2), ``server_ms`` its server ops' time at a whole server (ms); the device runtime
    keeps these per split (``ue_client.calibration.CostModel.split_spread``)."""
    if deadline_ms is not None:
        s = deadline_ms / 1e3
        return Patience(expected_s=s, stall_s=0.0, hard_s=s)
    sigma = math.sqrt(max(0.0, var_ms2) + (REL_SPREAD * predicted_ms) ** 2)
    compute_ms = server_ms / min(1.0, max(1e-3, share))
    stall_ms = max(min_stall_ms, COMPUTE_STALL_FACTOR * compute_ms + Z * sigma)
    return Patience(expected_s=(predicted_ms + Z * sigma) / 1e3, stall_s=stall_ms / 1e3)


def read_window_s(unacked_bytes: int, stall_s: float) -> float:
    """How long the same ``unacked_bytes`` (needed weight bytes that left the UE and are not acknowledged) may keep a
    request waiting through answered health checks (``wait``'s ``alive``) after the checks first vouched for them: their
    time at ``MIN_READ_MBPS`` plus one stall window. A server that reads bytes acknowledges them in that time; one
    that answers checks and never acknowledges (session 25's hostile server) holds a request no longer."""
    return stall_s + unacked_bytes * 8 / (MIN_READ_MBPS * 1e6)


def wait(rule: Patience, done, progress, clock, alive=None) -> bool:
    """Wait for a request under ``rule``; True when it finished, False when the client gives up.

    ``done(timeout_s) -> bool`` waits up to ``timeout_s`` for the answer; ``progress()`` returns a
    comparable snapshot of the request's progress counters; ``clock()`` is seconds since the request
    started. The counters are sampled only when the rule could give up (at ``expected_s``, then every
    ``stall_s``): a change since the previous sample counts as progress at the time it is seen.
    ``alive(timeout_s) -> bool`` (optional) is asked when the counters did not move: True means the
    server showed, within ``timeout_s``, that it is still reading this request's bytes (progress the
    counters cannot see: bytes handed to the transport but not yet acknowledged).

    The silence counts from the call, not from the request's start: the request's time before it (the UE's
    own part, run before the wait) is the UE's, not a silent server's. (Counted from the start, a UE prefix
    that ran past ``expected_s`` on a loaded UE was given up at once or at ``expected_s``: session 22's CI had
    such give-ups; reproduced under two busy loops, resnet18 requests entered the wait 0.97-5.5 s after their start
    and were given up 0-210 ms into it, in 7 of 8 runs.)
    """
    seen = progress()
    last = clock()
    while True:
        now = clock()
        if done(rule.next_check_s(now, last)):
            return True
        now = clock()
        snap = progress()
        if snap != seen:
            seen, last = snap, now
        elif alive is not None and now < rule.hard_s and rule.give_up(now, last) and alive(rule.stall_s):
            last = clock()
        if rule.give_up(clock(), last):
            return False

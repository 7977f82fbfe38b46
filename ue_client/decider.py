"""The request's decision from what the engine's parts hold now: the glue between them and ``DecisionCache``.

Owned by the caller's thread (``ue_client.client.RemoteEngine``: its ``decider``), and by the background
planner's worker while its job holds the engine's lock (``ue_client.background.Lookahead.job``).
"""

from __future__ import annotations

import logging

import torch

from partitioner.state import ServerState, Shares
from ue_client import planning
from ue_client.background import Lookahead
from ue_client.calibration import CostModel
from ue_client.connection import Connection, Suspension
from ue_client.decisions import DecisionCache
from ue_client.errors import ServerError
from ue_client.options import ClientOptions
from ue_client.probing import LinkProbe
from ue_client.request import RequestPath
from ue_client.uploads import UploadScheduler

log = logging.getLogger(__name__)


class Decider:
    """Decides request ``n`` from the server state, shares and estimates read now: the background decision when
    its inputs are exactly these (``Lookahead``), a quick reuse, else ``DecisionCache.decide``; and keys those
    inputs (``marks``) for the background decision. One per ``DecisionCache`` (the engine's ``_cut`` builds both)."""

    def __init__(self, options: ClientOptions, conn: Connection, uploads: UploadScheduler, cost_model: CostModel,
                 probe: LinkProbe, decisions: DecisionCache, path: RequestPath, ahead: Lookahead):
        self.options = options
        self.conn = conn
        self.uploads = uploads
        self.cost_model = cost_model
        self.probe = probe
        self.decisions = decisions
        self.path = path
        self.ahead = ahead
        self._shares_memo: tuple | None = None
        """(the session's raw shares, the ``Shares`` of them) of the last ``shares``."""
        self._offline_shares: tuple | None = None
        """(suspension, the ``Shares`` its offline decisions plan with) of the last offline decision."""

    def shares(self) -> Shares:
        """The open session's compute share and, when the UE obeys uplink shares (``cell_uplink_mbps``), its
        uplink share for weights and its request share for cut tensors; planning scales the cell rate by them."""
        s = self.conn.session
        raw = (s.share, s.uplink_share, s.request_uplink_share)
        memo = self._shares_memo
        if memo is not None and memo[0] == raw:  # the same object while the session's shares stay (a request
            return memo[1]  # asks every time; validating a new ``Shares`` cost ~0.04 ms on a 10 % UE)
        obey = self.options.cell_uplink_mbps is not None and s.uplink_share > 0
        up = s.uplink_share if obey else 1.0
        # a request's cut tensors go at the server's request share (at least the session's equal share of the
        # cell: ``Session.request_uplink_share``), weights at the uplink share: each predicted at its own
        tensor = min(1.0, max(1e-3, s.request_uplink_share)) if obey and s.request_uplink_share > 0 else None
        shares = Shares(compute=min(1.0, max(1e-3, s.share)), uplink=min(1.0, max(1e-3, up)), tensor_uplink=tensor)
        self._shares_memo = (raw, shares)
        return shares

    def marks(self, n: int) -> tuple | None:
        """A cheap exact key of every input of request ``n``'s decision (``Lookahead.take_exact``): ``n`` (the
        speculation is taken only by request ``n``, and no request ran since the job: the ``DecisionCache`` is
        as the job left it), the cost model's version and scales, the planning link (its value: RTT samples
        arrive every few ms and move nothing under an RTT override), the uplink-rate and send-cost estimators'
        sample counts (any thread), the send-cost capacity and torch's threads, and
        per mode: suspended, the suspension (its state and shares); with the session open, the session and its
        generation, its compute / uplink / request shares, and ``UploadScheduler.settled_key`` (what the server
        holds, queued weights, no acknowledgement waiting). None where no such key is exact and cheap: weights
        in flight (their bytes move with the sender thread), slice answers waiting, refusals kept (their
        back-offs move with the clock), no session. Equal marks mean equal ``background.fingerprint``s and an
        unchanged cache (``tests/test_background_plan.py`` mutates each input and checks the key moved)."""
        cm, pr, conn = self.cost_model, self.probe, self.conn
        common = (n, cm.version, cm.scale["ue"], cm.scale["server"], pr.planning_link(), pr.estimator.version,
                  pr.send_est.version, pr.send_est.capacity, torch.get_num_threads())
        s = conn.suspended
        if s is not None:
            return ("offline", id(s), *common)
        sess = conn.session
        if sess is None or not conn.alive or sess.slice_answers or not self.path.refusals.quiet(conn.address):
            return None
        held = self.uploads.settled_key()
        if held is None:
            return None
        return ("session", id(sess), conn.generation, sess.share, sess.uplink_share, sess.request_uplink_share,
                held, *common)

    def inputs(self) -> dict:
        """``DecisionCache.decide``'s keyword arguments but ``n``: the cost model's, the link's and the send
        cost's estimates of now."""
        cm = self.cost_model
        return dict(costs=lambda: cm.costs, base=cm.base, link=self.probe.planning_link(), ue_cpu=self.probe.ue_cpu(),
                    scale={**cm.scale, "ue_overhead_ms": cm.overhead_ms, "transport_ms": cm.transport_ms,
                           "transport_sd_ms": cm.transport_sd_ms() or 0.0,
                           "transport_se_ms": cm.transport_se_ms() or 0.0},
                    measured_cv=self.probe.uplink_cv, ue_cv=cm.ue_cv)  # (read only when a decision uses them)

    def decide(self, state: ServerState, share: Shares, n: int) -> planning.PlanChoice:
        """Request ``n``'s plan: the background decision made for it when its inputs are still these
        (``Lookahead.take``), else ``DecisionCache.decide``."""
        kw = self.inputs()
        if self.ahead.spec is not None:
            taken = self.ahead.take(n, state, share, kw)
            if taken is not None:
                return taken
        return self.decisions.decide(state, share, n=n, **kw)

    def decide_now(self, n: int) -> planning.PlanChoice:
        """Request ``n``'s decision with the session open: the background decision when nothing moved since it
        was made (``Lookahead.take_exact``: a key of microseconds), else from its inputs read now."""
        taken = self.ahead.take_exact(n)
        if taken is not None:
            return taken
        state = self.uploads.server_state()
        share = self.shares()
        self.path.sync_refusals()  # a split whose slice the server refused is left out (the next best is planned)
        self.decisions.exclude, self.decisions.allow = self.path.exclusion()
        return self.quick_reuse(state, share, n) or self.decide(state, share, n)

    def decide_offline(self, s: Suspension, n: int) -> planning.PlanChoice | None:
        """Request ``n``'s decision on a suspended session ``s``: with what the server held when it was suspended,
        at the shares the session held (the cell's uplink is as shared as it was: the others' sessions may be
        suspended too, but their UEs are still in the cell). None when planning failed (planned again, with the
        session open)."""
        try:
            memo = self._offline_shares
            if memo is None or memo[0] is not s:  # one ``Shares`` per suspension (``DecisionCache.key``'s memo hits)
                memo = self._offline_shares = (s, Shares(compute=s.share, uplink=s.uplink))
            share = memo[1]
            return self.ahead.take_exact(n) or self.quick_reuse(s.state, share, n) or self.decide(s.state, share, n)
        except Exception:
            log.debug("offline planning failed", exc_info=True)
            return None

    def quick_reuse(self, state: ServerState, share: Shares, n: int) -> planning.PlanChoice | None:
        """Request ``n``'s decision by ``DecisionCache.reuse`` (the previous decision when ``decide`` would reuse
        it, or ``held_answer``'s, read from the raw estimates: no inputs' dict, no spreads, at most one copy of the
        choice); None where ``decide`` must be asked (it would search), ``quick_reuse`` is off or a background
        decision waits (``decide`` looks at it first). With the session open and, since session 20, suspended
        (``decide_offline``: session 19's grid had its reuses through ``decide`` at 0.14 ms of CPU median on a
        10 % UE, 6 of the 16 requests whose ``plan_ms`` was over 5 % of their latency)."""
        if self.ahead.spec is not None or not self.options.quick_reuse or not self.decisions.may_reuse(state, n):
            return None  # (``reuse`` would return None before reading the estimates below)
        cm, pr = self.cost_model, self.probe
        sc = cm.scale
        return self.decisions.reuse(state, share, link=pr.planning_link(), ue_cpu=pr.ue_cpu(), base=cm.base,
                                    ue=sc["ue"], server=sc["server"], overhead_ms=cm.overhead_ms,
                                    transport_ms=cm.transport_ms, transport_se=cm.transport_se_ms, n=n)

    def decide_first(self) -> None:
        """Make the first request's decision while connecting: its long part (``auto``'s warm-target search) is
        done once per link estimate, and on a CPU-throttled UE it takes several hundred ms that would otherwise
        land on the first request. The request reuses it when nothing changed."""
        if self.options.policy == "local" or self.cost_model.base is None:
            return
        try:
            choice = self.decide(self.uploads.server_state(), self.shares(), 0)
        except Exception:  # the request plans again
            log.debug("planning ahead failed", exc_info=True)
            return
        if choice.server_ops:
            # and define its slice now: the server validates it while the UE waits for its first request, and the
            # request neither builds the slice's JSON nor waits for that validation, neither of which its
            # prediction counts (session 15's quick bench, 10 % UE: 50-110 ms between the request's start and its
            # prefix, and the server's 20-43 ms validation before a serial baseline's request ran). A refusal
            # is known before the first request (the answer is awaited here): it plans the next best split.
            try:
                self.path.define_ahead(self.path.split_run(choice.server_ops).split,
                                       wait_s=self.options.connect_timeout_s)
            except ServerError:  # the request defines it (and meets the failure) itself
                log.debug("defining the first request's slice ahead failed", exc_info=True)

"""What a request's report says beyond its run, counted per engine across its requests and sessions.

Owned by the caller's thread (``ue_client.client.RemoteEngine``: its ``tally``); no other thread touches it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ue_client.cpu_speed import CpuSpeed
from ue_client.options import ClientOptions
from ue_client.probing import LinkProbe
from ue_client.report import RequestReport

if TYPE_CHECKING:
    from ue_client.planning import PlanChoice
    from ue_client.session import SessionStream


class ReportTally:
    """Fills a request's report with what the engine knows beyond the run: the weight bytes sent for it and in the
    background since the previous request, the uplink probe's bytes since the previous report, the pinned ops,
    and its plan's deadline, prediction, bandwidth and energy fields."""

    def __init__(self, options: ClientOptions, probe: LinkProbe, cpu: CpuSpeed):
        self.options = options
        self.probe = probe
        self.cpu = cpu
        self._w_mark: tuple[object, int] | None = None
        """(session, its weight bytes sent at the end of the last request): background bytes are counted
        per session object (identity, not id(): a new session may reuse a freed one's address)."""
        self._probe_reported = 0

    def mark(self, sess: SessionStream) -> None:
        """The weight bytes ``sess`` sent so far are no request's (the uplink probe's, on the data channel)."""
        self._w_mark = (sess, sess.queue.sent.weight_bytes)

    def weights(self, rep: RequestReport, sess: SessionStream, w0: int) -> None:
        """The request's weight bytes: those ``sess`` sent during it (from ``w0``, its count when the request
        began) and those sent in the background since the previous request on the same session."""
        w1 = sess.queue.sent.weight_bytes
        rep.uploaded_weight_bytes = w1 - w0
        mark = self._w_mark
        rep.background_bytes = w0 - (mark[1] if mark is not None and mark[0] is sess else 0)
        self._w_mark = (sess, w1)

    def fill(self, rep: RequestReport, choice: PlanChoice | None, pinned: list) -> None:
        """The report's plan reason, ``pinned`` ops, probe bytes since the previous report, and the deadline,
        prediction, frequency, bandwidth and modelled energy fields of its plan ``choice`` (None: it had none)."""
        if choice is not None:
            rep.plan_why = choice.details.get("plan_why", "")
        rep.pinned = list(pinned)
        sent = self.probe.sent_bytes
        rep.probe_bytes, self._probe_reported = sent - self._probe_reported, sent
        o = self.options
        if choice is not None:
            rep.predicted_mean_ms = choice.details.get("mean_ms", choice.predicted_ms)
            rep.predicted_std_ms = choice.details.get("std_ms")
            if choice.policy == "robust":
                rep.feasible = choice.feasible
                rep.miss_bound = choice.details.get("miss_bound")
                rep.uplink_cv = choice.details.get("uplink_cv")
        link = self.probe.planning_link()
        rep.uplink_mbps = link.uplink_mbps
        rep.deadline_ms = o.deadline_ms
        rep.met_deadline = None if o.deadline_ms is None else rep.measured_ms <= o.deadline_ms
        self.cpu.report(rep, choice is not None and not rep.fallback, link.uplink_mbps)

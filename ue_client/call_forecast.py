"""A call's time outside its run, forecast by the kind of call: before its plan is ready and after its run.

Owned by the caller's thread (``ue_client.client.RemoteEngine``: its ``forecast``); no other thread touches it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ue_client.calibration import CostModel
from ue_client.connection import Connection
from ue_client.report import RequestReport
from ue_client.uploads import UploadScheduler

if TYPE_CHECKING:
    from ue_client.planning import PlanChoice


class CallForecast:
    """Names each call's kind (``calibration.CALL_MODES``, ``AFTER_KINDS``), forecasts its time before and after
    its run from the earlier calls of its kind (``CostModel.call_before_ms``, ``call_after``) and hands the
    cost model each call's measured times for the next calls' forecasts."""

    def __init__(self, cost_model: CostModel):
        self.cost_model = cost_model
        self.decided_at: float | None = None
        """``time.perf_counter()`` when the request in progress's plan was ready (None: it has none)."""
        self._after_pending: tuple[float, str] | None = None
        """The previous call's ms after its run (measured at its return; noted by the next call) and its kind
        (``after_kind``)."""

    def mode(self, conn: Connection, uploads: UploadScheduler, n: int, background: bool) -> str:
        """The kind of the call starting now (``calibration.CALL_MODES``), from the engine's state before the
        call measured anything: whether it will connect (and profile), run on a suspended session, start with
        weights still queued or going up, use a decision made in the background (``background``: one was
        waiting or being made when the call came), or is the engine's first request (``n``: requests before
        it). Its time before the run is forecast and kept per kind (``predict``)."""
        if conn.suspended is not None:
            return "offline"
        if not conn.alive:
            return "profile" if self.cost_model.base is None else "connect"
        if _weights_moving(conn, uploads):
            return "uploading"
        if background:
            return "background"
        return "first" if n == 0 else "plan"

    def begin(self) -> None:
        """A call starts (under the engine's lock): the previous call's time after its run goes to the cost
        model now (measured at its return, when the background job may have held the lock); no plan yet."""
        after = self._after_pending
        if after is not None:
            self._after_pending = None
            self.cost_model.note_call_after(*after)
        self.decided_at = None

    def predict(self, rep: RequestReport, started: float, mode: str, after_kind: str) -> None:
        """The report's call prediction (``RequestReport.call_predicted_ms``): the time calls of this kind
        (``mode``) spent until their plans were ready (the mean of the earlier ones', ``CostModel.call_before_ms``),
        the plan's prediction of its run (``predicted_ms``) and the mean time earlier calls of its plan's kind
        (``after_kind``) spent after their runs (``CostModel.call_after``): no time measured in this call enters
        it. The call's own time before its run (``started`` to the decision, ``decided_at``) is reported beside
        it (``call_before_ms``) and kept for the next calls' forecasts, after this one was made. Nothing for a
        request without a prediction or a decision (a fallback)."""
        if self.decided_at is None:
            return
        cm = self.cost_model
        forecast, after = cm.call_before_ms(mode), cm.call_after(after_kind)
        before = max(0.0, (self.decided_at - started) * 1e3)
        cm.note_call_before(mode, before)  # (after the forecast: the next calls' sample, not this one's)
        if rep.predicted_ms is None or rep.fallback:
            return
        rep.call_before_ms, rep.call_before_forecast_ms, rep.call_after_ms = before, forecast, after
        rep.call_mode = mode
        rep.call_predicted_ms = forecast + rep.predicted_ms + after

    def returned(self, run_end: float | None, after_kind: str) -> None:
        """The call returns now (after the engine's lock): its time since its run ended (``run_end``, None: no
        run timed), for the next call to note (``begin``)."""
        if run_end is not None:
            self._after_pending = (max(0.0, (time.perf_counter() - run_end) * 1e3), after_kind)


def after_kind_of(choice: PlanChoice | None, weights) -> str:
    """The kind of a request for its time after its run (``calibration.AFTER_KINDS``), from its plan: ``upload``
    when it puts weights (of ``weights``, the split graph's) on the uplink (weights its split lacks, a prefetch,
    a background stream), else ``plan`` (also without a plan)."""
    if choice is None:
        return "plan"
    uploads = choice.background or choice.prefetch or any(w in weights for w in choice.upload_order)
    return "upload" if uploads else "plan"


def _weights_moving(conn: Connection, uploads: UploadScheduler) -> bool:
    """Weights parked for the next request, queued on the uplink, or sent and not acknowledged yet (not
    ``UploadScheduler.settled``: that also waits for the link to go quiet after a request's tensors)."""
    sess = conn.session
    if sess is None:
        return False
    if uploads.parked or sess.queue.pending_bytes():
        return True
    return not uploads.queued.keys() <= sess.held  # (a subset test at C speed: a Python pass over every weight the
    # session queued was ~0.03 ms of each warm request of a client that uploaded through it, session 22)

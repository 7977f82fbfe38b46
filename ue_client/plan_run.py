"""A decided plan run with the session open, and the uplink arranged around it.

Owned by the caller's thread (``ue_client.client.RemoteEngine``: its ``runner``); no other thread touches it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from modelgraph import ModelGraph
from ue_client import planning
from ue_client.connection import Connection
from ue_client.decider import Decider
from ue_client.options import ClientOptions
from ue_client.probing import LinkProbe
from ue_client.report import RequestReport
from ue_client.request import RequestPath
from ue_client.uploads import UploadScheduler

log = logging.getLogger(__name__)


class PlanRunner:
    """Runs a decided plan (``RequestPath``) with what goes on the uplink meanwhile: the warm target's weights
    streamed, parked or capped around the run, its slice validated by the server ahead of use, and the session
    suspended after a local plan that left nothing to send. One per ``RequestPath`` (the engine's ``_cut``)."""

    def __init__(self, graph: ModelGraph, options: ClientOptions, conn: Connection, uploads: UploadScheduler,
                 probe: LinkProbe, path: RequestPath, decider: Decider):
        self.graph = graph
        self.options = options
        self.conn = conn
        self.uploads = uploads
        self.probe = probe
        self.path = path
        self.decider = decider

    def run(self, env: dict[str, torch.Tensor], choice: planning.PlanChoice, n: int, t_start: float,
            decide_ms: float, adopt: Callable[[planning.PlanChoice], None]) -> tuple[Any, RequestReport]:
        """Run request ``n`` on ``choice`` (decided since ``t_start``, ``decide_ms`` of it planning); ``adopt``
        makes it the request's plan (the engine's, at its frequency) once its target's split is known."""
        path, uploads = self.path, self.uploads
        # the target's split only where it is used (its background or prefetch): not on every warm request
        target = (self.graph.split(choice.warm_target) if choice.warm_target and (choice.background or choice.prefetch)
                  else None)
        # a server that refused slices lately validates a target's slice before its weights go up for it
        hold = bool(target is not None and choice.background and path.unproven(target.server_ops))
        adopt(choice)
        report_link = self.probe.report_link()
        if hold:  # what waits for a target stays off the uplink until the server accepts its slice
            uploads.park_background()
        else:
            uploads.resume_background()
        if choice.server_ops:
            return path.run_split(env, choice, n, report_link, t_start=t_start, decide_ms=decide_ms)
        cap = choice.details.get("prefetch_bytes") if choice.prefetch and not choice.gradual else None
        if choice.prefetch and not hold:  # the target's weights go up while this local run computes (the
            # planner counted the CPU they take from it); what is left waits for the next request, not idle time
            if cap is not None:  # the plan's bytes, not what the link carries until the run ends (session 21);
                uploads.cap_background(int(cap))  # set before the weights are scheduled (review21b finding 8)
            uploads.schedule(self.graph.split(()), choice.background, path.last_request_id)
        if target is not None and (choice.prefetch or hold):  # and the server validates the target's slice
            # meanwhile, not inside the request that first uses it (mobilenet_v2: 52 ms of validation there)
            path.define_ahead(target)
        elif choice.idle_only:  # sending would slow the local run: background waits until it is done
            uploads.park_background()
        try:
            out, rep = path.run_planned_local(env, choice, n)
        finally:
            if cap is not None:  # parked before the cap is lifted: no message goes uncapped between the two
                uploads.park_background()
                uploads.cap_background(None)
        if choice.prefetch:
            uploads.park_background()
            return out, rep
        if choice.background and not hold:  # progressive: stream the warm target (behind the run, or idle)
            uploads.schedule(self.graph.split(()), choice.background, path.last_request_id)
        if not hold:
            uploads.resume_background()
        self._suspend(choice, n)
        return out, rep

    def _suspend(self, choice: planning.PlanChoice, n: int) -> None:
        """Close the session after a local plan that left nothing to send.

        An open session costs the UE CPU even idle (the stream's receiver, HTTP/2 keepalive, RTT pings):
        measured ~0.5 % of a core, which on a 10 % CPU quota is enough to push a local run over one more
        100 ms quota period. Planning needs no server, so the session is re-opened only when a plan
        needs it (or after ``refresh_s``, to learn what the server holds now).
        """
        if not self.options.suspend_idle or choice.background or choice.invest or not self.uploads.settled():
            return
        state = self.uploads.server_state()
        self.uploads.query_held = self.uploads.held_shas()
        shares = self.decider.shares()
        self.conn.suspend(state, shares.compute, shares.uplink)
        log.debug("session suspended after request %d (plans stay local)", n)

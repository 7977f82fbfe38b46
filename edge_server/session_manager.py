"""Opens, finds and closes sessions; routes weight commits to the sessions of their tenant; keeps the
allocator's compute shares applied to the scheduler and told, with the uplink shares, to the sessions
whose share moved. Each UE's claimed profile, bounded, is :class:`~edge_server.ue_profiles.UeProfiles`.

Counters: each session owns its own (:class:`~edge_server.session.SessionCounters`); the manager owns
only the sessions opened and the sums of the sessions it has closed (per tenant), so server totals are
those sums plus the live sessions' counters (:meth:`SessionManager.totals`), and no counter is written
in two places.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import torch

from edge_server.allocation import SessionInfo, ShareAllocator, split_by_tenant, unparsed
from edge_server.auth import Quota
from edge_server.config import ServerConfig
from edge_server.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unauthenticated
from edge_server.events import SessionFailed, ShareChanged, SliceDefined
from edge_server.ids import check_id
from edge_server.memory import Bounds, Reservation
from edge_server.metrics import ServerMetrics
from edge_server.scheduler import ComputeScheduler
from edge_server.session import Session, SessionCounters
from edge_server.ue_profiles import UeProfiles
from edge_server.weight_store import WeightStore
from protos.values import ServerTimings, UeProfile

logger = logging.getLogger(__name__)


class SessionManager:
    """The open sessions of the server (event-loop side)."""

    def __init__(
        self,
        config: ServerConfig,
        store: WeightStore,
        scheduler: ComputeScheduler,
        allocator: ShareAllocator,
        device: torch.device,
        quota_of: Callable[[str], Quota | None] | None = None,
        bounds: Bounds | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.allocator = allocator
        # the planner CPU a session's joins and profile updates cost (ARA's re-plans) counts in its fair turn
        allocator.set_charge_listener(scheduler.charge)
        self.device = device
        self.bounds = bounds or Bounds()
        self.sessions: dict[str, Session] = {}
        self.uplink_shares: dict[str, float] = {}
        self.request_uplink_shares: dict[str, float] = {}
        """Session id -> the share its cut tensors of a request in flight may use (``_request_shares``)."""
        """session id -> its share of the cell's uplink, as last applied (see ``apply_shares``)."""
        self._opened: dict[str, int] = {}
        """Tenant -> sessions opened since start."""
        self._retired: dict[str, SessionCounters] = {}
        """Tenant -> sum of the counters of its sessions already closed."""
        self._tasks: set[asyncio.Task] = set()
        self.quota_of = quota_of or (lambda _tenant: None)
        """Tenant -> its limits (sessions, requests in flight, compute weight); None: no tenant limits."""
        self.ue_profiles = UeProfiles(config, self.quota_of, self.sessions)
        """Each session's UE profile as the allocator plans it (``edge_server.ue_profiles``)."""
        self._reaper: asyncio.Task | None = None
        self._listening = False
        self.metrics = metrics
        self.on_closed: Callable[[str], None] | None = None
        """Told each session id as its session closes (the data channel voids its ticket and connection)."""

    def totals(self, tenant: str | None = None) -> SessionCounters:
        """Counters summed over every session since start (closed and open), of ``tenant`` or of all."""
        total = SessionCounters()
        for t, c in self._retired.items():
            if tenant is None or t == tenant:
                total = total + c
        for s in self.sessions.values():
            if tenant is None or s.tenant == tenant:
                total = total + s.counters
        return total

    def opened(self, tenant: str | None = None) -> int:
        """Sessions opened since start, of ``tenant`` or of all."""
        return sum(self._opened.values()) if tenant is None else self._opened.get(tenant, 0)

    @property
    def sessions_opened(self) -> int:
        return self.opened()

    async def open(
        self,
        tenant: str,
        model_id: str,
        profile: UeProfile | None = None,
        *,
        slice_id: str = "",
        spec_json: bytes = b"",
        planner_key: str = "",
    ) -> tuple[Session, SliceDefined | None]:
        """Open a session (and define its first slice if ``spec_json`` is given). ``planner_key``: whose
        planner CPU bucket its ARA re-plans are charged to (``SessionInfo.planner_key``; "": the tenant's).

        Raises InvalidArgument (bad ids, bad slice), ResourceExhausted (session limit). On an error no
        session is left behind.
        """
        check_id("tenant", tenant)
        check_id("model_id", model_id, allow_empty=True)
        if not self._listening:  # plans finished later (ARA in the background) are applied on this loop
            loop = asyncio.get_running_loop()
            self.allocator.set_listener(lambda shares: loop.call_soon_threadsafe(self.apply_shares, shares))
            self._listening = True
        if len(self.sessions) >= self.config.max_sessions:
            raise ResourceExhausted(f"{len(self.sessions)} sessions open; the limit is {self.config.max_sessions}")
        q = self.quota_of(tenant)
        if q is not None:
            mine = sum(1 for s in self.sessions.values() if s.tenant == tenant)
            if mine >= q.sessions:
                raise ResourceExhausted(f"tenant {tenant!r} has {mine} sessions open; its quota is {q.sessions}")
        self._start_reaper()
        sid = uuid.uuid4().hex
        session = Session(
            sid,
            tenant,
            model_id,
            config=self.config,
            store=self.store,
            scheduler=self.scheduler,
            device=self.device,
            host=self,
            bounds=self.bounds,
        )
        self.scheduler.set_group(sid, tenant)  # compute is shared per tenant first, then per session
        self.sessions[sid] = session
        self._opened[tenant] = self._opened.get(tenant, 0) + 1
        if profile is not None:
            profile = self.plausible(profile, tenant, sid)
        info = SessionInfo(
            sid,
            tenant,
            model_id,
            weight=profile.weight if profile else 1.0,
            tenant_weight=q.compute_weight if q is not None else 1.0,
            planner_key=planner_key,
        )
        if profile is not None:
            info.extra["profile"] = profile  # with its parsed cost graph, for the allocator's join only
            self.ue_profiles.keep(sid, profile)
        try:  # an allocator may take a while (ARA re-plans): off the event loop
            self.apply_shares(await asyncio.to_thread(self.allocator.on_join, info))
        except BaseException:
            self.sessions.pop(sid, None)
            self.ue_profiles.forget(sid)
            self.allocator.on_leave(sid)
            raise
        finally:
            if profile is not None and info.extra.get("profile") is profile:
                info.extra["profile"] = self.ue_profiles.get(sid) or unparsed(profile)
        logger.info("session %s opened (tenant %s, model %s)", sid[:8], tenant, model_id or "-")
        defined = None
        if spec_json:
            try:
                defined = await session.define_slice(slice_id, spec_json)
            except BaseException:
                await self.close(session)
                raise
        return session, defined

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"no open session {session_id[:64]!r}")
        return s

    def get_for_tenant(self, session_id: str, tenant: str | None) -> Session:
        """The open session ``session_id`` if ``tenant``'s (None: anyone's, an operator's view). Another tenant's
        is NotFound with the very message of an unknown id: PERMISSION_DENIED for it told a tenant which ids were
        open sessions of others (break31 F5)."""
        s = self.sessions.get(session_id)
        if s is None or (tenant is not None and s.tenant != tenant):
            raise NotFound(f"no open session {session_id[:64]!r}")
        return s

    async def close(self, session: Session) -> None:
        if self.on_closed is not None:
            self.on_closed(session.session_id)
        await session.close()
        if self.sessions.pop(session.session_id, None) is not None:
            self.ue_profiles.forget(session.session_id, closed=True)
            c = session.counters
            self._retired[session.tenant] = self._retired.get(session.tenant, SessionCounters()) + c
            self.apply_shares(await asyncio.to_thread(self.allocator.on_leave, session.session_id))
            logger.info(
                "session %s closed (%d requests done, %d failed, %.1f MB received)",
                session.session_id[:8],
                c.requests_done,
                c.requests_failed,
                c.bytes_received / 1e6,
            )

    # -- SessionHost ---------------------------------------------------------------------------------

    def weight_committed(self, tenant: str, sha: str) -> None:
        """Make a newly committed weight available to the tenant's sessions that wait for it."""
        for s in list(self.sessions.values()):
            if s.tenant == tenant:
                s.weight_committed(sha, uploaded_here=False)

    def admit_request(self, tenant: str) -> None:
        """Raise ResourceExhausted if ``tenant`` already has its quota of requests in flight."""
        q = self.quota_of(tenant)
        if q is None:
            return
        n = sum(s.requests.in_flight for s in self.sessions.values() if s.tenant == tenant)
        if n >= q.requests_in_flight:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {n} requests in flight; its quota is {q.requests_in_flight}"
            )

    def request_finished(self, session: Session, code: str | None, timings: ServerTimings | None) -> None:
        """Metrics, and the allocator's check of the session's claimed server costs against the op times
        the server measured running its request (``ShareAllocator.on_measured``; never waits for a plan)."""
        if self.metrics is not None:
            self.metrics.request_finished(session.tenant, code, timings.total_ms if timings is not None else 0.0)
        if timings is not None and timings.ops:
            self.allocator.on_measured(session.session_id, timings.ops)

    def plausible(self, profile: UeProfile, tenant: str, session_id: str = "") -> UeProfile:
        """What a UE's claimed profile may count for in the allocator's plans:
        :meth:`edge_server.ue_profiles.UeProfiles.plausible` (the weight at the tenant's ``compute_weight``, the
        rates at the cell's)."""
        return self.ue_profiles.plausible(profile, tenant, session_id)

    def profile_of(self, session_id: str) -> UeProfile | None:
        """The profile the allocator plans ``session_id`` with (its UE's claims after :meth:`plausible`),
        None for a session without one."""
        return self.ue_profiles.get(session_id)

    async def profile_changed(self, session: Session, profile: UeProfile, hold: Reservation | None = None) -> None:
        """SessionRequest.profile: merge it into the session's profile (empty / 0 fields keep the old
        values), bound it (:meth:`plausible`: the weight at the tenant's ``compute_weight``, the rates at
        the cell's), and re-allocate. A session that sent no profile before needs a cost graph and an uplink rate now
        (else the update is logged and ignored: the allocator could not use it). ``hold`` (the parsed cost
        graph's memory in the tenant's budget) goes to the allocator with the graph, which releases it once
        the graph has left its queue; released here on every other way out."""
        try:
            update = self.ue_profiles.merged(session.session_id, session.tenant, profile)
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        if update is None:
            if hold is not None:
                hold.release()
            return
        # the allocator owns ``hold`` from here (it releases it, also when it fails)
        self.apply_shares(await asyncio.to_thread(self.allocator.on_profile, session.session_id, update, hold))

    def tenants(self) -> set[str]:
        """Tenants with a session open now or closed since start."""
        return set(self._opened) | {s.tenant for s in self.sessions.values()}

    def visible(self, tenant: str | None) -> list[Session]:
        """The open sessions of ``tenant`` (None: all; ``edge_server.auth.view_of``)."""
        if tenant is None:
            return list(self.sessions.values())
        return [s for s in self.sessions.values() if s.tenant == tenant]

    def end_revoked(self, holds: Callable[[str, str], bool]) -> None:
        """End every open session whose bearer token no longer maps to its tenant (``holds(tenant, token sha256)``
        False: the tokens file was reloaded without it) with UNAUTHENTICATED. Its stream is cancelled if the end
        cannot reach it, as an idle session's (the reaper, :meth:`_reap_idle`)."""
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.closed or s.idle_expired or not s.token_digest or holds(s.tenant, s.token_digest):
                continue
            s.idle_expired = True  # the reaper cancels a stream the end cannot reach
            s.expired_at = now
            logger.info("session %s of tenant %s: its token is no longer in the tokens file: ending it",
                        s.session_id[:8], s.tenant)
            s.emit(SessionFailed(Unauthenticated("this session's bearer token was revoked (tokens file reloaded)")))

    def upload_done(self, session: Session) -> None:
        """Tell the allocator that ``session`` has every weight of its slices (off the event loop)."""
        task = asyncio.get_running_loop().create_task(self._upload_done(session.session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upload_done(self, session_id: str) -> None:
        try:
            shares = await asyncio.to_thread(self.allocator.on_upload_done, session_id)
        except Exception:
            logger.exception("allocator on_upload_done failed")
            return
        self.apply_shares(shares)

    # -- shares --------------------------------------------------------------------------------------

    def tenant_shares(self, shares: dict[str, float]) -> dict[str, float]:
        """Compute shares per tenant first, then per session inside it: with tenant quotas, tenant t gets
        ``compute_weight_t / sum of the weights of tenants with open sessions`` of the server, split among
        its sessions in proportion to the allocator's ``shares``. Without quotas: ``shares`` unchanged."""
        tenant_of = {sid: s.tenant for sid in shares if (s := self.sessions.get(sid)) is not None}
        quotas = {t: self.quota_of(t) for t in set(tenant_of.values())}
        if not tenant_of or any(q is None for q in quotas.values()):
            return shares
        weighted = {sid: (t, quotas[t].compute_weight) for sid, t in tenant_of.items()}
        return {**shares, **split_by_tenant(weighted, inner=shares)}

    def apply_shares(self, shares: dict[str, float]) -> None:
        """Give the scheduler new compute shares and tell every session whose compute or uplink share
        (``allocator.uplink_shares()``, read now) changed."""
        shares = {sid: v for sid, v in shares.items() if sid in self.sessions}  # a late plan names closed ones
        shares = self.tenant_shares(shares)
        self.scheduler.set_shares(shares)
        weights = {}  # the scheduler's first level: tenants by their compute weight (default 1 each)
        for s in self.sessions.values():
            q = self.quota_of(s.tenant)
            if q is not None:
                weights[s.tenant] = q.compute_weight
        self.scheduler.set_group_shares(weights)
        try:
            uplinks = self.allocator.uplink_shares()
        except Exception:
            logger.exception("allocator uplink_shares failed")
            uplinks = {}
        self.uplink_shares = {sid: v for sid, v in uplinks.items() if sid in self.sessions}
        self.request_uplink_shares = self._request_shares(self.uplink_shares)
        for sid, share in shares.items():
            s = self.sessions.get(sid)
            if s is None or s.closed:
                continue
            up = self.uplink_shares.get(sid, 0.0)
            req = self.request_uplink_shares.get(sid, 0.0)
            if s.reported_share is not None and (
                abs(s.reported_share - share) > 1e-9
                or abs(s.reported_uplink_share - up) > 1e-9
                or abs(s.reported_request_uplink_share - req) > 1e-9
            ):
                s.emit(ShareChanged(share, up, req))
            s.reported_share, s.reported_uplink_share, s.reported_request_uplink_share = share, up, req

    def _request_shares(self, uplinks: dict[str, float]) -> dict[str, float]:
        """Each session's share of the cell for its cut tensors of a request in flight: its uplink share, or
        its equal share of the cell (per tenant by ``compute_weight``, then per session: ``split_by_tenant``)
        where the allocator gives it less. ARA gives a session whose upload is done ``UPLINK_FLOOR`` (1/64),
        and a UE pacing a warm request's 12 kB input to 1/64 of an 8 Mbit/s cell took 0.77 s for it (session
        9, N = 4); weights stay at the allocator's share. 0 where no uplink share is given."""
        tenant_of = {}
        for sid, s in self.sessions.items():
            q = self.quota_of(s.tenant)
            tenant_of[sid] = (s.tenant, q.compute_weight if q is not None else 1.0)
        equal = split_by_tenant(tenant_of)
        return {sid: max(up, equal.get(sid, 0.0)) for sid, up in uplinks.items() if up > 0}

    # -- idle sessions -------------------------------------------------------------------------------

    def _start_reaper(self) -> None:
        if self._reaper is None and self.config.session_idle_s > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle(), name="coinfer-idle-sessions")

    async def _reap_idle(self) -> None:
        """End sessions whose client sent nothing for ``session_idle_s`` (or, with a weight half-received on the
        stream, sent fewer than ``upload_progress_bytes`` of weights not held already: ``Session.idle_since``)
        while none of their requests was computing (requests waiting for a cut tensor, a weight or room for their
        outputs do not keep a session alive): their stream ends with DEADLINE_EXCEEDED and closing them frees
        their pins, staging bytes and memory reservations. A stream that cannot deliver that end (its client
        reads nothing) is cancelled one period later."""
        idle_s = self.config.session_idle_s
        period = min(5.0, idle_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.closed:
                    continue
                if s.idle_expired:
                    if now - s.expired_at >= period and s.stream_task is not None:
                        logger.info("session %s: its stream did not end after expiry: cancelling it", s.session_id[:8])
                        s.stream_task.cancel()
                    continue
                if s.requests.computing:
                    s.touch()  # the idle time counts from the end of the last computation
                    s.weights_clock.restart(now)
                    continue
                since = s.idle_since(now)
                if now - since < idle_s:
                    continue
                s.idle_expired = True
                s.expired_at = now
                why = "" if since == s.last_seen else (
                    f": a weight half-received on its stream without {s.weights_clock.need_bytes} bytes of weights "
                    "not held already"
                )
                logger.info("session %s idle for %.0f s%s: closing it", s.session_id[:8], now - since, why)
                s.emit(SessionFailed(DeadlineExceeded(
                    f"session idle for more than {idle_s:g} s (--session-idle-s){why}"
                )))

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for s in list(self.sessions.values()):
            await self.close(s)

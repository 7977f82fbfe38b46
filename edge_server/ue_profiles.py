"""The profile each session's UE claimed (OpenSession's, then ``SessionRequest.profile`` updates), as the
allocator may plan with it: bounded by the cell the server is configured with and the tenant's quota
(:meth:`UeProfiles.plausible`), updates merged into what the session said before.

Event-loop side; :class:`edge_server.session_manager.SessionManager` owns one and tells it of sessions opening and
closing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Container

from edge_server.allocation import unparsed
from edge_server.auth import Quota
from edge_server.config import ServerConfig
from protos.values import UeProfile

logger = logging.getLogger("edge_server.session_manager")
"""The session manager's logger, as before this module was split from it (operators' log filters and the tests
read the profile clamps there)."""


class UeProfiles:
    """Bounds each UE's claimed profile by the cell and its tenant's quota, and keeps each session's latest (the
    one the allocator plans it with)."""

    def __init__(self, config: ServerConfig, quota_of: Callable[[str], Quota | None], open_ids: Container[str]) -> None:
        """``quota_of(tenant)``: its limits (None: none); ``open_ids``: the ids of the open sessions (read only: a
        clamp is logged once per open session and field)."""
        self.config = config
        self.quota_of = quota_of
        self._open = open_ids
        self._profiles: dict[str, UeProfile] = {}
        """session id -> the UE's profile as last told (OpenSession, then SessionRequest.profile), bounded
        by :meth:`plausible`."""
        self._clamp_logged: dict[str, set[str]] = {}
        """session id -> profile fields whose clamping was logged (once per session and field)."""

    def plausible(self, profile: UeProfile, tenant: str, session_id: str = "") -> UeProfile:
        """What a UE's claimed profile may count for in the allocator's plans (one rule for OpenSession
        and SessionRequest.profile; the numbers are already in their ``edge_server.ranges``):

        * ``weight`` (0: 1.0) at most the tenant's quota ``compute_weight`` (1.0 without quotas), so a
          claimed weight buys no larger share than the tenant's;
        * ``uplink_mbps`` and ``send_mbps`` at most the cell rate the server is configured with
          (``ServerConfig.cell_uplink_mbps``): a UE shares that cell, so no honest UE sends faster, and a
          UE claiming more (ARA then plans it to offload as if its upload were free, taking compute and
          uplink from the others) is planned as an honest UE at the cell's rate;
        * ``downlink_mbps`` at most ``ServerConfig.cell_downlink_mbps`` (0, "the uplink's", counts as
          the smaller of the two) and ``rtt_ms`` at least ``ServerConfig.cell_rtt_ms`` (no UE of the cell
          is closer than the cell itself): a faster downlink or a shorter round trip than the cell's also
          makes offloading look cheaper than it can be.

        Without a configured cell value a claim counts as made (within its ``edge_server.ranges``). A
        clamp is logged at INFO once per session and field (``session_id``; a UE repeating its claim in
        every profile update logs nothing more)."""
        q = self.quota_of(tenant)
        cap = q.compute_weight if q is not None else 1.0
        changes: dict = {"weight": min(profile.weight or 1.0, cap)}
        cfg = self.config
        cell = cfg.cell_uplink_mbps
        if cell is not None:
            for name in ("uplink_mbps", "send_mbps"):
                if getattr(profile, name) > cell:
                    changes[name] = cell
        down = cfg.cell_downlink_mbps
        if down is not None:
            claim = profile.downlink_mbps or changes.get("uplink_mbps", profile.uplink_mbps)
            if claim > down:
                changes["downlink_mbps"] = down
        if cfg.cell_rtt_ms is not None and profile.rtt_ms < cfg.cell_rtt_ms:
            changes["rtt_ms"] = cfg.cell_rtt_ms
        logged = self._clamp_logged.setdefault(session_id, set()) if session_id in self._open else set()
        for name, value in changes.items():
            if name != "weight" and name not in logged:
                logged.add(name)
                logger.info(
                    "session %s (tenant %s): profile %s %.4g counts as the cell's %g (logged once per session)",
                    session_id[:8],
                    tenant,
                    name,
                    getattr(profile, name),
                    value,
                )
        return dataclasses.replace(profile, **changes)

    def get(self, session_id: str) -> UeProfile | None:
        """The profile the allocator plans ``session_id`` with (its UE's claims after :meth:`plausible`, without
        the parsed cost graph), None for a session without one."""
        return self._profiles.get(session_id)

    def keep(self, session_id: str, profile: UeProfile) -> None:
        """Keep ``profile`` (already :meth:`plausible`) as the session's, without its parsed cost graph (that goes
        to the allocator only)."""
        self._profiles[session_id] = unparsed(profile)

    def forget(self, session_id: str, *, closed: bool = False) -> None:
        """Drop the session's profile (and, once it is ``closed``, what of its clamps was logged)."""
        self._profiles.pop(session_id, None)
        if closed:
            self._clamp_logged.pop(session_id, None)

    def merged(self, session_id: str, tenant: str, profile: UeProfile) -> UeProfile | None:
        """The session's profile with ``profile``'s update merged (empty / 0 fields keep the old values) and
        bounded (:meth:`plausible`), kept for the session; None (and nothing kept) when the update cannot be used:
        a session that sent no profile before needs a cost graph and an uplink rate now."""
        old = self._profiles.get(session_id)
        if old is not None:
            profile = UeProfile(
                profile.cost_graph_json or old.cost_graph_json,
                profile.uplink_mbps or old.uplink_mbps,
                profile.rtt_ms or old.rtt_ms,
                profile.downlink_mbps or old.downlink_mbps,
                profile.weight or old.weight,
                profile.send_mbps or old.send_mbps,
                cost_graph=profile.cost_graph if profile.cost_graph_json else None,  # None: parse the kept text
            )
        elif not profile.cost_graph_json or profile.uplink_mbps <= 0:
            logger.info(
                "session %s: a profile update without a cost graph and uplink rate, and none before",
                session_id[:8],
            )
            return None
        profile = self.plausible(profile, tenant, session_id)
        self.keep(session_id, profile)
        logger.info(
            "session %s: new profile (send rate %.2f Mbit/s, weight %g)",
            session_id[:8],
            profile.send_mbps,
            profile.weight,
        )
        return profile

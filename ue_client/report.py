"""What one request did, as the device runtime saw it (``CoinferClient.last_report``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestReport:
    """One request, as the runtime saw it. ``predicted_ms`` is the simulator's latency of what ran."""

    request: int
    policy: str
    server_ops: int
    ue_ops: int
    uploaded_weight_bytes: int
    """Weight bytes put on the uplink while this request ran (its own needs and background uploads)."""
    sent_tensor_bytes: int
    predicted_ms: float | None
    measured_ms: float
    fallback: bool = False
    fallback_reason: str = ""
    """Why the request fell back (or, when it did not, why its plan stayed local)."""
    fallback_kind: str = ""
    """The fallback's category: "unreachable", "server error", "deadline", "protocol error" or "planner
    failure" ("" without a fallback)."""
    fallback_code: str = ""
    """The gRPC status name behind a fallback, when there was one (e.g. "INVALID_ARGUMENT", "UNAVAILABLE")."""
    background_bytes: int = 0
    """Weight bytes uploaded between the previous request and this one (progressive offloading)."""
    needed_upload_bytes: int = 0
    """Weight bytes this request's split needed that the server did not hold when it was planned."""
    serial_ms: float | None = None
    """Simulated latency of the same split with serial uploading (weights first, then inference)."""
    warm_ms: float | None = None
    plan_ms: float = 0.0
    link: dict[str, float] = field(default_factory=dict)
    server_timings: dict[str, float] | None = None
    max_abs_diff_vs_local: float | None = None
    """Max |result - captured graph run here| (``--verify``; 0 expected on CPU)."""
    max_abs_diff_vs_eager: float | None = None
    """Max |result - the user's eager module| (``--verify``; within ``ue_client.verify.TOLERANCES``)."""
    probe_bytes: int = 0
    """Weight bytes the connect-time uplink probe sent since the previous request's report."""
    invest: bool = False
    """The plan uploaded the warm target's weights in this request (horizon / rent-or-buy decision)."""
    plan_reason: str = ""
    offline: bool = False
    """Planned and run without a session (suspended while plans stay local): no server traffic."""
    pinned: list[dict[str, Any]] = field(default_factory=list)
    """Ops off the server's allowlist, each ``{"op", "target", "kept_on_ue"}``: the op and how many ops
    (itself and its descendants) it kept on this device (``modelgraph.pinning``); [] when none."""

    def pinned_note(self) -> str:
        """One line, e.g. ``pinned: cumprod (aten.cumprod.default) kept 5 ops on the UE`` ("" when none)."""
        if not self.pinned:
            return ""
        return "pinned: " + "; ".join(f"{p['op']} ({p['target']}) kept {p['kept_on_ue']} op"
                                      f"{'s' if p['kept_on_ue'] != 1 else ''} on the UE" for p in self.pinned)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

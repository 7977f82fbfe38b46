"""The result every planner returns: one frozen, JSON-ready record the runtime and the CLI consume."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Plan:
    policy: str
    server_ops: frozenset[str]
    """Op names that run on the server; the rest run on the UE."""
    predicted_ms: float
    """The simulator's latency of this partition as the runtime runs it (= ``cold_ms``), for every policy.
    The policy's own objective (the additive warm cost for dads, the serial latency for offload, mean +
    k*std for robust) is ``details["objective_ms"]``."""
    cold_ms: float
    """Simulated latency of this partition with what the server holds now (parallel need-ordered upload)."""
    warm_ms: float
    """Simulated latency of this partition once every weight is on the server."""
    decision_ms: float
    upload_bytes: int
    """Weight bytes this plan needs that the server does not hold yet."""
    sent_tensor_bytes: int
    upload_order: tuple[str, ...] = ()
    """Uplink items (weight names and tensor source names) in need order."""
    feasible: bool = True
    reason: str = ""
    exact: bool | None = None
    """True when the policy proved optimality for its objective (mjoa, optimal); None when not applicable."""
    warm_target: frozenset[str] | None = None
    """mjoa/progressive: the server set the plans move toward as weights arrive."""
    frequency_ghz: float | None = None
    energy_mj: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_ops", frozenset(self.server_ops))
        if self.warm_target is not None:
            object.__setattr__(self, "warm_target", frozenset(self.warm_target))
        object.__setattr__(self, "details", dict(self.details))

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "predicted_ms": self.predicted_ms, "cold_ms": self.cold_ms,
            "warm_ms": self.warm_ms, "decision_ms": self.decision_ms, "server_ops": sorted(self.server_ops),
            "upload_bytes": self.upload_bytes, "sent_tensor_bytes": self.sent_tensor_bytes,
            "upload_order": list(self.upload_order), "feasible": self.feasible, "reason": self.reason,
            "exact": self.exact,
            "warm_target": None if self.warm_target is None else sorted(self.warm_target),
            "frequency_ghz": self.frequency_ghz, "energy_mj": self.energy_mj, "details": dict(self.details),
        }

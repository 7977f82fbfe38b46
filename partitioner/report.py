"""The library side of `coinfer-ue plan`: every requested policy on one graph, one JSON, one table."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from partitioner.costgraph import CostGraph, Link
from partitioner.errors import PartitionerError, UnknownPolicyError
from partitioner.planners import POLICIES, plan
from partitioner.state import ServerState, Shares

log = logging.getLogger(__name__)


def _policies(policies: str | Iterable[str]) -> list[str]:
    if isinstance(policies, str):
        names = list(POLICIES) if policies == "all" else [p.strip() for p in policies.split(",") if p.strip()]
    else:
        names = list(policies)
    for p in names:
        if p not in POLICIES:
            raise UnknownPolicyError(p, list(POLICIES))
    return names


def plan_table(graph: CostGraph, link: Link, policies: str | Iterable[str] = "all", *,
               state: ServerState | None = None, share: Shares | None = None,
               options: Mapping[str, Mapping[str, Any]] | None = None,
               deadline_hint: str = "pass options={'robust': {'deadline_ms': D}}") -> dict[str, Any]:
    """``{"model", "ops", "plans": [...]}`` as `coinfer-ue plan --json` writes it.

    ``options`` maps a policy name to its keyword options (e.g. ``{"robust": {"deadline_ms": 50}}``).
    A policy that cannot produce a plan (robust without a deadline, optimal on a graph too large to
    enumerate) gets a row with ``feasible: false`` and its reason instead of numbers; ``deadline_hint``
    completes robust's missing-deadline reason (the CLI names its flag).
    """
    options = options or {}
    rows = []
    for name in _policies(policies):
        opts = dict(options.get(name, {}))
        if name == "robust" and "deadline_ms" not in opts:
            rows.append(_row_error(name, f"needs a deadline: {deadline_hint}"))
            continue
        if name == "optimal":
            opts.setdefault("budget_s", 10.0)
        try:
            p = plan(name, graph, link, state=state, share=share, **opts)
        except UnknownPolicyError:
            raise
        except PartitionerError as e:
            rows.append(_row_error(name, str(e)))
            continue
        rows.append({
            "policy": name, "predicted_ms": p.predicted_ms, "cold_ms": p.cold_ms, "warm_ms": p.warm_ms,
            "decision_ms": p.decision_ms, "server_ops": sorted(p.server_ops), "upload_bytes": p.upload_bytes,
            "sent_tensor_bytes": p.sent_tensor_bytes, "feasible": p.feasible, "reason": p.reason,
            "exact": p.exact, "frequency_ghz": p.frequency_ghz, "energy_mj": p.energy_mj,
        })
    return {
        "model": graph.model, "ops": len(graph), "plans": rows,
        "server_costs": str(graph.meta.get("server_costs", "profiled")),
        "link": {"uplink_mbps": link.uplink_mbps, "downlink_mbps": link.downlink, "rtt_ms": link.rtt_ms},
    }


def _row_error(name: str, reason: str) -> dict[str, Any]:
    return {"policy": name, "predicted_ms": None, "cold_ms": None, "warm_ms": None, "decision_ms": None,
            "server_ops": [], "upload_bytes": 0, "sent_tensor_bytes": 0, "feasible": False, "reason": reason,
            "exact": None, "frequency_ghz": None, "energy_mj": None}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(table: Mapping[str, Any]) -> str:
    """A fixed-width text table of ``plan_table``'s result (plus reasons of infeasible rows)."""
    lk = table.get("link", {})
    head = (f"model {table['model'] or '?'}: {table['ops']} ops; uplink {lk.get('uplink_mbps', '?')} Mbps, "
            f"downlink {lk.get('downlink_mbps', '?')} Mbps, RTT {lk.get('rtt_ms', '?')} ms; "
            f"server costs: {table.get('server_costs', 'profiled')}")
    cols = ("policy", "predicted_ms", "cold_ms", "warm_ms", "decision_ms", "server_ops", "upload_MB", "sent_KB")
    lines = [head, "  ".join(f"{c:>12}" for c in cols)]
    notes = []
    for r in table["plans"]:
        vals = (r["policy"], _fmt(r["predicted_ms"]), _fmt(r["cold_ms"]), _fmt(r["warm_ms"]),
                _fmt(r["decision_ms"], 3), str(len(r["server_ops"])), _fmt(r["upload_bytes"] / 1e6),
                _fmt(r["sent_tensor_bytes"] / 1e3, 1))
        mark = "" if r.get("feasible", True) else " *"
        lines.append("  ".join(f"{v:>12}" for v in vals) + mark)
        if r.get("reason"):
            notes.append(f"* {r['policy']}: {r['reason']}")
    return "\n".join(lines + notes)

"""The re-plan thresholds of ``ue_client.decisions.DecisionCache``: which continuous estimate (the link, a cost
scale, the send cost, ``robust``'s spreads) moved far enough since the last decision to plan again.

Relative thresholds, not buckets: on a throttled UE one local run varies by +-20 % with the CPU quota's period,
and re-planning after every such wobble is what drains the quota (each plan is tens of ms of CPU, i.e. hundreds
of ms at a 10 % quota). Pure functions of their arguments (the cache keeps what they compare against), run on
whichever thread runs the cache's decision (the caller's, or the background planner's under the engine's lock).
"""

from __future__ import annotations

from partitioner import Link
from partitioner.uecpu import UeCpu
from ue_client.calibration import TRANSPORT_REPLAN_SE


def estimate_drift(planned_with: tuple | None, link: Link, ue_cpu: UeCpu | None, scale: dict[str, float],
                   robust: bool, rel: float = 0.25) -> tuple[str, frozenset[str], str]:
    """(which estimate moved, the ``scale`` entries that moved, 'KEY THEN -> NOW, ...' for them) since the
    decision made with ``planned_with`` (planning link, cost scales, send ms per byte; None: no decision yet,
    'link'): the link by ``rel`` (uplink; RTT also by 2 ms; then the warm target is searched again too), 'scale'
    (``moved_scales``), the send cost by 50 %; '' when none did. ``DecisionCache.drift``'s rule."""
    if planned_with is None:
        return "link", frozenset(), ""
    l0, scale0, send0 = planned_with

    def far(a: float, b: float, r: float = rel) -> bool:
        return abs(a - b) > r * max(abs(b), 1e-9)

    if far(link.uplink_mbps, l0.uplink_mbps) or (far(link.rtt_ms, l0.rtt_ms) and abs(link.rtt_ms - l0.rtt_ms) > 2):
        return "link", frozenset(), ""
    moved = moved_scales(scale0, scale, scale.get("transport_se_ms") or 0.0, robust)
    if moved:
        return "scale", frozenset(moved), scale_detail(scale0, scale, moved)
    send = None if ue_cpu is None else ue_cpu.send_ms_per_byte
    if (send is None) != (send0 is None) or (send is not None and far(send, send0, 0.5)):
        return "send cost", frozenset(), ""
    return "", frozenset(), ""


def spread_moved(spread: tuple[float, float], then: tuple[float, float], rel: float = 0.25) -> bool:
    """Whether ``robust``'s (uplink cv, UE cv) moved by more than ``rel`` (relative, or 0.02 absolute) since
    ``then``, the pair its last decision planned with."""
    return any(abs(a - b) > max(0.02, rel * abs(b)) for a, b in zip(spread, then, strict=True))


def moved_scales(scale0: dict[str, float], scale: dict[str, float], se: float, robust: bool) -> list[str]:
    """The ``scale`` entries that moved past their re-plan thresholds since ``scale0`` (in ``scale0``'s order;
    entries missing from ``scale`` are not compared): the cost scales by 30 %, the UE's overhead by 10 ms, the
    transport residual by 10 ms and ``TRANSPORT_REPLAN_SE`` x its standard error ``se`` (``transport_se_ms``),
    its spread (``transport_sd_ms``) by 10 ms for ``robust`` only; ``transport_se_ms`` never (no plan reads it).
    ``estimate_drift``'s rule, also asked by ``DecisionCache.reuse`` once its quick checks saw a move."""
    moved = []
    for k, v0 in scale0.items():
        if k not in scale or k == "transport_se_ms" or (k == "transport_sd_ms" and not robust):
            continue
        v = scale[k]
        if k in ("ue", "server"):
            if far(v, v0, 0.3):
                moved.append(k)
        elif abs(v - v0) > (max(10.0, TRANSPORT_REPLAN_SE * se) if k == "transport_ms" else 10.0):
            moved.append(k)
    return moved


def scale_detail(scale0: dict[str, float], scale: dict[str, float], moved: list[str]) -> str:
    """``DecisionCache.drift_detail`` for the ``moved`` entries: 'KEY THEN -> NOW, ...'."""
    return ", ".join(f"{k} {scale0[k]:.3g} -> {scale[k]:.3g}" for k in moved)


def far(a: float, b: float, r: float) -> bool:
    """``moved_scales``' relative move: |a - b| > r x |b| (at least 1e-9)."""
    return abs(a - b) > r * max(abs(b), 1e-9)


_SCALE_KEYS = frozenset(("ue", "server", "ue_overhead_ms", "transport_ms", "transport_sd_ms", "transport_se_ms"))
"""The ``scale`` entries ``raw_drift`` knows the drift rules of (any other: it leaves it to ``decide``)."""


def raw_drift(planned_with: tuple, link: Link, send: float | None, ue: float, server: float, overhead_ms: float,
              transport_ms: float, transport_se) -> bool | None:
    """``estimate_drift`` for ``DecisionCache.reuse``, from raw values and without ``robust``'s spread: whether a
    ``scale`` entry moved (True: the caller asks ``moved_scales`` which), or None where the link or the send cost
    moved (a re-plan) or ``planned_with`` has entries it does not know (left to ``DecisionCache.decide``).
    ``ue``, ``server``, ``overhead_ms``, ``transport_ms``: the ``scale`` entries ``ue``, ``server``,
    ``ue_overhead_ms``, ``transport_ms``; ``send``: the send ms per byte (None: no send cost); ``transport_se``:
    gives ``transport_se_ms``, called only when the residual moved by more than 10 ms."""
    l0, s0, send0 = planned_with
    if not s0.keys() <= _SCALE_KEYS:
        return None
    # ``estimate_drift``'s rules, its arithmetic written out (``far``: |a - b| > r x max(|b|, 1e-9)): the link
    if link is not l0 and link != l0 and (
            abs(link.uplink_mbps - l0.uplink_mbps) > 0.25 * max(abs(l0.uplink_mbps), 1e-9)
            or (abs(link.rtt_ms - l0.rtt_ms) > 0.25 * max(abs(l0.rtt_ms), 1e-9)
                and abs(link.rtt_ms - l0.rtt_ms) > 2)):
        return None
    # the cost scales (30 %), the UE's overhead (10 ms), the transport residual (10 ms and TRANSPORT_REPLAN_SE
    # of its standard error); ``transport_sd_ms`` and ``transport_se_ms`` move no decision but robust's
    v = s0.get("ue")
    moved = v is not None and abs(ue - v) > 0.3 * max(abs(v), 1e-9)
    v = s0.get("server")
    moved = moved or (v is not None and abs(server - v) > 0.3 * max(abs(v), 1e-9))
    v = s0.get("ue_overhead_ms")
    moved = moved or (v is not None and abs(overhead_ms - v) > 10.0)
    v = s0.get("transport_ms")
    moved = moved or (v is not None and abs(transport_ms - v) > 10.0 and abs(transport_ms - v) >
                      TRANSPORT_REPLAN_SE * (transport_se() or 0.0))
    if moved:
        return True
    if (send is None) != (send0 is None) or (send is not None and abs(send - send0) > 0.5 * max(abs(send0), 1e-9)):
        return None
    return False

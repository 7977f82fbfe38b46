"""``auto``'s re-plan of a held warm target without a search (session 15): which earlier plan is the search's
answer, and how its prediction moves to the estimates of now.

Pure functions of their arguments: the candidates and the target stay on ``ue_client.decisions.DecisionCache``
(``_held_ahead``, ``last``, ``_target``), whose background copies (``ue_client.background.speculate``) must
see every change as a rebound attribute. Run on whichever thread runs the cache's decision (the caller's, or
the background planner's while its job holds the engine's lock).
"""

from __future__ import annotations

from partitioner import CostGraph, Link
from partitioner.simulate import Rates
from partitioner.state import Shares
from partitioner.uecpu import UeCpu, effective_link, effective_rates
from ue_client import planning

HELD_REFRESH = frozenset(("server", "transport_ms"))
"""The ``scale`` entries whose drift ``DecisionCache.held_answer`` follows without a search."""

HELD_REFRESH_ALL = HELD_REFRESH | {"ue"}
"""Those it follows where the warm target is every op (``held_follows``)."""


def held_follows(keys, target: frozenset[str] | None, base: CostGraph | None) -> bool:
    """Whether ``DecisionCache.held_answer`` may follow a 'scale' drift of the ``scale`` entries ``keys`` (else
    ``decide`` searches): the server scale and the transport residual (``HELD_REFRESH``) always; the UE's scale
    too where the warm ``target`` is every op of ``base`` (``HELD_REFRESH_ALL``: its prediction does not move
    with the UE's scale, the guard's local time moves by its ratio, as ``held_plan`` does; session 16's grid:
    resnet18's request 2 searched 1.4 ms of CPU on a 10 % UE for 'scale: ue 1 -> 1.34' to find the held
    target again)."""
    keys = frozenset(keys)
    if keys <= HELD_REFRESH:
        return True
    return bool(keys <= HELD_REFRESH_ALL and target and base is not None and len(target) == len(base.ops))


def held_plan(cands: list[tuple], key: tuple, t: frozenset[str], base: CostGraph, now: tuple,
              scale: dict[str, float], share: Shares | None) -> tuple[list[str], planning.PlanChoice | None]:
    """(misses, the answer) among ``cands`` (key, choice, planned with, searched at) for the held target ``t``
    at ``now`` (planning link, UE scale, UE overhead ms, send ms per byte) and the ``scale`` of now: the first
    candidate whose answer is the search's, its prediction moved; else None, with what differed for each
    candidate.

    Why this is the search's answer: with the warm target kept (only a link drift searches it again) and
    every weight of it held, ``planning.choose`` takes the target as the split ("no plan beats it") and only
    its request-level guard can turn it local (offloading predicted at or above local); nothing else of the
    choice depends on the horizon, the rent-or-buy total or the other held weights. So where the answer was
    made with the same link, send cost, UE cost scale and UE overhead (equal values), the same shares,
    refusals and policy (the ``key`` but the held set), and only the server scale or the transport residual
    moved, the search would give the same split, whose prediction ``planning.refresh_reused`` moves (exact
    when every op is on the server, else within the server part's move, as for a reused decision), with
    the guard checked on the moved prediction (within 1e-9 of it: the search). Its ``warm_ms`` and
    ``serial_ms`` follow when they equalled its prediction (nothing to upload), else None; ``std_ms`` stays
    the one planned with (as a reused decision's)."""
    misses = []
    for key0, choice, (_, s0, _), searched in cands:
        if (choice.warm_target != t or choice.server_ops != t or choice.reason != "warm target held"
                or key0[:2] != key[:2] or key0[3:] != key[3:]):
            misses.append("not a held plan of this key")
            continue
        oh = choice.details.get("ue_overhead_ms", 0.0)
        local = choice.local_ms - oh  # (the guard's: before the overhead)
        l0, l1 = searched[0], now[0]
        down = l0 is not l1 and l0 != l1
        ue0, ue1 = searched[1], now[1]
        send_moved = searched[3] != now[3] and searched[2] == now[2] and _send_moves_nothing(
            base, t, l1, share, searched[3], now[3])
        if (searched[2:] != now[2:] and not send_moved) or (
                down and (l0.uplink_mbps != l1.uplink_mbps or l0.rtt_ms != l1.rtt_ms)):
            misses.append(",".join(nm for nm, a, b in (("ue overhead", searched[2], now[2]),
                                                       ("send cost", searched[3], now[3])) if a != b) or "link")
            continue
        if (down or ue0 != ue1) and len(t) != len(base.ops):  # (a split without UE ops only: below)
            misses.append("ue scale" if ue0 != ue1 else "downlink")
            continue
        if ue0 != ue1:  # its prediction does not move with the UE's scale; local's is the profile's x the scale
            if not ue0 or not ue1 or ue0 <= 0 or ue1 <= 0:
                misses.append("ue scale")
                continue
            local *= ue1 / ue0
        moved = planning.refresh_reused(choice, scale.get("transport_ms", 0.0), None, None, s0.get("server"),
                                        scale.get("server"))
        if down:
            moved = _downlink_moved(moved, base, l0.downlink_mbps, l1.downlink_mbps)
            if moved is None:
                misses.append("downlink")
                continue
        d = moved.details
        base_ms = d.get("transport_base_ms")
        if base_ms is None or base_ms >= local * (1 - 1e-9):  # the guard (or too near it to tell): search
            misses.append("guard")
            continue
        if choice.warm_ms != choice.predicted_ms or choice.serial_ms != choice.predicted_ms:
            misses.append("upload left")
            continue
        details = {k: v for k, v in d.items() if k not in ("reused_decision", "planned_ahead")}
        if send_moved and "send_ms_per_byte" in details:
            details["send_ms_per_byte"] = now[3]
        return misses, planning.evolve(moved, warm_ms=moved.predicted_ms, serial_ms=moved.predicted_ms,
                                       local_ms=local + oh if searched != now else choice.local_ms, details=details)
    return misses, None


def _downlink_moved(choice: planning.PlanChoice, base: CostGraph, d0: float | None,
                    d1: float | None) -> planning.PlanChoice | None:
    """An all-server split ``choice`` of ``base`` (one output op) planned at downlink ``d0`` Mbit/s, predicted at
    ``d1``: its output's download (out bytes x 8 / downlink) is the last thing the request waits for, so the
    prediction before the transport residual (``details["transport_base_ms"]``) moves by its change, the
    residual's floor (``min(0, server ms - that prediction)``: ``planning.choose``'s ``keep_base`` for ``auto``)
    with it, and the prediction by both. None where that does not hold (several outputs, no numbers)."""
    d = choice.details
    outs = base.outputs
    if len(outs) != 1 or outs[0] not in base.index or not d0 or not d1 or d0 <= 0 or d1 <= 0:
        return None
    tb, srv = d.get("transport_base_ms"), d.get("server_ms")
    if tb is None or srv is None or d.get("mean_ms") != choice.predicted_ms:
        return None
    delta = base.ops[base.index[outs[0]]].out_bytes * 8 / 1e3 * (1.0 / d1 - 1.0 / d0)
    t = d.get("transport_ms", 0.0)
    floor0, floor1 = d.get("transport_floor_ms", 0.0), min(0.0, srv - (tb + delta))

    def term(floor: float) -> float:
        return max(t, floor) if t else 0.0

    predicted = choice.predicted_ms + delta + term(floor1) - term(floor0)
    details = {**d, "transport_base_ms": tb + delta, "transport_floor_ms": floor1, "mean_ms": predicted}
    return planning.evolve(choice, predicted_ms=predicted, details=details)


def _send_moves_nothing(base: CostGraph, target: frozenset[str], link: Link, share: Shares | None,
                        s0: float | None, s1: float | None) -> bool:
    """Whether a send cost of ``s1`` ms per byte (the UE's ``UeCpu.send_ms_per_byte``) instead of ``s0`` leaves the
    prediction of the split ``target`` of ``base`` on ``link`` at ``share`` as it was, with every weight of the
    target held: ``target`` is every op (the UE computes nothing, so sending steals no compute time:
    ``partitioner.uecpu``'s shared-CPU model sends at min(rate, 1 / s) while only the sender is busy) and at both
    costs the CPU-bound send rate caps neither the planning link (``uecpu.effective_link``) nor the simulator's
    uplink rates (``uecpu.effective_rates``, ``Rates.of(link, share)``): the graph's inputs go at the link's rate
    either way, and nothing else is sent. Both costs given (> 0), or the same. Session 20's testbed: the request
    after the cold upload searched (0.67-1.1 ms of CPU on a 10 % UE) because the cold upload's samples had moved
    the send-cost estimate, by less than its drift threshold."""
    if s0 is None or s1 is None or len(target) != len(base.ops):
        return False
    r = Rates.of(link, share)  # (each cap function returns its input itself when it caps nothing)
    return all(s <= 0 or (effective_link(link, UeCpu(s)) is link and effective_rates(r, s) is r) for s in (s0, s1))


"""Constructed two-UE upload cases for the ARA tests (``partitioner.allocation``), with the objective
computed by hand: the reference the allocators' optima are checked against."""

from __future__ import annotations

from partitioner.allocation import UPLINK_FLOOR, UeDemand


def upload(uid: str, up_ms: float, weight: float = 1.0, **kw) -> UeDemand:
    """A UE that only uploads (no local compute, no cut tensor, no server time; ms at the whole cell):
    T_n = when its upload ends."""
    return UeDemand(uid, weight, 0.0, up_ms, 0.0, 0.0, 0.0, **kw)


def two_phase(a: UeDemand, b: UeDemand, beta_a: float) -> float:
    """sum w T when ``a`` holds beta_a and ``b`` 1 - beta_a (each at most its cap ``max_uplink``) until the
    first finishes, then the other holds min(its cap, 1 - the finished UE's floor) (what the server does
    at an upload completion). Without caps (``max_uplink`` 1) the plain two-phase objective."""
    sa, sb = min(beta_a, a.max_uplink), min(1 - beta_a, b.max_uplink)
    ta, tb = a.overlap_up_ms / sa, b.overlap_up_ms / sb
    if ta <= tb:
        rest = b.overlap_up_ms - sb * ta
        return a.weight * ta + b.weight * (ta + rest / min(b.max_uplink, 1 - UPLINK_FLOOR))
    rest = a.overlap_up_ms - sa * tb
    return b.weight * tb + a.weight * (tb + rest / min(a.max_uplink, 1 - UPLINK_FLOOR))

"""Scenario files for ``coinfer-testbed run``: one edge server and a list of UEs (TOML or JSON).

    name = "two-ues"
    [server]
    threads = 2            # torch threads of the edge server (default: torch's)
    allocator = "equal"    # or "ara"
    [[ue]]
    model = "torchvision:resnet18"
    policy = "coinfer"     # coinfer, local, neurosurgeon-serial, dads-serial, ionn, or a ue_client policy
    uplink_mbps = 20
    downlink_mbps = 100    # default: same as the uplink
    rtt_ms = 20
    cpu = 0.25             # share of one core (cgroup quota; 1/cpu slowdown in userspace mode)
    requests = 5
    count = 2              # this many identical UEs (default 1)
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).parent


class ScenarioError(ValueError):
    """A scenario file or flag set is malformed (message names the field)."""


@dataclasses.dataclass(frozen=True)
class UeSpec:
    model: str
    policy: str = "coinfer"
    uplink_mbps: float | None = 20.0
    downlink_mbps: float | None = None
    rtt_ms: float = 20.0
    cpu: float | None = 0.25
    requests: int = 4
    weight: float = 1.0
    """The UE's priority w_n in ARA's weighted latency sum (``ClientOptions.weight``; capped by the server at
    its tenant's quota compute_weight, 1.0 in the testbed)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, int | float) and 0 < self.weight < float("inf")):
            raise ScenarioError(f"ue.weight must be > 0 and finite, got {self.weight!r}")
        for k in ("uplink_mbps", "downlink_mbps", "cpu"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise ScenarioError(f"ue.{k} must be > 0, got {v!r}")
        if not (isinstance(self.rtt_ms, int | float) and self.rtt_ms >= 0):
            raise ScenarioError(f"ue.rtt_ms must be >= 0, got {self.rtt_ms!r}")
        if not (isinstance(self.requests, int) and self.requests >= 1):
            raise ScenarioError(f"ue.requests must be an integer >= 1, got {self.requests!r}")
        if not isinstance(self.model, str) or ":" not in self.model:
            raise ScenarioError(f"ue.model must be a spec like torchvision:resnet18, got {self.model!r}")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    ues: tuple[UeSpec, ...]
    server_threads: int | None = None
    allocator: str = "equal"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "server": {"threads": self.server_threads, "allocator": self.allocator},
                "ue": [dataclasses.asdict(u) for u in self.ues]}


_UE_KEYS = {f.name for f in dataclasses.fields(UeSpec)}


def from_dict(d: dict[str, Any], default_name: str = "scenario") -> Scenario:
    if not isinstance(d, dict):
        raise ScenarioError("a scenario is a table with [server] and [[ue]] entries")
    server = d.get("server") or {}
    ues: list[UeSpec] = []
    for i, u in enumerate(d.get("ue") or []):
        if not isinstance(u, dict):
            raise ScenarioError(f"ue[{i}] must be a table")
        u = dict(u)
        count = u.pop("count", 1)
        unknown = set(u) - _UE_KEYS
        if unknown:
            raise ScenarioError(f"ue[{i}]: unknown keys {sorted(unknown)} (known: {sorted(_UE_KEYS | {'count'})})")
        if not (isinstance(count, int) and count >= 1):
            raise ScenarioError(f"ue[{i}].count must be an integer >= 1")
        try:
            spec = UeSpec(**u)
        except TypeError as e:
            raise ScenarioError(f"ue[{i}]: {e}") from None
        ues.extend([spec] * count)
    if not ues:
        raise ScenarioError("the scenario has no [[ue]] entries")
    allocator = server.get("allocator", "equal")
    if allocator not in ("equal", "ara"):
        raise ScenarioError(f"server.allocator must be equal or ara, got {allocator!r}")
    return Scenario(str(d.get("name", default_name)), tuple(ues), server.get("threads"), allocator)


def load(path: str | Path) -> Scenario:
    """A TOML or JSON file, or the name of a bundled scenario (``testbed/scenarios/NAME.toml``)."""
    p = Path(path)
    if not p.exists() and (SCENARIO_DIR / f"{path}.toml").exists():
        p = SCENARIO_DIR / f"{path}.toml"
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {str(path)!r}: {e.strerror}") from None
    try:
        d = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ScenarioError(f"{p}: {e}") from None
    return from_dict(d, p.stem)


def bundled() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))

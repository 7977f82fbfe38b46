"""What the server already holds for a model, and the share of the server a UE gets.

Both change between requests (progressive offloading, multi-UE allocation), so they are passed to
every planner instead of being baked into the cost graph.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.costgraph import CostGraph, CostGraphError


@dataclass(frozen=True)
class ServerState:
    """Weights the server holds (complete and verified) and weights in flight (bytes still to send).

    An in-flight weight needed by a request is an uplink item of its remaining size; one the request
    does not need keeps streaming at the lowest priority and does not delay the request.
    """

    held: frozenset[str] = frozenset()
    in_flight: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "held", frozenset(self.held))
        object.__setattr__(self, "in_flight", dict(self.in_flight))
        for name, b in self.in_flight.items():
            if not isinstance(b, int | float) or math.isnan(b) or b < 0:
                raise CostGraphError(f"in-flight weight {name!r} has invalid remaining bytes {b!r}")

    @classmethod
    def trusted(cls, held: frozenset[str], in_flight: dict[str, int]) -> ServerState:
        """A state from values the caller vouches for, without ``__post_init__``'s copies and checks: ``held`` a
        frozenset, ``in_flight`` a fresh dict (the state owns it) of weight name -> bytes still to send, ints
        >= 0. For ``ue_client.uploads.UploadScheduler.server_state``, built inside every request's plan window
        (the checks were a Python pass over every weight on its way: googlenet's prefetch requests, ~90)."""
        state = object.__new__(cls)
        object.__setattr__(state, "held", held)
        object.__setattr__(state, "in_flight", in_flight)
        return state

    def lacking(self, names: frozenset[str], within: frozenset[str] | None = None) -> frozenset[str]:
        """``names - held``: the names of ``names`` the server does not hold (in flight or not sent), remembered on
        this state per ``names`` set. Where the state's maker gave what it lacks of a larger set
        (:meth:`with_lacking`: ``ue_client.uploads.UploadScheduler`` does, beside the held set) and few are lacking,
        it is read from there: a pass over what the server lacks instead of over ``names`` (session 34: each pass
        over a model's ~260 weight names cost ~10-25 us of a real client's decision, right after a forward pass; a
        decision made several). ``within``: a set the caller knows holds ``names`` (a table's weights: whether it
        lies within the maker's set is then asked once per pair of sets, not once per ``names``)."""
        given = self.__dict__.get("_lack")
        if not self.held:
            if given is not None and within is not None:  # (whether ``within`` lies in the maker's set, asked once per
                _within(within, given[0])  # pair of sets: a client's first plans hold nothing yet, off the requests')
            return names
        memo = self.__dict__.get("_lacking")
        if memo is None:
            memo = self.__dict__["_lacking"] = {}
        got = memo.get(id(names))
        if got is not None and got[0] is names:
            return got[1]
        if given is not None and given[1] is None:  # (told the set only: what it lacks of it is made once, here)
            given = self.__dict__["_lack"] = (given[0], given[0].difference(self.held))
        if given is not None and given[0] is names:
            lack = given[1]
        elif (given is not None and _within(within if within is not None else names, given[0])
              and 4 * len(given[1]) <= len(names)):
            lack = frozenset(w for w in given[1] if w in names)
        else:
            lack = names.difference(self.held)
        if len(memo) > 16:
            memo.clear()
        memo[id(names)] = (names, lack)  # (keeps ``names`` alive: its id stays its own)
        return lack

    def with_lacking(self, universe: frozenset[str], lack: frozenset[str] | None = None) -> ServerState:
        """This state, told that of the names ``universe`` it lacks exactly ``lack`` (``universe - held``; the
        caller vouches for it; None: made at the first :meth:`lacking` that needs it, once): :meth:`lacking` of a
        subset of ``universe`` then passes over ``lack`` only."""
        self.__dict__["_lack"] = (universe, lack)
        return self

    @classmethod
    def warm(cls, graph: CostGraph) -> ServerState:
        """The server holds every weight of the graph."""
        return cls(held=frozenset(graph.weights))

    def with_held(self, names: Iterable[str]) -> ServerState:
        names = set(names)
        return ServerState(held=self.held | names,
                           in_flight={k: v for k, v in self.in_flight.items() if k not in names})

    def remaining_bytes(self, name: str, full: int) -> int:
        """Bytes of weight ``name`` still to upload (0 when held)."""
        if name in self.held:
            return 0
        return int(self.in_flight.get(name, full))

    def to_dict(self) -> dict[str, Any]:
        return {"held": sorted(self.held), "in_flight": dict(self.in_flight)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServerState:
        return cls(held=frozenset(d.get("held", ())), in_flight=dict(d.get("in_flight", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ServerState:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Shares:
    """This UE's share of the server's compute (server op time / compute) and of the uplink rate: ``uplink``
    for its weights, ``tensor_uplink`` for a request's cut tensors (None: ``uplink``). The edge server gives
    cut tensors at least the session's equal share of the cell while the allocator may give its weights less
    (``SessionOpened`` / ``ShareChanged.request_uplink_share``, README "Shared cell uplink"), so a narrow UE's
    warm request sends its tensors faster than its weights."""

    compute: float = 1.0
    uplink: float = 1.0
    tensor_uplink: float | None = None

    def __post_init__(self) -> None:
        for label, v in (("compute", self.compute), ("uplink", self.uplink), ("tensor_uplink", self.tensor_uplink)):
            if v is None and label == "tensor_uplink":
                continue
            if not isinstance(v, int | float) or math.isnan(v) or not 0 < v <= 1:
                raise CostGraphError(f"share {label} must be in (0, 1], got {v!r}")

    @property
    def tensor(self) -> float:
        """The cut tensors' uplink share (``tensor_uplink``, else ``uplink``)."""
        return self.uplink if self.tensor_uplink is None else self.tensor_uplink

    def to_dict(self) -> dict[str, float]:
        d = {"compute": self.compute, "uplink": self.uplink}
        if self.tensor_uplink is not None:
            d["tensor_uplink"] = self.tensor_uplink
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Shares:
        t = d.get("tensor_uplink")
        return cls(compute=float(d.get("compute", 1.0)), uplink=float(d.get("uplink", 1.0)),
                   tensor_uplink=None if t is None else float(t))


FULL_SHARE = Shares()
EMPTY_STATE = ServerState()

_WITHIN: dict[tuple[int, int], tuple[frozenset[str], frozenset[str], bool]] = {}


def _within(names: frozenset[str], universe: frozenset[str]) -> bool:
    """``names <= universe``, remembered for the pair of objects (a table's weights within a client's: the same two
    sets for every decision)."""
    key = (id(names), id(universe))
    got = _WITHIN.get(key)
    if got is None or got[0] is not names or got[1] is not universe:
        if len(_WITHIN) > 64:
            _WITHIN.clear()
        got = _WITHIN[key] = (names, universe, names <= universe)
    return got[2]

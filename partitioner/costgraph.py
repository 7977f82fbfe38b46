"""The plain-data cost model every planner works on.

The profiler fills it from a captured torch graph; the partitioner never imports torch. Times are
milliseconds, variances ms^2, sizes bytes. Names are the captured graph's node names, so a plan maps
straight back onto the graph that runtime executes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any


class CostGraphError(ValueError):
    """A cost graph that no planner may use: cycle, dangling reference, negative or NaN cost."""


@dataclass(frozen=True)
class OpCost:
    name: str
    inputs: tuple[str, ...]
    """Tensor sources this op reads: names of earlier ops or of graph inputs (each listed once)."""
    weights: tuple[str, ...] = ()
    """Names of weights (keys of ``CostGraph.weights``) this op reads; a shared weight appears in
    several ops but is uploaded once."""
    out_bytes: int = 0
    """Bytes of this op's output tensor(s): what crosses the link if a consumer is on the other side."""
    ue_ms: float = 0.0
    ue_var: float = 0.0
    server_ms: float = 0.0
    server_var: float = 0.0
    layer: str = ""
    offloadable: bool = True
    """False when the server cannot run this op (e.g. off its allowlist): it is pinned to the UE."""


@dataclass(frozen=True)
class Link:
    """One UE's link to the server. ``rtt_ms`` is a round trip; one-way latency is half of it."""

    uplink_mbps: float
    downlink_mbps: float | None = None
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        for label, v in (("uplink_mbps", self.uplink_mbps), ("downlink_mbps", self.downlink),
                         ("rtt_ms", self.rtt_ms)):
            if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v):
                raise CostGraphError(f"link {label} must be a number, got {v!r}")
        if self.uplink_mbps <= 0 or self.downlink <= 0:
            raise CostGraphError(
                f"link bandwidth must be > 0 Mbps (uplink={self.uplink_mbps}, downlink={self.downlink})")
        if self.rtt_ms < 0:
            raise CostGraphError(f"link rtt_ms must be >= 0, got {self.rtt_ms}")

    @property
    def downlink(self) -> float:
        return self.uplink_mbps if self.downlink_mbps is None else self.downlink_mbps

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2.0

    def up_ms(self, nbytes: float) -> float:
        """Milliseconds to push ``nbytes`` up (1 Mbps = 125 bytes/ms)."""
        return nbytes / (self.uplink_mbps * 125.0)

    def down_ms(self, nbytes: float) -> float:
        return nbytes / (self.downlink * 125.0)


@dataclass(frozen=True)
class CostGraph:
    ops: tuple[OpCost, ...]
    """In a topological order (every op after the sources it reads)."""
    inputs: Mapping[str, int]
    """Graph input name -> bytes. Inputs live on the UE; a server op reading one makes it a sent tensor."""
    outputs: tuple[str, ...]
    """Sources (op or input names) returned to the caller; server-produced ones come back on the downlink."""
    weights: Mapping[str, int] = field(default_factory=dict)
    """Weight name -> bytes, each unique parameter/buffer once."""
    model: str = ""
    model_hash: str = ""
    ue_samples_ms: tuple[tuple[float, ...], ...] | None = None
    """Optional raw per-run UE times: ``ue_samples_ms[i][r]`` is op i in run r. Keeps the correlation
    between ops so the variance of a prefix is measured, not assumed independent."""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "inputs", dict(self.inputs))
        object.__setattr__(self, "weights", dict(self.weights))
        self.validate()

    # ---- structure -------------------------------------------------------------------------
    def validate(self) -> None:
        seen: set[str] = set(self.inputs)
        if len(seen) != len(self.inputs):
            raise CostGraphError("duplicate graph input names")
        for i, op in enumerate(self.ops):
            if op.name in seen:
                raise CostGraphError(f"duplicate name {op.name!r}")
            for src in op.inputs:
                if src not in seen:
                    later = any(o.name == src for o in self.ops[i + 1:])
                    what = "a later op (cycle or non-topological order)" if later else "nothing"
                    raise CostGraphError(f"op {op.name!r} reads {src!r}, which names {what}")
            for w in op.weights:
                if w not in self.weights:
                    raise CostGraphError(f"op {op.name!r} reads unknown weight {w!r}")
            for label in ("ue_ms", "ue_var", "server_ms", "server_var"):
                v = getattr(op, label)
                if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v) or v < 0:
                    raise CostGraphError(f"op {op.name!r} has invalid {label}={v!r} (must be >= 0)")
            if isinstance(op.out_bytes, bool):
                raise CostGraphError(f"op {op.name!r} has a boolean out_bytes={op.out_bytes!r} (must be bytes)")
            if op.out_bytes < 0:
                raise CostGraphError(f"op {op.name!r} has negative out_bytes={op.out_bytes!r}")
            seen.add(op.name)
        for name, b in list(self.weights.items()) + list(self.inputs.items()):
            if isinstance(b, bool):
                raise CostGraphError(f"{name!r} has a boolean size {b!r} (must be a number of bytes)")
            if b < 0:
                raise CostGraphError(f"{name!r} has negative size {b}")
        for out in self.outputs:
            if out not in seen:
                raise CostGraphError(f"output {out!r} names no op or input")
        if self.ue_samples_ms is not None:
            if len(self.ue_samples_ms) != len(self.ops):
                raise CostGraphError("ue_samples_ms must have one row per op")
            if len({len(r) for r in self.ue_samples_ms}) > 1:
                raise CostGraphError("ue_samples_ms rows must all have the same number of runs")

    def __getattr__(self, name: str):
        """``ops`` and ``ue_samples_ms`` of a scaled copy, built on first use (``scaled``); any other missing
        attribute raises."""
        src = self.__dict__.get("_scaled_from") if name in ("ops", "ue_samples_ms") else None
        if src is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        base, ue, server = src
        if name == "ue_samples_ms":
            got = self.__dict__[name] = tuple(tuple(x * ue for x in r) for r in base.ue_samples_ms)
            return got
        new_op = object.__new__
        ops = []
        for o in base.ops:
            d = o.__dict__
            n = new_op(OpCost)
            n.__dict__.update(d, ue_ms=d["ue_ms"] * ue, ue_var=d["ue_var"] * ue * ue, server_ms=d["server_ms"] * server,
                              server_var=d["server_var"] * server * server)
            ops.append(n)
        got = self.__dict__["ops"] = tuple(ops)
        return got

    def scaled_from(self) -> tuple[CostGraph, float, float] | None:
        """(base graph, UE factor, server factor) of a copy made by ``scaled``; None for any other graph."""
        return self.__dict__.get("_scaled_from")

    @cached_property
    def index(self) -> dict[str, int]:
        return {op.name: i for i, op in enumerate(self.ops)}

    @cached_property
    def preds(self) -> tuple[tuple[int, ...], ...]:
        """Op-index predecessors of each op (graph inputs are not ops)."""
        idx = self.index
        return tuple(tuple(idx[s] for s in op.inputs if s in idx) for op in self.ops)

    @cached_property
    def succs(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in self.ops]
        for i, ps in enumerate(self.preds):
            for p in ps:
                out[p].append(i)
        return tuple(tuple(s) for s in out)

    @cached_property
    def output_ops(self) -> frozenset[int]:
        idx = self.index
        return frozenset(idx[o] for o in self.outputs if o in idx)

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weights.values())

    def __len__(self) -> int:
        return len(self.index) if "index" in self.__dict__ else len(self.ops)

    # ---- variants ------------------------------------------------------------------------
    def with_server_costs(self, server_ms: Mapping[str, float], server_var: Mapping[str, float] | None = None,
                          **meta: Any) -> CostGraph:
        """The same graph with server times from the server's own profile (by op name)."""
        server_var = server_var or {}
        ops = tuple(replace(op, server_ms=float(server_ms.get(op.name, op.server_ms)),
                            server_var=float(server_var.get(op.name, op.server_var))) for op in self.ops)
        return replace(self, ops=ops, meta={**self.meta, **meta})

    def with_server_speedup(self, speedup: float) -> CostGraph:
        """What-if: server op time = UE op time / speedup (variance scales by 1/speedup^2)."""
        if not speedup > 0:
            raise CostGraphError(f"server speedup must be > 0, got {speedup}")
        ops = tuple(replace(op, server_ms=op.ue_ms / speedup, server_var=op.ue_var / speedup ** 2)
                    for op in self.ops)
        return replace(self, ops=ops, meta={**self.meta, "server_costs": f"what-if: UE time / {speedup:g}"})

    def scaled(self, ue: float = 1.0, server: float = 1.0) -> CostGraph:
        """The same graph with every UE time x ``ue`` (variance and per-run samples likewise: x ue^2, x ue)
        and every server time x ``server`` (variance x server^2): a calibrated copy of a profile
        (``ue_client.calibration.CostModel.costs``), a UE at another frequency.

        Built without re-validating (scaling by a finite factor > 0 keeps every check true) and keeping
        what depends on the structure only: the index, predecessor and successor tuples, and the
        partitioner's prepared arrays (:func:`partitioner.prep.rescaled`: the same index arrays with the
        times scaled). googlenet (197 ops): 0.08 ms CPU median instead of 0.70 with ``dataclasses.replace`` per op
        (``bench/bench_decisions.py``, column ``copy``; the planner's preparation of a copy comes on top).
        ``ue``, ``server``: finite and > 0 (else ``CostGraphError``); 1 and 1 return ``self``. The copy's
        ``ops`` and ``ue_samples_ms`` are built on first access (the planner's online path reads the prepared
        arrays only), equal to building them at once."""
        for label, f in (("ue", ue), ("server", server)):
            if not isinstance(f, int | float) or not math.isfinite(f) or f <= 0:
                raise CostGraphError(f"scale factor {label} must be a finite number > 0, got {f!r}")
        if ue == 1.0 and server == 1.0:
            return self
        ue, server = float(ue), float(server)
        g = object.__new__(CostGraph)
        # ``ops`` is built on first access (``__getattr__``): the planner works on the prepared arrays, and
        # building an OpCost per op is most of what a copy cost (densenet121: 431 of them per re-plan)
        g.__dict__.update(inputs=self.inputs, outputs=self.outputs, weights=self.weights, model=self.model,
                          model_hash=self.model_hash, meta=self.meta, _scaled_from=(self, ue, server))
        if self.ue_samples_ms is None:
            g.__dict__["ue_samples_ms"] = None
        for k in ("index", "preds", "succs", "output_ops"):  # cached properties: structure only (built once, here)
            g.__dict__[k] = getattr(self, k)
        # the partitioner's prepared arrays are derived from the base's on first use (``prep.prepare`` reads
        # ``_scaled_from``): importing prep here would make a cycle (prep imports this module)
        return g

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = [asdict(op) for op in self.ops]
        d["inputs"] = dict(self.inputs)
        d["weights"] = dict(self.weights)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostGraph:
        """A graph from its JSON document (``to_dict``'s form; a UE's file or a UE's message to the server).
        Raises CostGraphError for what ``validate`` refuses, for a missing or unknown field and for a value
        of the wrong JSON type (``_check_json_types``: ``"ue_ms": true`` was a cost of 1 ms, since a
        Python bool is an int)."""
        _check_json_types(d)
        try:
            ops = tuple(OpCost(**{**op, "inputs": tuple(op["inputs"]), "weights": tuple(op.get("weights", ()))})
                        for op in d["ops"])
            samples = d.get("ue_samples_ms")
            return cls(ops=ops, inputs=d.get("inputs", {}), outputs=tuple(d["outputs"]),
                       weights=d.get("weights", {}), model=d.get("model", ""), model_hash=d.get("model_hash", ""),
                       ue_samples_ms=None if samples is None else tuple(tuple(r) for r in samples),
                       meta=d.get("meta", {}))
        except (KeyError, TypeError) as e:
            raise CostGraphError(f"malformed cost graph JSON: {e}") from e

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> CostGraph:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))


_OP_NUMBERS = ("out_bytes", "ue_ms", "ue_var", "server_ms", "server_var")
_FLOAT_INT = frozenset({float, int})
_OP_NUMBER_SET = frozenset(_OP_NUMBERS)


def _is_number(v: object) -> bool:
    """A JSON number: an int or a float, not a bool (``True`` is the int 1 to Python)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_json_types(d: object) -> None:
    """Refuse (CostGraphError naming the field) a JSON value of the wrong type where ``from_dict``'s
    fields expect one: a boolean, string or null where a number is expected (op costs and ``out_bytes``,
    input and weight sizes, per-run samples), a non-boolean ``offloadable``, names that are not strings.
    Ranges (>= 0, not NaN) are ``validate``'s. Linear in the document."""
    if not isinstance(d, Mapping):
        raise CostGraphError(f"malformed cost graph JSON: the document is a {type(d).__name__}, not an object")
    ops = d.get("ops")
    if not isinstance(ops, list | tuple):
        raise CostGraphError("malformed cost graph JSON: ops must be a list of objects")
    if not _ops_well_typed(ops):
        _name_the_bad_op(ops)
    _check_sizes_and_samples(d, ops)


def _ops_well_typed(ops: list | tuple) -> bool:
    """The common case, checked with set comprehensions (no call per value): every op an object whose name is
    a string, whose numbers are ints or floats, ``offloadable`` a bool, ``inputs``/``weights`` lists of names."""
    try:
        if {type(op) for op in ops} - {dict}:
            return False
        if {type(op.get("name")) for op in ops} - {str}:
            return False
        if {type(v) for op in ops for k, v in op.items() if k in _OP_NUMBER_SET} - _FLOAT_INT:
            return False
        if {type(op["offloadable"]) for op in ops if "offloadable" in op} - {bool}:
            return False
        if {type(op.get(k, ())) for op in ops for k in ("inputs", "weights")} - {list, tuple}:
            return False
        return not {type(r) for op in ops for k in ("inputs", "weights") for r in op.get(k, ())} - {str}
    except (TypeError, AttributeError):
        return False


def _name_the_bad_op(ops: list | tuple) -> None:
    """Raise CostGraphError naming the first op with a field of the wrong JSON type."""
    for i, op in enumerate(ops):
        if not isinstance(op, Mapping):
            raise CostGraphError(f"malformed cost graph JSON: op #{i} is not an object")
        name = op.get("name")
        if type(name) is not str:
            raise CostGraphError(f"op #{i}'s name must be a string, got {repr(name)[:32]}")
        for label in _OP_NUMBERS:
            if label in op and not _is_number(op[label]):
                raise CostGraphError(f"op {name!r} has invalid {label}={repr(op[label])[:32]} (must be a number)")
        if "offloadable" in op and type(op["offloadable"]) is not bool:
            raise CostGraphError(f"op {name!r} has offloadable={repr(op['offloadable'])[:32]} (must be true or false)")
        for label in ("inputs", "weights"):
            refs = op.get(label, ())
            if not isinstance(refs, list | tuple) or not all(type(r) is str for r in refs):
                raise CostGraphError(f"op {name!r}'s {label} must be a list of names")


def _check_sizes_and_samples(d: Mapping[str, Any], ops: list | tuple) -> None:
    """Input and weight sizes JSON numbers, per-run samples numbers >= 0 (CostGraphError naming the field)."""
    for label in ("inputs", "weights"):
        sizes = d.get(label, {})
        if not isinstance(sizes, Mapping):
            raise CostGraphError(f"malformed cost graph JSON: {label} must be an object of name -> bytes")
        for k, b in sizes.items():
            if not _is_number(b):
                raise CostGraphError(f"{label[:-1]} {k!r} has size {repr(b)[:32]} (must be a number of bytes)")
    samples = d.get("ue_samples_ms")
    if samples is not None:
        if not isinstance(samples, list | tuple):
            raise CostGraphError("ue_samples_ms must be a list of rows (one per op)")
        for i, row in enumerate(samples):
            if not isinstance(row, list | tuple):
                raise CostGraphError(f"ue_samples_ms row {i} must be a list of numbers")
            if row and set(map(type, row)) <= _FLOAT_INT and min(row) >= 0 and (t := sum(row)) == t:
                continue  # all numbers >= 0, no NaN (a NaN makes the sum NaN): C-speed, the common case
            for v in row:
                if not _is_number(v) or not v >= 0:
                    op_name = ops[i].get("name") if i < len(ops) else f"#{i}"
                    raise CostGraphError(f"ue_samples_ms of op {op_name!r} has {repr(v)[:32]} "
                                         "(must be numbers >= 0)")


# A scaled copy builds ``ue_samples_ms`` on first access (``CostGraph.__getattr__``), which a class attribute
# (the field's default, set by ``dataclass``) would shadow: every instance has the field in its ``__dict__``
# (``__init__`` sets it) or builds it there, so the class attribute is not needed.
del CostGraph.ue_samples_ms


def chain(costs: Iterable[tuple[float, float, int, int]], input_bytes: int = 0) -> CostGraph:
    """A chain graph from (ue_ms, server_ms, out_bytes, weight_bytes) tuples: handy for tests and docs."""
    ops, weights = [], {}
    prev = "x"
    for i, (a, c, d, w) in enumerate(costs):
        name = f"op{i}"
        wn = (f"w{i}",) if w else ()
        if w:
            weights[f"w{i}"] = w
        ops.append(OpCost(name=name, inputs=(prev,), weights=wn, out_bytes=d, ue_ms=a, server_ms=c))
        prev = name
    return CostGraph(ops=tuple(ops), inputs={"x": input_bytes}, outputs=(prev,), weights=weights)

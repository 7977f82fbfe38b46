"""The result of profiling a graph on one device: plain data with a JSON form and per-layer views."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass(frozen=True)
class OpStats:
    name: str
    layer: str
    target: str
    mean_ms: float
    """Calibrated mean (per-op means sum to the whole-graph median)."""
    var_ms2: float
    raw_mean_ms: float
    out_bytes: int
    weight_bytes: int
    """Bytes of the weights this op is the first reader of (a shared weight counts once)."""


@dataclass(frozen=True)
class LayerStats:
    layer: str
    ops: int
    mean_ms: float
    var_ms2: float
    """Variance of the layer's total over the measured runs (correlation between its ops kept)."""
    out_bytes: int
    """Bytes leaving the layer's last op (what a cut right after this layer would send)."""
    weight_bytes: int


@dataclass(frozen=True)
class GraphProfile:
    model: str
    model_hash: str
    device: str
    threads: int
    torch_version: str
    runs: int
    warmup: int
    ops: tuple[OpStats, ...]
    samples_ms: tuple[tuple[float, ...], ...]
    """samples_ms[i][r]: op i in timed run r (calibrated)."""
    whole_model_ms: float
    whole_model_samples_ms: tuple[float, ...]
    calibration: float
    total_weight_bytes: int
    profile_seconds: float = 0.0
    eager_model_ms: float | None = None
    """Median of the eager model's forward timed in the same loop (when the module was given)."""
    device_info: dict = field(default_factory=dict, compare=False)

    @property
    def sum_mean_ms(self) -> float:
        return sum(op.mean_ms for op in self.ops)

    @property
    def raw_sum_mean_ms(self) -> float:
        return sum(op.raw_mean_ms for op in self.ops)

    @property
    def run_totals_ms(self) -> list[float]:
        return [sum(col) for col in zip(*self.samples_ms)] if self.samples_ms else []

    def per_layer(self, depth: int | None = None) -> list[LayerStats]:
        """Group consecutive ops by module path (cut to ``depth`` components), in graph order."""
        groups: list[tuple[str, list[int]]] = []
        for i, op in enumerate(self.ops):
            key = op.layer or "(top)"
            if depth is not None and op.layer:
                key = ".".join(op.layer.split(".")[:depth])
            if groups and groups[-1][0] == key:
                groups[-1][1].append(i)
            else:
                groups.append((key, [i]))
        out = []
        for key, idx in groups:
            nruns = len(self.samples_ms[0]) if self.samples_ms and self.samples_ms[0] else 0
            totals = [sum(self.samples_ms[i][r] for i in idx) for r in range(nruns)]
            mean = sum(self.ops[i].mean_ms for i in idx)
            var = 0.0
            if len(totals) > 1:
                m = sum(totals) / len(totals)
                var = sum((t - m) ** 2 for t in totals) / (len(totals) - 1)
            out.append(LayerStats(layer=key, ops=len(idx), mean_ms=mean, var_ms2=var,
                                  out_bytes=self.ops[idx[-1]].out_bytes,
                                  weight_bytes=sum(self.ops[i].weight_bytes for i in idx)))
        return out

    # ---- JSON (the documented `coinfer-ue profile --json` shape plus what a cache needs) ------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["ops"] = [asdict(op) for op in self.ops]
        d["sum_mean_ms"] = self.sum_mean_ms
        d["raw_sum_mean_ms"] = self.raw_sum_mean_ms
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> GraphProfile:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["ops"] = tuple(OpStats(**op) for op in d["ops"])
        kw["samples_ms"] = tuple(tuple(r) for r in d["samples_ms"])
        kw["whole_model_samples_ms"] = tuple(d["whole_model_samples_ms"])
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> GraphProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))

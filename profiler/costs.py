"""Turn a captured graph and measured profiles into the partitioner's plain-data CostGraph."""

from __future__ import annotations

from collections.abc import Mapping

from modelgraph import ModelGraph, split_ref
from modelgraph.allowlist import is_allowed
from partitioner import CostGraph, OpCost
from profiler.profile import GraphProfile


def cost_graph(graph: ModelGraph, profile: GraphProfile | None = None,
               server_costs: Mapping[str, tuple[float, float]] | None = None) -> CostGraph:
    """UE costs from ``profile`` (zeros if None), server costs (mean, var) by op name if known."""
    if profile is not None and profile.model_hash != graph.model_hash:
        raise ValueError(f"profile is for model {profile.model_hash}, graph is {graph.model_hash}")
    stats = {op.name: op for op in profile.ops} if profile else {}
    server_costs = server_costs or {}
    ops = []
    for op in graph.ops:
        srcs = tuple(dict.fromkeys(split_ref(r)[0] for r in op.tensor_inputs))
        st = stats.get(op.name)
        sm, sv = server_costs.get(op.name, (0.0, 0.0))
        ops.append(OpCost(
            name=op.name, inputs=srcs, weights=op.weight_inputs, out_bytes=graph.used_out_bytes(op),
            ue_ms=st.mean_ms if st else 0.0, ue_var=st.var_ms2 if st else 0.0,
            server_ms=float(sm), server_var=float(sv), layer=op.layer, offloadable=is_allowed(op.target)))
    outputs = tuple(dict.fromkeys(split_ref(o)[0] for o in graph.outputs))
    meta = {"model_hash": graph.model_hash}
    if profile is not None:
        meta.update(ue_device=profile.device, ue_threads=profile.threads, ue_whole_model_ms=profile.whole_model_ms)
    return CostGraph(
        ops=tuple(ops), inputs={n: m.nbytes for n, m in graph.inputs.items()}, outputs=outputs,
        weights={n: m.nbytes for n, m in graph.weights.items()}, model=graph.name, model_hash=graph.model_hash,
        ue_samples_ms=profile.samples_ms if profile else None, meta=meta)

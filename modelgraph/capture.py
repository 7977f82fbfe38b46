"""Capture any nn.Module as a ModelGraph with torch.export (ATen level, functional)."""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from collections.abc import Sequence

import torch
from torch.export.graph_signature import InputKind, OutputKind

from modelgraph.allowlist import op_name
from modelgraph.argcodec import encode
from modelgraph.errors import CaptureError, ModelGraphError
from modelgraph.graph import ModelGraph, OpNode
from modelgraph.tensors import TensorMeta
from modelgraph.tracelock import TORCH_TRACE_LOCK

log = logging.getLogger(__name__)

_WEIGHT_KINDS = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}


def _meta(val: object, where: str) -> TensorMeta:
    if not isinstance(val, torch.Tensor):
        raise CaptureError(f"{where} produces a non-tensor value ({type(val).__name__}); "
                           "only tensor-valued ops can be represented")
    return TensorMeta.of(val)


def _layer_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def capture(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, name: str = "") -> ModelGraph:
    """Export ``module`` (in eval mode) and turn the functional ATen graph into a ModelGraph.

    Parameters, buffers and constants become named weights (a tied weight is one entry); in-place
    ops are functionalised by ``run_decompositions({})`` so no op mutates a tensor that crosses a cut.
    """
    module = module.eval()
    example_inputs = tuple(example_inputs)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example input {i} is a {type(x).__name__}; only tensors are supported")
    # torch.export prints a partial graph to stderr when it fails; keep it for --verbose logs only.
    chatter = io.StringIO()
    try:
        with TORCH_TRACE_LOCK, contextlib.redirect_stderr(chatter):
            ep = torch.export.export(module, example_inputs)
            ep = ep.run_decompositions({})
    except ModelGraphError:
        raise
    except Exception as e:  # torch raises many types here; all mean "cannot capture"
        log.debug("torch.export output:\n%s", chatter.getvalue())
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"torch.export could not capture {name or type(module).__name__}: "
                           f"{type(e).__name__}: {first[:300]}") from e

    sig = ep.graph_signature
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        raise CaptureError("the model mutates its own buffers or inputs during forward "
                           "(e.g. batch norm in training mode); call .eval() or remove the mutation")
    state = {**ep.state_dict, **ep.constants}
    placeholders: dict[str, dict] = {}
    inputs: dict[str, TensorMeta] = {}
    weights: dict[str, TensorMeta] = {}
    weight_values: dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        pname = spec.arg.name
        if spec.kind in _WEIGHT_KINDS:
            value = state[spec.target]
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"constant {spec.target!r} is not a tensor")
            value = value.detach()
            weights[spec.target] = TensorMeta.of(value, keep_stride=False)
            weight_values[spec.target] = value.contiguous()
            placeholders[pname] = {"w": spec.target}
        elif spec.kind == InputKind.USER_INPUT:
            placeholders[pname] = {"t": pname}
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind.name} ({pname})")

    aliases: dict[str, str] = {}  # getitem node -> "<producer>#<i>"
    ops: list[OpNode] = []
    multi: set[str] = set()

    def ref_of(node: torch.fx.Node) -> dict:
        if node.name in placeholders:
            return placeholders[node.name]
        if node.name in aliases:
            return {"t": aliases[node.name]}
        if node.name in multi:
            raise CaptureError(f"op {node.name} passes a whole tuple of tensors to another op")
        return {"t": node.name}

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if placeholders.get(node.name, {}).get("t"):
                inputs[node.name] = _meta(node.meta.get("val"), f"input {node.name}")
            continue
        if node.op == "output":
            outs = node.args[0]
            break
        if node.op != "call_function":
            raise CaptureError(f"unsupported node {node.op} {node.name}")
        if node.target is operator.getitem:
            src, idx = node.args
            if src.name not in multi:
                raise CaptureError(f"getitem on non-tuple node {src.name}")
            aliases[node.name] = f"{src.name}#{idx}"
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            raise CaptureError(f"node {node.name} calls {node.target!r}, not an ATen op")
        val = node.meta.get("val")
        is_multi = isinstance(val, list | tuple)
        if is_multi:
            outputs = tuple(_meta(v, f"{node.name}[{i}]") if isinstance(v, torch.Tensor)
                            else TensorMeta((0,), "float32") for i, v in enumerate(val))
            multi.add(node.name)
        else:
            outputs = (_meta(val, node.name),)
        ops.append(OpNode(
            name=node.name, target=op_name(node.target),
            args=tuple(encode(a, ref_of) for a in node.args),
            kwargs={k: encode(v, ref_of) for k, v in node.kwargs.items()},
            outputs=outputs, multi=is_multi, layer=_layer_of(node),
        ))
    else:  # pragma: no cover - fx graphs always end with an output node
        raise CaptureError("graph has no output node")

    out_refs = []
    for o in (outs if isinstance(outs, list | tuple) else [outs]):
        r = ref_of(o)
        if "w" in r:
            raise CaptureError("a model output is a parameter/buffer itself; not supported")
        out_refs.append(r["t"])
    used_weights = {w for op in ops for w in op.weight_inputs}
    unused = [w for w in weights if w not in used_weights]
    if unused:
        log.debug("dropping %d weights no op reads: %s", len(unused), unused[:5])
        for w in unused:
            weights.pop(w)
            weight_values.pop(w)
    graph = ModelGraph(name=name or type(module).__name__, ops=tuple(ops), inputs=inputs,
                       outputs=tuple(out_refs), weights=weights, weight_values=weight_values)
    log.debug("captured %s: %d ops, %d weights (%.1f MiB)", graph.name, len(ops), len(weights),
              graph.total_weight_bytes / 2**20)
    return graph

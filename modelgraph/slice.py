"""The server part of a model as self-contained, validated plain data, and its binary form.

A ``SliceSpec`` is what a UE sends to a server that has never seen the model: ops (allowlisted
ATen overloads with JSON arguments), the cut tensors it will receive, the outputs it must return,
and a manifest of the weights it needs (dtype, shape, sha256). Weights travel as raw contiguous
bytes. Nothing here unpickles, imports, or evaluates anything from the sender.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from modelgraph.allowlist import positional_form, resolve
from modelgraph.argcodec import TensorRef, WeightRef
from modelgraph.errors import (
    CycleError,
    DanglingReferenceError,
    MalformedSliceError,
    ShapeError,
    SliceError,
    WeightIntegrityError,
)
from modelgraph.graph import ModelGraph, OpNode, Split, new_op, split_ref
from modelgraph.kernel_shapes import checked_shapes
from modelgraph.opcall import call_op
from modelgraph.tensors import (
    MAX_RANK,
    TensorMeta,
    contiguous_strides,
    dense_layout,
    restorable_layout,
    tensor_bytes,
    tensor_from_bytes,
    to_dtype,
)
from modelgraph.tracelock import TORCH_TRACE_LOCK

FORMAT_VERSION = 1
_INTS = tuple((int,) * n for n in range(MAX_RANK + 1))  # element types of an all-int list of length n
MAX_OPS = 100_000
UNUSED_OUTPUT_SLACK_BYTES = 1 << 20
"""How much larger than declared an output that nothing reads or returns may be (its op's transient)."""
MAGIC = b"CFSLICE1"
CHECK_EVERY_META_RUNS = 16
"""How many meta-kernel runs (memo misses) validation makes between two calls of its ``check`` (at ~0.4-1.4 ms per
run on this project's machines, ~10-25 ms of CPU; a memo hit costs microseconds and is not counted)."""
CHECK_EVERY_OPS = 4096
"""How many ops the structural checks walk between two calls of ``check`` (a few microseconds per op)."""


@dataclass(frozen=True)
class WeightEntry:
    name: str
    meta: TensorMeta
    sha256: str = ""
    """Hex sha256 of the contiguous bytes; empty in a weightless spec (profiling only)."""

    def to_json(self) -> dict:
        return {**self.meta.to_json(), "sha256": self.sha256}


@dataclass(frozen=True)
class SliceSpec:
    ops: tuple[OpNode, ...]
    inputs: Mapping[str, TensorMeta]
    """Cut tensors the UE sends, by ref, with the producer's metadata (strides included)."""
    outputs: tuple[str, ...]
    weights: Mapping[str, WeightEntry]
    model_hash: str = ""

    @cached_property
    def graph_hash(self) -> str:
        """Hash of everything but weight contents: the server's profile cache key.

        sha256 of one canonical JSON document (sorted keys, no spaces): the format version, the model
        hash, a table of the distinct output metadata (first use first), per op ``[name, target, args,
        kwargs, [output metadata positions in the table], multi, layer]``, the inputs, the outputs and
        the weights' metadata (not their sha256). A function of the spec's values only (equal specs,
        whether parsed or built, hash alike), encoded by the C encoder from lists.
        """
        table: list[dict] = []
        position: dict[tuple, int] = {}  # metadata value -> its position in the table
        by_id: dict[int, int] = {}  # id(TensorMeta) -> position (the objects stay alive in self.ops)
        rows = []
        for op in self.ops:
            outs = []
            for m in op.outputs:
                i = by_id.get(id(m))
                if i is None:
                    v = (m.shape, m.dtype, m.stride)
                    i = position.get(v)
                    if i is None:
                        i = position[v] = len(table)
                        table.append(m.to_json())
                    by_id[id(m)] = i
                outs.append(i)
            rows.append([op.name, op.target, op.args, op.kwargs, outs, op.multi, op.layer])
        doc = {
            "version": FORMAT_VERSION,
            "model_hash": self.model_hash,
            "metas": table,
            "ops": rows,
            "inputs": {k: v.to_json() for k, v in self.inputs.items()},
            "outputs": list(self.outputs),
            "weights": {k: w.meta.to_json() for k, w in self.weights.items()},
        }
        # args/kwargs are parsed JSON or argcodec.encode's output: trees, never cycles
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), check_circular=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def weight_bytes(self) -> int:
        return sum(w.meta.nbytes for w in self.weights.values())

    def to_dict(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "model_hash": self.model_hash,
            "ops": [op.to_json() for op in self.ops],
            "inputs": {k: v.to_json() for k, v in self.inputs.items()},
            "outputs": list(self.outputs),
            "weights": {k: w.to_json() for k, w in self.weights.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> SliceSpec:
        """Parse and structurally check; semantic checks happen in ``validate``."""
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MalformedSliceError(f"slice spec is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> SliceSpec:
        if not isinstance(d, dict):
            raise MalformedSliceError("slice spec must be a JSON object")
        if type(d.get("version")) is not int or d["version"] != FORMAT_VERSION:  # (true == 1 to Python)
            raise MalformedSliceError(f"unsupported slice format version {d.get('version')!r} "
                                      f"(this side speaks {FORMAT_VERSION})")
        ops_raw, inputs_raw, weights_raw = d.get("ops"), d.get("inputs"), d.get("weights")
        outputs = d.get("outputs")
        if not isinstance(ops_raw, list) or not isinstance(inputs_raw, dict) or not isinstance(weights_raw, dict) \
                or not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise MalformedSliceError("slice spec needs ops (list), inputs (object), outputs (list of names) "
                                      "and weights (object)")
        if len(ops_raw) > MAX_OPS:
            raise MalformedSliceError(f"slice has {len(ops_raw)} ops; the limit is {MAX_OPS}")
        ops = []
        metas: dict[tuple, TensorMeta] = {}  # one object per distinct metadata (long slices repeat them)

        def meta_of(m: Any) -> TensorMeta:
            if type(m) is dict and len(m) <= 3:
                shape, stride = m.get("shape"), m.get("stride")
                # exact ints only (1.0 and True equal 1 as keys): compare the element types at C speed
                if type(shape) is list and len(shape) <= MAX_RANK and tuple(map(type, shape)) == _INTS[len(shape)] \
                        and (stride is None or (type(stride) is list and len(stride) <= MAX_RANK
                                                and tuple(map(type, stride)) == _INTS[len(stride)])):
                    key = (tuple(shape), m.get("dtype"), None if stride is None else tuple(stride))
                    try:
                        hit = metas.get(key)
                    except TypeError:  # an unhashable dtype: let from_json say what is wrong
                        return TensorMeta.from_json(m)
                    if hit is None:
                        hit = metas[key] = TensorMeta.from_json(m)
                    return hit
            return TensorMeta.from_json(m)

        for i, o in enumerate(ops_raw):
            if type(o) is not dict:
                raise MalformedSliceError(f"op #{i} is malformed: needs name, target, args, kwargs, outputs")
            name, target, args, kwargs, outs = (o.get("name"), o.get("target"), o.get("args", []),
                                                o.get("kwargs", {}), o.get("outputs"))
            if type(name) is not str or type(target) is not str or type(args) is not list \
                    or type(kwargs) is not dict or type(outs) is not list or not outs:
                raise MalformedSliceError(f"op #{i} is malformed: needs name, target, args, kwargs, outputs")
            layer, multi = o.get("layer", ""), o.get("multi", False)
            if type(multi) is not bool:
                raise MalformedSliceError(f"op {name!r}: multi must be true or false, got {str(multi)[:32]!r}")
            m = outs[0]
            shape = m.get("shape") if type(m) is dict else None
            if len(outs) == 1 and type(shape) is list and len(m) == 2 and "dtype" in m and len(shape) <= MAX_RANK \
                    and tuple(map(type, shape)) == _INTS[len(shape)]:  # one contiguous output: meta_of inlined
                key = (tuple(shape), m["dtype"], None)
                try:
                    meta = metas.get(key)
                except TypeError:  # an unhashable dtype: let from_json say what is wrong
                    meta = TensorMeta.from_json(m)
                if meta is None:
                    meta = metas[key] = TensorMeta.from_json(m)
                out_metas = (meta,)
            else:
                out_metas = tuple([meta_of(m) for m in outs])
            args, kwargs = positional_form(target, tuple(args), dict(kwargs)) if kwargs else (tuple(args), {})
            ops.append(new_op(name, target, args, kwargs, out_metas, multi,
                              layer if type(layer) is str else str(layer)))
        inputs = {str(k): TensorMeta.from_json(v) for k, v in inputs_raw.items()}
        weights = {}
        for k, v in weights_raw.items():
            sha = v.get("sha256", "") if isinstance(v, dict) else None
            if not isinstance(sha, str):
                raise MalformedSliceError(f"weight {k!r}: sha256 must be a hex string")
            weights[str(k)] = WeightEntry(str(k), TensorMeta.from_json(v), sha)
        return cls(tuple(ops), inputs, tuple(outputs), weights, str(d.get("model_hash", "")))


def make_slice(graph: ModelGraph, split: Split, *, with_hashes: bool = True) -> SliceSpec:
    """The self-contained server part of ``graph`` for ``split``."""
    ops = tuple(graph.op_by_name[n] for n in split.server_order)
    inputs = {r: graph.meta_of(r) for r in split.cut_tensors}
    weights = {w: WeightEntry(w, graph.weights[w], graph.weight_sha256(w) if with_hashes else "")
               for w in split.server_weights}
    return SliceSpec(ops, inputs, split.server_outputs, weights, graph.model_hash)


# ---- validation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_tensor_bytes: int = 4 << 30
    max_total_bytes: int = 16 << 30
    """Bound on inputs + weights + every op output held at once (no frees assumed): refuse early."""


_EXEC_DEVICE = {"device": None}


def _check_placement(op: OpNode) -> None:
    """A slice places nothing itself: a factory op's ``device`` is the executing side's device (the encoded slot
    ``{"device": null}``, or null) and ``pin_memory`` is null or false. A plain string such as ``"cuda:1"`` or
    ``"cpu"`` passed argcodec (strings are a valid argument type: ``rounding_mode``, ``approximate``) and reached
    the kernel: a client could put tensors on a device the operator did not choose (review17 F2). Every
    allowlisted op takes both keyword-only (checked against the schemas in tests/test_attack17.py).

    Raises MalformedSliceError naming the op and the value."""
    kw = op.kwargs
    if "device" in kw and kw["device"] is not None and kw["device"] != _EXEC_DEVICE:
        raise MalformedSliceError(f"op {op.name!r} ({op.target}): device {kw['device']!r}"[:200]
                                  + ' is not the executing device; a slice may only pass {"device": null}')
    if "pin_memory" in kw and kw["pin_memory"] not in (None, False):
        raise MalformedSliceError(f"op {op.name!r} ({op.target}): pin_memory {kw['pin_memory']!r}"[:200]
                                  + " is not allowed; a slice may only pass null or false")


def validate(spec: SliceSpec, limits: Limits | None = None,
             check: Callable[[], None] | None = None, nondense: set[str] | None = None,
             strides: dict[str, tuple[int, ...]] | None = None) -> tuple[OpNode, ...]:
    """Check a slice before anything runs; returns its ops in an executable (topological) order.

    Order of checks: allowlist, references, cycles, declared sizes, then a shape/dtype propagation
    on meta tensors (no memory, no compute) that must reproduce every declared output.

    ``check`` (optional) is called every ``CHECK_EVERY_OPS`` ops of the structural walk and every
    ``CHECK_EVERY_META_RUNS`` meta-kernel runs of the propagation; whatever it raises ends the validation (the
    server's per-tenant validation CPU budget, ``edge_server.profile_budget``: a slice of 100k ops whose calls
    all differ, e.g. ``tril`` with distinct diagonals, is ~50-140 s of CPU and has no other stopping point).

    ``nondense`` (optional): filled with the refs (cut tensors and op outputs) whose layout is not dense, stride 0
    or gaps, by their declared strides or their meta kernel's (``dense_layout``; the op budget counts the copy a
    kernel makes of such an argument, break33 H2).

    ``strides`` (optional): filled with the strides (in elements) each ref will have at run time where the
    declaration pins them: a cut tensor's declared ones when ``restore_layout`` can give it them
    (``modelgraph.tensors.restorable_layout``; none declared: contiguous), an op output's meta-kernel ones when the
    declaration says the same (or nothing). A ref whose declared strides differ from its meta kernel's is left out
    (the run gets the real kernel's, which the meta kernel may not reproduce). The op budget reads them to cost the
    operand copies of matrix products (``edge_server.op_budget.matmul_copy_bytes``), and trusts an op output's only
    when the op's kernel is known to lay its output out as its meta kernel does.
    """
    limits = limits or Limits()
    produced: dict[str, OpNode] = {}
    inputs, weights = spec.inputs, spec.weights
    skeletons: dict[tuple, tuple] = {}  # one object per distinct call skeleton of this slice
    unresolved: list[OpNode] = []  # ops with a ref not read from an earlier single-output op
    later: list[str] = []  # op names read by an op at or before their own position: not in execution order
    for i, op in enumerate(spec.ops):
        if check is not None and not i % CHECK_EVERY_OPS:
            check()
        resolve(op.target)
        name = op.name
        if name in produced or name in inputs:
            raise MalformedSliceError(f"duplicate op name {name!r}")
        op.prepare(skeletons)  # decoding validates the argument vocabulary
        kw = op.kwargs
        if kw and ("device" in kw or "pin_memory" in kw):
            _check_placement(op)
        ok = True
        for r in op.tensor_inputs:
            p = produced.get(r)  # only the ops before this one are in ``produced`` yet
            if p is not None and "#" not in r:
                ok = ok and not p.multi
                continue
            if p is None or p.multi:
                ok = False
            dep = r if "#" not in r else split_ref(r)[0]  # the op Kahn's order waits for (if dep is an op)
            if dep not in produced:
                later.append(dep)
        for w in op.weight_inputs:
            if w not in weights:
                ok = False
        if not ok:
            unresolved.append(op)
        produced[name] = op
    for op in unresolved:  # references against every op, in op and argument order: the first problem
        for ref in op.refs:
            if type(ref) is WeightRef:
                if ref.name not in weights:
                    raise DanglingReferenceError(f"op {op.name!r} reads weight {ref.name!r}, not in the manifest")
                continue
            p = produced.get(ref.name)
            if (p is None or p.multi) and not _defined(ref.name, spec, produced):
                raise DanglingReferenceError(f"op {op.name!r} reads tensor {ref.name!r}, which nothing defines")
    for o in spec.outputs:
        if not _defined(o, spec, produced):
            raise DanglingReferenceError(f"output {o!r} names no op output or input")
    if any(dep in produced for dep in later):
        order = _topological(spec.ops, produced)
    else:  # every op reads only earlier ops: Kahn's order (smallest ready index first) is the client's
        order = tuple(spec.ops)

    max_tensor = limits.max_tensor_bytes
    total = 0
    for k, m in inputs.items():
        _check_size("input " + k, m, max_tensor)
        total += m.nbytes
    for k, w in weights.items():
        _check_size("weight " + k, w.meta, max_tensor)
        total += w.meta.nbytes
    checked: set[int] = set()  # ids of metadata objects already checked (the parser shares equal ones)
    for op in order:
        for m in op.outputs:
            if id(m) not in checked:
                _check_size(f"op {op.name}", m, max_tensor)
                checked.add(id(m))
            total += m.nbytes
    if total > limits.max_total_bytes:
        raise ShapeError(f"slice would need {total} bytes of tensors; the limit is {limits.max_total_bytes}")
    with TORCH_TRACE_LOCK:
        _propagate_meta(spec, order, check=None if check is None else _unlocked(check), nondense=nondense,
                        strides=strides)
    return order


def _unlocked(check: Callable[[], None]) -> Callable[[], None]:
    """``check`` run with ``TORCH_TRACE_LOCK`` let go (taken once, by ``validate``): between two ops no torch tracing
    state of ours is live, and the server's ``check`` may block while another tenant's validation takes its turn
    (``edge_server.memory.ValidationSlot``), which needs the lock (held across the wait, the two deadlocked)."""

    def run() -> None:
        TORCH_TRACE_LOCK.release()
        try:
            check()
        finally:
            TORCH_TRACE_LOCK.acquire()

    return run


def _check_size(label: str, meta: TensorMeta, max_tensor_bytes: int) -> None:
    if meta.nbytes > max_tensor_bytes:
        raise ShapeError(f"{label} declares {meta.nbytes} bytes (shape {list(meta.shape)}); "
                         f"the per-tensor limit is {max_tensor_bytes}")
    if meta.storage_nbytes > max_tensor_bytes:
        raise ShapeError(f"{label} declares stride {list(meta.stride or ())} spanning {meta.storage_nbytes} "
                         f"bytes; the per-tensor limit is {max_tensor_bytes}")


def _defined(ref: str, spec: SliceSpec, produced: Mapping[str, OpNode]) -> bool:
    if ref in spec.inputs:
        return True
    name, idx = split_ref(ref)
    op = produced.get(ref) or produced.get(name)
    if op is None:
        return False
    if op.multi:
        return idx is not None and 0 <= idx < len(op.outputs)
    return idx is None


def _topological(ops: tuple[OpNode, ...], produced: Mapping[str, OpNode]) -> tuple[OpNode, ...]:
    """Kahn's algorithm, O(n log n + edges): ready ops run in the order the client sent them, so a
    slice that is already in execution order keeps it."""
    index = {op.name: i for i, op in enumerate(ops)}
    get = index.get
    deps = [{j for j in (get(r) if "#" not in r else get(split_ref(r)[0]) for r in op.tensor_inputs) if j is not None}
            for op in ops]
    consumers: list[list[int]] = [[] for _ in ops]
    indegree = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            consumers[j].append(i)
    ready = [i for i, n in enumerate(indegree) if n == 0]
    heapq.heapify(ready)
    order: list[OpNode] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(ops[i])
        for c in consumers[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    if len(order) < len(ops):
        left = {ops[i].name: {ops[j].name for j in deps[i]} for i, n in enumerate(indegree) if n > 0}
        cycle = _find_cycle(left)
        raise CycleError(f"ops depend on each other in a cycle: {' -> '.join(cycle)}")
    return tuple(order)


def _find_cycle(deps: Mapping[str, set[str]]) -> list[str]:
    start = next(iter(deps))
    path, seen = [start], {start: 0}
    node = start
    while True:
        node = next(d for d in deps[node] if d in deps)
        if node in seen:
            return [*path[seen[node]:], node]
        seen[node] = len(path)
        path.append(node)


_Sig = tuple  # (shape, stride, dtype, storage_offset) of a meta tensor: all a meta kernel sees of it


def _sig(t: torch.Tensor) -> _Sig:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.storage_offset())


def _materialize(sig: _Sig) -> torch.Tensor:
    shape, stride, dtype, offset = sig
    if not offset:
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    span = 1 + sum((d - 1) * s for d, s in zip(shape, stride)) if all(shape) else 0
    return torch.empty((offset + span,), dtype=dtype, device="meta").as_strided(shape, stride, offset)


def _propagate_meta(spec: SliceSpec, order: tuple[OpNode, ...], *, memoize: bool = True,
                    check: Callable[[], None] | None = None, nondense: set[str] | None = None,
                    strides: dict[str, tuple[int, ...]] | None = None) -> dict[str, _Sig]:
    """Run every op on meta tensors and compare with the declared outputs; returns the signature
    ``(shape, stride, dtype, storage offset)`` each tensor ref continues with (``memoize=False``: one
    meta-kernel run per op, the reference the memo is tested against).

    Linear in the slice size: an op's meta result depends only on its target, its decoded non-tensor
    arguments and the (shape, stride, dtype, offset) of the tensor at each argument position (no
    allowlisted op mutates or reads values on meta), so each distinct call runs its meta kernel once and
    repeats are a lookup. The memo key is ``(target, multi, call skeleton, signature per tensor and
    weight slot)``: the skeleton (``argcodec.CallForm``) is the whole argument structure with type-tagged
    scalars and each reference replaced by its slot, so aliasing (``add(x, x)`` vs ``add(x, y)``) is
    part of the key too. A result that is not a tensor (a plain op's list) and is read or returned is a
    ShapeError. The memo lives for one slice: at most one entry per op. ``check``: called before every
    ``CHECK_EVERY_META_RUNS``-th meta-kernel run (:func:`validate`). ``nondense`` / ``strides``: filled as
    :func:`validate` says.
    """

    def declared(m: TensorMeta) -> _Sig:
        stride = m.stride if m.stride is not None else contiguous_strides(m.shape)
        return (m.shape, stride, to_dtype(m.dtype), 0)

    sigs: dict[str, _Sig] = {k: declared(m) for k, m in spec.inputs.items()}
    if nondense is not None:
        nondense.update(k for k, m in spec.inputs.items() if m.stride is not None and not dense_layout(*sigs[k][:2]))
    if strides is not None:
        strides.update((k, sigs[k][1]) for k, m in spec.inputs.items() if restorable_layout(*sigs[k][:2]))
    wsigs: dict[str, _Sig] = {k: declared(w.meta) for k, w in spec.weights.items()}
    tensor_sig, weight_sig = sigs.__getitem__, wsigs.__getitem__
    meta_dev = torch.device("meta")
    # Unused extra outputs (e.g. batch norm's saved statistics) may differ between meta kernels
    # and the export's record; only what is read or returned must match.
    used = {r for op in order for r in op.tensor_inputs}
    used.update(spec.outputs)
    memo: dict[Any, tuple] = {}
    decl: dict[int, tuple] = {}  # id(declared TensorMeta) -> (shape, torch dtype, stride or None)
    layouts: dict[tuple, bool] = {}  # (shape, meta stride, declared stride) -> not dense
    runs = 0
    for op in order:
        ws = op.weight_inputs
        # ``multi`` is part of the call: _meta_call gives a multi op's tensors, a plain op's one result
        key = (op.target, op.multi, op.call_skeleton, tuple(map(tensor_sig, op.tensor_inputs)),
               tuple(map(weight_sig, ws)) if ws else ())
        got = memo.get(key) if memoize else None
        if got is None:
            if check is not None and not runs % CHECK_EVERY_META_RUNS:
                check()
            runs += 1
            got = memo[key] = _meta_call(op, sigs, wsigs, meta_dev, call_op)
        outs = op.outputs
        if len(got) != len(outs):
            raise ShapeError(f"op {op.name!r} returns {len(got)} tensors, declared {len(outs)}")
        for i, (r, g, m) in enumerate(zip(op.output_refs() if op.multi else (op.name,), got, outs)):
            if g is None:  # not a tensor (a plain op's list, an int): refused if anything reads or returns it
                if r in used:
                    raise ShapeError(f"op {op.name!r} ({op.target}) output {i} is not a tensor; it is read or "
                                     f"returned as one")
                continue
            d = decl.get(id(m))
            if d is None:
                d = decl[id(m)] = (m.shape, to_dtype(m.dtype), m.stride)
            if g[0] != d[0] or g[2] != d[1]:
                if r in used:
                    raise ShapeError(f"op {op.name!r} output {i} is {list(g[0])} {g[2]}, declared "
                                     f"{list(m.shape)} {m.dtype}")
                # an unused output may differ (meta kernels give batch norm's saved statistics [C], the
                # export [0]) and is freed right after its op (execute.Program), but not hide real bytes
                # from the memory estimate beyond a small slack
                if math.prod(g[0]) * g[2].itemsize > m.nbytes + UNUSED_OUTPUT_SLACK_BYTES:
                    raise ShapeError(f"op {op.name!r} output {i} (unused) is {list(g[0])} {g[2]}, larger than "
                                     f"declared {list(m.shape)} {m.dtype}")
            if nondense is not None:
                lay = (g[0], g[1], d[2])
                sparse = layouts.get(lay)
                if sparse is None:
                    sparse = layouts[lay] = not (dense_layout(g[0], g[1])
                                                 and (d[2] is None or dense_layout(g[0], d[2])))
                if sparse:
                    nondense.add(r)
            # Meta kernels do not always reproduce the real kernels' output strides (e.g. SDPA), and
            # a later view depends on them: continue from the declared layout (already bounded above).
            if d[2] is not None and g[1] != d[2]:
                g = (g[0], d[2], g[2], 0)
            elif strides is not None:
                strides[r] = g[1]
            sigs[r] = g
    return sigs


def _meta_call(op: OpNode, sigs: Mapping[str, _Sig], wsigs: Mapping[str, _Sig], meta_dev: torch.device,
               call_op) -> tuple:
    """One meta-kernel run of ``op``; returns the signature of each result (None for a non-tensor)."""
    wanted_t = {r for r in op.tensor_inputs}
    env = {r: _materialize(sigs[r]) for r in wanted_t}
    weights = {w: _materialize(wsigs[w]) for w in op.weight_inputs}
    try:
        out = call_op(op, env, weights, meta_dev, _with_meta_device(op))
    except SliceError:
        raise
    except Exception as e:
        raise ShapeError(f"op {op.name!r} ({op.target}) fails on its declared inputs: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if op.multi and not isinstance(out, tuple | list):
        raise ShapeError(f"op {op.name!r} ({op.target}) returns one tensor; declared multi")
    got = tuple(out) if op.multi else (out,)
    return tuple(_sig(t) if isinstance(t, torch.Tensor) else None for t in got)


_RNN_TARGETS = frozenset({"aten.lstm.input", "aten.gru.input", "aten.rnn_tanh.input", "aten.rnn_relu.input"})


def _rnn_one_step(fn):
    """An RNN op's meta kernel run on the input's first time step, the output given its whole time dim back.

    torch's RNN ops have no meta kernel of their own: on meta tensors they decompose and loop over the time
    steps in Python, so a 1 KB slice of one GRU over 10,000 steps took 41 s to validate (an LSTM 80 s; session
    15, attack15), and validations run one at a time server-wide. The shapes do not depend on the number of steps
    but for the output's time dim: one step checks every argument (hx, params, flags) as the whole run would. The
    output is laid out as the kernel lays it out: time-major contiguous, transposed for ``batch_first``."""

    def one_step(input, *args, **kwargs):
        batch_first = args[7] if len(args) > 7 else kwargs.get("batch_first", False)
        tdim = 1 if batch_first and input.dim() == 3 else 0
        steps = input.shape[tdim] if input.dim() else 0
        if steps <= 1:
            return fn(input, *args, **kwargs)
        if batch_first and input.dim() != 3:
            raise ValueError(f"batch_first needs a 3-D input, got {input.dim()}-D")  # as the whole run fails
        out = fn(input.narrow(tdim, 0, 1), *args, **kwargs)
        y = out[0]
        shape = list(y.shape)
        shape[tdim] = steps
        if tdim == 1:
            shape[0], shape[1] = shape[1], shape[0]
        full = torch.empty(shape, dtype=y.dtype, device=y.device)
        return (full.transpose(0, 1) if tdim == 1 else full, *out[1:])

    return one_step


def _with_meta_device(op: OpNode):
    """The op's kernel with ``device=meta`` forced when its schema takes a device: a factory op
    (full, zeros, arange...) must not allocate for real while its declared shape is being checked; an RNN
    op's kernel run on one time step (:func:`_rnn_one_step`); in every case the shape and argument rules its
    kernels assume checked first (``modelgraph.kernel_shapes.checked_shapes``)."""
    fn = resolve(op.target)
    if op.target in _RNN_TARGETS:  # (its shape rule reads the whole call: checked before the step is taken)
        return checked_shapes(op.target, _rnn_one_step(fn), op.name)
    if not any(a.name == "device" for a in fn._schema.arguments):
        return checked_shapes(op.target, fn, op.name, len(op.outputs))

    def on_meta(*args, **kwargs):
        kwargs["device"] = torch.device("meta")
        return fn(*args, **kwargs)

    return checked_shapes(op.target, on_meta, op.name, len(op.outputs))


# ---- self-contained binary form ----------------------------------------------------------------
def encode_slice(spec: SliceSpec, weights: Mapping[str, torch.Tensor]) -> bytes:
    """MAGIC | u64 header length | header JSON | weight bytes in manifest order. One copy of the bytes."""
    header = spec.to_json().encode()
    parts: list[bytes | memoryview] = [MAGIC, struct.pack("<Q", len(header)), header]
    for name, entry in spec.weights.items():
        buf = tensor_bytes(weights[name])
        if buf.nbytes != entry.meta.nbytes:
            raise WeightIntegrityError(f"weight {name!r} has {buf.nbytes} bytes, manifest says {entry.meta.nbytes}")
        parts.append(buf)
    return b"".join(parts)


def decode_slice(blob: bytes | bytearray | memoryview, *, verify: bool = True,
                 align: bool = True) -> tuple[SliceSpec, dict[str, torch.Tensor]]:
    """Parse a blob from ``encode_slice``; each weight checked against its dtype x shape and (``verify``)
    its sha256. Weights are zero-copy views into ``blob`` where they start 64-byte aligned (or with
    ``align=False``), else views of an aligned copy (``tensors.tensor_from_bytes``: kernels' last bits
    depend on operand alignment)."""
    view = memoryview(blob)
    if view[:len(MAGIC)].tobytes() != MAGIC or view.nbytes < len(MAGIC) + 8:
        raise MalformedSliceError("not a coinfer slice (bad magic)")
    (hlen,) = struct.unpack_from("<Q", view, len(MAGIC))
    start = len(MAGIC) + 8
    if hlen > view.nbytes - start:
        raise MalformedSliceError(f"header length {hlen} exceeds the blob")
    spec = SliceSpec.from_json(view[start:start + hlen].tobytes())
    off = start + hlen
    weights: dict[str, torch.Tensor] = {}
    for name, entry in spec.weights.items():
        n = entry.meta.nbytes
        if off + n > view.nbytes:
            raise WeightIntegrityError(f"weight {name!r}: blob ends after {view.nbytes - off} of {n} bytes")
        chunk = view[off:off + n]
        if verify:
            check_sha256(name, chunk, entry.sha256)
        weights[name] = tensor_from_bytes(chunk, entry.meta, align=align)
        off += n
    if off != view.nbytes:
        raise WeightIntegrityError(f"{view.nbytes - off} trailing bytes after the last weight")
    return spec, weights


def check_sha256(name: str, data: bytes | memoryview, expected: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise WeightIntegrityError(f"weight {name!r}: sha256 {got[:16]}... does not match manifest {expected[:16]}...")


__all__ = ["Limits", "SliceSpec", "TensorRef", "WeightEntry", "decode_slice", "encode_slice", "make_slice",
           "validate"]

"""The server part of a model as self-contained, validated plain data, and its binary form.

A ``SliceSpec`` is what a UE sends to a server that has never seen the model: ops (allowlisted
ATen overloads with JSON arguments), the cut tensors it will receive, the outputs it must return,
and a manifest of the weights it needs (dtype, shape, sha256). Weights travel as raw contiguous
bytes. Nothing here unpickles, imports, or evaluates anything from the sender.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from modelgraph.allowlist import resolve
from modelgraph.argcodec import TensorRef, WeightRef, refs
from modelgraph.errors import (
    CycleError,
    DanglingReferenceError,
    MalformedSliceError,
    ShapeError,
    SliceError,
    WeightIntegrityError,
)
from modelgraph.graph import ModelGraph, OpNode, Split, split_ref
from modelgraph.opcall import call_op
from modelgraph.tensors import TensorMeta, tensor_bytes, tensor_from_bytes, to_dtype
from modelgraph.tracelock import TORCH_TRACE_LOCK

FORMAT_VERSION = 1
MAX_OPS = 100_000
MAGIC = b"CFSLICE1"


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
        """Hash of everything but weight contents: the server's profile cache key."""
        d = self.to_dict()
        for w in d["weights"].values():
            w.pop("sha256", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]

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
        if d.get("version") != FORMAT_VERSION:
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
        for i, o in enumerate(ops_raw):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not isinstance(o.get("target"), str) \
                    or not isinstance(o.get("args", []), list) or not isinstance(o.get("kwargs", {}), dict) \
                    or not isinstance(o.get("outputs"), list) or not o["outputs"]:
                raise MalformedSliceError(f"op #{i} is malformed: needs name, target, args, kwargs, outputs")
            ops.append(OpNode(name=o["name"], target=o["target"], args=tuple(o.get("args", [])),
                              kwargs=dict(o.get("kwargs", {})),
                              outputs=tuple(TensorMeta.from_json(m) for m in o["outputs"]),
                              multi=bool(o.get("multi", False)), layer=str(o.get("layer", ""))))
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


def validate(spec: SliceSpec, limits: Limits | None = None) -> tuple[OpNode, ...]:
    """Check a slice before anything runs; returns its ops in an executable (topological) order.

    Order of checks: allowlist, references, cycles, declared sizes, then a shape/dtype propagation
    on meta tensors (no memory, no compute) that must reproduce every declared output.
    """
    limits = limits or Limits()
    names: set[str] = set()
    produced: dict[str, OpNode] = {}
    for op in spec.ops:
        resolve(op.target)
        if op.name in names or op.name in spec.inputs:
            raise MalformedSliceError(f"duplicate op name {op.name!r}")
        names.add(op.name)
        produced[op.name] = op
        try:
            op.template  # noqa: B018 - decoding validates the argument vocabulary
        except SliceError:
            raise
    for op in spec.ops:
        for r in refs(list(op.template)):
            if isinstance(r, WeightRef):
                if r.name not in spec.weights:
                    raise DanglingReferenceError(f"op {op.name!r} reads weight {r.name!r}, not in the manifest")
            elif not _defined(r.name, spec, produced):
                raise DanglingReferenceError(f"op {op.name!r} reads tensor {r.name!r}, which nothing defines")
    for o in spec.outputs:
        if not _defined(o, spec, produced):
            raise DanglingReferenceError(f"output {o!r} names no op output or input")
    order = _topological(spec.ops, produced)

    total = 0
    for label, meta in [*(("input " + k, m) for k, m in spec.inputs.items()),
                        *(("weight " + k, w.meta) for k, w in spec.weights.items()),
                        *((f"op {op.name}", m) for op in order for m in op.outputs)]:
        if meta.nbytes > limits.max_tensor_bytes:
            raise ShapeError(f"{label} declares {meta.nbytes} bytes (shape {list(meta.shape)}); "
                             f"the per-tensor limit is {limits.max_tensor_bytes}")
        if meta.storage_nbytes > limits.max_tensor_bytes:
            raise ShapeError(f"{label} declares stride {list(meta.stride or ())} spanning {meta.storage_nbytes} "
                             f"bytes; the per-tensor limit is {limits.max_tensor_bytes}")
        total += meta.nbytes
    if total > limits.max_total_bytes:
        raise ShapeError(f"slice would need {total} bytes of tensors; the limit is {limits.max_total_bytes}")
    with TORCH_TRACE_LOCK:
        _propagate_meta(spec, order)
    return order


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
    deps = {op.name: {split_ref(r)[0] for r in op.tensor_inputs} & produced.keys() for op in ops}
    done: set[str] = set()
    order: list[OpNode] = []
    remaining = list(ops)
    while remaining:
        progress = [op for op in remaining if deps[op.name] <= done]
        if not progress:
            cycle = _find_cycle({op.name: deps[op.name] for op in remaining})
            raise CycleError(f"ops depend on each other in a cycle: {' -> '.join(cycle)}")
        ready = {op.name for op in progress}
        order.extend(progress)
        done |= ready
        remaining = [op for op in remaining if op.name not in ready]
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


def _propagate_meta(spec: SliceSpec, order: tuple[OpNode, ...]) -> None:

    def meta_tensor(m: TensorMeta) -> torch.Tensor:
        if m.stride is not None:
            return torch.empty_strided(m.shape, m.stride, dtype=to_dtype(m.dtype), device="meta")
        return torch.empty(m.shape, dtype=to_dtype(m.dtype), device="meta")

    env = {k: meta_tensor(m) for k, m in spec.inputs.items()}
    weights = {k: meta_tensor(w.meta) for k, w in spec.weights.items()}
    meta_dev = torch.device("meta")
    # Unused extra outputs (e.g. batch norm's saved statistics) may differ between meta kernels
    # and the export's record; only what is read or returned must match.
    used = {r for op in order for r in op.tensor_inputs} | set(spec.outputs)
    for op in order:
        try:
            out = call_op(op, env, weights, meta_dev, _with_meta_device(op))
        except SliceError:
            raise
        except Exception as e:
            raise ShapeError(f"op {op.name!r} ({op.target}) fails on its declared inputs: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        got = out if op.multi else (out,)
        if len(got) != len(op.outputs):
            raise ShapeError(f"op {op.name!r} returns {len(got)} tensors, declared {len(op.outputs)}")
        for i, (r, t, m) in enumerate(zip(op.output_refs(), got, op.outputs)):
            if not isinstance(t, torch.Tensor) or r not in used:
                continue
            if tuple(t.shape) != m.shape or t.dtype != to_dtype(m.dtype):
                raise ShapeError(f"op {op.name!r} output {i} is {list(t.shape)} {t.dtype}, declared "
                                 f"{list(m.shape)} {m.dtype}")
        for r, t, m in zip(op.output_refs(), got, op.outputs):
            # Meta kernels do not always reproduce the real kernels' output strides (e.g. SDPA), and
            # a later view depends on them: continue from the declared layout (already bounded above).
            if isinstance(t, torch.Tensor) and m.stride is not None and tuple(t.stride()) != m.stride:
                t = torch.empty_strided(m.shape, m.stride, dtype=t.dtype, device="meta")
            env[r] = t


def _with_meta_device(op: OpNode):
    """The op's kernel with ``device=meta`` forced when its schema takes a device: a factory op
    (full, zeros, arange...) must not allocate for real while its declared shape is being checked."""
    fn = resolve(op.target)
    if not any(a.name == "device" for a in fn._schema.arguments):
        return fn

    def on_meta(*args, **kwargs):
        kwargs["device"] = torch.device("meta")
        return fn(*args, **kwargs)

    return on_meta


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


def decode_slice(blob: bytes | bytearray | memoryview, *,
                 verify: bool = True) -> tuple[SliceSpec, dict[str, torch.Tensor]]:
    """Parse a blob from ``encode_slice``; weights are zero-copy views into ``blob``, each checked
    against its dtype x shape and (``verify``) its sha256."""
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
        weights[name] = tensor_from_bytes(chunk, entry.meta)
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

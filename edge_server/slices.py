"""The edge server's view of a slice: the only module that talks to ``modelgraph``'s slice API.

``compile_slice`` parses the JSON a client sent, runs every modelgraph check (allowlist, references,
cycles, declared sizes, shape/dtype propagation on meta tensors) and precomputes what the session's
executor needs per op: which cut tensors and which weights (by sha256) it waits for. Any problem is an
:class:`SliceRejected` (INVALID_ARGUMENT) naming the modelgraph error class and the problem.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

import modelgraph
from edge_server.errors import InvalidArgument
from edge_server.op_budget import OpLimits, SliceCost, check_slice_budget, estimate_slice
from modelgraph import SliceError, SliceProgram, SliceSpec, TensorMeta
from modelgraph.allowlist import ALLOWED_OPS
from modelgraph.slice import MAX_OPS
from modelgraph.tracelock import TORCH_TRACE_LOCK  # re-exported: validation and capture share it

_SHA_RE = re.compile(r"[0-9a-f]{64}")

__all__ = [
    "MAX_OPS",
    "TORCH_TRACE_LOCK",
    "CompiledSlice",
    "SliceRejected",
    "WeightUse",
    "allowed_ops",
    "allowed_ops_hash",
    "compile_slice",
    "parse_spec",
    "spec_text",
    "weight_tensor",
]


class SliceRejected(InvalidArgument):
    """The slice spec must not run; the message names the problem."""


@dataclass(frozen=True, slots=True)
class WeightUse:
    """A weight of a slice as the executor needs it."""

    name: str
    sha256: str
    meta: TensorMeta


@dataclass(eq=False)
class CompiledSlice:
    slice_id: str
    spec: SliceSpec
    program: SliceProgram
    graph_hash: str
    weights: dict[str, WeightUse]
    """Weight name -> use."""
    op_inputs: list[tuple[str, ...]]
    """Per op (in execution order): the cut tensors (slice inputs) it reads."""
    op_weights: list[tuple[str, ...]]
    """Per op: the weight names it reads."""
    cost: SliceCost | None = None
    """Estimated per-op FLOPs/scratch and peak live bytes (``edge_server.op_budget``)."""
    device_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weight name -> tensor on the device, filled by the executor as weights arrive."""

    @property
    def order(self):
        return self.program.order

    @property
    def inputs(self) -> dict[str, TensorMeta]:
        return dict(self.spec.inputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.spec.outputs)

    @property
    def needed_sha256(self) -> set[str]:
        return {w.sha256 for w in self.weights.values()}

    @functools.cached_property
    def batched_products(self) -> bool:
        """Whether the slice has a batched matrix product (``edge_server.precision.has_batched_products``): its
        requests run at "highest" whatever precision they ask (``served_precision``, break42 F1)."""
        from edge_server.precision import has_batched_products

        ranks = {r: len(m.shape) for r, m in self.spec.inputs.items()}
        ranks.update((k, len(w.meta.shape)) for k, w in self.spec.weights.items())
        return has_batched_products(self.spec.ops, ranks)


def _limits(max_tensor_bytes: int, max_slice_bytes: int) -> modelgraph.Limits:
    return modelgraph.Limits(max_tensor_bytes=max_tensor_bytes, max_total_bytes=max_slice_bytes)


def spec_text(spec_json: bytes | str) -> str:
    """The slice spec a client sent as text; SliceRejected if it is empty or not UTF-8."""
    if not spec_json:
        raise SliceRejected("empty slice spec")
    try:
        return spec_json.decode("utf-8") if isinstance(spec_json, bytes | bytearray) else spec_json
    except UnicodeDecodeError:
        raise SliceRejected("slice spec is not UTF-8") from None


def parse_spec(spec_json: bytes | str) -> SliceSpec:
    text = spec_text(spec_json)
    try:
        return SliceSpec.from_json(text)
    except RecursionError:
        raise SliceRejected("MalformedSliceError: slice spec JSON is nested too deeply") from None
    except SliceError as e:
        raise SliceRejected(f"{type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # structure the parser did not expect
        raise SliceRejected(f"MalformedSliceError: {type(e).__name__}: {e}"[:500]) from None


_SIZED_FACTORIES = {"aten.zeros.default", "aten.ones.default", "aten.full.default"}
_ARANGES = {"aten.arange.default", "aten.arange.start", "aten.arange.start_step"}


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def precheck_factory_ops(spec: SliceSpec, max_tensor_bytes: int) -> None:
    """Bound what factory ops (no tensor inputs) would allocate, before anything runs.

    Shape propagation runs ops on meta tensors, but an op with no tensor input and no device argument
    (full, zeros, ones, arange) would allocate for real on the CPU during validation. Their sizes come
    from their arguments: check them against the declared output and the per-tensor limit first.
    """
    for op in spec.ops:
        if op.target not in _SIZED_FACTORIES and op.target not in _ARANGES:
            continue
        args = list(op.args)
        if op.target in _SIZED_FACTORIES:
            size = args[0] if args else op.kwargs.get("size")
            if not isinstance(size, list) or not all(_num(d) is not None and d >= 0 for d in size):
                raise SliceRejected(f"ShapeError: op {op.name!r} ({op.target}) has an invalid size argument")
            numel = math.prod(int(d) for d in size)
        else:
            nums = [_num(a) for a in args]
            if not nums or any(n is None for n in nums[:3]):
                raise SliceRejected(f"ShapeError: op {op.name!r} ({op.target}) has non-numeric bounds")
            start, end, step = (0.0, nums[0], 1.0) if len(nums) == 1 else (nums[0], nums[1], 1.0)
            if len(nums) >= 3:
                step = nums[2]
            if not step:
                raise SliceRejected(f"ShapeError: op {op.name!r} ({op.target}) has step 0")
            numel = max(0, math.ceil((end - start) / step))
        declared = op.outputs[0].numel if op.outputs else -1
        if numel * 16 > max_tensor_bytes or numel != declared:
            raise SliceRejected(
                f"ShapeError: op {op.name!r} ({op.target}) would create {numel} elements; its declared output "
                f"has {declared} (limit {max_tensor_bytes} bytes per tensor)"
            )


def compile_slice(
    spec_json: bytes | str | SliceSpec,
    *,
    slice_id: str = "",
    device: str | torch.device = "cpu",
    max_tensor_bytes: int = 1 << 30,
    max_slice_bytes: int = 4 << 30,
    require_hashes: bool = True,
    op_limits: OpLimits | None = None,
    check: Callable[[], None] | None = None,
) -> CompiledSlice:
    """Parse and validate a slice (CPU work: call it off the event loop for big graphs). ``spec_json`` may
    be a spec already parsed with :func:`parse_spec` (under :func:`gc_paused`), which is not parsed again.

    Raises :class:`SliceRejected` (INVALID_ARGUMENT) for a slice that must not run and
    :class:`~edge_server.op_budget.OpOverBudget` (RESOURCE_EXHAUSTED) for one whose op would exceed
    ``op_limits`` (scratch bytes, time budget, peak bytes; defaults: ``OpLimits()``). ``check`` is called
    periodically while it validates (``modelgraph.slice.validate``; the caller's validation CPU budget,
    ``edge_server.profile_budget.CpuMeter.check``): what it raises ends the validation and is raised here.
    """
    with gc_paused():
        return _compile(spec_json, slice_id, device, max_tensor_bytes, max_slice_bytes, require_hashes, op_limits,
                        check)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a slice compiles. A long slice allocates a few objects per op
    (the parsed JSON, op nodes, templates, metadata), all alive until the end; each allocation burst
    triggered collections, and the full ones walk the whole heap (torch's ~500k objects): more than
    half of the CPU time of a 20k-op slice. Reference counting still frees everything acyclic; the
    collector resumes after. The server compiles one slice at a time (``Bounds.compile_slots``)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _compile(
    spec_json: bytes | str | SliceSpec,
    slice_id: str,
    device: str | torch.device,
    max_tensor_bytes: int,
    max_slice_bytes: int,
    require_hashes: bool,
    op_limits: OpLimits | None,
    check: Callable[[], None] | None = None,
) -> CompiledSlice:
    spec = spec_json if isinstance(spec_json, SliceSpec) else parse_spec(spec_json)
    precheck_factory_ops(spec, max_tensor_bytes)
    try:
        program = SliceProgram(spec, device, _limits(max_tensor_bytes, max_slice_bytes), check)
    except SliceError as e:
        raise SliceRejected(f"{type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise SliceRejected(f"MalformedSliceError: {type(e).__name__}: {e}"[:500]) from None
    weights: dict[str, WeightUse] = {}
    for name, entry in spec.weights.items():
        if require_hashes and not _SHA_RE.fullmatch(entry.sha256 or ""):
            raise SliceRejected(f"WeightIntegrityError: weight {name!r} has no valid sha256 in the manifest")
        weights[name] = WeightUse(name, entry.sha256, entry.meta)
    cost = estimate_slice(spec, program.order, program.device, program.nondense, program.strides)
    check_slice_budget(spec, program.order, cost, op_limits or OpLimits())
    inputs = set(spec.inputs)
    reads_no_input = inputs.isdisjoint
    op_inputs = [
        () if reads_no_input(t) else tuple([r for r in t if r in inputs])
        for t in [op.tensor_inputs for op in program.order]
    ]
    op_weights = [op.weight_inputs for op in program.order]  # already a tuple per op
    return CompiledSlice(slice_id, spec, program, spec.graph_hash, weights, op_inputs, op_weights, cost)


_WARMUP_SLICE = json.dumps(
    {
        "version": 1,
        "inputs": {"x": {"shape": [1, 8], "dtype": "float32"}},
        "weights": {"w": {"shape": [8, 8], "dtype": "float32", "sha256": ""}},
        "ops": [
            {
                "name": "r",
                "target": "aten.relu.default",
                "args": [{"t": "x"}],
                "kwargs": {},
                "outputs": [{"shape": [1, 8], "dtype": "float32"}],
            },
            {
                "name": "l",
                "target": "aten.linear.default",
                "args": [{"t": "r"}, {"w": "w"}],
                "kwargs": {},
                "outputs": [{"shape": [1, 8], "dtype": "float32"}],
            },
        ],
        "outputs": ["l"],
    }
)


@functools.cache
def warm_up_validation() -> None:
    """Compile a two-op slice once per process. The first shape propagation on meta tensors imports
    and registers torch's meta kernels and decompositions (about 1.3-1.8 CPU s on this project's
    machine); the server does it at start so that no client's first slice pays it (and the
    validation time of a slice is its own)."""
    compile_slice(_WARMUP_SLICE, require_hashes=False)


def allowed_ops() -> list[str]:
    return sorted(ALLOWED_OPS)


def allowed_ops_hash() -> str:
    import hashlib

    return hashlib.sha256("\n".join(allowed_ops()).encode()).hexdigest()


def _not_01(data) -> bool:
    """True when the bytes-like ``data`` holds a byte other than 0 and 1 (C speed: one copy, one delete)."""
    return bool(bytes(data).translate(None, b"\x00\x01"))


def weight_tensor(data: bytearray, meta: TensorMeta, device: torch.device) -> torch.Tensor:
    """A stored weight's bytes as a tensor of the slice's dtype/shape/layout on ``device``.

    On CPU this is a zero-copy view of the store's (pinned, never modified) buffer. The bytes are read
    under the meta of the slice that uses them (the client's own declaration; the sha256 binds the bytes,
    not a dtype: equal bytes under two metas in one model are one stored weight), never under the meta an
    upload carried. Raises ``modelgraph.errors.WeightIntegrityError`` (INVALID_ARGUMENT for the request)
    when the byte count is not the meta's, or for a bool meta over bytes other than 0 and 1 (the wire's
    bool tensors are refused so, ``tensor_codec``; torch's kernels assume it).
    """
    if meta.dtype == "bool" and _not_01(data):
        from modelgraph.errors import WeightIntegrityError

        raise WeightIntegrityError(f"a bool weight of shape {list(meta.shape)[:8]} holds bytes other than 0 and 1")
    t = modelgraph.tensor_from_bytes(data, TensorMeta(meta.shape, meta.dtype))
    if device.type != "cpu":
        t = t.to(device)
    return modelgraph.restore_layout(t, meta)

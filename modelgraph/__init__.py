"""Capture a torch model as a DAG of ATen ops, slice it, ship a slice safely, run either part.

Mechanism only: this package can cut anywhere; ``partitioner`` decides where.

Users' models as they come (DESIGN §4): ``capture(module, args, kwargs=...)`` records the input and
output pytrees of ``forward`` in ``graph.io`` (see ``modelgraph.pytree_io``); ``graph.bind(args, kwargs)``
flattens run-time inputs (structure, dtype and shape checked, strides made the captured ones) and
``graph.rebuild(values)`` / ``collect_outputs`` / ``run_graph`` return the model's own structure.
"""

from modelgraph.capture import capture
from modelgraph.errors import (
    CaptureError,
    CycleError,
    DanglingReferenceError,
    InputSpecError,
    MalformedSliceError,
    ModelGraphError,
    ModelSourceError,
    OpExecutionError,
    OpNotAllowedError,
    PartitionError,
    ShapeError,
    SliceError,
    WeightIntegrityError,
)
from modelgraph.execute import OpTiming, Program, SliceProgram, collect_outputs, run_graph, run_ue_part
from modelgraph.graph import ModelGraph, OpNode, Split, split_ref
from modelgraph.pinning import PinnedTail, pin_off_allowlist, run_tail
from modelgraph.pytree_io import IOSpec, signature
from modelgraph.signatures import SignatureCache
from modelgraph.slice import Limits, SliceSpec, WeightEntry, decode_slice, encode_slice, make_slice, validate
from modelgraph.sources import LoadedModel, load_model
from modelgraph.tensors import TensorMeta, restore_layout, tensor_bytes, tensor_from_bytes

__all__ = [
    "CaptureError",
    "CycleError",
    "DanglingReferenceError",
    "IOSpec",
    "InputSpecError",
    "Limits",
    "LoadedModel",
    "MalformedSliceError",
    "ModelGraph",
    "ModelGraphError",
    "ModelSourceError",
    "OpExecutionError",
    "OpNode",
    "OpNotAllowedError",
    "OpTiming",
    "PartitionError",
    "PinnedTail",
    "Program",
    "ShapeError",
    "SignatureCache",
    "SliceError",
    "SliceProgram",
    "SliceSpec",
    "Split",
    "TensorMeta",
    "WeightEntry",
    "WeightIntegrityError",
    "capture",
    "collect_outputs",
    "decode_slice",
    "encode_slice",
    "load_model",
    "make_slice",
    "pin_off_allowlist",
    "restore_layout",
    "run_graph",
    "run_tail",
    "run_ue_part",
    "signature",
    "split_ref",
    "tensor_bytes",
    "tensor_from_bytes",
    "validate",
]

"""Typed errors of the model-graph layer: each names the problem precisely so callers can map them
to a CLI exit status or a gRPC status without parsing messages."""

from __future__ import annotations

# One error for a partition that breaks the rules, whoever checks it (the planners on a CostGraph,
# ``ModelGraph.split`` on a captured graph). It lives in the pure partitioner (no torch), the lower of
# the two layers, and is re-exported here for modelgraph's callers. It is a ValueError, not a
# ModelGraphError: the partition is the caller's input, not the model's.
from partitioner.errors import PartitionError as PartitionError


class ModelGraphError(Exception):
    """Base class for everything modelgraph raises on bad input."""


class ModelSourceError(ModelGraphError):
    """A model spec that cannot be turned into a module (unknown name, factory raised, bad weights file)."""


class CaptureError(ModelGraphError):
    """torch.export could not capture the model, or captured something we cannot represent."""


class SliceError(ModelGraphError):
    """A serialised slice that must not run. Subclasses say why."""


class MalformedSliceError(SliceError):
    """Structurally invalid slice data (wrong types, missing fields, bad encoding)."""


class OpNotAllowedError(SliceError):
    """An op outside the server's explicit ATen allowlist."""


class DanglingReferenceError(SliceError):
    """An argument names a tensor or weight that the slice does not define."""


class CycleError(SliceError):
    """The ops of a slice depend on each other in a cycle."""


class ShapeError(SliceError):
    """An absurd or inconsistent shape/dtype, or a slice whose memory need exceeds the limit."""


class InputSpecError(ShapeError, ValueError):
    """Run-time inputs that do not fit the captured graph: another tree structure, dtype (never cast
    silently), shape, or a different value for a non-tensor input the graph was specialised on."""


class WeightIntegrityError(SliceError):
    """Weight bytes that do not match their declared dtype x shape, or their sha256."""


class OpExecutionError(SliceError):
    """An op failed while running (e.g. a weight whose declared dtype the kernel rejects)."""

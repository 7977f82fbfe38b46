"""Typed errors of the partitioner: callers (CLI, runtime) tell bad input from an impossible request."""

from __future__ import annotations

from partitioner.costgraph import CostGraphError


class PartitionerError(ValueError):
    """Base class of every error the planners raise on purpose."""


class PartitionError(PartitionerError):
    """A proposed partition breaks the rules: a server op feeding a UE op (the server part is not closed
    under successors), a pinned op on the server, an op the graph does not have, or a split position
    outside the op order. Raised by the simulator/planners and by ``modelgraph``'s ``ModelGraph.split``
    (re-exported as ``modelgraph.PartitionError``)."""


class UnknownPolicyError(PartitionerError):
    """A policy name that is not in ``POLICIES``; the message lists the valid ones."""

    def __init__(self, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown policy {name!r}; valid policies: {', '.join(sorted(valid))}")
        self.name = name
        self.valid = tuple(sorted(valid))


class SearchSpaceTooLarge(PartitionerError):
    """An exact method would have to look at more partitions than its limit allows."""


__all__ = ["CostGraphError", "PartitionError", "PartitionerError", "SearchSpaceTooLarge", "UnknownPolicyError"]

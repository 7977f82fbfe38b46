"""Decide where each op runs: pure algorithms on a CostGraph (no torch, no grpc)."""

from partitioner.costgraph import CostGraph, CostGraphError, Link, OpCost, chain

__all__ = ["CostGraph", "CostGraphError", "Link", "OpCost", "chain"]

"""Ops the server will not run: pin only them and what depends on them to the UE (DESIGN §4).

A split's server part is closed under successors (the server's results come back at the end), so an op
off the allowlist, kept on the UE inside the graph, would keep every op *before* it on the UE too: one
``topk`` at the end of a classifier would run the whole model on the device. Instead the graph is cut
in two: the *head* (every op that does not depend on a pinned op) is what the partitioner plans and the
server may run; the *tail* (each pinned op and its descendants) runs on the UE once the head's outputs
are back. The head's outputs are the model's outputs it produces plus every tensor the tail reads from
it, so any partition of the head is a valid way to run the whole model.

``pin_off_allowlist(graph)`` returns a :class:`PinnedTail`; ``pins`` says which op kept how many ops on
the device (for reports and plan notes); ``run_tail`` finishes a request on the UE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from modelgraph.allowlist import is_allowed
from modelgraph.graph import ModelGraph


@dataclass(frozen=True)
class PinnedTail:
    """A graph cut into a server-eligible head and a UE-only tail."""

    head: ModelGraph
    """The ops that do not depend on a pinned op; all on the allowlist. Flat inputs (the full graph's
    ``inputs``), flat outputs (tensor refs, see module docstring), no ``io``. Plan and split this one."""
    tail: tuple[str, ...]
    """Names of the full graph's ops that always run on the UE after the head, in topological order."""
    pins: Mapping[str, int]
    """Pinned op name -> ops it keeps on the UE (itself plus the descendants no earlier pinned op keeps)."""
    pin_targets: Mapping[str, str]
    """Pinned op name -> its ATen target (why it is pinned)."""

    @property
    def kept_on_ue(self) -> int:
        return len(self.tail)

    def note(self) -> str:
        """One line for a plan note or report, e.g. ``topk (aten.topk.default) kept 3 ops on the UE``."""
        if not self.pins:
            return ""
        parts = [
            f"{n} ({self.pin_targets[n]}) kept {k} op{'s' if k != 1 else ''} on the UE" for n, k in self.pins.items()
        ]
        return "off the server allowlist: " + "; ".join(parts)

    def to_json(self) -> dict:
        """Plain data for plan/report JSON: ``{"pinned": [{"op", "target", "kept_on_ue"}], "tail_ops": n}``."""
        return {
            "pinned": [{"op": n, "target": self.pin_targets[n], "kept_on_ue": k} for n, k in self.pins.items()],
            "tail_ops": len(self.tail),
        }


def pin_off_allowlist(graph: ModelGraph, allowed: Callable[[str], bool] = is_allowed) -> PinnedTail:
    """Cut ``graph`` into a head the server may run and a tail of the ops ``allowed`` refuses (and their
    descendants). ``allowed`` takes an ATen target name (default: this build's allowlist; pass the
    server's list, e.g. ``lambda t: t in hello.allowed_ops``). With nothing pinned, ``head`` is ``graph``."""
    pins: dict[str, int] = {}
    targets: dict[str, str] = {}
    owner: dict[str, str] = {}  # ref produced in the tail -> the pinned op that put its producer there
    tail: list[str] = []
    for op in graph.ops:
        first = next((owner[r] for r in op.tensor_inputs if r in owner), None)
        if first is None and allowed(op.target):
            continue
        if first is None:  # pinned itself
            first = op.name
            targets[op.name] = op.target
            pins[op.name] = 0
        pins[first] += 1
        tail.append(op.name)
        for r in op.output_refs():
            owner[r] = first
    if not tail:
        return PinnedTail(graph, (), {}, {})
    in_tail = set(tail)
    head_ops = tuple(op for op in graph.ops if op.name not in in_tail)
    head_made = {r for op in head_ops for r in op.output_refs()}
    outs: dict[str, None] = {}
    for o in graph.outputs:
        if o in head_made:
            outs.setdefault(o)
    for name in tail:
        for r in graph.op_by_name[name].tensor_inputs:
            if r in head_made:
                outs.setdefault(r)
    used_w = {w for op in head_ops for w in op.weight_inputs}
    head = ModelGraph(
        name=graph.name,
        ops=head_ops,
        inputs=dict(graph.inputs),
        outputs=tuple(outs),
        weights={k: v for k, v in graph.weights.items() if k in used_w},
        weight_values={k: v for k, v in graph.weight_values.items() if k in used_w},
        weight_sources={k: v for k, v in graph.weight_sources.items() if k in used_w},
    )
    return PinnedTail(head, tuple(tail), pins, targets)


def run_tail(
    graph: ModelGraph,
    pinned: PinnedTail,
    env: dict[str, torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    after_op: Callable[[float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the tail ops of the full ``graph`` on ``env`` (graph inputs + the head's outputs, by ref);
    returns ``env`` holding every graph output, ready for ``graph.rebuild`` / ``collect_outputs``.
    ``after_op(seconds)`` runs after each op (``Program.run``: pacing an emulated slower device)."""
    from modelgraph.execute import Program  # local: execute sits above this module

    if not pinned.tail:
        return env
    ops = tuple(graph.op_by_name[n] for n in pinned.tail)
    keep = frozenset(graph.outputs) | frozenset(graph.inputs)
    Program(ops, keep, torch.device(device), trusted=True).run(env, graph.run_weights, after_op=after_op)
    return env

"""Which tensor a forward read the value of, for the refusal of a data-dependent capture (session 22, review22).

torch.export traces with fake tensors (shapes and dtypes, no values): ``if self.t.item() > 0:`` or ``x / self.t.item()``
cannot be captured whichever tensor ``t`` is. When it is a weight (a parameter or buffer), its value is fixed, not
an input's, and the fix is to keep it a tensor (``torch.where(self.t > 0, a, b)``, ``x / self.t``): the refusal says
which weight and that, instead of "branches on a tensor's value" alone.

Two places the value read is found:

* a Python branch (``bool()`` of a symbolic value) fails inside torch.export (``GuardOnDataDependentSymNode``), with
  no graph: the last frame of the user's code the failure went through names the line (``_line_of``), and the
  weights that line reads are its attribute chains (``self.t``, ``s.head.scale``) resolved in that frame's variables
  (``weights_read_at``);
* ``.item()`` / ``float()`` whose value flows on into ops is exported as an ``aten.item`` node with a symbolic value:
  the placeholders it is computed from, per the export's graph signature, say whether only weights feed it
  (``item_sources``).
"""

from __future__ import annotations

import linecache
import re
from typing import Any

import torch

from modelgraph.pystate import _USER_DRAW, _drawer_kind, _line_of

_CHAIN = re.compile(r"\b([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)")
"""An attribute chain in a source line (``self.head.scale``): a variable name, then ``.name`` parts."""


def user_line(e: BaseException) -> Any:
    """The last frame of the user's code (``pystate._drawer_kind``: not torch's, the standard library's or
    ``modelgraph``'s) that the exception ``e`` went through, or None."""
    found = None
    tb = e.__traceback__
    while tb is not None:
        if _drawer_kind(tb.tb_frame.f_code) == _USER_DRAW:
            found = tb.tb_frame
        tb = tb.tb_next
    return found


def _weight_names(module: torch.nn.Module) -> dict[int, str]:
    """id(tensor) -> its name in ``module`` (``label.path``), for its parameters and buffers."""
    names: dict[int, str] = {}
    for n, t in [*module.named_buffers(remove_duplicate=False), *module.named_parameters(remove_duplicate=False)]:
        names.setdefault(id(t), n)
    return names


def weights_read_at(frame: Any, module: torch.nn.Module) -> list[str]:
    """Names (paths in ``module``) of the parameters and buffers the source line of ``frame`` reads through
    attribute chains of its variables (``self.t``, ``s.head.scale``; the first tensor along each chain). Only
    what the line names is seen (a weight read into a variable on an earlier line is not)."""
    src = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    names = _weight_names(module)
    found: list[str] = []
    for head, rest in _CHAIN.findall(src):
        if head not in frame.f_locals:
            continue
        obj = frame.f_locals[head]
        for part in rest.strip(".").split("."):
            if isinstance(obj, torch.Tensor):
                break
            try:
                obj = getattr(obj, part)
            except Exception:
                obj = None
                break
        name = names.get(id(obj)) if isinstance(obj, torch.Tensor) else None
        if name is not None and name not in found:
            found.append(name)
    return found


def data_branch_refusal(e: BaseException, module: torch.nn.Module, label: str) -> str:
    """One line for a forward torch.export refused for branching on a tensor's value (``e``): the line it branches
    at and, where that line reads weights, which ones and how to keep them tensors."""
    frame = user_line(e)
    at = f" at {_line_of(frame)}" if frame is not None else ""
    weights = weights_read_at(frame, module) if frame is not None else []
    if weights:
        w = ", ".join(f"{label}.{n}" for n in weights)
        t = f"self.{weights[0]}"
        return (f"{label} branches on a tensor's value{at}, a line that reads its weight {w}: a weight's value is "
                "fixed, but torch.export traces without values, so a Python if/while/bool(), int() or .item() on it "
                f"cannot be captured; keep it a tensor: pick with torch.where({t} > 0, a, b), scale by it as a "
                f"tensor (x / {t})")
    return (f"{label} branches on a tensor's value{at} (a Python if/while/bool() on data, e.g. `if x.sum() > 0:`); "
            "compute both sides and pick with torch.where(cond, a, b) (torch.cond is refused too: coinfer cuts a flat "
            "graph of ATen ops)")


def item_sources(node: torch.fx.Node, signature: Any) -> tuple[list[str], list[str]]:
    """(weights, inputs): the targets of the weight placeholders and the names of the user-input placeholders that
    ``node`` (an ``aten.item`` node of an exported graph) is computed from; ``signature`` is the export's
    ``graph_signature``."""
    kinds = {s.arg.name: s for s in signature.input_specs if hasattr(s.arg, "name")}
    weights: list[str] = []
    inputs: list[str] = []
    seen: set[str] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "placeholder":
            spec = kinds.get(n.name)
            if spec is not None and spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
                inputs.append(n.name)
            elif spec is not None:
                weights.append(str(spec.target))
            continue
        todo.extend(n.all_input_nodes)
    return sorted(weights), sorted(inputs)

"""F1: outputs that are a model's weight, or a view of one, do not come back as eager's.

(a) Under ``torch.inference_mode`` an output that is a *view of a weight* (``self.fc.bias.T``, ``self.fc.weight[0]``,
    ``self.center.view(1, 5)``) comes back an inference tensor on every path, local included; eager's is a normal
    tensor (a view of a normal tensor stays normal), so e.g. using it in autograd afterwards raises "Inference tensors
    cannot be saved for backward" where eager's works. (``modelgraph.out_layout.as_callers``?)
(b) Where the forward returns a weight *and* a view of it (``return y, self.fc.weight, self.fc.weight[0]``), a split
    or all-server client answers the weight as a plain ``Tensor`` copy: eager (and the local client) answer the
    ``Parameter`` object itself. Returning the weight without a view of it comes back right on every path
    (``tests.user_zoo``-style anchors buffer). The view's own storage is documented (README: "an output sharing
    storage with a weight ... keeps its own storage"), the weight's type and identity are not.

Run: .venv/bin/python docs/results/usermodels/session34/f1_weight_view_output_kind.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import torch
from torch import nn


class ParamViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.register_buffer("center", torch.randn(5))

    def forward(self, x):
        return self.fc(x), self.fc.weight, self.fc.bias.T, self.fc.weight[0], self.center.view(1, 5)


torch.manual_seed(0)
m = ParamViews().eval()
x = torch.randn(3, 6)
srv = harness.server()
try:
    for path, c in harness.clients(srv, m, (x,), cuts={1}):
        with c:
            for rep in ("cold", "warm"):
                with torch.inference_mode():
                    got, want = c(x), m(x)
                print(
                    f"{path:10s} {rep}: is_inference coinfer {[t.is_inference() for t in got]} "
                    f"eager {[t.is_inference() for t in want]}"
                )
                print(
                    f"{'':10s} {rep}: output 1 coinfer {type(got[1]).__name__} (is fc.weight: {got[1] is m.fc.weight})"
                    f"; eager {type(want[1]).__name__} (is fc.weight: {want[1] is m.fc.weight})"
                )
                p = torch.ones((), requires_grad=True)
                for name, t in (("coinfer", got[2]), ("eager", want[2])):
                    try:
                        (t * p).sum().backward()
                        print(f"{'':10s} {rep}: {name} bias.T * p, backward outside inference_mode: ok")
                    except RuntimeError as e:
                        print(f"{'':10s} {rep}: {name} bias.T * p, backward outside inference_mode: {str(e)[:60]}")
            with torch.no_grad():
                got, want = c(x), m(x)
            print(
                f"{'':10s} no_grad: output 1 coinfer {type(got[1]).__name__} (is fc.weight: {got[1] is m.fc.weight});"
                f" eager {type(want[1]).__name__} (is fc.weight: {want[1] is m.fc.weight})"
            )
finally:
    srv.stop()

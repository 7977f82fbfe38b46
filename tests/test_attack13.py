"""Session 13's attack from outside (attack13): what a new user and a stranger on the wire found.

A user's weights changed after the client was built (``load_state_dict``, an optimizer step, a parameter
replaced, ``module.double()``): the local path read the module's tensors in place while the server kept the
weights it was sent (content-addressed by the sha256 the client computed once), so an offloaded request
answered with the old weights and the local one with the new (0.14 max|diff| from the user's
``model(x)`` after ``weight.mul_(2)``); a replaced parameter left every path on the old one. Now the
client refuses the call in one line (``ue_client.model.WeightWatch``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ue_client import CoinferClient, InputError, new_tenant
from ue_client.verify import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


class Functional(nn.Module):
    """Functional calls on parameters, and a tied weight read twice."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3, generator=g) * 0.2)
        self.b = nn.Parameter(torch.randn(6, generator=g) * 0.1)
        self.fw = nn.Parameter(torch.randn(10, 6, generator=g) * 0.2)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w, self.b, padding=1))
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.bn(F.linear(y, self.fw)) @ self.fw


def _change(module: Functional, how: str) -> None:
    if how == "in_place":
        with torch.no_grad():
            module.w.mul_(2.0)
    elif how == "load_state_dict":
        module.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in module.state_dict().items()})
    elif how == "replaced":
        module.fw = nn.Parameter(torch.randn(10, 6))
    elif how == "train_step":  # the user runs the module in training mode: batch-norm's running statistics move
        module.train()
        module(torch.randn(4, 3, 8, 8))
        module.eval()
    elif how == "dtype":
        module.double()


@pytest.mark.parametrize("how", ["in_place", "load_state_dict", "replaced", "train_step", "dtype"])
@pytest.mark.parametrize("policy", ["local", "offload"])
def test_weights_changed_after_the_client_was_built_are_refused(server, policy: str, how: str) -> None:
    module = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    with CoinferClient(module, (x,), server=server.address, policy=policy, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        for _ in range(2):
            y = c(x)
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) <= 1e-5
        _change(module, how)
        with pytest.raises(InputError, match="after the client captured it"):
            c(x.double() if how == "dtype" else x)
        with pytest.raises(InputError, match="after the client captured it"):
            c.reference(x)


def test_a_new_input_signature_and_the_eager_check_do_not_trip_the_watch(server) -> None:
    """Capturing another batch size from the module (torch.export swaps its parameters meanwhile) and the
    client's own eager comparison leave the weights as they were: no refusal."""
    module = Functional().eval()
    x1, x4 = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8)
    with CoinferClient(module, (x1,), server=server.address, policy="offload", link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        for x in (x1, x4, x1, x4):
            y = c(x)
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) <= 1e-5
            c.eager(x)

"""The call's weight check waits for the server on a warm split request (session 33, ``model.DeferredCheck``).

The check (``WeightWatch.check``: every watched tensor's samples, the module's Python state, the version counters)
cost 1.4-2.0 ms of a full core per call, 34-46 % of a UE's CPU per warm all-server request; it ran before the request
left. After a warm split request the next call's check runs once the request's cut tensors were handed to gRPC,
while the UE waits for the answer, and a change it finds is raised in place of that answer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.checks import warm_client
from ue_client import InputError
from ue_client.verify import max_abs_diff


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()


def _watch_sent_bytes(c) -> list[int]:
    """Replace ``c``'s weight check by one that records the session's cut-tensor bytes handed to gRPC when it runs."""
    seen: list[int] = []
    check = c._watch.check

    def recording() -> None:
        s = c.engine.conn.session
        seen.append(s.queue.sent.tensor_bytes if s is not None else -1)
        check()

    c._watch.check = recording
    return seen


def test_a_warm_split_calls_check_runs_after_its_input_was_handed_over(server) -> None:
    module, x = _model(), torch.randn(4, 64)
    with warm_client(server, module, x, "offload") as (c, _):
        seen = _watch_sent_bytes(c)
        before = c.engine.conn.session.queue.sent.tensor_bytes
        y = c(x)
        assert len(seen) == 1
        assert seen[0] >= before + x.numel() * 4  # the input had left for gRPC when the check ran
        assert c.last_report.server_ops > 0 and not c.last_report.fallback
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) <= 1e-5


def test_a_call_after_no_warm_split_checks_before_anything_is_sent(server) -> None:
    module, x = _model(), torch.randn(4, 64)
    with warm_client(server, module, x, "local") as (c, _):
        order: list[str] = []
        check, infer = c._watch.check, c.engine.infer

        def checking() -> None:
            order.append("check")
            check()

        def inferring(*a, **k):
            order.append("infer")
            return infer(*a, **k)

        c._watch.check, c.engine.infer = checking, inferring
        c(x)
        assert order == ["check", "infer"]  # no warm split before: checked up front, as before session 33


def test_a_data_write_before_a_warm_split_call_is_refused_in_place_of_its_answer(server) -> None:
    module, x = _model(), torch.randn(4, 64)
    with warm_client(server, module, x, "offload") as (c, _):
        n = len(c.reports)
        kept = module[0].weight.detach().clone()
        module[0].weight.data.mul_(2)  # no version bump: only the value check sees it
        with pytest.raises(InputError, match=r"through \.data"):
            c(x)
        assert c.last_report is None and len(c.reports) == n  # no answer, no report of it
        module[0].weight.data.copy_(kept)
        y = c(x)  # the weights as captured again: answered, and equal to the user's module
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) <= 1e-5
        assert len(c.reports) == n + 1 and c.last_report.server_ops > 0


def test_a_changed_module_is_named_before_the_input_it_then_refuses(server) -> None:
    """A deferred check still names the cause when the call fails first: the module made float64 and given a float64
    input (binding refuses it) is refused as a changed module, as when the check ran first."""
    module, x = _model(), torch.randn(4, 64)
    with warm_client(server, module, x, "offload") as (c, _):
        module.double()
        with pytest.raises(InputError, match="after the client captured it"):
            c(x.double())


def test_a_deferred_check_runs_before_the_weights_a_split_request_sends_are_queued(server) -> None:
    """A split request whose weights the server lacks reads them for the uplink: the call's check runs before they
    are queued (a write through ``.data`` is refused before its bytes go up), not while the answer is awaited."""
    from tests.checks import FAST_LINK
    from ue_client import CoinferClient, new_tenant

    module, x = _model(), torch.randn(4, 64)
    with CoinferClient(module, (x,), server=server.address, policy="offload", link=FAST_LINK, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        c._last_engine, c.engine.warm_split = c.engine, True  # as after a warm split: this cold call defers its check
        queued: list[int] = []
        check = c._watch.check

        def recording() -> None:
            queued.append(len(c.engine.uploads.queued))
            check()

        c._watch.check = recording
        y = c(x)
        assert queued == [0]  # checked before any of the request's weights was queued
        assert c.last_report.uploaded_weight_bytes > 0  # and the request did send weights
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) <= 1e-5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(16, 4)
        self.temperature = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x)))) / self.temperature


@pytest.mark.parametrize("change", ["attr", "replace", "train"])
def test_a_change_then_a_new_signature_is_refused_and_nothing_captured_from_it(server, change: str) -> None:
    """break41 F1 / F2: after warm split requests the user changes the module, then calls with another batch size.
    The new signature used to be captured from the changed module before the deferred check refused the call, and
    once the change was undone that graph answered its signature's calls wrongly (0.17-1.44 off ``m(x)``); a capture
    also put the module back in eval mode, so ``train()`` was answered. Now the check runs before any capture."""
    from tests.checks import FAST_LINK
    from ue_client import CoinferClient, new_tenant

    m = _Net().eval()
    x4, x3 = torch.randn(4, 8), torch.randn(3, 8)
    with CoinferClient(m, (x4,), server=server.address, server_ops=2, link=FAST_LINK, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        for _ in range(3):
            c(x4)
        assert c.last_report.server_ops > 0 and c.engine.warm_split
        old = m.a.weight
        if change == "attr":
            m.temperature = 5.0
        elif change == "replace":
            m.a.weight = nn.Parameter(torch.randn_like(old))
        else:
            m.train()
        with pytest.raises(InputError):
            c(x3)
        assert m.training == (change == "train")  # no capture put the user's module in eval mode
        if change == "attr":
            m.temperature = 2.0
        elif change == "replace":
            m.a.weight = old
        else:
            m.eval()
        for x in (x4, x3, x3):
            y = c(x)
            with torch.inference_mode():
                assert max_abs_diff(y, m(x)) <= 1e-5

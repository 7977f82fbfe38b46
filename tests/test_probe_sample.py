"""The connect-time probe sends a sample of the model with the model's weights per byte.

Sending costs the UE CPU per weight (frames, the server's acknowledgement, its handling) besides per byte;
the probe used to send the weights nearest the output (googlenet: its classifier, 2 weights in 4.1 MB)
and kept 1.03 ns/B where the model's other weights cost 1.55 sent the same way
(``bench/bench_send_beside.py``). ``probing.probe_weights`` picks the weights nearest the model's mean
size instead. Unit tests on captured modules, and one against a real edge server (loopback, port 0,
data channel on): the probe uploads exactly that sample.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_server.config import MiB, ServerConfig
from ue_client import CoinferClient, new_tenant
from ue_client.model import prepare_model
from ue_client.probing import probe_weights


class ManySmallThenBig(nn.Module):
    """24 linear layers (16-31 KB of weight each, and their biases) and a 0.5 MB classifier at the output:
    the old probe of 256 KiB sent only the classifier (2 weights in 0.5 MB, 4 weights per MB; the model
    ~40 per MB)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(64 + 8 * (i % 4), 64 + 8 * ((i + 1) % 4)), nn.ReLU())
                                    for i in range(24)])
        self.head = nn.Linear(64, 2048)

    def forward(self, x):
        return self.head(self.body(x))


def graph_of(module: nn.Module, *inputs: torch.Tensor):
    torch.manual_seed(0)
    return prepare_model(module.eval(), inputs).graph


def distinct(g) -> dict[str, int]:
    out = {}
    for op in g.ops:
        for w in op.weight_inputs:
            out[g.weight_sha256(w)] = g.weights[w].nbytes
    return out


def test_the_sample_has_the_models_weights_per_byte() -> None:
    torch.manual_seed(0)
    g = graph_of(ManySmallThenBig(), torch.randn(1, 64))
    d = distinct(g)
    model_density = len(d) / sum(d.values())
    sample = probe_weights(g, 256 << 10)
    nbytes = sum(g.weights[w].nbytes for _, w in sample)
    assert nbytes >= 256 << 10
    assert len({sha for sha, _ in sample}) == len(sample)  # each weight once
    assert all(g.weight_sha256(w) == sha for sha, w in sample)
    density = len(sample) / nbytes
    # within a factor 2 of the model's (the old rule: the classifier, ~1/10 of it)
    assert 0.5 * model_density <= density <= 2.0 * model_density, (density, model_density)
    assert probe_weights(g, 256 << 10) == sample  # the same model gives the same sample


def test_a_weight_far_over_the_probe_is_left_out_while_others_are_there() -> None:
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 40000))
    g = graph_of(net, torch.randn(1, 64))
    big = max(g.weights, key=lambda w: g.weights[w].nbytes)
    assert g.weights[big].nbytes > 8 * (64 << 10)
    sample = probe_weights(g, 64 << 10)
    assert big not in {w for _, w in sample} and sample
    # a model of nothing but that weight still probes with it
    only = graph_of(nn.Linear(64, 40000, bias=False), torch.randn(1, 64))
    assert [w for _, w in probe_weights(only, 64 << 10)] == list(only.weights)


def test_a_small_model_sends_all_of_it_and_a_weightless_one_nothing() -> None:
    g = graph_of(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(1, 8))
    assert {sha for sha, _ in probe_weights(g, 1 << 20)} == set(distinct(g))
    assert probe_weights(graph_of(nn.ReLU(), torch.randn(1, 8)), 1 << 20) == []


@pytest.fixture(scope="module")
def server_options():
    return {"config": ServerConfig(cache_bytes=256 * MiB, staging_bytes=64 * MiB, data_port=0, threads=1)}


def test_the_probe_uploads_that_sample(server) -> None:
    torch.manual_seed(0)
    net = ManySmallThenBig().eval()
    x = torch.randn(1, 64)
    c = CoinferClient(net, (x,), server=server.address, policy="auto", tenant=new_tenant(),
                      link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, probe_bytes=256 << 10)
    try:
        c.engine.connect()
        g = c.engine.graph
        sample = probe_weights(g, 256 << 10)
        assert c.engine.conn.session.data_sender is not None  # the probe went on the data channel
        assert c.engine.probe.sent_bytes == sum(g.weights[w].nbytes for _, w in sample)
        assert {sha for sha, _ in sample} <= c.engine.conn.session.held  # the server acknowledged every one
        assert c.engine.probe.send_est.cpu_s_per_byte is not None  # and the send cost was measured
        out = c(x)
    finally:
        c.close()
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)

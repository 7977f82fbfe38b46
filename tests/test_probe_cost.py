"""The connect-time uplink probe's send cost on the data channel counts sending, not its own waiting.

Against a real edge server (loopback, port 0, data channel on) with a real client. The probe's thread waits
for the server's acknowledgements in a 2 ms polling loop; that loop's CPU is no part of sending (in a
request the UE computes meanwhile), yet it was counted: 3.4 ns/B at 20 Mbit/s of which 2.3 its own
polling (``bench/bench_probe_cost.py``), so the planner charged a slow link's bytes up to 3x their CPU.
"""

from __future__ import annotations

import time
import types

import pytest
import torch
from torch import nn

from edge_server.config import MiB, ServerConfig
from ue_client import CoinferClient, new_tenant, probing

BURN_S = 0.1
"""CPU each polling step of the probe burns here (a wait made expensive on purpose)."""


@pytest.fixture(scope="module")
def server_options():
    return {"config": ServerConfig(cache_bytes=256 * MiB, staging_bytes=64 * MiB, data_port=0, threads=1)}


class Net(nn.Module):
    """~2.4 MB of weights, most of them near the output (what the probe uploads)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 512)
        self.fc2 = nn.Linear(512, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x):
        x = torch.relu(self.c(x)).mean((2, 3))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_the_probe_does_not_count_its_own_waiting_as_sending(server, monkeypatch) -> None:
    burnt: list[float] = []

    def busy_sleep(s: float) -> None:  # the probe's polling step, made to cost BURN_S of this thread's CPU
        t0 = time.thread_time()
        while time.thread_time() - t0 < BURN_S:
            pass
        burnt.append(time.thread_time() - t0)

    # only the probing module's clock: every other thread (gRPC, the data sender) sleeps as usual
    fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake.sleep = busy_sleep
    monkeypatch.setattr(probing, "time", fake)
    torch.manual_seed(0)
    net = Net().eval()
    c = CoinferClient(net, (torch.randn(1, 3, 8, 8),), server=server.address, policy="auto", tenant=new_tenant(),
                      link={"uplink_mbps": 400.0, "rtt_ms": 2.0})
    try:
        c.engine.connect()
        assert c.engine.conn.session.data_sender is not None  # the probe went on the data channel
        probed = c.engine.probe.sent_bytes
        per_byte = c.engine.probe.send_est.cpu_s_per_byte
    finally:
        c.close()
    assert probed >= 1 << 20 and burnt, (probed, burnt)  # it uploaded and waited at least one polling step
    # what it keeps for sending those bytes is far below what its waiting burnt (the old probe kept both)
    assert per_byte is not None and per_byte * probed < 0.5 * sum(burnt), (per_byte * probed, sum(burnt))

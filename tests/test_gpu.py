"""The CUDA paths on a GPU: a server on CUDA against users' eager modules, a stranger's index ops on CUDA,
sandboxed profiling, GPU memory given back, NVML.

Every test here needs CUDA and is skipped without it (CI has none). On a GPU machine:
``pytest -m gpu tests/test_gpu.py`` (session 29 ran them on an H200: docs/results/gpu/session29/).
"""

from __future__ import annotations

import functools
import gc
import json
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import torch
from torch import nn

# imported with the module, as in the other test files: conftest's ``_no_gc_freeze`` then keeps clients from
# freezing the whole test process (session 29: a real freeze of a GPU machine's pytest process took minutes)
from ue_client import CoinferClient, new_tenant

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MiB = 1 << 20


# ---- users' models, written the way users write them ------------------------------------------------------
class ConvHeads(nn.Module):
    """A conv net with batch norm and two heads returned in a dict (the structure must come back)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.cls = nn.Linear(32, 10)
        self.box = nn.Linear(32, 4)

    def forward(self, x):
        f = self.body(x).mean(dim=(2, 3))
        return {"logits": self.cls(f), "box": torch.sigmoid(self.box(f)), "feat": f}


class Tagger(nn.Module):
    """Embedding + LSTM + per-token head: the index ops the server checks before their CUDA kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 24)
        self.rnn = nn.LSTM(24, 32, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 7)

    def forward(self, tokens):
        h, _ = self.rnn(self.emb(tokens))
        return self.head(h).log_softmax(-1), h[:, -1]


class TinyEncoder(nn.Module):
    """A transformer encoder classifier (attention, layer norm, GELU)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, activation="gelu")
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.enc(self.proj(x)).mean(1))


@functools.cache
def _models():
    """The users' modules and inputs, built once on first use (not at collection: CI skips every test here)."""
    torch.manual_seed(0)
    conv = ConvHeads().eval()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (conv.body[1], conv.body[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    from modelgraph.tv_compat import import_torchvision

    torchvision = import_torchvision()
    return {
        "conv_heads": (conv, (torch.randn(2, 3, 32, 32),)),
        "tagger": (Tagger().eval(), (torch.randint(0, 100, (2, 9)),)),
        "encoder": (TinyEncoder().eval(), (torch.randn(2, 6, 16),)),
        "mobilenet_v2": (torchvision.models.mobilenet_v2(num_classes=10).eval(), (torch.randn(1, 3, 64, 64),)),
    }


MODEL_NAMES = ("conv_heads", "tagger", "encoder", "mobilenet_v2")


def _close(got, want) -> None:
    """Same structure as eager, values within float32-on-another-device error."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _close(got[k], want[k])
    elif isinstance(want, tuple | list):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _close(a, b)
    else:
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def cuda_server():
    from edge_server.config import ServerConfig
    from edge_server.testing import ServerThread

    srv = ServerThread(config=ServerConfig(device="cuda", cache_bytes=512 * MiB)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_users_models_split_on_a_cuda_server_equal_eager(cuda_server, name: str) -> None:
    """Every cut (all on the server, mid, last op only): cold and warm requests equal the user's own eager
    ``model(*inputs)`` on the UE's CPU, in its structure, without a fallback."""
    module, x = _models()[name]
    with torch.no_grad():
        want = module(*x)
    n = None
    for frac in (0.0, 0.5, 0.95):
        c = CoinferClient(module, x, server=cuda_server.address, tenant=new_tenant(),
                          server_ops=0 if n is None else max(1, min(n - 1, int(frac * n))))
        try:
            n = len(c.graph.ops)
            for _ in range(2):  # cold, then warm
                got = c(*x)
                rep = c.last_report
                assert not rep.fallback, rep.fallback_reason
                assert rep.server_ops > 0, rep
                _close(got, want)
        finally:
            c.close()
    assert cuda_server.runtime.device.type == "cuda"


def test_weights_on_the_gpu_are_given_back_when_sessions_end(cuda_server) -> None:
    """A session's device copies of its weights are freed when it closes (no GPU memory kept per tenant)."""
    module, x = _models()["mobilenet_v2"]
    deadline = time.monotonic() + 20
    while cuda_server.runtime.sessions.sessions and time.monotonic() < deadline:  # earlier tests' sessions closing
        time.sleep(0.2)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        c = CoinferClient(module, x, server=cuda_server.address, tenant=new_tenant(), server_ops=0)
        try:
            c(*x)
            assert c.last_report.server_ops == len(c.graph.ops)
        finally:
            c.close()
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the server closes a session after the client's stream ends
        gc.collect()
        if not cuda_server.runtime.sessions.sessions and torch.cuda.memory_allocated() - before < weights // 2:
            break
        time.sleep(0.2)
    assert not cuda_server.runtime.sessions.sessions
    assert torch.cuda.memory_allocated() - before < weights // 2, (before, torch.cuda.memory_allocated(), weights)


# ---- a stranger's index ops on CUDA ---------------------------------------------------------------------
def _gather_spec(index: int) -> bytes:
    from tests.slice_json import meta, zeros

    idx = {"name": "idx", "target": "aten.full.default", "args": [[3, 1], index],
           "kwargs": {"dtype": {"dtype": "int64"}, "device": {"device": None}, "pin_memory": False},
           "outputs": [meta([3, 1], "int64")]}
    ops = [zeros("w", [3, 4]), idx,
           {"name": "g", "target": "aten.gather.default", "args": [{"t": "w"}, 1, {"t": "idx"}], "kwargs": {},
            "outputs": [meta([3, 1])]},
           {"name": "y", "target": "aten.add.Tensor", "args": [{"t": "g"}, {"t": "x"}], "kwargs": {},
            "outputs": [meta([3, 1])]}]
    return json.dumps({"version": 1, "ops": ops, "inputs": {"x": meta([3, 1])}, "outputs": ["y"],
                       "weights": {}}).encode()


def test_a_strangers_out_of_range_index_is_refused_and_the_cuda_context_survives() -> None:
    """Unchecked, each call below is a device-side assert in ``coinfer-edge serve --device cuda`` (the test after
    this one shows what that does to the process); checked, INVALID_ARGUMENT, and the server keeps computing."""
    from protos.coinfer.v1 import coinfer_pb2 as pb
    from protos.coinfer.v1 import coinfer_pb2_grpc as pbg
    from tests.test_index_bounds import _bag_spec
    from tests.test_server_cli import running_server

    with running_server("--device", "cuda", "--threads", "1") as (proc, address):
        ch = grpc.insecure_channel(address)
        stub = pbg.EdgeServiceStub(ch)
        assert stub.Hello(pb.HelloRequest(client_version="t"), timeout=60).device.startswith("cuda")
        bad = [(_gather_spec(9), "index holds 9, outside [0, 4)"), (_gather_spec(-1), "index holds -1, outside [0, 4)"),
               (_bag_spec(-1), "offsets hold -1, outside [0, 3]"),
               (_bag_spec(-100_000_000), "offsets hold -100000000, outside [0, 3]")]
        for spec, message in bad:
            with pytest.raises(grpc.RpcError) as e:
                stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=1, warmup=0), timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert message in e.value.details(), e.value.details()
            assert proc.poll() is None
        for spec in (_gather_spec(3), _gather_spec(0), _bag_spec(1)):  # the CUDA context still computes
            r = stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec, iterations=2, warmup=1), timeout=60)
            assert r.ops and r.device.startswith("cuda"), r
        ch.close()


def test_an_unchecked_cuda_index_poisons_the_whole_process() -> None:
    """Why the check exists: the kernel's own device-side assert fails that op and every CUDA call after it,
    every tenant's, until the process restarts (run in a child process: it cannot be undone)."""
    code = textwrap.dedent("""
        import torch
        w = torch.zeros(3, 4, device="cuda")
        try:
            torch.gather(w, 1, torch.full((3, 1), 9, device="cuda"))
            torch.cuda.synchronize()
            print("FIRST OK")
        except Exception as e:
            print("FIRST FAILED", type(e).__name__)
        try:
            (torch.ones(2, device="cuda") + 1).cpu()
            print("AFTER OK")
        except Exception as e:
            print("AFTER FAILED", type(e).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert "FIRST FAILED" in out and "AFTER FAILED" in out, out


def test_sandboxed_profiling_is_refused_on_cuda() -> None:
    """``profile_workers`` > 0 profiles in forked children under an address-space limit, which does not bound GPU
    memory (and each child would make its own CUDA context): a CUDA server refuses it at start with a clear error.
    (Session 29's H200 run of sandboxed CUDA profiling failed; its log was lost to the run's time limit.)"""
    from edge_server.config import ServerConfig
    from edge_server.testing import ServerThread

    with pytest.raises(ValueError, match="--profile-workers needs --device cpu"):
        ServerThread(config=ServerConfig(device="cuda", profile_workers=1)).start()


def test_nvml_reads_the_gpu() -> None:
    from profiler import device_info

    info = device_info()
    assert info.nvml == "ok", info.nvml
    assert info.gpus and info.gpus[0].memory_total_mb > 1000, info.gpus
    # (NVML numbers the machine's GPUs, not CUDA_VISIBLE_DEVICES's: compared by name)
    assert any(torch.cuda.get_device_name(0).split()[-1] in g.name for g in info.gpus), info.gpus

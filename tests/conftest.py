"""Shared pytest setup: the repo root on ``sys.path`` and the in-process edge server fixture.

``server`` is one real edge server (``edge_server.testing.ServerThread`` on a free loopback port) per
test module. A module that needs other settings overrides ``server_options`` (a module-scoped fixture
returning the keyword arguments of ``ServerThread``), e.g. ``{"config": ServerConfig(...)}``; a single
test can pass them with ``@pytest.mark.parametrize("server", [{...}], indirect=True)``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _no_gc_freeze(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients built in tests leave Python's collector alone: each construction with no other client open
    collects and freezes the whole test process (``ue_client.heap.freeze_gc``: a full collection of its
    ~1M objects, 43 s of test_ue_client + test_user_zoo's 99 s). ``tests/test_gc_freeze.py`` runs the real
    ones; subprocesses (the testbed's UEs) do too. Only where ``ue_client.client`` is imported already."""
    cc = sys.modules.get("ue_client.client")
    if cc is None or request.module.__name__.rpartition(".")[2] == "test_gc_freeze":
        return
    monkeypatch.setattr(cc, "freeze_gc", lambda: 0)
    monkeypatch.setattr(cc, "refreeze_gc", lambda: 0)
    monkeypatch.setattr(cc, "release_gc", lambda: None)


@pytest.fixture(scope="session")
def _transport_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's base for the per-test ``$COINFER_TRANSPORT_DIR`` (``_fresh_transport_memory``)."""
    return tmp_path_factory.mktemp("transport")


@pytest.fixture(autouse=True)
def _fresh_transport_memory(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                            _transport_dirs: Path) -> None:
    """Each test starts with no transport residuals kept from another test's clients
    (``ue_client.calibration.TRANSPORT_MEMORY``, keyed by server address: a later test's server can get an
    earlier one's port; and ``ue_client.transport_cache`` on disk, keyed by the server process, which a
    module's tests share: each test gets its own directory, made only when a client writes to it, inherited by
    the subprocesses it starts); the clients of one test share them as a process's clients do."""
    cal = sys.modules.get("ue_client.calibration")
    if cal is not None:
        cal.TRANSPORT_MEMORY.forget()
    name = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv("COINFER_TRANSPORT_DIR", str(_transport_dirs / name))


TEST_MIN_STALL_MS = 20_000.0
"""The shortest server silence after which a test's in-process client gives a split request up (the library's
default is ``ClientOptions.deadline_slack_ms``, 1 s)."""


@pytest.fixture(autouse=True)
def _patient_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process clients wait ``TEST_MIN_STALL_MS`` of silence, not 1 s, before giving a request up. Their server
    runs in the test's process (its threads share the GIL and the two cores with the client, the link relays and
    the test) and the CI host is sometimes ~2x slower: session 22's CI had three spurious 'no progress for
    1000 ms' give-ups (a relayed resnet18 split, timm_block's 5 ms request, a first request), each failing a test
    of correctness or decisions. The rule itself is tested on recorded counters (``tests/test_ue_client_parts.py``)
    and by a real client whose UE part outlasts it (``tests/test_deadline_wait.py``); a dead server still ends a
    request at once (its stream breaks). Only where ``ue_client`` is imported already (collection imports it)."""
    if "ue_client" not in sys.modules:
        return
    import ue_client.request as req

    orig = req.patience_of

    def patient(*a, min_stall_ms: float, **k):
        return orig(*a, min_stall_ms=max(min_stall_ms, TEST_MIN_STALL_MS), **k)

    monkeypatch.setattr(req, "patience_of", patient)


@pytest.fixture(scope="module")
def server_options() -> dict[str, Any]:
    """Keyword arguments for the module's ``server``: one compute thread (bit-identical CPU results)."""
    return {"threads": 1}


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, server_options: dict[str, Any]) -> Iterator[Any]:
    """A real edge server on ``127.0.0.1:<free port>`` for the module; stopped even if a test fails."""
    from edge_server.testing import ServerThread  # imported here: partitioner-only modules skip torch/grpc

    options = getattr(request, "param", None)
    srv = ServerThread(**(server_options if options is None else options)).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def zoo_capture():
    """``zoo_capture(name)`` -> (module, example inputs, captured ModelGraph) of ``modelgraph.zoo``'s model
    ``name``, captured once per test session (the same models were captured again by test_zoo,
    test_modelgraph_split and test_validation_memo: ~0.4-1.5 s each). Shared and read-only: a test that
    changes a module or a graph builds its own."""
    from modelgraph import capture
    from modelgraph.zoo import ZOO

    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            module, inputs = ZOO[name]()
            cache[name] = (module, inputs, capture(module, inputs, name=name))
        return cache[name]

    return get


@pytest.fixture
def channel(server) -> Iterator[Any]:
    """A plain-text gRPC channel to the module's ``server``, closed after the test."""
    import grpc

    ch = grpc.insecure_channel(server.address)
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture
def stub(channel) -> Any:
    """The coinfer.v1 EdgeService stub on ``channel``."""
    from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

    return pb_grpc.EdgeServiceStub(channel)


@pytest.fixture
def cli(capsys, tmp_path, monkeypatch):
    """``coinfer-ue``'s ``main`` in-process (what the console script runs), with a per-test cache dir:
    ``rc, stdout, stderr = cli("run", ...)``."""
    from ue_client.cli import main

    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))

    def run(*args: str) -> tuple[int, str, str]:
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    return run



COSTGRAPHS = Path(__file__).parent / "data" / "costgraphs"


@pytest.fixture(scope="session")
def slowed_resnet18_costs():
    """resnet18's cost graph as a UE emulated 10x slower (``ue_slowdown=10``) than this machine runs it
    quietly: the kept graph (``tests/data/costgraphs/resnet18.json``, one thread of an AMD EPYC, 158 ms for
    the whole model; server ms the UE's / 10) with UE times x 3 (475 ms; here quiet 10x-slowed local runs
    took 436-580 ms). ``ClientOptions.costs`` is planned as given (``ue_slowdown`` slows the runs, not a
    given graph). For ``auto`` at 100 Mbit/s, 30 requests: prefetch for UE totals of 316 ms to 3.2 s
    (``planning.choose`` offline), so the calibration's scale (0.25-4x) keeps it prefetching; local
    below ~200 ms, invest above ~3.9 s."""
    from partitioner.costgraph import CostGraph

    return CostGraph.from_json(COSTGRAPHS / "resnet18.json").scaled(ue=3.0)


@pytest.fixture
def prefetching_client(slowed_resnet18_costs):
    """``prefetching_client(address, **overrides)`` -> a ``CoinferClient`` (a context manager) of
    torchvision:resnet18 whose cheapest stream is "run local while the warm target's weights go up": policy
    auto, 100 Mbit/s planned (paced) and 2 ms RTT, no probe, a CPU-shared UE 10x slower than this CPU that
    pays 1e-6 ms of CPU per byte sent, 30 requests to come, a new tenant. Its plans start from a kept cost
    graph (``slowed_resnet18_costs``), not from a profile taken now: on a loaded machine (2 cores, load
    ~5-9) the profile of the 10x-slowed UE came out at 3.8 s per request (the profile's wall time x 10, the
    waiting included; a slowed run sleeps 9x its CPU time only) and the first plan went "invest" (session
    12: three tests failed so). A remote request is given up after 120 s, not after the deadline drawn from
    the prediction's spread (``ue_client.deadline``; under load ~10 one fell back there): these tests are
    about prefetching, tests/test_ue_client.py about the deadline. ``overrides`` are ``ClientOptions``
    fields."""
    from partitioner.uecpu import UeCpu
    from ue_client import CoinferClient, new_tenant

    def make(address: str, **overrides: Any):
        opts: dict[str, Any] = dict(policy="auto", link={"uplink_mbps": 100.0, "rtt_ms": 2.0}, tenant=new_tenant(),
                                    ue_slowdown=10.0, send_cpu=UeCpu(send_ms_per_byte=1e-6, shared=True),
                                    probe=False, horizon=30, costs=slowed_resnet18_costs,
                                    timeout_ms=120_000.0)
        opts.update(overrides)
        return CoinferClient("torchvision:resnet18", server=address, **opts)

    return make

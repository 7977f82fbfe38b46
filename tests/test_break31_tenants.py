"""break31 F4-F6, each attacked again against a real server (in-process ``ServerThread`` on loopback port 0, or a
``coinfer-edge serve`` process) with real gRPC clients (F2/F3 are in ``tests/test_break31.py``).

F4: every tenant's default ``weight_mb`` was 256 MiB whatever the cache: under ``--memory-mb 1024`` (a 256 MiB
cache) alice filled the cache with idle weights and bob's 64 MiB upload was refused "weight cache full ... other
tenants' weights are not evicted" for as long as hers stayed; the refusal's numbers (capacity, his freeable bytes)
let bob binary-search the bytes others held. Now a tenant's ``weight_mb`` is room reserved for it alone (the given
ones must fit the cache); the others share the rest, each keeping a fair share when another needs room (session 31:
session 30 split the rest equally among every tenant in the file, a few MiB each in a file of hundreds); an upload
fails only over the caller's own room, and the refusal names only the caller's own numbers. F5: another tenant's
session id answered PERMISSION_DENIED where an unknown one answered NOT_FOUND (Stats, UploadHeader); now both answer
the same. F6: ``CoinferClient(..., profile_runs=1)`` was built, then its first call raised a raw ``ProfilerError``;
now the options refuse it. Each test failed before its fix (checked once against main at 388306e0's server and
options).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from edge_server.auth import AuthConfigError, Authenticator
from edge_server.config import MiB, ServerConfig
from edge_server.tensor_codec import encode_weight_chunks
from edge_server.testing import ServerThread
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

TIMEOUT = 60
ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"alice": "alice-token-0031", "bob": "bob-token-000031", "ops": "ops-token-000031"}
CACHE_MB = 16


def _tokens(path: Path, quotas: dict[str, dict] | None = None) -> Path:
    """A tokens file of alice, bob and the operator ops (no weights of its own), with ``quotas`` per tenant."""
    quotas = quotas or {}
    tenants = {
        name: {"token": TOKENS[name], **({"quota": quotas[name]} if name in quotas else {})}
        for name in ("alice", "bob")
    }
    tenants["ops"] = {"token": TOKENS["ops"], "operator": True, "quota": {"weight_mb": 0}}
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def _stub(srv: ServerThread, tenant: str) -> tuple[grpc.Channel, pb_grpc.EdgeServiceStub]:
    from ue_client import wire

    ch = wire.channel(srv.address, token=TOKENS[tenant])
    return ch, pb_grpc.EdgeServiceStub(ch)


def _weight(mb: float, seed: int) -> torch.Tensor:
    return torch.full((int(mb * MiB) // 4,), float(seed), dtype=torch.float32)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _upload(stub, *weights: torch.Tensor, session_id: str = "") -> pb.UploadWeightsResponse:
    msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(session_id=session_id))]
    for w in weights:
        msgs += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(_sha(w), w, 1 << 20)]
    return stub.UploadWeights(iter(msgs), timeout=TIMEOUT)


def _refusal(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def _store(stub) -> pb.StoreStats:
    return stub.Stats(pb.StatsRequest(), timeout=TIMEOUT).store


def _numbers(text: str) -> set[int]:
    return {int(x) for x in re.findall(r"\d+", text)}


class _Session:
    """A raw Session stream of one tenant, held open until :meth:`close`."""

    def __init__(self, stub) -> None:
        self._q: queue.Queue = queue.Queue()
        self._q.put(pb.SessionRequest(open=pb.OpenSession(model_id="m")))

        def gen():
            while (m := self._q.get()) is not None:
                yield m

        self._it = stub.Session(gen(), timeout=TIMEOUT)
        self.id = next(self._it).opened.session_id

    def close(self) -> None:
        self._q.put(None)
        for _ in self._it:
            pass


@pytest.fixture()
def served(tmp_path):
    """A server with a 16 MiB cache; alice and bob give no ``weight_mb``: they share the 16 MiB (ops reserves none)."""
    cfg = ServerConfig(cache_bytes=CACHE_MB * MiB, auth_tokens_file=str(_tokens(tmp_path / "tokens.json")))
    with ServerThread(config=cfg) as srv:
        yield srv


def test_f4_idle_weights_give_way_down_to_a_fair_share(served) -> None:
    """alice fills the whole shared 16 MiB with idle weights (no session, nothing pinned; she may: nobody else needs
    it); bob then uploads his 8 MiB: alice's least recently used weights over her fair share (16 / 2) go, and once
    she is within it bob's further uploads cycle his own weights, never hers. Session 30's static equal shares kept
    her at 8 MiB even while bob held nothing."""
    a_ch, a = _stub(served, "alice")
    b_ch, b = _stub(served, "bob")
    with a_ch, b_ch:
        assert _store(a).capacity_bytes == _store(b).capacity_bytes == CACHE_MB * MiB  # the rest they share
        mine = [_weight(4, 10 + i) for i in range(4)]
        _upload(a, *mine)
        assert (_store(a).bytes_used, _store(a).evictions) == (16 * MiB, 0)
        bobs = [_weight(4, 20), _weight(4, 21)]
        r = _upload(b, *bobs)
        assert [w.sha256 for w in r.weights] == [_sha(w) for w in bobs]
        assert _store(b).bytes_used == 8 * MiB
        held = _store(a)
        assert held.bytes_used == 8 * MiB and held.evictions == 2
        present = a.QueryWeights(pb.QueryWeightsRequest(sha256=[_sha(w) for w in mine]), timeout=TIMEOUT).present
        assert list(present) == [_sha(w) for w in mine[2:]]  # her two oldest went
        _upload(b, _weight(4, 22), _weight(4, 23))  # bob past his fair share: his own oldest go
        assert _store(b).bytes_used == 8 * MiB and _store(b).evictions == 2
        after = _store(a)
        assert (after.bytes_used, after.evictions) == (held.bytes_used, held.evictions)  # nothing more of hers


def test_f4_a_refusal_names_only_the_callers_own_numbers(served) -> None:
    """A weight over the shared rest is refused naming that rest; with alice's session pinning her 8 MiB (half the
    rest: her cap, break36 F3) and bob's his own 8, bob's refusal names his weight and his bytes: no number about the
    cache's use or alice (before break31: the capacity and his freeable bytes, so the others' could be searched for).
    Once the sessions end, his own oldest weight makes the room (hers is within her fair share)."""
    a_ch, a = _stub(served, "alice")
    b_ch, b = _stub(served, "bob")
    with a_ch, b_ch:
        big = _weight(17, 31)
        e = _refusal(_upload, a, big)
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota" in e.details(), e.details()
        assert _numbers(e.details().replace(_sha(big)[:12], "")) <= {16 * MiB, 17 * MiB}, e.details()
        sa, sb = _Session(a), _Session(b)
        try:
            _upload(a, *[_weight(4, 32 + i) for i in range(2)], session_id=sa.id)
            _upload(b, *[_weight(4, 36 + i) for i in range(2)], session_id=sb.id)
            e = _refusal(_upload, b, _weight(2, 38))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry" in e.details() and _numbers(e.details()) <= {2 * MiB, 8 * MiB}, e.details()
            assert (_store(a).bytes_used, _store(b).bytes_used) == (8 * MiB, 8 * MiB)
        finally:
            sa.close()
            sb.close()
        _upload(b, _weight(2, 38))
        assert _store(b).bytes_used == 6 * MiB and _store(a).bytes_used == 8 * MiB


def test_one_sharer_cannot_pin_the_whole_rest(served) -> None:
    """break36 F3: a sharer's session pinned the whole rest (pinned_mb's default was the whole 256 MiB cache at
    --memory-mb 1024) and the other sharer was refused even 1 MiB while it stayed open. Now a sharer pins at most
    half the rest: alice's third 4 MiB weight is not pinned, and bob uploads his 8 MiB beside her open session."""
    a_ch, a = _stub(served, "alice")
    b_ch, b = _stub(served, "bob")
    with a_ch, b_ch:
        sa = _Session(a)
        try:
            try:
                _upload(a, *[_weight(4, 60 + i) for i in range(3)], session_id=sa.id)
            except grpc.RpcError as e:  # her third pin over her cap
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in e.details(), e.details()
            assert _store(a).pinned_bytes <= 8 * MiB
            _upload(b, _weight(4, 70), _weight(4, 71))
            assert _store(b).bytes_used == 8 * MiB
        finally:
            sa.close()


def test_a_weight_another_group_member_holds_oldest_is_committed(tmp_path) -> None:
    """break36 F2: alice and bob in one dedup group, alice over her fair share; bob uploads the weight that is her
    least recently used one: making room dropped her entry, which deleted the blob under bob's commit (INTERNAL,
    KeyError). Now the weight being committed is kept: bob's upload succeeds and alice still sees it."""
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": {n: {"token": TOKENS[n]} for n in ("alice", "bob")},
                                "groups": {"lab": ["alice", "bob"]}}))
    cfg = ServerConfig(cache_bytes=CACHE_MB * MiB, auth_tokens_file=str(path))
    with ServerThread(config=cfg) as srv:
        a_ch, a = _stub(srv, "alice")
        b_ch, b = _stub(srv, "bob")
        with a_ch, b_ch:
            first = _weight(6, 80)
            _upload(a, first)
            _upload(a, _weight(4, 81))
            _upload(b, _weight(4, 82))
            r = _upload(b, first)
            assert [w.sha256 for w in r.weights] == [_sha(first)]
            assert list(a.QueryWeights(pb.QueryWeightsRequest(sha256=[_sha(first)]), timeout=TIMEOUT).present) == [
                _sha(first)]
            assert _store(b).bytes_used == 10 * MiB


def test_a_tokens_file_of_many_tenants_leaves_each_one_the_whole_shared_cache(tmp_path) -> None:
    """Session 31's full grid: its tokens file grows by a tenant per UE client, and with session 30's equal shares
    (the cache over every tenant in the file) 585 tenants had 7 MiB each of a 4 GiB cache: vit_b_16's 9 MiB weights
    were refused ("exceeds the weight quota"), and 64 MiB over 200 tenants would not even start. Now the tenants
    without ``weight_mb`` share the cache: one of 200 uploads a 24 MiB model into a 64 MiB cache, a second its own
    24 MiB, and a third 32 MiB takes what the first two hold past their fair share (64 / 3), least recently used."""
    tenants = {f"ue{i}": {"token": f"token-of-ue-{i:04d}"} for i in range(200)}
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tenants": tenants}))
    cfg = ServerConfig(cache_bytes=64 * MiB, auth_tokens_file=str(path))
    from ue_client import wire

    with ServerThread(config=cfg) as srv:
        stubs = []
        try:
            for i in range(3):
                ch = wire.channel(srv.address, token=f"token-of-ue-{i:04d}")
                stubs.append((ch, pb_grpc.EdgeServiceStub(ch)))
            s0, s1, s2 = (st for _, st in stubs)
            _upload(s0, *[_weight(8, 70 + i) for i in range(3)])
            _upload(s1, *[_weight(8, 80 + i) for i in range(3)])
            assert _store(s0).bytes_used == _store(s1).bytes_used == 24 * MiB
            _upload(s2, *[_weight(8, 90 + i) for i in range(4)])
            got = [_store(st).bytes_used for st in (s0, s1, s2)]
            assert got[2] == 32 * MiB and sum(got) <= 64 * MiB, got
            assert min(got[:2]) >= 16 * MiB, got  # each of the first two keeps its fair share, weight-rounded
        finally:
            for ch, _ in stubs:
                ch.close()


def test_f4_quotas_that_overcommit_the_cache_are_refused_at_start_and_at_reload(tmp_path) -> None:
    """Given ``weight_mb`` summing past the cache: ``coinfer-edge serve`` exits 2 naming both, before listening; the
    same file at a reload (SIGHUP) keeps the tokens in force; tenants without weight_mb left under 1 MiB each are
    refused too."""
    over = _tokens(tmp_path / "over.json", {"alice": {"weight_mb": 40}, "bob": {"weight_mb": 40}})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [
        sys.executable,
        "-m",
        "edge_server.cli",
        "serve",
        "--port",
        "0",
        "--threads",
        "1",
        "--cache-mb",
        "64",
        "--auth-tokens",
        str(over),
    ]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the server started: {out[-500:]}")
    assert proc.returncode == 2, (out[-500:], err[-2000:])
    assert "listening on" not in out
    assert "weight_mb quotas sum to 80 MiB, more than the 64 MiB weight cache" in err, err[-2000:]

    good = _tokens(tmp_path / "t.json", {"alice": {"weight_mb": 40}})
    auth = Authenticator(good, weight_capacity=64 * MiB)
    assert auth.quota_of("alice").weight_mb == 40 and auth.quota_of("bob").weight_mb == 24
    assert auth.quota_of("gone").weight_mb == 0  # a tenant no longer in the file reserves nothing
    good.write_text(over.read_text())
    assert not auth.reload()
    assert auth.quota_of("bob").weight_mb == 24
    _tokens(good, {"alice": {"weight_mb": 64}})
    with pytest.raises(AuthConfigError, match=r"without weight_mb .* under 1 MiB"):
        Authenticator(good, weight_capacity=64 * MiB)


async def _reload(runtime) -> bool:
    return runtime.reload_tokens()


def test_f4_a_quota_lowered_at_reload_gives_its_room_back(tmp_path) -> None:
    """alice holds her 8 MiB; the operator reloads with alice 2 MiB, bob 14 MiB: bob's 13 MiB upload takes the room
    alice holds past her new quota (her least recently used unpinned weights), and she keeps at most 2 MiB."""
    path = _tokens(tmp_path / "tokens.json")
    cfg = ServerConfig(cache_bytes=CACHE_MB * MiB, auth_tokens_file=str(path))
    with ServerThread(config=cfg) as srv:
        a_ch, a = _stub(srv, "alice")
        b_ch, b = _stub(srv, "bob")
        with a_ch, b_ch:
            _upload(a, *[_weight(2, 40 + i) for i in range(4)])
            assert _store(a).bytes_used == 8 * MiB
            _tokens(path, {"alice": {"weight_mb": 2}, "bob": {"weight_mb": 14}})
            assert srv.call(_reload(srv.runtime))
            _upload(b, *[_weight(6.5, 50 + i) for i in range(2)])
            assert _store(b).bytes_used == 13 * MiB
            assert _store(a).bytes_used <= 2 * MiB


def test_f5_another_tenants_session_is_a_session_that_does_not_exist(served) -> None:
    a_ch, a = _stub(served, "alice")
    b_ch, b = _stub(served, "bob")
    with a_ch, b_ch:
        s = _Session(a)
        try:
            unknown = "0" * len(s.id)
            answers = []
            for sid in (s.id, unknown):
                e1 = _refusal(b.Stats, pb.StatsRequest(session_id=sid), timeout=TIMEOUT)
                e2 = _refusal(_upload, b, _weight(0.01, 60), session_id=sid)
                answers.append([(e.code(), e.details().replace(sid, "ID")) for e in (e1, e2)])
            assert answers[0] == answers[1], answers
            assert answers[0][0][0] == grpc.StatusCode.NOT_FOUND
            # alice herself still reads it and pins into it
            assert a.Stats(pb.StatsRequest(session_id=s.id), timeout=TIMEOUT).session.session_id == s.id
            _upload(a, _weight(0.01, 61), session_id=s.id)
        finally:
            s.close()


def test_f6_options_out_of_range_are_refused_when_the_client_is_built() -> None:
    import math

    from torch import nn

    from ue_client import CoinferClient
    from ue_client.errors import InputError

    m = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(1, 4)
    for kw, words in (
        ({"profile_runs": 1}, "profile_runs must be an int >= 2"),
        ({"profile_runs": 2.5}, "profile_runs must be an int >= 2"),
        ({"probe_bytes": 1.5}, "probe_bytes must be an int >= 1"),
        ({"ue_slowdown": math.inf}, "ue_slowdown must be a finite number >= 1"),
        ({"ue_slowdown": True}, "ue_slowdown must be a finite number >= 1"),
        ({"backoff_s": (1.0, math.inf)}, "backoff_s must be (first, largest) finite seconds"),
        ({"policy": "robust", "deadline_ms": math.inf}, "deadline_ms must be a finite number > 0"),
    ):
        t0 = time.monotonic()
        with pytest.raises(InputError) as e:
            CoinferClient(m, (x,), server="127.0.0.1:1", **kw)
        assert words in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
        assert time.monotonic() - t0 < 30
    with CoinferClient(m, (x,), profile_runs=2) as c:  # the least that estimates a variance still runs
        torch.testing.assert_close(c(x), m(x))


@pytest.mark.parametrize("value", [0.5, 47.9])
def test_a_fractional_integer_quota_is_refused_not_rounded(value: float) -> None:
    """break35 L1: ``weight_mb: 0.5`` started a server whose tenant could hold nothing, and 47.9 + 48.5 passed the
    over-commit check of a 96 MiB cache as 47 + 48."""
    from edge_server.auth import AuthConfigError, Quota

    with pytest.raises(AuthConfigError, match="quota weight_mb must be a whole number"):
        Quota.from_dict({"weight_mb": value}, "tokens file")
    assert Quota.from_dict({"weight_mb": 48.0}, "tokens file").weight_mb == 48


def test_tiny_weights_are_charged_their_bookkeeping(tmp_path) -> None:
    """break36 F1: each stored weight holds ~1.3 KB of Python objects its bytes do not count; 900,000 weights of 4
    bytes (charged 3.6 MB) took a ``--memory-mb 1024`` server from 363 to 1481 MiB. Now a weight counts for at least
    ``MIN_WEIGHT_CHARGE``: 300 one-float weights into a 1 MiB cache hold at most 128 of them (1 MiB / 8 KiB), the
    oldest evicted, where all 300 stayed (1.2 KB charged) before."""
    from edge_server.weight_store import MIN_WEIGHT_CHARGE

    cfg = ServerConfig(cache_bytes=1 * MiB, auth_tokens_file=str(_tokens(tmp_path / "tokens.json")))
    with ServerThread(config=cfg) as srv:
        a_ch, a = _stub(srv, "alice")
        with a_ch:
            for k in range(0, 300, 100):
                _upload(a, *[torch.tensor([float(k + i)]) for i in range(100)])
            st = _store(a)
            assert st.entries <= MiB // MIN_WEIGHT_CHARGE and st.evictions >= 300 - MiB // MIN_WEIGHT_CHARGE, st
            assert st.bytes_used == st.entries * MIN_WEIGHT_CHARGE <= MiB


def test_tiny_pinned_weights_count_their_charge_against_the_pin_cap(served) -> None:
    """break37 F1: the pin cap (half the rest with two sharers) counted raw bytes while the cache charges each weight
    at least 8 KiB: alice's session pinned 2048 one-float weights, charged the whole 16 MiB rest against 8 KiB
    pinned, and bob was refused even a 4-byte weight while it stayed open. Now her pins stop at the cap (charged)
    and bob uploads beside her open session."""
    from edge_server.weight_store import MIN_WEIGHT_CHARGE

    a_ch, a = _stub(served, "alice")
    b_ch, b = _stub(served, "bob")
    with a_ch, b_ch:
        sa = _Session(a)
        try:
            for k in range(0, 2048, 256):
                try:
                    _upload(a, *[torch.tensor([float(k + i)]) for i in range(256)], session_id=sa.id)
                except grpc.RpcError as e:  # her pins past the cap
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in e.details(), e.details()
            assert _store(a).pinned_bytes <= CACHE_MB * MiB // 2
            _upload(b, _weight(4, 90), _weight(1, 91), torch.tensor([1.0]))
            assert _store(b).bytes_used == 5 * MiB + MIN_WEIGHT_CHARGE
        finally:
            sa.close()

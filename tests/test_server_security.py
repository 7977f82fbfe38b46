"""Issue 11 (DESIGN.md §10): TLS, bearer-token tenants, isolation between tenants, against real servers
on loopback port 0 with real gRPC clients. Certificates are a throwaway CA made with ``cryptography``."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

import modelgraph as mg
from edge_server.auth import AuthConfigError, Authenticator, token_digest
from edge_server.config import MiB, ServerConfig
from edge_server.server import create_server, is_loopback
from edge_server.tensor_codec import encode_tensor_chunks, encode_weight_chunks
from edge_server.testing import ServerThread
from edge_server.weight_store import MIN_WEIGHT_CHARGE
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

TIMEOUT = 30
TOKENS = {"alice": "alice-token-0001", "bob": "bob-token-00002", "ops": "operator-token-3"}


# ------------------------------------------------------------------------------------------------------
# certificates


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, san: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("coinfer test CA", ca_key, _name("coinfer test CA"), ca_key, ca=True)
    out = {}

    def write(stem: str, cert, key) -> None:
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[stem] = str(d / f"{stem}.pem")
        if key is not None:
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            (d / f"{stem}.key").write_bytes(pem)
            out[f"{stem}_key"] = str(d / f"{stem}.key")

    write("ca", ca, None)
    for stem, san in (("server", True), ("client", False)):
        k = ec.generate_private_key(ec.SECP256R1())
        write(stem, _cert(f"coinfer {stem}", k, ca.subject, ca_key, ca=False, san=san), k)
    return out


def tls_channel(address: str, pki: dict[str, str], *, client_cert: bool = False) -> grpc.Channel:
    from ue_client import wire

    if client_cert:
        return wire.channel(address, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])
    return wire.channel(address, tls_ca=pki["ca"])


def health_status(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# ------------------------------------------------------------------------------------------------------
# TLS


def test_tls_session_works_and_plain_text_fails_cleanly(pki) -> None:
    cfg = ServerConfig(cache_bytes=64 * MiB, tls_cert_file=pki["server"], tls_key_file=pki["server_key"])
    w = torch.arange(4096, dtype=torch.float32)
    sha = hashlib.sha256(w.numpy().tobytes()).hexdigest()
    with ServerThread(config=cfg) as srv:
        with tls_channel(srv.address, pki) as ch:
            stub = pb_grpc.EdgeServiceStub(ch)
            assert stub.Hello(pb.HelloRequest(tenant="t"), timeout=TIMEOUT).protocol == "coinfer.v1"
            chunks = [pb.UploadWeightsRequest(header=pb.UploadHeader(tenant="t"))]
            chunks += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha, w, 4096)]
            r = stub.UploadWeights(iter(chunks), timeout=TIMEOUT)
            assert [x.sha256 for x in r.weights] == [sha] and not r.weights[0].already_present
            got = stub.QueryWeights(pb.QueryWeightsRequest(tenant="t", sha256=[sha]), timeout=TIMEOUT)
            assert list(got.present) == [sha]
        # a plain-text client gets a clean UNAVAILABLE (the handshake fails), and the server goes on
        with grpc.insecure_channel(srv.address) as plain:
            with pytest.raises(grpc.RpcError) as ei:
                pb_grpc.EdgeServiceStub(plain).Hello(pb.HelloRequest(tenant="t"), timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(srv.address, pki) as ch:
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_requires_a_client_certificate(pki) -> None:
    cfg = ServerConfig(
        cache_bytes=64 * MiB,
        tls_cert_file=pki["server"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"],
    )
    with ServerThread(config=cfg) as srv:
        with tls_channel(srv.address, pki) as ch, pytest.raises(grpc.RpcError) as ei:
            pb_grpc.EdgeServiceStub(ch).Hello(pb.HelloRequest(tenant="t"), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(srv.address, pki, client_cert=True) as ch:
            assert pb_grpc.EdgeServiceStub(ch).Hello(pb.HelloRequest(tenant="t"), timeout=TIMEOUT).protocol


def test_plain_text_only_on_loopback_unless_insecure() -> None:
    assert is_loopback("127.0.0.1:0") and is_loopback("[::1]:50051") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("10.1.2.3:1") and not is_loopback("[::]:1")
    import asyncio

    with pytest.raises(ValueError, match="--insecure"):  # refused before anything binds
        asyncio.run(create_server("0.0.0.0:0", config=ServerConfig(cache_bytes=64 * MiB)))


def test_without_tokens_only_loopback_and_nobody_is_operator(pki) -> None:
    """Single-tenant mode (no --auth-tokens: any caller names any tenant) was served on any address once
    TLS was given, and made every caller an operator; now it needs loopback or --insecure, and its callers
    are plain tenants. 192.0.2.1 (TEST-NET-1) is never this machine's: nothing binds."""
    import asyncio

    tls = {"tls_cert_file": pki["server"], "tls_key_file": pki["server_key"]}
    with pytest.raises(ValueError, match="without --auth-tokens"):
        asyncio.run(create_server("192.0.2.1:0", config=ServerConfig(cache_bytes=64 * MiB, **tls)))
    with pytest.raises(OSError, match="cannot bind"):  # --insecure lets it try (and it cannot bind there)
        asyncio.run(create_server("192.0.2.1:0", config=ServerConfig(cache_bytes=64 * MiB, insecure=True, **tls)))
    with ServerThread(config=ServerConfig(cache_bytes=64 * MiB, **tls)) as srv:
        assert not srv.runtime.caller(None, "t").operator
        with tls_channel(srv.address, pki) as ch:
            assert pb_grpc.EdgeServiceStub(ch).Stats(pb.StatsRequest(), timeout=TIMEOUT).active_sessions == 0


# ------------------------------------------------------------------------------------------------------
# authentication and isolation


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("auth") / "tokens.json"
    doc = {
        "tenants": {
            "alice": {"token": TOKENS["alice"]},
            "bob": {"token_sha256": token_digest(TOKENS["bob"])},
            "ops": {"token": TOKENS["ops"], "operator": True},
        }
    }
    p.write_text(json.dumps(doc))
    return p


@pytest.fixture(scope="module")
def auth_server(tokens_file):
    cfg = ServerConfig(cache_bytes=8 * MiB, staging_bytes=16 * MiB, auth_tokens_file=str(tokens_file))
    with ServerThread(config=cfg) as srv:
        yield srv


def stub_for(srv, tenant: str | None):
    from ue_client import wire

    ch = wire.channel(srv.address, token=TOKENS[tenant] if tenant else None)
    return ch, pb_grpc.EdgeServiceStub(ch)


def code_of(fn, *args, **kw) -> grpc.StatusCode | None:
    try:
        r = fn(*args, **kw)
        if hasattr(r, "__iter__") and not isinstance(r, pb.HelloResponse | pb.StatsResponse):
            for _ in r:
                pass
    except grpc.RpcError as e:
        return e.code()
    return None


def upload(stub, tenant: str, t: torch.Tensor) -> pb.UploadWeightsResponse:
    sha = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(tenant=tenant))]
    msgs += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha, t, 1 << 20)]
    return stub.UploadWeights(iter(msgs), timeout=TIMEOUT)


def every_call(stub) -> dict:
    """One call of each EdgeService method (bodies that need no token to be judged)."""
    spec = json.dumps({"not": "checked before auth"}).encode()
    return {
        "Hello": lambda: stub.Hello(pb.HelloRequest(), timeout=TIMEOUT),
        "ProfileGraph": lambda: stub.ProfileGraph(pb.ProfileGraphRequest(slice_spec_json=spec), timeout=TIMEOUT),
        "QueryWeights": lambda: stub.QueryWeights(pb.QueryWeightsRequest(sha256=["0" * 64]), timeout=TIMEOUT),
        "UploadWeights": lambda: stub.UploadWeights(
            iter([pb.UploadWeightsRequest(header=pb.UploadHeader())]), timeout=TIMEOUT
        ),
        "Session": lambda: list(stub.Session(iter([pb.SessionRequest(open=pb.OpenSession())]), timeout=TIMEOUT)),
        "Stats": lambda: stub.Stats(pb.StatsRequest(), timeout=TIMEOUT),
    }


def test_every_rpc_but_health_needs_a_token(auth_server) -> None:
    for tenant_token in (None, "wrong"):
        from ue_client import wire

        ch = wire.channel(auth_server.address, token=None if tenant_token is None else "not-a-known-token")
        stub = pb_grpc.EdgeServiceStub(ch)
        with ch:
            calls = every_call(stub)
            assert set(calls) == set(pb.DESCRIPTOR.services_by_name["EdgeService"].methods_by_name)
            for name, call in calls.items():
                assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, name
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING  # health is exempt


def test_the_tenant_comes_from_the_token(auth_server) -> None:
    ch, stub = stub_for(auth_server, "alice")
    with ch:
        assert stub.Hello(pb.HelloRequest(), timeout=TIMEOUT).protocol == "coinfer.v1"
        for call in (
            lambda: stub.Hello(pb.HelloRequest(tenant="bob"), timeout=TIMEOUT),
            lambda: stub.QueryWeights(pb.QueryWeightsRequest(tenant="bob", sha256=[]), timeout=TIMEOUT),
            lambda: upload(stub, "bob", torch.ones(4)),
            lambda: list(stub.Session(iter([pb.SessionRequest(open=pb.OpenSession(tenant="bob"))]), timeout=TIMEOUT)),
            lambda: stub.Stats(pb.StatsRequest(tenant="bob"), timeout=TIMEOUT),
        ):
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
        # naming itself, or nobody, is fine
        assert stub.QueryWeights(pb.QueryWeightsRequest(tenant="alice", sha256=[]), timeout=TIMEOUT) is not None
        assert stub.Stats(pb.StatsRequest(tenant="alice"), timeout=TIMEOUT) is not None


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)

    def forward(self, x):
        return torch.relu(self.fc(x))


def _tiny_slice(seed: int):
    """:class:`Tiny` with weights of ``seed`` (eval mode), an input (2, 64) float32, its captured graph, the split
    with every op on the server (``split_at(0)``) and that split's slice: (net, x, graph, split, spec)."""
    torch.manual_seed(seed)
    net = Tiny().eval()
    x = torch.randn(2, 64)
    graph = mg.capture(net, (x,), name="tiny")
    split = graph.split_at(0)
    return net, x, graph, split, mg.make_slice(graph, split)


def test_another_tenants_weights_are_invisible_unusable_unevictable_undetectable(auth_server) -> None:
    _net, x, graph, split, spec = _tiny_slice(3)
    shas = sorted({e.sha256 for e in spec.weights.values()})
    a_ch, a = stub_for(auth_server, "alice")
    b_ch, b = stub_for(auth_server, "bob")
    ops_ch, ops = stub_for(auth_server, "ops")
    with a_ch, b_ch, ops_ch:
        # bob uploads the model's weights (and a big blob: 2 MiB of the 8 MiB cache the tenants share)
        for name, e in spec.weights.items():
            r = upload(b, "", graph.weight_values[name])
            assert r.weights[0].sha256 == e.sha256
        big = torch.arange(450_000, dtype=torch.float32)  # 1.8 MB
        upload(b, "", big)
        # visible: alice sees none of bob's weights
        assert list(a.QueryWeights(pb.QueryWeightsRequest(sha256=shas), timeout=TIMEOUT).present) == []
        assert sorted(b.QueryWeights(pb.QueryWeightsRequest(sha256=shas), timeout=TIMEOUT).present) == shas
        b_stats = b.Stats(pb.StatsRequest(), timeout=TIMEOUT)
        # usable: a session of alice on a slice naming them must upload them first
        msgs = [pb.SessionRequest(open=pb.OpenSession(model_id="tiny", slice_spec_json=spec.to_json().encode()))]
        msgs.append(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1)))
        msgs += [pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(1, split.cut_tensors[0], x, 1 << 16)]
        # the request waits for weights alice does not have; it is cancelled after its inputs (were bob's
        # weights usable it would have finished first: RequestDone with outputs)
        msgs.append(pb.SessionRequest(cancel_request=pb.CancelRequest(request_id=1)))
        answers = list(a.Session(iter(msgs), timeout=TIMEOUT))
        assert sorted(answers[0].opened.missing_weights) == shas
        failed = [m.request_failed for m in answers if m.WhichOneof("msg") == "request_failed"]
        assert [(f.request_id, f.code) for f in failed] == [(1, grpc.StatusCode.CANCELLED.value[0])]
        assert not any(m.WhichOneof("msg") in ("output", "request_done") for m in answers)
        # detectable: alice's upload of the same content is new to her and costs her the bytes; bob's
        # view does not move, and alice's Stats show only her own bytes
        a_before = a.Stats(pb.StatsRequest(), timeout=TIMEOUT).store
        assert a_before.bytes_used == 0 and a_before.entries == 0
        name0 = next(iter(spec.weights))
        r = upload(a, "", graph.weight_values[name0])
        assert not r.weights[0].already_present
        a_after = a.Stats(pb.StatsRequest(), timeout=TIMEOUT).store
        assert a_after.bytes_used == r.weights[0].nbytes and a_after.entries == 1
        assert b.Stats(pb.StatsRequest(), timeout=TIMEOUT).store == b_stats.store
        # evictable: alice filling the cache cannot push out bob's weights within his fair share of it (the 8 MiB
        # the tenants without weight_mb share: 4 MiB each while both hold weights); her own oldest go (break31 F4,
        # session 31), and a weight over the whole shared cache is refused in words that say nothing of bob
        upload(a, "", torch.arange(1_000_000, dtype=torch.float32) + 1)  # 4 MB
        upload(a, "", torch.arange(1_000_000, dtype=torch.float32) + 2)  # 4 MB more: her oldest go
        assert a.Stats(pb.StatsRequest(), timeout=TIMEOUT).store.evictions >= 1
        with pytest.raises(grpc.RpcError) as e:
            upload(a, "", torch.arange(2_200_000, dtype=torch.float32))  # 8.8 MB
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "weight quota of tenant 'alice': 8388608 bytes" in e.value.details() and "cache" not in e.value.details()
        assert b.Stats(pb.StatsRequest(), timeout=TIMEOUT).store.evictions == 0
        assert sorted(b.QueryWeights(pb.QueryWeightsRequest(sha256=shas), timeout=TIMEOUT).present) == shas
        a_after = a.Stats(pb.StatsRequest(), timeout=TIMEOUT).store
        # only the operator reads another tenant's stats, and sees everyone's bytes
        assert code_of(a.Stats, pb.StatsRequest(tenant="bob"), timeout=TIMEOUT) == grpc.StatusCode.PERMISSION_DENIED
        whole = ops.Stats(pb.StatsRequest(tenant="bob"), timeout=TIMEOUT)
        assert whole.tenant_bytes == b_stats.store.bytes_used
        assert whole.store.bytes_used == b_stats.store.bytes_used + a_after.bytes_used
        upload(a, "", torch.arange(450_000, dtype=torch.float32) + 1)  # her fair share is hers to fill


def test_tokens_file_is_checked_and_reloaded(tmp_path) -> None:
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"tenants": {"a": {"token": "aaaaaaaaaa"}}}))
    auth = Authenticator(p)
    assert auth.authenticate("Bearer aaaaaaaaaa").tenant == "a"
    assert auth.authenticate("Bearer bbbbbbbbbb") is None and auth.authenticate(None) is None
    assert auth.authenticate("Basic aaaaaaaaaa") is None
    p.write_text(json.dumps({"tenants": {"b": {"token": "bbbbbbbbbb", "quota": {"sessions": 2}}}, "groups": {}}))
    assert auth.reload()
    assert auth.authenticate("Bearer aaaaaaaaaa") is None
    assert auth.authenticate("Bearer bbbbbbbbbb").quota.sessions == 2
    p.write_text("{not json")
    assert not auth.reload()  # a bad file keeps the current tokens
    assert auth.authenticate("Bearer bbbbbbbbbb").tenant == "b"
    for bad in (
        {"tenants": {}},
        {"tenants": {"a": {}}},
        {"tenants": {"a": {"token": "short"}}},
        {"tenants": {"a": {"token": "aaaaaaaaaa", "quota": {"nope": 1}}}},
        {"tenants": {"a": {"token": "aaaaaaaaaa"}, "b": {"token": "aaaaaaaaaa"}}},
        {"tenants": {"a": {"token": "aaaaaaaaaa"}}, "groups": {"g": ["zz"]}},
    ):
        p.write_text(json.dumps(bad))
        with pytest.raises(AuthConfigError):
            Authenticator(p)


# ------------------------------------------------------------------------------------------------------
# the device side


def test_client_over_tls_with_a_token_runs_remotely_and_exactly(pki, tokens_file) -> None:
    from modelgraph import zoo
    from ue_client import CoinferClient
    from ue_client.options import ClientOptions
    from ue_client.verify import max_abs_diff

    cfg = ServerConfig(
        cache_bytes=64 * MiB,
        tls_cert_file=pki["server"],
        tls_key_file=pki["server_key"],
        auth_tokens_file=str(tokens_file),
        threads=1,
    )
    with ServerThread(config=cfg) as srv:
        opts = ClientOptions(policy="offload", link=None, token=TOKENS["alice"], tls_ca=pki["ca"], fallback=False)
        assert opts.tenant == ""  # the token names the tenant
        with CoinferClient(zoo.spec("diamond"), server=srv.address, options=opts) as c:
            x = c.example_inputs
            for _ in range(2):
                assert max_abs_diff(c(*x), c.reference(*x)) == 0.0
                assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
        st = srv.runtime.stats()
        assert st.sessions_opened == 1 and srv.runtime.sessions.opened("alice") == 1


def test_client_never_falls_back_on_an_auth_failure(auth_server, cli, monkeypatch) -> None:
    """A refused token is the user's error: the library raises AccessDenied even with fallback on, and
    ``coinfer-ue run`` (its ``main``, in-process: a process's exit status and stderr are checked by
    test_user_zoo's test_cli_no_fallback_server_death_keeps_finished_requests_in_json) exits 2 with the
    status in one line."""

    from modelgraph import zoo
    from ue_client import CoinferClient
    from ue_client.errors import AccessDenied
    from ue_client.options import ClientOptions

    opts = ClientOptions(policy="offload", token="not-a-known-token", fallback=True)
    with CoinferClient(zoo.spec("diamond"), server=auth_server.address, options=opts) as c:
        with pytest.raises(AccessDenied) as ei:
            c(*c.example_inputs)
        assert ei.value.code == "UNAUTHENTICATED"
    opts = ClientOptions(policy="offload", token=TOKENS["alice"], tenant="bob", fallback=True)
    with CoinferClient(zoo.spec("diamond"), server=auth_server.address, options=opts) as c:
        with pytest.raises(AccessDenied) as ei:
            c(*c.example_inputs)
        assert ei.value.code == "PERMISSION_DENIED"
    monkeypatch.setenv("COINFER_TOKEN", "not-a-known-token")  # the token from the environment, as users pass it
    rc, out, err = cli("run", "--server", auth_server.address, "--model", zoo.spec("diamond"))
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "UNAUTHENTICATED" in lines[0], err


# ------------------------------------------------------------------------------------------------------
# quotas and idle sessions


class OpenStream:
    """A Session stream kept open from a queue; answers are collected by a thread."""

    def __init__(self, stub, first: pb.SessionRequest) -> None:
        import queue
        import threading

        self._q: queue.Queue = queue.Queue()
        self._q.put(first)
        self.answers: list[pb.SessionResponse] = []
        self.error: grpc.RpcError | None = None
        self.opened = threading.Event()

        def requests():
            while (m := self._q.get()) is not None:
                yield m

        def read():
            try:
                for r in stub.Session(requests(), timeout=TIMEOUT):
                    self.answers.append(r)
                    if r.WhichOneof("msg") == "opened":
                        self.opened.set()
            except grpc.RpcError as e:
                self.error = e
            finally:
                self.opened.set()

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()

    def send(self, m: pb.SessionRequest) -> None:
        self._q.put(m)

    def close(self, timeout: float = TIMEOUT) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    @property
    def session_id(self) -> str:
        assert self.opened.wait(TIMEOUT) and self.error is None, self.error
        return self.answers[0].opened.session_id


def wait_for(pred, timeout: float = TIMEOUT) -> None:
    import time

    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory):
    """alice has tight quotas, bob the defaults."""
    p = tmp_path_factory.mktemp("quota") / "tokens.json"
    quota = {"weight_mb": 2, "pinned_mb": 1, "staging_mb": 3, "sessions": 2, "requests_in_flight": 1}
    p.write_text(
        json.dumps({"tenants": {"alice": {"token": TOKENS["alice"], "quota": quota}, "bob": {"token": TOKENS["bob"]}}})
    )
    cfg = ServerConfig(cache_bytes=64 * MiB, auth_tokens_file=str(p), session_idle_s=0)
    with ServerThread(config=cfg) as srv:
        yield srv


def mb_tensor(mb: float, seed: int) -> torch.Tensor:
    return torch.full((int(mb * MiB) // 4,), float(seed), dtype=torch.float32)


def test_weight_and_staging_quotas(quota_server) -> None:
    a_ch, a = stub_for(quota_server, "alice")
    b_ch, b = stub_for(quota_server, "bob")
    with a_ch, b_ch:
        # a weight over alice's weight quota (2 MiB), and one over her staging quota (3 MiB)
        assert code_of(upload, a, "", mb_tensor(2.5, 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # holding more than the quota evicts her own oldest weights, never fails on them
        for i in range(3):
            upload(a, "", mb_tensor(0.75, 10 + i))
        assert a.Stats(pb.StatsRequest(), timeout=TIMEOUT).store.bytes_used <= 2 * MiB
        # bob (default quotas) is unaffected
        assert not upload(b, "", mb_tensor(2.5, 1)).weights[0].already_present


def test_staging_quota(quota_server) -> None:
    a_ch, a = stub_for(quota_server, "alice")
    b_ch, b = stub_for(quota_server, "bob")
    with a_ch, b_ch:
        # two unfinished 1.5 MiB weights take alice's 3 MiB of staging; a third is refused
        parts = []
        for i in range(3):
            t = mb_tensor(1.5, 20 + i)
            sha = hashlib.sha256(t.numpy().tobytes()).hexdigest()
            parts.append(next(iter(encode_weight_chunks(sha, t, 1 << 18))))  # first chunk only
        msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader())] + [pb.UploadWeightsRequest(chunk=c) for c in parts]
        assert code_of(a.UploadWeights, iter(msgs), timeout=TIMEOUT) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_server.runtime.store.stats("alice").staging_bytes == 0  # the broken stream gave it back
        msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader())] + [pb.UploadWeightsRequest(chunk=c) for c in parts]
        code = code_of(b.UploadWeights, iter(msgs), timeout=TIMEOUT)
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # bob gets past staging: only "incomplete" remains


def test_session_pinned_and_in_flight_quotas(quota_server) -> None:
    _net, _x, _graph, _split, spec = _tiny_slice(5)
    open_a = pb.SessionRequest(open=pb.OpenSession(model_id="tiny", slice_spec_json=spec.to_json().encode()))
    a_ch, a = stub_for(quota_server, "alice")
    b_ch, b = stub_for(quota_server, "bob")
    with a_ch, b_ch:
        s1, s2 = OpenStream(a, open_a), OpenStream(a, open_a)
        try:
            assert s1.session_id and s2.session_id
            # sessions: a third of alice's is refused, bob still opens his
            s3 = OpenStream(a, open_a)
            s3.close()
            assert s3.error is not None and s3.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            sb = OpenStream(b, open_a)
            assert sb.session_id
            sb.close()
            assert sb.error is None
            # requests in flight over all her sessions: 1 (the first waits for its inputs)
            s1.send(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1)))
            wait_for(lambda: sum(s.requests.in_flight for s in quota_server.runtime.sessions.sessions.values()) == 1)
            s2.send(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=7)))
            wait_for(lambda: any(r.WhichOneof("msg") == "request_failed" for r in s2.answers))
            failed = [r.request_failed for r in s2.answers if r.WhichOneof("msg") == "request_failed"]
            assert (failed[0].request_id, failed[0].code) == (7, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
            # pinned bytes: alice's sessions may pin 1 MiB; a 1.5 MiB weight uploaded for s1 is refused
            t = mb_tensor(1.5, 40)
            sha = hashlib.sha256(t.numpy().tobytes()).hexdigest()
            msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(session_id=s1.session_id))]
            msgs += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha, t, 1 << 20)]
            code = code_of(a.UploadWeights, iter(msgs), timeout=TIMEOUT)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert quota_server.runtime.store.stats("alice").pinned_bytes <= 1 * MiB
            s1.send(pb.SessionRequest(cancel_request=pb.CancelRequest(request_id=1)))
        finally:
            s1.close()
            s2.close()


def test_compute_is_shared_per_tenant_then_per_session(quota_server) -> None:
    open_msg = pb.SessionRequest(open=pb.OpenSession(model_id="m"))
    a_ch, a = stub_for(quota_server, "alice")
    b_ch, b = stub_for(quota_server, "bob")
    with a_ch, b_ch:
        streams = [OpenStream(a, open_msg), OpenStream(a, open_msg), OpenStream(b, open_msg)]
        try:
            ids = [s.session_id for s in streams]
            shares = [quota_server.runtime.scheduler.share(i) for i in ids]
            # two tenants of weight 1: half the server each; alice's half split between her two sessions
            assert shares == pytest.approx([0.25, 0.25, 0.5])
        finally:
            for s in streams:
                s.close()


def test_idle_sessions_time_out_and_free_their_pins(tokens_file) -> None:
    cfg = ServerConfig(cache_bytes=64 * MiB, auth_tokens_file=str(tokens_file), session_idle_s=0.5)
    with ServerThread(config=cfg) as srv:
        ch, a = stub_for(srv, "alice")
        with ch:
            s = OpenStream(a, pb.SessionRequest(open=pb.OpenSession(model_id="m")))
            sid = s.session_id
            t = mb_tensor(0.5, 50)
            sha = hashlib.sha256(t.numpy().tobytes()).hexdigest()
            msgs = [pb.UploadWeightsRequest(header=pb.UploadHeader(session_id=sid))]
            msgs += [pb.UploadWeightsRequest(chunk=c) for c in encode_weight_chunks(sha, t, 1 << 20)]
            a.UploadWeights(iter(msgs), timeout=TIMEOUT)
            wait_for(lambda: s.error is not None)  # the idle session's stream ends with a status
            assert s.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in s.error.details()
            wait_for(lambda: srv.runtime.store.stats().pinned_bytes == 0)
            assert sid not in srv.runtime.sessions.sessions
            s.close()


# ------------------------------------------------------------------------------------------------------
# observability


def test_prometheus_metrics_per_tenant(tokens_file) -> None:
    import urllib.request

    _net, x, graph, split, spec = _tiny_slice(6)
    cfg = ServerConfig(cache_bytes=64 * MiB, auth_tokens_file=str(tokens_file), metrics_port=0)
    with ServerThread(config=cfg) as srv:
        port = srv.server.metrics_server.server_port
        ch, a = stub_for(srv, "alice")
        with ch:
            msgs = [pb.SessionRequest(open=pb.OpenSession(model_id="tiny", slice_spec_json=spec.to_json().encode()))]
            for name, e in spec.weights.items():
                msgs += [
                    pb.SessionRequest(weight=c)
                    for c in encode_weight_chunks(e.sha256, graph.weight_values[name], 1 << 16)
                ]
            msgs.append(pb.SessionRequest(begin_request=pb.BeginRequest(request_id=1)))
            msgs += [pb.SessionRequest(tensor=c) for c in encode_tensor_chunks(1, split.cut_tensors[0], x, 1 << 16)]
            answers = list(a.Session(iter(msgs), timeout=TIMEOUT))
            assert any(r.WhichOneof("msg") == "request_done" for r in answers)
            with wire_channel(srv.address) as plain:
                assert (
                    code_of(pb_grpc.EdgeServiceStub(plain).Stats, pb.StatsRequest()) == grpc.StatusCode.UNAUTHENTICATED
                )
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    # each weight charged at least MIN_WEIGHT_CHARGE (its bookkeeping, break36 F1)
    weight_bytes = sum(max(graph.weight_values[n].numel() * 4, MIN_WEIGHT_CHARGE) for n in spec.weights)
    for line in (
        'coinfer_requests_done_total{tenant="alice"} 1.0',
        'coinfer_request_seconds_count{tenant="alice"} 1.0',
        'coinfer_sessions_opened_total{tenant="alice"} 1.0',
        'coinfer_sessions_open{tenant="alice"} 0.0',
        f'coinfer_cache_bytes{{tenant="alice"}} {float(weight_bytes)}',
        'coinfer_rpc_errors_total{code="UNAUTHENTICATED",method="Stats"} 1.0',
    ):
        assert line in text, (line, [ln for ln in text.splitlines() if ln.startswith("coinfer_")])
    assert 'tenant="bob"' not in text  # no series for a tenant that did nothing


def wire_channel(address: str) -> grpc.Channel:
    from ue_client import wire

    return wire.channel(address)


# ``coinfer-edge serve --log-format json`` (one JSON object per line): tests/test_server_cli.py's
# test_serve_health_and_signal_drain runs its SIGINT server with it (one process start less).

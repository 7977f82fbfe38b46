"""Throwaway run credentials (testbed/credentials.py): a CA, a server certificate that a real gRPC TLS
handshake accepts for the names the UEs dial, and tokens whose hashes are what the server's file holds."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from testbed.credentials import CredentialsError, make_credentials
from testbed.credentials import main as credentials_main


def test_certificate_chain_names_and_tokens(tmp_path):
    creds = make_credentials(tmp_path / "run", ["ue0-a", "ue0-b", "pre"], hosts=["edge", "10.77.0.2"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "edge"} <= set(san.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.77.0.2")} <= set(
        san.get_values_for_type(x509.IPAddress))
    table = json.loads(creds.tokens_file.read_text())["tenants"]
    assert set(table) == set(creds.tokens) == {"ue0-a", "ue0-b", "pre"}
    assert len(set(creds.tokens.values())) == 3
    for tenant, token in creds.tokens.items():
        assert table[tenant] == {"token_sha256": hashlib.sha256(token.encode()).hexdigest()}
        assert creds.token_file(tenant).read_text() == token
        assert stat.S_IMODE(creds.token_file(tenant).stat().st_mode) == 0o600
    assert token not in creds.tokens_file.read_text()  # the server's file holds hashes only
    for secret in (creds.server_key, creds.tokens_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    opts = creds.client_options("ue0-b")
    assert opts == {"tenant": "ue0-b", "token": creds.tokens["ue0-b"], "tls_ca": str(creds.ca_cert)}
    assert creds.server_args()[:2] == ["--auth-tokens", str(creds.tokens_file)]
    with pytest.raises(CredentialsError, match="no token"):
        creds.client_options("nobody")
    # issued later (the server re-reads its file on SIGHUP): old tokens stay, the file lists all
    before = dict(creds.tokens)
    added = creds.add_tenants(["ue1-a", "ue0-a"])
    assert added["ue0-a"] == before["ue0-a"] and creds.tokens["ue1-a"] not in before.values()
    table = json.loads(creds.tokens_file.read_text())["tenants"]
    assert set(table) == {"ue0-a", "ue0-b", "pre", "ue1-a"}
    assert table["ue1-a"]["token_sha256"] == hashlib.sha256(added["ue1-a"].encode()).hexdigest()


def test_a_real_tls_handshake_accepts_the_certificate(tmp_path):
    creds = make_credentials(tmp_path, ["t"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server_creds = grpc.ssl_server_credentials([(creds.server_key.read_bytes(), creds.server_cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", server_creds)
    server.start()
    try:
        ok = grpc.ssl_channel_credentials(root_certificates=creds.ca_cert.read_bytes())
        for host in ("127.0.0.1", "localhost"):
            with grpc.secure_channel(f"{host}:{port}", ok) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        other = make_credentials(tmp_path / "other", ["t"])  # a CA the server's certificate is not from
        wrong = grpc.ssl_channel_credentials(root_certificates=other.ca_cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", wrong) as ch, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # the container health probe speaks TLS with the run's CA (docker-compose.yml's edge healthcheck)
        from edge_server.healthcheck import check

        address = f"127.0.0.1:{port}"
        assert check(address, 5.0, tls_ca=creds.ca_cert.read_bytes())
        assert not check(address, 5.0, tls_ca=other.ca_cert.read_bytes())
        assert not check(address, 5.0)  # plain text to a TLS server
    finally:
        server.stop(None)


@pytest.mark.parametrize("tenants", [[], ["a", "a"], ["../etc"], ["a b"]])
def test_bad_tenant_names_are_refused(tmp_path, tenants):
    with pytest.raises(CredentialsError):
        make_credentials(tmp_path, tenants)


def test_command_line(tmp_path, capsys):
    assert credentials_main(["--out", str(tmp_path), "--tenants", "ue-1,ue-2", "--hosts", "edge"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tenants"] == ["ue-1", "ue-2"] and (tmp_path / "tokens" / "ue-2.token").exists()
    assert credentials_main(["--out", str(tmp_path), "--tenants", "bad/name"]) == 2
    assert credentials_main(["--out", str(tmp_path), "--count", "3", "--hosts", "edge"]) == 0
    assert json.loads(capsys.readouterr().out)["tenants"] == ["ue-1", "ue-2", "ue-3"]
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["ue-1.token", "ue-2.token", "ue-3.token"]


@pytest.mark.slow
def test_secure_testbed_server_admits_issued_tenants_only(tmp_path):
    """A real ``coinfer-edge`` started by a secure Testbed: TLS with the run's CA, a token per tenant; a
    tenant issued after the start (the server re-reads its file on SIGHUP) is admitted too. (Slow: its own
    server start; the default run sees the secure testbed work in test_testbed_cli's tiny scenario.)"""
    import time

    from protos.coinfer.v1 import coinfer_pb2 as pb
    from testbed.launcher import Testbed
    from ue_client import wire

    with Testbed(tmp_path, mode="userspace", server_threads=1) as tb:
        tb.start_server(tenants=["alpha"])
        creds = tb.credentials
        assert creds is not None and "TLS" in tb.describe()

        def hello(tenant: str = "", **kw):
            ch = wire.channel(tb.local_server_address, **kw)
            try:
                return wire.stub(ch).Hello(pb.HelloRequest(tenant=tenant), timeout=10)
            finally:
                ch.close()

        def code_of(fn) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as err:
                fn()
            return err.value.code()

        ca = str(creds.ca_cert)
        assert hello("alpha", tls_ca=ca, token=creds.tokens["alpha"]).protocol == "coinfer.v1"
        assert code_of(lambda: hello("alpha", tls_ca=ca)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: hello("alpha", tls_ca=ca, token="not-a-token-at-all")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: hello("alpha", token=creds.tokens["alpha"])) == grpc.StatusCode.UNAVAILABLE  # no TLS
        beta = tb.issue_tenants(["beta"])["beta"]
        deadline = time.monotonic() + 10
        while True:
            try:
                assert hello("beta", tls_ca=ca, token=beta).protocol == "coinfer.v1"
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline, e
                time.sleep(0.1)
        assert code_of(lambda: hello("alpha", tls_ca=ca, token=beta)) == grpc.StatusCode.PERMISSION_DENIED
        assert hello("alpha", tls_ca=ca, token=creds.tokens["alpha"]).protocol == "coinfer.v1"
        spec = tb.access_spec(["gamma"], ["beta"])
        assert spec["pool"] == ["gamma"] and spec["tokens"]["beta"] == beta and spec["tls_ca"] == ca


@pytest.mark.slow
def test_restart_server_starts_empty_and_keeps_the_tokens(tmp_path):
    """``Testbed.restart_server`` (the bench's fresh server per model): the old server is gone, the new one
    admits the tokens issued before the restart and holds none of the weights the old one held."""
    import hashlib as hl

    from testbed.launcher import Testbed
    from ue_client import wire
    from ue_client.session import SessionStream

    data = bytes(range(256)) * 64
    sha = hl.sha256(data).hexdigest()
    with Testbed(tmp_path, mode="userspace", server_threads=1) as tb:
        tb.start_server(tenants=["alpha"])
        old = tb.server
        kw = {"tls_ca": str(tb.credentials.ca_cert), "token": tb.credentials.tokens["alpha"]}

        def held() -> set[str]:
            ch = wire.channel(tb.local_server_address, **kw)
            try:
                return wire.query_weights(wire.stub(ch), "alpha", [sha], timeout_s=10)
            finally:
                ch.close()

        ch = wire.channel(tb.local_server_address, **kw)
        try:
            st = wire.stub(ch)
            sess = SessionStream(st, "alpha", "m")
            chunk = wire.encode_weight_chunk(sha, "uint8", (len(data),), 0, len(data), data, field=wire.UPLOAD_CHUNK)
            wire.upload_weights(st, "alpha", sess.opened.session_id, iter([chunk]), timeout_s=30)
            sess.close()
        finally:
            ch.close()
        assert held() == {sha}
        tb.restart_server()
        assert old.poll() is not None and tb.server is not old and tb.server.poll() is None
        assert held() == set()

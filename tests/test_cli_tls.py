"""Session 33: ``coinfer-ue run`` / ``plan`` against a TLS server without ``--tls-ca`` or with the wrong one. Before,
``run`` fell back to local with one "UNAVAILABLE ... Socket closed" line and ``plan`` said the same; now the reason
names TLS and the flag to pass, up front on stderr, in every fallen-back request and in the ``--json`` report."""

from __future__ import annotations

import json

import pytest

from tests.test_server_cli import running_server

MODEL = "tests.user_zoo:int_input"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A ``coinfer-edge serve`` process speaking TLS on loopback: (address, our CA, another CA)."""
    from testbed.credentials import make_credentials

    ours = make_credentials(tmp_path_factory.mktemp("ours"), ["alice"])
    other = make_credentials(tmp_path_factory.mktemp("other"), ["bob"])
    with running_server("--threads", "1", "--tls-cert", str(ours.server_cert), "--tls-key",
                        str(ours.server_key)) as (_, address):
        yield address, str(ours.ca_cert), str(other.ca_cert)


def _report(path) -> dict:
    return json.loads(path.read_text())["requests"][0]


def test_run_without_tls_ca_says_the_server_speaks_tls(tls_server, cli, tmp_path) -> None:
    address, _, _ = tls_server
    out = tmp_path / "r.json"
    rc, _, err = cli("run", "--server", address, "--model", MODEL, "--json", str(out))
    assert rc == 0, err
    assert f"{address} speaks TLS" in err and "pass --tls-ca" in err, err
    rep = _report(out)
    assert rep["fallback"] and rep["fallback_reason"].startswith("TLS mismatch: "), rep
    assert "pass --tls-ca" in rep["fallback_reason"] and rep["fallback_kind"] == "unreachable", rep
    rc, _, err = cli("run", "--server", address, "--model", MODEL, "--no-fallback")
    assert rc == 2 and "speaks TLS" in err and "pass --tls-ca" in err, err


def test_run_with_the_wrong_ca_says_so_and_the_right_one_works(tls_server, cli, tmp_path) -> None:
    address, ca, wrong = tls_server
    out = tmp_path / "r.json"
    rc, _, err = cli("run", "--server", address, "--model", MODEL, "--tls-ca", wrong, "--json", str(out))
    assert rc == 0, err
    rep = _report(out)
    assert rep["fallback"] and rep["fallback_reason"].startswith("TLS mismatch: "), rep
    assert f"not signed by --tls-ca {wrong}" in rep["fallback_reason"], rep
    assert "not signed by --tls-ca" in err, err
    rc, _, err = cli("run", "--server", address, "--model", MODEL, "--tls-ca", ca, "--policy", "offload",
                     "--no-fallback", "--json", str(out))
    assert rc == 0 and not _report(out)["fallback"], err
    assert "TLS" not in err, err


def test_plan_against_a_tls_server_without_tls_ca(tls_server, cli) -> None:
    address, _, _ = tls_server
    rc, _, err = cli("plan", "--server", address, "--model", MODEL, "--uplink-mbps", "10", "--rtt-ms", "5",
                     "--runs", "2")
    assert rc == 2 and "speaks TLS" in err and "pass --tls-ca" in err, err


def test_a_plain_text_server_is_not_called_tls(cli, tmp_path) -> None:
    """The probe says TLS only when a TLS handshake completes: a plain-text server does not."""
    from ue_client.connection import speaks_tls

    with running_server("--threads", "1") as (_, address):
        assert not speaks_tls(address, 2.0)

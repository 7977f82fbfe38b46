"""coinfer-testbed end to end: a tiny scenario runs; failed and interrupted runs leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import scenarios
from testbed.netns import detect_mode

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "testbed.cli"]
NETNS = detect_mode().name == "netns"
needs_netns = pytest.mark.skipif(not NETNS, reason="needs root with namespaces, tc and cgroups")


def leftovers(pid: int, workdir: Path) -> dict[str, list[str]]:
    """Namespaces, root-namespace links and cgroups named cfr-<pid>-, and processes running from workdir."""
    prefix = f"cfr-{pid}-"
    out: dict[str, list[str]] = {"netns": [], "links": [], "cgroups": [], "procs": []}
    if os.geteuid() == 0:
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        out["netns"] = [line.split()[0] for line in ns.splitlines() if line.startswith(prefix)]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        out["links"] = [line for line in links.splitlines() if prefix in line]
        from testbed.cgroups import detect_cgroups

        base = detect_cgroups().base
        if base is not None and base.exists():
            out["cgroups"] = [p.name for p in base.iterdir() if p.name.startswith(prefix)]
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    out["procs"] = [line for line in ps.splitlines() if str(workdir) in line and "ps -ww" not in line]
    return {k: v for k, v in out.items() if v}


def run_cli(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def wait_gone(pid: int, workdir: Path, timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        left = leftovers(pid, workdir)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.2)


# One mode end to end in the default run: netns where this machine can (root, namespaces, tc, cgroups),
# else userspace; the other runs with the slow tests (``make test-all``). Both start the same scenario
# through the same CLI; they differ in how the link and the CPU share are emulated.
@pytest.mark.parametrize("mode", [pytest.param("userspace", marks=[pytest.mark.slow] if NETNS else []),
                                  pytest.param("netns", marks=needs_netns)])
def test_tiny_scenario_end_to_end(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "run"
    summary = tmp_path / "summary.json"
    p = subprocess.Popen([*CLI, "run", "tiny", "--mode", mode, "--out", str(out), "--json", str(summary)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 0, text
    assert f"mode={mode}" in text
    assert "TLS + a bearer token per tenant" in text  # the run's server is secure; the UEs got in
    creds = out / "credentials"
    table = json.loads((creds / "tokens.json").read_text())["tenants"]
    for k in range(2):
        spec = json.loads((out / f"ue{k}.spec.json").read_text())
        assert (out / f"ue{k}.spec.json").stat().st_mode & 0o077 == 0  # it holds the UE's tokens
        access = spec["access"]
        assert access["tls_ca"] == str(creds / "ca.pem") and access["pool"]
        assert set(access["pool"]) <= set(table) and set(access["tokens"]) == set(access["pool"])
        # the run is over: the spec stays as its record, without a usable token
        assert set(access["tokens"].values()) == {"<redacted>"}
        text = (out / f"ue{k}.spec.json").read_text()
        issued = [(creds / "tokens" / f"{name}.token").read_text().strip() for name in access["pool"]]
        assert issued and all(tok and tok not in text for tok in issued)
    # nor any other file the run leaves outside its credentials folder (the workers' result files repeat
    # their spec)
    every = [t.read_text().strip() for t in (creds / "tokens").glob("*.token")]
    assert every
    for f in out.rglob("*"):
        if f.is_file() and creds not in f.parents:
            text = f.read_text(errors="replace")
            assert not any(tok in text for tok in every), f
    res = json.loads(summary.read_text())
    assert res["mode"] == mode and res["ok"]
    assert len(res["ues"]) == 2 and res["requests"] == 4
    for ue in res["ues"]:
        assert len(ue["latency_ms"]) == 2 and all(x > 0 for x in ue["latency_ms"])
        assert ue["error"] is None
    assert wait_gone(p.pid, out) == {}


def test_run_flags_and_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[ue]]\nmodel = "torchvision:resnet18"\nuplink_mbps = -1\n')
    r = run_cli(["run", str(bad)])
    assert r.returncode == 2 and "uplink_mbps" in r.stderr
    r = run_cli(["run"])
    assert r.returncode == 2 and "--model" in r.stderr
    sc = scenarios.load("tiny")
    assert len(sc.ues) == 2 and sc.ues[0].model == "modelgraph.zoo:chain"
    assert "tiny" in scenarios.bundled()


@needs_netns
def test_failed_run_leaves_nothing(tmp_path: Path) -> None:
    """A UE with a model that does not exist: exit 1, no namespace, cgroup or process left."""
    out = tmp_path / "run"
    p = subprocess.Popen([*CLI, "run", "--model", "modelgraph.zoo:no_such_model", "--ues", "2", "--mode", "netns",
                          "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text, _ = p.communicate(timeout=90)
    assert p.returncode == 1, text
    assert "exited" in text
    assert wait_gone(p.pid, out) == {}


@needs_netns
def test_interrupted_run_leaves_nothing(tmp_path: Path) -> None:
    """SIGINT after the UEs started: exit 130, no namespace, veth, cgroup or process left."""
    out = tmp_path / "run"
    p = subprocess.Popen([*CLI, "run", "--model", "modelgraph.zoo:chain", "--ues", "2", "--requests", "100000",
                          "--mode", "netns", "--cpu", "0.2", "--out", str(out)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 60
    while time.monotonic() < end and not (out / "ue1.log").exists():
        time.sleep(0.1)
    assert (out / "ue1.log").exists(), "UEs never started"
    time.sleep(1.0)
    during = leftovers(p.pid, out)
    assert during.get("netns") and during.get("cgroups") and during.get("procs"), during
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=30)
    assert p.returncode == 130, text
    assert wait_gone(p.pid, out) == {}


@pytest.mark.parametrize("value", ["nan", "0", "-5", "2000", "inf"])
def test_bad_cpu_period_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """--cpu-period-ms outside the kernel's 1-1000 ms (or not a number): exit 2 with the flag named, before
    anything starts (nan once ended in a traceback from round())."""
    for cmd in (["run", "--model", "modelgraph.zoo:chain"], ["bench", "--quick"]):
        r = run_cli([*cmd, "--cpu-period-ms", value, "--out", str(tmp_path / "o")], timeout=60)
        assert r.returncode == 2 and "--cpu-period-ms" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)


def test_run_flags_beside_a_scenario_file_are_refused_and_requests_applies(tmp_path: Path) -> None:
    """review22 finding 5: ``run tiny --policy local --ues 3 --uplink-mbps 1`` ran the file's 2 coinfer UEs at 20
    Mbit/s and ``--requests 3`` was ignored (each UE ran the file's 2). A flags-mode option beside a scenario file is a
    usage error (exit 2, naming it); ``--requests`` sets every UE's count."""
    from testbed.cli import _scenario_of, build_parser

    r = run_cli(["run", "tiny", "--policy", "local", "--ues", "3", "--uplink-mbps", "1"])
    assert r.returncode == 2 and "--ues, --policy, --uplink-mbps: flags mode only" in r.stderr, r.stderr
    r = run_cli(["run", "no-such-scenario-32", "--model", "modelgraph.zoo:chain"])  # newuser32: "... sets the UEs"
    assert r.returncode == 2 and "cannot read scenario 'no-such-scenario-32'" in r.stderr, r.stderr
    args = build_parser().parse_args(["run", "tiny", "--requests", "3"])
    assert [u.requests for u in _scenario_of(args).ues] == [3, 3]
    args = build_parser().parse_args(["run", "tiny"])
    assert [u.requests for u in _scenario_of(args).ues] == [u.requests for u in scenarios.load("tiny").ues]
    args = build_parser().parse_args(["run", "--model", "modelgraph.zoo:chain", "--ues", "2"])
    sc = _scenario_of(args)
    got = [(u.policy, u.uplink_mbps, u.rtt_ms, u.cpu, u.requests) for u in sc.ues]
    assert got == [("coinfer", 20.0, 20.0, 0.25, 4)] * 2

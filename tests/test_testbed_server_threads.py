"""The bench's edge server set-up (session 14, srvnoise): ``coinfer-testbed bench --server-threads N`` and
``--server-omp-wait`` reach the config (defaults: 2 threads, OMP_WAIT_POLICY=PASSIVE); ``Testbed``'s
``server_threads`` reaches the server's command line (None: the server's own default rule, ``edge_server.cpus``)
and its ``server_env`` the server's process environment, both named in the testbed's description (the results'
header)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.bench.suite import BenchConfig
from testbed.cli import build_parser
from testbed.scenarios import ScenarioError


def test_server_flags_reach_the_config() -> None:
    a = build_parser().parse_args(["bench", "--out", "o"])
    cfg = BenchConfig.make(quick=False, server_threads=a.server_threads, server_omp_wait=a.server_omp_wait)
    assert (cfg.server_threads, cfg.server_omp_wait) == (2, "PASSIVE")  # the defaults since session 14
    a = build_parser().parse_args(["bench", "--out", "o", "--server-threads", "1", "--server-omp-wait", "default"])
    cfg = BenchConfig.make(quick=True, server_threads=a.server_threads, server_omp_wait=a.server_omp_wait)
    assert (cfg.server_threads, cfg.server_omp_wait) == (1, None)
    with pytest.raises(ScenarioError, match=r"in 1\.\."):
        BenchConfig.make(quick=False, server_threads=0)
    with pytest.raises(ScenarioError, match="passive"):
        BenchConfig.make(quick=False, server_omp_wait="sometimes")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--out", "o", "--server-omp-wait", "sometimes"])


def _argv_env(pid: int) -> tuple[list[str], dict[str, str]]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    env = dict(x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
    return [x.decode() for x in argv if x], {k.decode(): v.decode() for k, v in env.items()}


def test_testbed_server_threads_and_env(tmp_path: Path) -> None:
    """``server_threads`` None: no ``--threads`` on the server's command line (its own default rule), said in
    ``describe``; ``server_env`` reaches its process. (``server_threads=2`` is started by the next test, through
    ``Bench``: its server's argv and environment from /proc, and ``tb.describe()`` as meta.json's
    ``mode_description``; a case here started one more server for the same assertions.)"""
    from testbed.launcher import Testbed

    with Testbed(tmp_path, mode="userspace", server_threads=None, secure=False,
                 server_env={"OMP_WAIT_POLICY": "PASSIVE"}) as tb:
        tb.start_server()
        assert tb.server is not None
        argv, env = _argv_env(tb.server.pid)
        assert env.get("OMP_WAIT_POLICY") == "PASSIVE"
        assert "--threads" not in argv and "default --threads" in tb.describe()
        assert "OMP_WAIT_POLICY=PASSIVE" in tb.describe()


def test_bench_starts_its_server_with_the_configured_threads_and_wait_policy(tmp_path: Path, monkeypatch) -> None:
    """``Bench.run`` hands its config's server set-up to the real testbed's edge server (seen from /proc) and
    names it in the results' header (``meta.json``'s ``mode_description``)."""
    import json

    from testbed.bench.suite import Bench

    seen = {}

    def streams(self: Bench, tb) -> None:
        seen["argv"], seen["env"] = _argv_env(tb.server.pid)

    monkeypatch.setattr(Bench, "streams", streams)
    monkeypatch.setenv("COINFER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cfg = BenchConfig(quick=True, mode="userspace", scenarios=("stream",), models=("modelgraph.zoo:chain",))
    bench = Bench(cfg, tmp_path / "out", "coinfer-testbed bench (test)")
    bench.run()
    assert seen["env"].get("OMP_WAIT_POLICY") == "PASSIVE"
    assert seen["argv"][seen["argv"].index("--threads") + 1] == "2"
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert "--threads 2 OMP_WAIT_POLICY=PASSIVE" in meta["mode_description"]


@pytest.mark.parametrize("given, outer, want, start", [(None, None, "PASSIVE", True), (None, "ACTIVE", "ACTIVE", True),
                                                       ({}, None, None, False),
                                                       ({"OMP_WAIT_POLICY": "ACTIVE"}, None, "ACTIVE", False)])
def test_testbed_default_server_env(tmp_path: Path, monkeypatch, given, outer, want, start) -> None:
    """Every testbed command's server sleeps at OpenMP barriers unless told otherwise: ``Testbed`` without
    ``server_env`` adds PASSIVE (session 15: ``coinfer-testbed run`` and ``run robust`` started theirs spinning),
    a user's own ``OMP_WAIT_POLICY`` wins, ``{}`` adds nothing. Each case checks the environment the server's
    process is started with (``Testbed._env``, what ``_popen`` hands to ``Popen``); the default and the
    inherited one (``start``) also start the real server and read it from /proc (the other two: ``server_env``
    given, as ``test_testbed_server_threads_and_env`` starts one; a server start is ~3 s of the suite each)."""
    from testbed.launcher import Testbed

    if outer is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", outer)
    with Testbed(tmp_path, mode="userspace", secure=False, server_env=given) as tb:
        assert tb._env(tb.server_env).get("OMP_WAIT_POLICY") == want
        if start:
            tb.start_server()
            assert tb.server is not None
            _, env = _argv_env(tb.server.pid)
            assert env.get("OMP_WAIT_POLICY") == want


def test_run_command_takes_the_wait_policy() -> None:
    from testbed.launcher import OMP_WAIT_CHOICES

    a = build_parser().parse_args(["run", "--model", "modelgraph.zoo:chain"])
    assert OMP_WAIT_CHOICES[a.server_omp_wait] == {"OMP_WAIT_POLICY": "PASSIVE"}
    a = build_parser().parse_args(["run", "--model", "modelgraph.zoo:chain", "--server-omp-wait", "default"])
    assert OMP_WAIT_CHOICES[a.server_omp_wait] == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--server-omp-wait", "sometimes"])

"""The bench's edge server set-up (session 14, srvnoise): ``coinfer-testbed bench --server-threads N`` reaches
the config and the server's command line; without it the server runs at its own default rule
(``edge_server.cpus``); ``Testbed(server_env=...)`` reaches the server's process environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.bench.suite import BenchConfig
from testbed.cli import build_parser
from testbed.scenarios import ScenarioError


def test_server_threads_flag_reaches_the_config() -> None:
    a = build_parser().parse_args(["bench", "--out", "o"])
    assert BenchConfig.make(quick=False, server_threads=a.server_threads).server_threads is None
    a = build_parser().parse_args(["bench", "--out", "o", "--server-threads", "2"])
    assert BenchConfig.make(quick=True, server_threads=a.server_threads).server_threads == 2
    with pytest.raises(ScenarioError, match=">= 1"):
        BenchConfig.make(quick=False, server_threads=0)


def _argv_env(pid: int) -> tuple[list[str], dict[str, str]]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    env = dict(x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
    return [x.decode() for x in argv if x], {k.decode(): v.decode() for k, v in env.items()}


@pytest.mark.parametrize("threads", [None, 2])
def test_testbed_server_threads_and_env(tmp_path: Path, threads: int | None) -> None:
    from testbed.launcher import Testbed

    with Testbed(tmp_path, mode="userspace", server_threads=threads, secure=False,
                 server_env={"OMP_WAIT_POLICY": "PASSIVE"}) as tb:
        tb.start_server()
        assert tb.server is not None
        argv, env = _argv_env(tb.server.pid)
        assert env.get("OMP_WAIT_POLICY") == "PASSIVE"
        if threads is None:
            assert "--threads" not in argv and "default --threads" in tb.describe()
        else:
            assert argv[argv.index("--threads") + 1] == "2" and "--threads 2" in tb.describe()
        assert "OMP_WAIT_POLICY=PASSIVE" in tb.describe()

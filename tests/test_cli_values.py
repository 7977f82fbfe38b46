"""Wrong flag values on the three CLIs end with one line naming the flag and exit status 2, before anything
runs (session 16, newuser16: each case below was accepted before). No server, no model load: every refusal
comes first."""

from __future__ import annotations

import os

import pytest

from edge_server import cli as edge_cli
from testbed import cli as tb_cli
from ue_client import cli as ue_cli

CORES = len(os.sched_getaffinity(0))


def _exit_code(fn, argv) -> int:
    try:
        return fn(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize("argv, says", [
    (["--port", "70000"], "--port: port 70000 out of range"),  # gRPC listened on 70000 mod 65536 = 4464
    (["--port", "-1"], "--port: port -1 out of range"),  # ... and on 65535
    (["--metrics-port", "99999"], "--metrics-port: port 99999 out of range"),  # OverflowError traceback
    (["--health-port", "65536"], "--health-port: port 65536 out of range"),
    (["--staging-mb", "-1"], "--staging-mb must be >= 0"),  # "capacity must be >= 0"
    (["--threads", str(CORES + 1)], f"more than the {CORES} core(s)"),  # --threads 1000 served
    (["--max-calls-per-caller", "-1"], "--max-calls-per-caller must be 0 (no call gate) or"),
    (["--max-stranger-calls", "0"], "--max-stranger-calls must be a number in [1,"),
    (["--max-waiting-calls", "0"], "--max-waiting-calls must be a number in [1,"),
    (["--first-message-s", "nan"], "--first-message-s must be 0 (no deadline) or"),
    (["--upload-progress-kb", "0"], "--upload-progress-kb must be a number in [1, 1.04858e+06] KiB, got 0"),
    (["--data-progress-kb", "-64"], "--data-progress-kb must be a number in [1,"),
    (["--data-idle-s", "0"], "--data-idle-s must be a number in [0.1,"),  # the acknowledgement wait would give up
    (["--data-idle-s", "inf"], "--data-idle-s must be a number in [0.1,"),
    # inf / 5e9 served every Hello INTERNAL (a uint32 Limits field), 0.001 kept the event loop busy (session 24)
    (["--progress-interval-ms", "inf"], "--progress-interval-ms must be 0 (no progress reports) or"),
    (["--progress-interval-ms", "5e9"], "--progress-interval-ms must be 0 (no progress reports) or"),
    (["--progress-interval-ms", "0.001"], "--progress-interval-ms must be 0 (no progress reports) or"),
])
def test_edge_serve_refuses(capsys, argv, says):
    assert _exit_code(edge_cli.main, ["serve", "--port", "0", *argv]) == 2
    assert says in capsys.readouterr().err


def test_edge_call_gate_flags_reach_the_config():
    """review17 F4: the call gate's bounds (session 17) had no flags: a server without --auth-tokens, where every
    UE behind one address shares one caller's bound, could not raise it."""
    args = edge_cli.build_parser().parse_args(["serve", "--max-calls-per-caller", "1024", "--max-stranger-calls",
                                                "9000", "--max-waiting-calls", "64", "--first-message-s", "30"])
    cfg = edge_cli.config_from_args(args)
    assert (cfg.max_calls_per_caller, cfg.max_stranger_calls, cfg.max_waiting_calls_per_caller,
            cfg.first_message_s) == (1024, 9000, 64, 30.0)
    off = edge_cli.config_from_args(edge_cli.build_parser().parse_args(["serve", "--max-calls-per-caller", "0"]))
    assert off.max_calls_per_caller == 0


def test_edge_progress_flags_reach_the_config():
    """Session 24: the idle rules' progress (session 23: ``upload_progress_bytes``, ``data_progress_bytes``) and the
    data channel's idle time had no flags: an operator with slow UEs could not lower the progress they need."""
    args = edge_cli.build_parser().parse_args(["serve", "--upload-progress-kb", "256", "--data-idle-s", "12.5",
                                                "--data-progress-kb", "8"])
    cfg = edge_cli.config_from_args(args)
    assert (cfg.upload_progress_bytes, cfg.data_idle_s, cfg.data_progress_bytes) == (256 << 10, 12.5, 8 << 10)
    d, default = edge_cli.ServerConfig(), edge_cli.config_from_args(edge_cli.build_parser().parse_args(["serve"]))
    assert (default.upload_progress_bytes, default.data_idle_s, default.data_progress_bytes) == (
        d.upload_progress_bytes, d.data_idle_s, d.data_progress_bytes)


def test_edge_ports_in_range_parse():
    args = edge_cli.build_parser().parse_args(["serve", "--port", "65535", "--metrics-port", "0", "--health-port",
                                               "8081"])
    assert (args.port, args.metrics_port, args.health_port) == (65535, 0, 8081)
    assert edge_cli.config_from_args(args).health_port == 8081


@pytest.mark.parametrize("argv, says", [
    (["profile", "--threads", str(CORES + 1)], f"--threads must be in 1..{CORES}"),
    (["profile", "--warmup", "-1"], "--warmup must be >= 0"),
    (["profile", "--depth", "0"], "--depth must be >= 1"),
    (["profile", "--json", "/nonexistent-dir-16/p.json"], "directory /nonexistent-dir-16 does not exist"),
    (["plan", "--server-speedup", "2", "--uplink-mbps", "10", "--rtt-ms", "5", "--eps", "3"],
     "--eps must be in (0, 1)"),  # was a note in the table, exit 0
    (["plan", "--server-speedup", "2", "--uplink-mbps", "10", "--rtt-ms", "5", "--deadline-ms", "-3"],
     "--deadline-ms must be > 0"),
    # session 32: refused only after the capture and the UE profile (the file: "[Errno 2] No such file ...")
    (["profile", "--runs", "1"], "--runs must be >= 2"),
    (["plan", "--server-speedup", "2", "--uplink-mbps", "10", "--rtt-ms", "5", "--runs", "0"], "--runs must be >= 2"),
    (["plan", "--server-speedup", "2", "--uplink-mbps", "0", "--rtt-ms", "5"], "--uplink-mbps must be a finite"),
    (["plan", "--server-speedup", "2", "--uplink-mbps", "nan", "--rtt-ms", "5"], "--uplink-mbps must be a finite"),
    (["plan", "--server-speedup", "2", "--uplink-mbps", "10", "--downlink-mbps", "-1", "--rtt-ms", "5"],
     "--downlink-mbps must be a finite"),
    (["plan", "--server-speedup", "2", "--uplink-mbps", "10", "--rtt-ms", "-1"], "--rtt-ms must be a finite"),
    (["plan", "--server-speedup", "0", "--uplink-mbps", "10", "--rtt-ms", "5"], "--server-speedup must be a finite"),
    (["plan", "--server-profile", "/nonexistent-dir-32/s.json", "--uplink-mbps", "10", "--rtt-ms", "5"],
     "--server-profile /nonexistent-dir-32/s.json: no such file"),
    # newuser32: "data channel TLS files: [Errno 2] No such file or directory", after the model's capture
    (["run", "--server", "127.0.0.1:1", "--tls-ca", "/nonexistent-dir-32/ca.pem"],
     "--tls-ca /nonexistent-dir-32/ca.pem: no such file"),
    (["plan", "--server", "127.0.0.1:1", "--uplink-mbps", "10", "--rtt-ms", "5", "--tls-cert", "/nonexistent-32.pem",
      "--tls-key", "/nonexistent-32.key"], "--tls-cert /nonexistent-32.pem: no such file"),
    (["run", "--server", "127.0.0.1:1", "--interval-ms", "-5"], "--interval-ms must be in [0, 3600000]"),
    (["run", "--server", "127.0.0.1:1", "--interval-ms", "nan"], "--interval-ms must be in [0, 3600000]"),
    (["run", "--server", "127.0.0.1:1", "--threads", str(CORES + 1)], f"--threads must be in 1..{CORES}"),
    # run did every request, logged the failed write and printed "wrote PATH", exit 0
    (["run", "--server", "127.0.0.1:1", "--json", "/nonexistent-dir-16/r.json"], "does not exist"),
])
def test_ue_refuses(capsys, argv, says):
    assert _exit_code(ue_cli.main, [*argv, "--model", "modelgraph.zoo:chain"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, says", [
    (["bench", "--out", "/tmp/x16", "--server-threads", "1000"], "1000 threads on"),
    (["bench", "--out", "/tmp/x16", "--requests", "0"], "--requests: must be >= 1"),  # ran the default K
    (["bench", "--out", "/tmp/x16", "--requests", "-3"], "--requests: must be >= 1"),
    (["bench", "--out", "/tmp/x16", "--uplinks", "-5"], "every rate must be a finite number > 0"),
    (["bench", "--out", "/tmp/x16", "--uplinks", "nan"], "every rate must be a finite number > 0"),
    (["bench", "--out", "/tmp/x16", "--cpus", "0"], "a CPU share must be in (0,"),
    (["bench", "--out", "/tmp/x16", "--cpus", str(CORES + 3)], "a CPU share must be in (0,"),
    (["bench", "--out", "/tmp/x16", "--cpus", "abc"], "expected a share of a core"),
    (["bench", "--out", "/tmp/x16", "--multi-n", "a,2"], "--multi-n must be a comma list"),  # ValueError traceback
    (["bench", "--out", "/tmp/x16", "--multi-n", "0"], "--multi-n must be a comma list"),
    (["bench", "--out", "/tmp/x16", "--warm-requests", "-1"], "--warm-requests: must be >= 1"),
    (["bench", "--out", "/tmp/x16", "--warm-rounds", "0"], "--warm-rounds: must be >= 1"),
    (["bench", "--out", "/tmp/x16", "--cold-repeats", "-2"], "--cold-repeats: must be >= 1"),
    (["bench", "--out", "/tmp/x16", "--models", "resnet18,nosuchmodel"], "unknown torchvision model(s)"),
    (["run", "--model", "torchvision:resnet18", "--cpu", "0"], "a CPU share must be in (0,"),
    (["run", "--model", "torchvision:resnet18", "--uplink-mbps", "0"], "every rate must be"),
    (["run", "--model", "torchvision:resnet18", "--rtt-ms", "-1"], "every round trip must be"),
    (["run", "--model", "torchvision:resnet18", "--server-threads", str(CORES + 1)], "threads on"),
    (["run", "--model", "torchvision:resnet18", "--timeout", "-1"], "--timeout: must be a finite number"),
    (["run", "--model", "torchvision:resnet18", "--ues", "0"], "--ues: must be >= 1"),
])
def test_testbed_refuses(capsys, argv, says):
    assert _exit_code(tb_cli.main, argv) == 2
    assert says in capsys.readouterr().err
    assert not os.path.exists("/tmp/x16")


def test_testbed_values_in_range_parse():
    from testbed.bench.suite import BenchConfig

    a = tb_cli.build_parser().parse_args(["bench", "--out", "/tmp/x16", "--cpus", "10%,0.25", "--uplinks", "100,400",
                                          "--server-threads", str(CORES), "--requests", "2"])
    assert a.cpus == [0.1, 0.25] and a.uplinks == [100.0, 400.0] and a.server_threads == CORES and a.requests == 2
    cfg = BenchConfig.make(quick=True, models="resnet18,tests.user_zoo:dict_out", multi_n="1,2",
                           server_threads=CORES)
    assert cfg.models == ("resnet18", "tests.user_zoo:dict_out") and cfg.multi_n == (1, 2)


@pytest.mark.parametrize("value", [0, 1, (16 << 10) - 1, (64 << 20) + 1, 1.5e6, True])
def test_server_config_refuses_a_chunk_size_clients_would_not_keep(value):
    """``ServerConfig.max_chunk_bytes`` within ``ranges.CHUNK_BYTES``, the range the project's client takes a server's
    ``Limits.max_chunk_bytes`` in (``ue_client.wire.SERVER_CHUNK_BYTES``, session 25: below it a hostile server set
    the size of every message the UE sent). A server configured outside it would have had every clamped chunk of an
    honest client refused."""
    from edge_server.config import ServerConfig
    from edge_server.ranges import CHUNK_BYTES
    from ue_client.wire import SERVER_CHUNK_BYTES

    assert (CHUNK_BYTES.lo, CHUNK_BYTES.hi) == SERVER_CHUNK_BYTES
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        ServerConfig(max_chunk_bytes=value)
    ServerConfig(max_chunk_bytes=16 << 10)
    ServerConfig(max_chunk_bytes=64 << 20)

"""``coinfer-edge``: the edge server daemon.

    coinfer-edge serve [--host 127.0.0.1] [--port 50051] [--device cpu|cuda] [--tf32] [--cache-mb N]
                       [--threads N] [--max-sessions N] [--allocator equal|ara] [--memory-mb N]
                       [--op-time-ms MS] [--progress-interval-ms MS] [--verbose]
                       [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] [--insecure]
                       [--auth-tokens FILE] [--session-idle-s S]
                       [--max-calls-per-caller N] [--max-stranger-calls N] [--max-waiting-calls N]
                       [--first-message-s S]

``--threads`` defaults to max(1, cores - 1) (``edge_server.cpus``: the compute leaves one core to I/O).
Unless the environment sets ``OMP_WAIT_POLICY``, ``serve`` sets it to PASSIVE before torch (libgomp, which reads
it once, when it loads) is imported: this module imports nothing that loads torch at import time, ``main`` sets
the variable first and imports the server afterwards (``omp_wait_policy``).
Prints ``listening on HOST:PORT`` (flushed) once it serves, then in the same write ``data channel on
HOST:PORT`` when it runs one (the default) and ``health on HOST:PORT`` with ``--health-port``; SIGTERM/SIGINT
drain and exit 0.
Logging is configured here and only here.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import logging
import os
import signal
import sys

# Nothing imported here at module level may load torch (``omp_wait_policy``): edge_server.allocation,
# edge_server.cpus, edge_server.server and profiler.device_info are imported where they are used.
from edge_server.config import MiB, ServerConfig
from edge_server.ranges import (
    CALLS,
    CALLS_PER_CALLER,
    CELL_MBPS,
    CONTENDED_FIRST_MESSAGE_S,
    CPU_SECONDS,
    CPU_SHARE,
    DATA_IDLE_S,
    FIRST_MESSAGE_S,
    GRACE_S,
    IDLE_S,
    OP_TIME_MS,
    PROGRESS_INTERVAL_MS,
    PROGRESS_KB,
    READ_WINDOW_KB,
    READING_CALLS,
    READING_GRACE_S,
    READING_MB,
    RTT_MS,
    TARPIT_BURST,
    TARPIT_RATE,
)

logger = logging.getLogger("edge_server")
MAX_PROFILE_WORKERS = 64
"""Bound of ``--profile-workers``: each worker is a thread here and a child process with torch loaded."""
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"
"""``serve``'s OpenMP wait policy when the environment sets none (``omp_wait_policy``)."""


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime (torch's libgomp) is in this process already: it read its environment then."""
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in ln or "libiomp" in ln for ln in f)
    except OSError:
        return "torch" in sys.modules


def omp_wait_policy() -> str:
    """Make ``OMP_WAIT_POLICY`` PASSIVE in this process's environment unless it is set already; returns the line
    to log at start (which policy is in effect, and why).

    libgomp reads the variable once, when torch loads it, so this runs before anything imports torch (``main``,
    first thing for ``serve``); the profiling child processes inherit it. Unset, each of torch's OpenMP threads
    spins up to ~300,000 rounds at every barrier before it sleeps: with ``--threads 2`` beside other processes
    on 2 cores a descheduled thread stalls the other at each op while it burns the CPU the first one waits for.
    Measured (session 33, ``docs/results/cli/session33``: mobilenet_v2, ``--threads 2``, 2 busy-loop hogs on 2
    cores): ProfileGraph 11.95 s wall and 6.6 server CPU s unset (915 ms per iteration), 1.42 s and 0.47 CPU s
    PASSIVE (63 ms). With one thread the policy changes nothing."""
    user = os.environ.get("OMP_WAIT_POLICY")
    if user is not None:
        return f"OpenMP wait policy OMP_WAIT_POLICY={user} (set in the environment)"
    if _openmp_loaded():  # main() called in a process that loaded torch already (not the console script):
        # too late for this process; its environment is left as it is
        return ("OpenMP wait policy: libgomp's default (OMP_WAIT_POLICY unset when torch loaded, before "
                f"coinfer-edge could set {DEFAULT_OMP_WAIT_POLICY}; its threads spin at barriers): set "
                "OMP_WAIT_POLICY=PASSIVE in the environment")
    os.environ["OMP_WAIT_POLICY"] = DEFAULT_OMP_WAIT_POLICY
    return (f"OpenMP wait policy OMP_WAIT_POLICY={DEFAULT_OMP_WAIT_POLICY} (coinfer-edge's default: idle OpenMP "
            "threads sleep instead of spinning; set OMP_WAIT_POLICY to choose)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC), level, logger, msg, and exc (a traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig()  # the one source of defaults
    p = argparse.ArgumentParser(prog="coinfer-edge", description="coinfer edge server daemon")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server until SIGTERM/SIGINT")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=50051, help="port (0: any free port; default 50051)")
    s.add_argument("--device", default=d.device, help=f"cpu or cuda[:N] (default {d.device})")
    s.add_argument("--tf32", action="store_true",
                   help="CUDA: float32 convolutions and matmuls on TF32 tensor cores (faster, ~1e-3 from the UE's "
                        "float32 results; default off: float32 arithmetic)")
    cache_mb = d.cache_bytes // MiB
    s.add_argument(
        "--cache-mb",
        type=int,
        default=None,
        help=f"weight cache size in MiB (default {cache_mb}; under --memory-mb a quarter of the cap)",
    )
    s.add_argument(
        "--staging-mb", type=int, default=None, help="staging area in MiB (default half the cache, at least 64)"
    )
    s.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch intra-op threads per compute worker (default: max(1, (C - 1) // W) for C cores this process "
        "may use (affinity, cgroup CPU quota) and W compute workers (1): the compute leaves one core to the event "
        "loop and gRPC, so concurrent sessions' uploads do not wait for a core; 1 on a single core). Unless "
        "the environment sets OMP_WAIT_POLICY, the server sets it to PASSIVE before torch loads: with more than "
        "one thread torch's OpenMP threads then sleep at a barrier instead of spinning while a descheduled thread "
        "holds it up (mobilenet_v2's ProfileGraph with --threads 2 beside 2 busy processes on 2 cores: 915 ms per "
        "iteration and 6.6 CPU s unset, 63 ms and 0.5 CPU s PASSIVE); the policy in effect is logged at start. "
        "OMP_WAIT_POLICY=ACTIVE (or any value) in the environment is kept",
    )
    s.add_argument(
        "--max-sessions", type=int, default=d.max_sessions, help=f"concurrent sessions (default {d.max_sessions})"
    )
    s.add_argument(
        "--allocator",
        choices=["equal", "ara"],
        default="equal",
        help="compute and uplink sharing among sessions: equal shares, or ARA for UEs that send a profile "
        "(default equal)",
    )
    s.add_argument(
        "--ara-policy",
        choices=["mjoa", "neurosurgeon", "dads", "cic", "offload"],
        default="mjoa",
        help="the partitioner ARA plans each UE with; pick the policy the UEs run (default mjoa: cold, "
        "parallel uploading; offload: every UE runs everything on the server, ARA only allocates)",
    )
    s.add_argument(
        "--ara-planner",
        choices=["child", "inline"],
        default="child",
        help="where ARA's plans run: in a child process at niceness +10, killed past 10 CPU s per plan, 30 s "
        "without progress or 300 s in all (default), or on the server's planner thread (edge_server.plan_process)",
    )
    s.add_argument(
        "--cell-uplink-mbps",
        type=float,
        default=d.cell_uplink_mbps,
        help="uplink rate of the cell the UEs share, Mbit/s: a UE's claimed uplink or send rate counts for at most "
        "this in the allocator's plans, so a UE claiming more buys no larger share (default: unknown)",
    )
    s.add_argument(
        "--cell-downlink-mbps",
        type=float,
        default=d.cell_downlink_mbps,
        help="downlink rate of the cell, Mbit/s: a UE's claimed downlink rate counts for at most this in the "
        "allocator's plans (default: unknown)",
    )
    s.add_argument(
        "--cell-rtt-ms",
        type=float,
        default=d.cell_rtt_ms,
        help="round trip of the cell itself, ms: a UE's claimed round trip counts for at least this in the "
        "allocator's plans (default: unknown)",
    )
    s.add_argument(
        "--memory-mb",
        type=int,
        default=d.memory_bytes // MiB,
        help="server-wide memory cap in MiB: the process, weight cache, staging and all work in flight stay under "
        "it; work that would not fit is refused RESOURCE_EXHAUSTED (default 0: no cap)",
    )
    s.add_argument(
        "--op-time-ms",
        type=float,
        default=d.op_time_ms,
        help=f"time budget of one op of a client's slice, estimated from its FLOPs before it runs "
        f"(default {d.op_time_ms:g})",
    )
    s.add_argument(
        "--progress-interval-ms",
        type=float,
        default=d.progress_interval_ms,
        help="report a request in flight (ops run, cut-tensor bytes received) to a client that asks at most this "
        f"often, when it moved; its deadline then tells a slow server from a stalled one (0: never; default "
        f"{d.progress_interval_ms:g})",
    )
    s.add_argument(
        "--grace", type=float, default=d.grace_s, help=f"drain time on shutdown in seconds (default {d.grace_s:g})"
    )
    s.add_argument(
        "--data-port",
        type=_data_port,
        default=d.data_port,
        metavar="P|off",
        help="TCP port of the data channel for weight bytes, on the --host, TLS like gRPC: UEs that get its "
        "one-time ticket send their session's weights there raw instead of in gRPC messages (less UE CPU); "
        "0: any free port (advertised to clients: behind a firewall give a fixed P and open it, or say off); "
        "off: none, weights go in-stream "
        f"(default {'off' if d.data_port is None else d.data_port})",
    )
    s.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS (with --tls-key)")
    s.add_argument("--tls-key", metavar="PEM", help="server private key")
    s.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain text, or no --auth-tokens, on a non-loopback address (without TLS or without tokens "
        "the server binds only loopback)",
    )
    s.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="tenants' bearer tokens, quotas and groups (JSON, see README 'Security model'; re-read on SIGHUP). "
        "Without it: single tenant, no authentication, loopback only unless --insecure",
    )
    s.add_argument(
        "--profile-workers",
        type=int,
        default=d.profile_workers,
        help="ProfileGraph jobs run at once, each in a child process (under an address-space limit, off the "
        "server's GIL, a crash contained); 0: in the server process, in fair time slices with sessions' requests "
        f"(default {d.profile_workers}: on few cores a child computing beside the server slows other tenants more)",
    )
    s.add_argument(
        "--profile-nice",
        type=int,
        default=d.profile_nice,
        help="CPU priority offset (nice, 0-19) of the profiling processes: higher protects sessions more under "
        f"contention but makes measured op times grow with the machine's load (default {d.profile_nice})",
    )
    s.add_argument(
        "--profile-cpu-s",
        type=float,
        default=d.profile_cpu_s,
        help="ProfileGraph CPU budget of each tenant (quota profile_cpu_s overrides): a bucket of this many CPU "
        "seconds (validation and profile run, abandoned work included); an empty bucket refuses ProfileGraph "
        f"RESOURCE_EXHAUSTED before decoding it; 0: no budget (default {d.profile_cpu_s:g})",
    )
    s.add_argument(
        "--profile-cpu-share",
        type=float,
        default=d.profile_cpu_share,
        help="refill of that bucket in CPU seconds per second (quota profile_cpu_share overrides; "
        f"default {d.profile_cpu_share:g})",
    )
    s.add_argument(
        "--slice-cpu-s",
        type=float,
        default=d.slice_cpu_s,
        help="slice validation CPU budget of each tenant (quota slice_cpu_s overrides): its sessions' DefineSlice "
        "validations are charged to a bucket of this many CPU seconds; an empty bucket refuses them "
        "RESOURCE_EXHAUSTED and a validation stops mid-way once it is spent; 0: no budget "
        f"(default {d.slice_cpu_s:g})",
    )
    s.add_argument(
        "--slice-cpu-share",
        type=float,
        default=d.slice_cpu_share,
        help="refill of that bucket in CPU seconds per second (quota slice_cpu_share overrides; "
        f"default {d.slice_cpu_share:g})",
    )
    s.add_argument(
        "--tarpit-rate",
        type=float,
        default=d.tarpit_rate,
        help="error answers per second a caller (a tenant; an address without a token) gets once its burst is "
        "spent; its further error answers wait for their slot, so a flood of failing calls slows to this rate "
        f"(successful answers never wait; default {d.tarpit_rate:g}; 0: off)",
    )
    s.add_argument(
        "--tarpit-burst",
        type=int,
        default=d.tarpit_burst,
        help=f"error answers a caller gets at once before the tarpit delays the next (default {d.tarpit_burst})",
    )
    s.add_argument(
        "--max-calls-per-caller",
        type=int,
        default=d.max_calls_per_caller,
        help="calls one caller (a token's tenant, else an address: IPv4, or an IPv6 /64) may have open at once; one "
        f"more is RESOURCE_EXHAUSTED (default {d.max_calls_per_caller}; 0: no call gate at all). Without "
        "--auth-tokens every client behind one address (a NAT, the testbed's UEs on loopback) shares it: each UE "
        "holds a Session and, while uploading, an UploadWeights",
    )
    s.add_argument(
        "--max-stranger-calls",
        type=int,
        default=d.max_stranger_calls,
        help="calls open at once over all callers known by their address (no valid token: every caller of a "
        f"server without --auth-tokens) (default {d.max_stranger_calls})",
    )
    s.add_argument(
        "--max-reading-calls",
        type=int,
        default=d.max_reading_calls_per_caller,
        help="calls one caller may have reading their request (a unary call's message, a stream's first) at once; "
        "the others wait before their message is read (needs the call gate: refused with --max-calls-per-caller "
        "0); set, it also turns grpc's BDP probing off (each received message over "
        "64 KiB then waits a round trip for its window), which the bound needs: a burst of 200 x 7 MiB Hellos "
        f"from one token took +1049 MiB RSS without, +112 MiB with 4 (0: no bound; default "
        f"{d.max_reading_calls_per_caller})",
    )
    s.add_argument(
        "--max-reading-mb",
        type=int,
        default=None,
        help="MiB of requests being received at once, server-wide (each unary request or stream's first message "
        "counts as the message limit until it is decoded: slots = this // 8 MiB; a caller holds at most its share "
        "of them, see --reading-grace-s); the others wait before their message is read. "
        "Under --memory-mb the budget for work in flight is twice this much smaller (a message "
        "is held about twice while received). Needs the call gate; turns grpc's BDP probing off as "
        "--max-reading-calls does (each stream then gets a fixed --read-window-kb window). 64 tenants' 6.45 MiB "
        "ProfileGraphs at once took the server +876 MiB RSS over a 722 MiB budget without, +495 with 32 "
        "(0: no bound; default: under --memory-mb one 8 MiB slot per 160 MiB of the budget for work in flight, "
        "2 to 8, none under 2, e.g. 4 slots at --memory-mb 1024; without --memory-mb: 0)",
    )
    s.add_argument(
        "--read-window-kb",
        type=int,
        default=d.read_window_bytes >> 10,
        help="while requests are read in slots (--max-reading-mb, --max-reading-calls): each stream's receive "
        "window, grpc's BDP probing being off; a message up to it needs no round trip for its window, a stream "
        "carries up to it per round trip (1 MiB at 20 ms: 420 Mbit/s), and an unread call holds up to it outside "
        "the memory budget. At 400 Mbit/s, 40 ms RTT a 46 MB in-stream upload took 2.8-3.1x as long with 64 "
        f"(default {d.read_window_bytes >> 10})",
    )
    s.add_argument(
        "--max-waiting-calls",
        type=int,
        default=d.max_waiting_calls_per_caller,
        help="of a caller's calls, those still waiting for their first message; one more ends its oldest "
        f"(default {d.max_waiting_calls_per_caller})",
    )
    s.add_argument(
        "--first-message-s",
        type=float,
        default=d.first_message_s,
        help="a call's first message within this many seconds of its start, else DEADLINE_EXCEEDED "
        "(UNAVAILABLE when it was still waiting for a server-wide reading slot: other callers held them) "
        f"(default {d.first_message_s:g}; 0: no deadline)",
    )
    s.add_argument(
        "--reading-grace-s",
        type=float,
        default=d.reading_grace_s,
        help="with --max-reading-mb: seconds a call keeps a reading slot its caller holds beyond its share (the "
        "slots over the callers holding or waiting for one, at least one) once a caller under its share waits; "
        "then it is ended UNAVAILABLE (retry) and its slot goes to the waiting caller. A caller's calls up to its "
        "share are ended for another only after --contended-first-message-s without their first message "
        f"(default {d.reading_grace_s:g})",
    )
    s.add_argument(
        "--contended-first-message-s",
        type=float,
        default=d.contended_first_message_s,
        help="with --max-reading-mb: seconds a call keeps a reading slot within its caller's share without its "
        "first message arriving once another caller waits for one; then it is ended UNAVAILABLE (retry) and its "
        "slot goes to the waiting caller: as many colluding tenants as slots no longer hold them all until "
        f"--first-message-s (default {d.contended_first_message_s:g}; 0: until --first-message-s)",
    )
    s.add_argument(
        "--session-idle-s",
        type=float,
        default=d.session_idle_s,
        help="close a session idle this long (no message, no request computing), freeing its pins, staging and "
        f"memory; end an UploadWeights call silent this long (default {d.session_idle_s:g}; 0: never)",
    )
    s.add_argument(
        "--upload-progress-kb",
        type=int,
        default=d.upload_progress_bytes >> 10,
        help="KiB of weights its tenant does not hold already that an UploadWeights call, or a Session stream, "
        "with a weight half-received must bring within each --session-idle-s: else the call ends "
        "DEADLINE_EXCEEDED (a Session's session ends as idle) and its staging is freed; re-sent held weights and "
        "messages "
        f"without new weight bytes do not count (default {d.upload_progress_bytes >> 10}: 28 kbit/s at the "
        "default --session-idle-s)",
    )
    s.add_argument(
        "--data-idle-s",
        type=float,
        default=d.data_idle_s,
        help="with the data channel (--data-port): seconds a data connection with a weight half-received may go "
        "without --data-progress-kb of weights its tenant does not hold already; then it is closed and its "
        "partial weights dropped (its UE sends the rest in-stream); between weights it may idle as long as its "
        "session lives. Also how long a connection waits for its UE to read its weights' acknowledgements "
        f"(default {d.data_idle_s:g})",
    )
    s.add_argument(
        "--data-progress-kb",
        type=int,
        default=d.data_progress_bytes >> 10,
        help="with the data channel: KiB of weights its tenant does not hold already a data connection with a "
        "weight half-received must bring within each --data-idle-s, counted as bytes arrive "
        f"(default {d.data_progress_bytes >> 10}: 8.7 kbit/s at the default --data-idle-s)",
    )
    s.add_argument(
        "--health-port",
        type=_port,
        default=d.health_port,
        help="also serve grpc.health.v1 on this port of the server's host, in plain text and nothing else, for "
        "the orchestrator's and load balancer's probes (k8s gRPC probes carry no token and no TLS); let only the "
        "probers reach it (0: any free port; default: none)",
    )
    s.add_argument(
        "--metrics-port",
        type=_port,
        default=d.metrics_port,
        help="serve Prometheus metrics (coinfer_*, per tenant) on this port (0: any free port; default: none)",
    )
    s.add_argument(
        "--metrics-host",
        default=d.metrics_host,
        help=f"address of the metrics endpoint (default {d.metrics_host}: tenant names are in it)",
    )
    s.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="log lines as text or as JSON objects"
    )
    s.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def _port(text: str) -> int:
    """A TCP port 0..65535 (0: any free port). gRPC took ``--port 70000`` as 70000 mod 65536 (it listened on
    4464) and ``-1`` as 65535; the metrics server raised OverflowError with a traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} out of range 0..65535")
    return port


def _data_port(text: str) -> int | None:
    if text == "off":
        return None
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'off', got {text!r}") from None
    return _port(text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server configuration the ``serve`` flags describe (unset flags keep ServerConfig's defaults)."""
    cache_mb = args.cache_mb
    if cache_mb is None:
        cache_mb = max(16, args.memory_mb // 4) if args.memory_mb else ServerConfig().cache_bytes // MiB
    return ServerConfig(
        device=args.device,
        allow_tf32=args.tf32,
        cache_bytes=cache_mb * MiB,
        staging_bytes=None if args.staging_mb is None else args.staging_mb * MiB,
        threads=args.threads if args.threads is not None else _default_threads(),
        max_sessions=args.max_sessions,
        grace_s=args.grace,
        memory_bytes=args.memory_mb * MiB,
        op_time_ms=args.op_time_ms,
        progress_interval_ms=args.progress_interval_ms,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        insecure=args.insecure,
        auth_tokens_file=args.auth_tokens,
        session_idle_s=args.session_idle_s,
        upload_progress_bytes=args.upload_progress_kb << 10,
        data_idle_s=args.data_idle_s,
        data_progress_bytes=args.data_progress_kb << 10,
        profile_workers=args.profile_workers,
        profile_nice=args.profile_nice,
        profile_cpu_s=args.profile_cpu_s,
        profile_cpu_share=args.profile_cpu_share,
        slice_cpu_s=args.slice_cpu_s,
        slice_cpu_share=args.slice_cpu_share,
        tarpit_rate=args.tarpit_rate,
        tarpit_burst=args.tarpit_burst,
        max_calls_per_caller=args.max_calls_per_caller,
        max_stranger_calls=args.max_stranger_calls,
        max_waiting_calls_per_caller=args.max_waiting_calls,
        max_reading_calls_per_caller=args.max_reading_calls,
        max_reading_bytes=None if args.max_reading_mb is None else args.max_reading_mb * MiB,
        read_window_bytes=args.read_window_kb << 10,
        first_message_s=args.first_message_s,
        reading_grace_s=args.reading_grace_s,
        contended_first_message_s=args.contended_first_message_s,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        cell_uplink_mbps=args.cell_uplink_mbps,
        cell_downlink_mbps=args.cell_downlink_mbps,
        cell_rtt_ms=args.cell_rtt_ms,
        metrics_host=args.metrics_host,
        data_port=args.data_port,
    )


def _default_threads() -> int:
    from edge_server.cpus import compute_threads, usable_cores

    return compute_threads(usable_cores(), ServerConfig().workers)


async def serve(args: argparse.Namespace, omp_line: str = "") -> int:
    from edge_server.allocation import AraShareAllocator
    from edge_server.server import create_server

    if omp_line:
        logger.info("%s", omp_line)
    # A thread validating or profiling a client's slice holds the GIL in long stretches; with the default
    # 5 ms switch interval every hand-off of another tenant's request (event loop -> worker -> event
    # loop) waits that long. 0.5 ms keeps those hand-offs short (issue 11: victim latency under attack).
    sys.setswitchinterval(0.0005)
    host = args.host
    bind = f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"
    config = config_from_args(args)
    server, port = await create_server(
        bind, config=config, allocator=(AraShareAllocator(policy=args.ara_policy, planner=args.ara_planner)
                                      if args.allocator == "ara" else None)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    auth = server.runtime.auth
    if auth is not None:
        loop.add_signal_handler(signal.SIGHUP, server.runtime.reload_tokens)
    # Everything alive now (torch, the code, the warm-up's meta kernels: ~320k objects) lives as long as the
    # process: move it out of the cyclic collector's reach. A full collection walked all of it, 200-400 ms
    # holding the GIL (each one a stall of every tenant's requests; 3 in 40 s under the abandon attack),
    # 1-10 ms after the freeze (gc.freeze, Python 3.7+; the Instagram fork-server recipe).
    gc.collect()
    gc.freeze()
    shown = f"[{host}]" if ":" in host else host
    # "listening on" stays the first line (scripts read it); the data channel's line comes in the same
    # write, so whoever sees the first finds the second
    data = f"\ndata channel on {shown}:{server.runtime.data.port}" if server.runtime.data is not None else ""
    if server.health_port is not None:
        data += f"\nhealth on {shown}:{server.health_port}"
    print(f"listening on {shown}:{port}{data}", flush=True)
    try:
        await stop.wait()
        logger.info("signal received: draining (grace %.1fs)", config.grace_s)
    finally:
        await server.stop(config.grace_s)
    logger.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    if args.command == "serve":
        omp_line = omp_wait_policy()  # before anything below imports torch
        if not 0 <= args.profile_workers <= MAX_PROFILE_WORKERS or not 0 <= args.profile_nice <= 19:
            print(
                f"coinfer-edge: --profile-workers must be in 0..{MAX_PROFILE_WORKERS} (each is a process with "
                "torch loaded) and --profile-nice in 0..19",
                file=sys.stderr,
            )
            return 2
        try:
            for flag, value, rng in (
                ("--profile-cpu-s", args.profile_cpu_s, CPU_SECONDS),
                ("--profile-cpu-share", args.profile_cpu_share, CPU_SHARE),
                ("--slice-cpu-s", args.slice_cpu_s, CPU_SECONDS),
                ("--slice-cpu-share", args.slice_cpu_share, CPU_SHARE),
                ("--op-time-ms", args.op_time_ms, OP_TIME_MS),
                ("--session-idle-s", args.session_idle_s, IDLE_S),
                ("--upload-progress-kb", args.upload_progress_kb, PROGRESS_KB),
                ("--data-idle-s", args.data_idle_s, DATA_IDLE_S),
                ("--data-progress-kb", args.data_progress_kb, PROGRESS_KB),
                ("--progress-interval-ms", args.progress_interval_ms, PROGRESS_INTERVAL_MS),
                ("--grace", args.grace, GRACE_S),
                ("--tarpit-rate", args.tarpit_rate, TARPIT_RATE),
                ("--tarpit-burst", args.tarpit_burst, TARPIT_BURST),
                ("--max-calls-per-caller", args.max_calls_per_caller, CALLS_PER_CALLER),
                ("--max-stranger-calls", args.max_stranger_calls, CALLS),
                ("--max-waiting-calls", args.max_waiting_calls, CALLS),
                ("--max-reading-calls", args.max_reading_calls, READING_CALLS),
                ("--max-reading-mb", 0 if args.max_reading_mb is None else args.max_reading_mb, READING_MB),
                ("--read-window-kb", args.read_window_kb, READ_WINDOW_KB),
                ("--first-message-s", args.first_message_s, FIRST_MESSAGE_S),
                ("--reading-grace-s", args.reading_grace_s, READING_GRACE_S),
                ("--contended-first-message-s", args.contended_first_message_s, CONTENDED_FIRST_MESSAGE_S),
                ("--cell-uplink-mbps", 1.0 if args.cell_uplink_mbps is None else args.cell_uplink_mbps, CELL_MBPS),
                ("--cell-downlink-mbps", 1.0 if args.cell_downlink_mbps is None else args.cell_downlink_mbps,
                 CELL_MBPS),
                ("--cell-rtt-ms", 0.0 if args.cell_rtt_ms is None else args.cell_rtt_ms, RTT_MS),
            ):
                rng.check(flag, value)
        except ValueError as e:
            print(f"coinfer-edge: {e}", file=sys.stderr)
            return 2
        if args.tf32 and not str(args.device).startswith("cuda"):
            print(f"coinfer-edge: --tf32 is for --device cuda (TF32 tensor cores), not --device {args.device}",
                  file=sys.stderr)
            return 2
        for flag, value in (("--max-reading-calls", args.max_reading_calls), ("--max-reading-mb", args.max_reading_mb)):
            if value is not None and value > 0 and args.max_calls_per_caller == 0:
                # the bound lives in the call gate: without it the flag bounded nothing and turned BDP probing off
                print(f"coinfer-edge: {flag} needs the call gate, which --max-calls-per-caller 0 turns off: "
                      "drop one of the two", file=sys.stderr)
                return 2
        if args.memory_mb < 0:
            print("coinfer-edge: --memory-mb must be >= 0", file=sys.stderr)
            return 2
        for name, v in (
            ("--cache-mb", 1 if args.cache_mb is None else args.cache_mb),
            ("--max-sessions", args.max_sessions),
            ("--threads", 1 if args.threads is None else args.threads),
        ):
            if v <= 0:
                print(f"coinfer-edge: {name} must be > 0", file=sys.stderr)
                return 2
        if args.staging_mb is not None and args.staging_mb < 0:
            print("coinfer-edge: --staging-mb must be >= 0", file=sys.stderr)
            return 2
        from profiler.device_info import affinity_cores

        cores = affinity_cores()
        if args.threads is not None and args.threads > cores:
            print(
                f"coinfer-edge: --threads {args.threads} is more than the {cores} core(s) this process may run on "
                "(its affinity mask): torch's intra-op threads would only take turns on them; give at most "
                f"{cores} (default here: {_default_threads()}, one core left "
                "to gRPC)",
                file=sys.stderr,
            )
            return 2
        try:
            return asyncio.run(serve(args, omp_line))
        except (OSError, ValueError) as e:
            print(f"coinfer-edge: {e}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

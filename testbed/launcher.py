"""Launch one edge server and N UE processes with a per-UE link (rate, RTT) and CPU share.

Two modes (``detect_mode`` picks, ``mode=`` forces):

- ``netns`` (root): the server in its own network namespace, each UE in a namespace joined by a veth
  pair; ``tc tbf`` shapes uplink and downlink rate on the veths (``NetnsTestbed``); the RTT comes from
  netem where the kernel has it, else from a userspace delay relay inside the UE namespace; each UE runs
  in a cgroup with a CPU quota (v2 ``cpu.max`` / v1 ``cpu.cfs_quota_us``) and 1 torch thread.
- ``userspace`` (anywhere): the server on loopback, one link-emulator relay per UE (rate + delay, one
  shared bottleneck for all the UE's connections), and the UE's CPU share emulated by the client's
  ``ue_slowdown`` = 1 / share with 1 torch thread.

Shared cell uplink (netns mode, ``shared_uplink_mbps=R``): the UEs' uplinks meet in one htb bottleneck
at R (``NetnsTestbed``); each UE plans with R as its uplink and is told the cell rate, so it paces to
the share the server's allocator gives it (obeyed); with ``enforce_shares`` the testbed also sets each
UE's htb class to share x R from the shares the UEs report (enforced); ``obey_shares=False`` makes the
UEs ignore their shares (the bottleneck alone divides the cell).

Everything started here (namespaces, veths, cgroups, relays, processes) is registered with the cleanup
registry before it exists and removed on ``close()``, on exceptions, on SIGINT/SIGTERM/SIGHUP and at exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from testbed import cgroups, netns
from testbed.cleanup import REGISTRY
from testbed.credentials import Credentials, make_credentials

log = logging.getLogger(__name__)

SERVER_PORT = 50051
SECURE_NETNS_UES = 256
"""In netns mode the server certificate names the server-side addresses of this many UE links."""
_LISTEN_RE = re.compile(r"^listening on \S+:(\d+)\s*$", re.MULTILINE)
_DATA_RE = re.compile(r"^data channel on \S+:(\d+)\s*$", re.MULTILINE)
_SHARE_RE = re.compile(r"^UPLINK_SHARE ([0-9.eE+-]+)\s*$", re.MULTILINE)
_ids = itertools.count()


class LaunchError(RuntimeError):
    """A process of the testbed failed to start or to reach a stage in time."""


@dataclasses.dataclass
class UeHandle:
    """One emulated UE: where it connects, its link and CPU share, and its process once started."""

    index: int
    uplink_mbps: float | None
    downlink_mbps: float | None
    rtt_ms: float
    cpu: float | None
    server_address: str
    netns: str | None = None
    cgroup: cgroups.CpuCgroup | None = None
    relay: object | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    link: netns.UeLink | None = None
    data_address: str | None = None
    """"HOST:PORT" of the server's data channel as this UE must reach it (its delay relay for the data
    port); None: the server's host and advertised port (netem delays the veth), or no data channel."""

    @property
    def slowdown(self) -> float:
        """The client's ue_slowdown in userspace mode (1 where a cgroup quota does the throttling)."""
        if self.cgroup is not None or not self.cpu:
            return 1.0
        return max(1.0, 1.0 / self.cpu)


def resolve_mode(requested: str = "auto") -> tuple[str, netns.Mode]:
    """``auto``: netns where the machine allows it, else userspace. ``netns`` fails where it cannot run."""
    m = netns.detect_mode()
    if requested == "userspace":
        return "userspace", m
    if requested == "netns" and m.name != "netns":
        raise LaunchError(f"netns mode unavailable: {m.describe()}")
    return ("netns" if m.name == "netns" else "userspace"), m


DEFAULT_SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
"""The edge server's extra environment when a ``Testbed`` is given none (every testbed command: ``run``,
``bench``, the demo, ``run robust``): a server thread waiting at an OpenMP barrier sleeps at once, as
``bench_server_noise`` measured steadier beside the UEs on a small machine."""

OMP_WAIT_CHOICES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "active": {"OMP_WAIT_POLICY": "ACTIVE"},
                    "default": {}}
"""``--server-omp-wait`` values -> ``Testbed(server_env=...)`` (``default``: leave it unset: ``coinfer-edge serve``
then sets PASSIVE itself, since session 33; libgomp's spin-first default is no longer reachable from the testbed)."""


class Testbed:
    """``with Testbed(workdir) as tb: tb.start_server(); ue = tb.add_ue(20, None, 20, 0.25); tb.spawn(ue, argv)``."""

    def __init__(self, workdir: Path, *, mode: str = "auto", server_threads: int | None = None,
                 cache_mb: int = 2048, allocator: str = "equal", prefix: str | None = None, secure: bool = True,
                 shared_uplink_mbps: float | None = None, enforce_shares: bool = False, obey_shares: bool = True,
                 cpu_period_ms: float | None = None, server_env: dict[str, str] | None = None,
                 server_device: str = "cpu"):
        """``secure`` (the default): the server runs with bearer tokens and TLS, both generated for this run
        into ``<workdir>/credentials`` (``testbed.credentials``); UEs get their tenants' tokens and the CA.
        ``secure=False``: plain text and no authentication (a loopback development server).
        ``shared_uplink_mbps``: the UEs share one uplink bottleneck at this rate (netns mode only; raises
        LaunchError elsewhere), see the module docstring for ``enforce_shares`` and ``obey_shares``.
        ``cpu_period_ms``: CFS period of the UEs' CPU quotas (netns mode; default
        ``cgroups.DEFAULT_PERIOD_US``, 10 ms: latencies move in steps of about one period).
        ``server_env``: extra environment variables of the edge server's process, over this process's own;
        None: ``DEFAULT_SERVER_ENV`` (OpenMP's ``OMP_WAIT_POLICY=PASSIVE``, unless this process's environment
        sets it: a waiting thread sleeps at once instead of spinning on the cores the UEs, relays and tc share;
        docs/results/srvnoise/session14/); ``{}``: nothing added (libgomp's default: spin first).
        ``server_device``: the edge server's ``--device`` (``cpu``, ``cuda``, ``cuda:N``); the server process
        refuses one it cannot use (LaunchError from ``start_server``)."""
        self.workdir = Path(workdir)
        self.server_device = str(server_device)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode_name, self.mode = resolve_mode(mode)
        # the edge server refuses more threads than the cores it may run on (``coinfer-edge serve --threads``):
        # the bench's default 2 on a one-core machine becomes 1 (said in ``describe``)
        self.server_threads = (None if not server_threads
                               else min(int(server_threads), len(os.sched_getaffinity(0))))
        self.server_env = (dict(server_env) if server_env is not None
                           else {k: v for k, v in DEFAULT_SERVER_ENV.items() if k not in os.environ})
        if cpu_period_ms is not None and not 1.0 <= cpu_period_ms <= 1000.0:  # nan too (round() would raise)
            raise LaunchError(f"cpu_period_ms must be in [1, 1000] (the kernel's CFS periods), got {cpu_period_ms}")
        self.cpu_period_us = round(cpu_period_ms * 1000) if cpu_period_ms is not None else cgroups.DEFAULT_PERIOD_US
        self.cache_mb = cache_mb
        self.allocator = allocator
        self.prefix = prefix or f"{netns.process_prefix()}{next(_ids)}-"
        self.ues: list[UeHandle] = []
        self.procs: list[subprocess.Popen] = []
        self.spec_paths: list[Path] = []
        """Worker spec files written for this run: their bearer tokens are redacted at teardown."""
        self.relays: list = []
        self.cgroups: list[cgroups.CpuCgroup] = []
        self.net: netns.NetnsTestbed | None = None
        self.server: subprocess.Popen | None = None
        self._server_args: tuple[float, tuple[str, ...]] = (60.0, ())
        """``start_server``'s timeout and extra arguments, for ``restart_server``."""
        self.server_port: int | None = None
        self.data_port: int | None = None
        """The server's data channel port (netns mode), None without one."""
        self._closed = False
        self.secure = secure
        self.credentials: Credentials | None = None
        self.shared_uplink_mbps = shared_uplink_mbps
        self.enforce_shares = enforce_shares
        self.obey_shares = obey_shares
        if shared_uplink_mbps is not None and self.mode_name != "netns":
            raise LaunchError(f"a shared uplink needs netns mode (namespaces + tc htb): {self.mode.describe()}")
        if enforce_shares and shared_uplink_mbps is None:
            raise LaunchError("enforce_shares needs a shared uplink (shared_uplink_mbps)")
        self._enforcer: ShareEnforcer | None = None
        self._token = REGISTRY.push(f"launcher {self.prefix}", self._cleanup)
        if self.mode_name == "netns":
            self.net = netns.NetnsTestbed(self.prefix, mode=self.mode, shared_uplink_mbps=shared_uplink_mbps)

    # ---- description ------------------------------------------------------------------------------------
    def describe(self) -> str:
        access = ("; server: TLS + a bearer token per tenant (credentials made for this run)" if self.secure
                  else "; server: plain text, no authentication")
        weights = ("; weights on the server's data channel (the UE's link: its veth, tc, its delay)"
                   if self.mode_name == "netns" else "; weights in the Session stream (the relay carries one port)")
        env = "".join(f" {k}={v}" for k, v in sorted(self.server_env.items()) if k != "COINFER_CACHE_DIR")
        threads = (f"; edge server --threads {self.server_threads}" if self.server_threads
                   else "; edge server at its default --threads (edge_server.cpus: max(1, cores - 1))") + env
        if self.server_device != "cpu":
            threads += f"; edge server --device {self.server_device}"
        return self._describe_mode() + access + weights + threads

    def _describe_mode(self) -> str:
        if self.mode_name == "netns" and self.shared_uplink_mbps is not None:
            how = ("enforced by htb classes set from the shares" if self.enforce_shares else "work-conserving htb")
            obey = "UEs pace to their shares" if self.obey_shares else "UEs ignore their shares"
            return (f"mode=netns: shared cell uplink {self.shared_uplink_mbps:g} Mbit/s (one htb, a class per UE, "
                    f"{how}; {obey}), delay by userspace relay or netem, CPU by cgroup "
                    f"{self.mode.cgroup_version} quota, CFS period {self.cpu_period_us / 1000:g} ms "
                    f"({self.mode.describe()})")
        if self.mode_name == "netns":
            delay = "netem" if self.mode.netem else "userspace delay relay"
            return (f"mode=netns: namespaces + veth + tc tbf rate, delay by {delay}, "
                    f"CPU by cgroup {self.mode.cgroup_version} quota, CFS period {self.cpu_period_us / 1000:g} ms "
                    f"({self.mode.describe()})")
        return (f"mode=userspace: loopback + link-emulator relay (rate+delay), CPU share emulated by "
                f"ue_slowdown=1/share and 1 torch thread ({self.mode.describe()})")

    # ---- processes -----------------------------------------------------------------------------------------
    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra or {})
        return env

    def _popen(self, ns: str | None, argv: Sequence[str], log_path: Path, *, cgroup=None, stdin=None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as f:
            kw = dict(stdout=f, stderr=subprocess.STDOUT, stdin=stdin, env=self._env(env))
            if ns is not None and self.net is not None:
                proc = self.net.popen(ns, argv, cgroup=cgroup, **kw)
            elif cgroup is not None:
                proc = cgroup.popen(argv, **kw)
            else:
                proc = subprocess.Popen(list(argv), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def start_server(self, timeout_s: float = 60.0, extra_args: Sequence[str] = (),
                     tenants: Sequence[str] = (), *, keep_credentials: bool = False) -> int:
        """Start ``coinfer-edge serve``; wait for its port. Secure: first generate the run's credentials
        with a token for each of ``tenants`` (more later with ``issue_tenants``); ``keep_credentials``: the
        run's credentials (and every token issued so far) stay when there are some."""
        self._server_args = (timeout_s, tuple(extra_args))
        host, port = ("0.0.0.0", SERVER_PORT) if self.net is not None else ("127.0.0.1", 0)
        argv = [sys.executable, "-m", "edge_server.cli", "serve", "--host", host, "--port", str(port),
                "--cache-mb", str(self.cache_mb), "--allocator", self.allocator, "--grace", "1", *extra_args]
        if self.server_threads:
            argv += ["--threads", str(self.server_threads)]
        if self.server_device != "cpu":
            argv += ["--device", self.server_device]
        # weights on the data channel (the server's default) in netns mode: its connection crosses the UE's
        # veth (tc's rate, netem's delay) or its own delay relay (``add_ue``). Off in userspace mode: the link
        # emulator relays one port per UE with one rate, and the UE would reach the advertised port on
        # loopback past the emulator (its weights on no emulated link at all).
        argv += ["--data-port", "0" if self.net is not None else "off"]
        if self.shared_uplink_mbps is not None:  # the server bounds what a UE's claimed rate counts for by it
            argv += ["--cell-uplink-mbps", str(self.shared_uplink_mbps)]
        if self.secure:
            if self.credentials is None or not keep_credentials:
                hosts = [netns.server_address(k) for k in range(SECURE_NETNS_UES)] if self.net is not None else []
                self.credentials = make_credentials(self.workdir / "credentials", [f"{self.prefix}admin", *tenants],
                                                    hosts=hosts)
            argv += self.credentials.server_args()
        elif self.net is not None:  # plain text on the testbed's own private namespace addresses
            argv.append("--insecure")
        log_path = self.workdir / "server.log"
        ns = self.net.server_ns if self.net is not None else None
        # the log is appended to: a workdir used before holds an earlier server's "listening on" line,
        # which read as this server's would release the UEs before it listens (they failed, and the
        # earlier run's results were read as theirs)
        before = log_path.stat().st_size if log_path.exists() else 0
        self.server = self._popen(ns, argv, log_path, env=self.server_env)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            text = log_path.read_bytes()[before:].decode(errors="replace")
            m = _LISTEN_RE.search(text)
            if m:
                self.server_port = int(m.group(1))
                d = _DATA_RE.search(text)  # printed in the same write as "listening on"
                self.data_port = int(d.group(1)) if d else None
                log.info("edge server on port %d (%s)", self.server_port, ns or "loopback")
                return self.server_port
            if self.server.poll() is not None:
                raise LaunchError(f"edge server exited with {self.server.returncode}: "
                                  f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise LaunchError(f"edge server did not report its port within {timeout_s:.0f} s")

    def restart_server(self) -> int:
        """Stop the edge server (SIGTERM, its drain) and start a fresh one with the same arguments and
        credentials: an empty weight cache, no sessions. Only between cells: a UE still connected to the old
        server loses it. Returns the new server's port (the data channel's may change: ``add_ue`` reads it)."""
        if self.server is None:
            raise LaunchError("restart_server: no server was started")
        cgroups.stop_processes([self.server])
        log.info("edge server stopped (exit %s); starting a fresh one", self.server.returncode)
        timeout_s, extra_args = self._server_args
        return self.start_server(timeout_s, extra_args, keep_credentials=True)

    def issue_tenants(self, tenants: Sequence[str]) -> dict[str, str]:
        """Tokens for ``tenants`` (new ones are added to the server's file, then the server is sent SIGHUP
        to re-read it; a client that comes first may see UNAUTHENTICATED for a moment, so the bench worker
        retries its first call). Returns tenant -> token; {} when the testbed is not secure."""
        if self.credentials is None:
            return {}
        new = [t for t in tenants if t not in self.credentials.tokens]
        tokens = self.credentials.add_tenants(list(dict.fromkeys(tenants)))
        if new and self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGHUP)
        return tokens

    def access_spec(self, pool: Sequence[str], also: Sequence[str] = ()) -> dict | None:
        """What a bench worker needs to reach the secure server as these tenants (issued here): the CA,
        the tenants it takes its streams' fresh tenants from (``pool``, in order) and every token."""
        if self.credentials is None:
            return None
        tokens = self.issue_tenants([*pool, *also])
        return {"tls_ca": str(self.credentials.ca_cert), "pool": list(pool), "tokens": tokens}

    def add_ue(self, uplink_mbps: float | None, downlink_mbps: float | None, rtt_ms: float,
               cpu: float | None) -> UeHandle:
        """Create the UE's link (and cgroup in netns mode). The quota starts unlimited: ``throttle`` sets it."""
        if self.server_port is None:
            raise LaunchError("start the server first")
        k = len(self.ues)
        if self.net is not None:
            # on a shared cell the bottleneck is the cell's htb: no private uplink shaping
            link = self.net.add_ue(None if self.shared_uplink_mbps else uplink_mbps, downlink_mbps, rtt_ms)
            data_address = None
            if rtt_ms > 0 and not link.delay_applied_by_tc:
                relay = self.net.delay_relay(link, self.server_port)
                address = f"127.0.0.1:{relay.port}"
                if self.data_port is not None:  # the same delay on the data channel's connection
                    data_address = f"127.0.0.1:{self.net.delay_relay(link, self.data_port).port}"
            else:
                relay, address = None, f"{link.srv_addr}:{self.server_port}"
            cg = None
            if cpu:
                cg = cgroups.CpuCgroup(f"{self.prefix}ue{k}", cpu, period_us=self.cpu_period_us)
                self.cgroups.append(cg)
                cg.set_cpus(None)  # unlimited until ``throttle``: the capture is an offline step
            ue = UeHandle(k, uplink_mbps, downlink_mbps, rtt_ms, cpu, address, netns=link.netns, cgroup=cg,
                          relay=relay, link=link, data_address=data_address)
        else:
            from testbed.linkemu import LinkEmulatorThread

            relay = LinkEmulatorThread("127.0.0.1", self.server_port, uplink_mbps, downlink_mbps, rtt_ms,
                                       shared_uplink=True, shared_downlink=True)
            self.relays.append(relay)
            relay.start()
            ue = UeHandle(k, uplink_mbps, downlink_mbps, rtt_ms, cpu, f"127.0.0.1:{relay.port}", relay=relay)
        self.ues.append(ue)
        return ue

    def throttle(self, ue: UeHandle) -> None:
        """Apply the UE's CPU quota (netns mode; a no-op in userspace mode, where the client slows itself)."""
        if ue.cgroup is not None and ue.cpu:
            ue.cgroup.set_cpus(ue.cpu)

    def spawn(self, ue: UeHandle, argv: Sequence[str], *, handshake: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        ue.log_path = self.workdir / f"ue{ue.index}.log"
        ue.proc = self._popen(ue.netns, argv, ue.log_path, cgroup=ue.cgroup,
                              stdin=subprocess.PIPE if handshake else subprocess.DEVNULL, env=env)
        if self.enforce_shares and self.net is not None:
            if self._enforcer is None:
                self._enforcer = ShareEnforcer(self.net)
            self._enforcer.watch(ue)
        return ue.proc

    def run_next_to_server(self, argv: Sequence[str], log_name: str, timeout_s: float = 600.0) -> int:
        """Run a helper to completion where the server is reachable on loopback, unshaped (e.g. preload)."""
        proc = self._popen(self.net.server_ns if self.net is not None else None, argv, self.workdir / log_name)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            cgroups.stop_processes([proc])
            raise LaunchError(f"{' '.join(argv[:4])} did not finish within {timeout_s:.0f} s") from None

    @property
    def local_server_address(self) -> str:
        return f"127.0.0.1:{self.server_port}"

    def wait_stage(self, ues: Sequence[UeHandle], name: str, timeout_s: float) -> None:
        """Wait until every UE printed ``STAGE name`` (or fail if one exited)."""
        end = time.monotonic() + timeout_s
        pending = list(ues)
        while pending:
            for ue in list(pending):
                text = ue.log_path.read_text(errors="replace") if ue.log_path.exists() else ""
                if f"STAGE {name}" in text:
                    pending.remove(ue)
                elif ue.proc.poll() is not None:
                    raise LaunchError(f"UE {ue.index} exited with {ue.proc.returncode} before stage {name!r}: "
                                      f"{text[-1500:]}")
            if pending and time.monotonic() > end:
                raise LaunchError(f"UEs {[u.index for u in pending]} did not reach stage {name!r} in {timeout_s:.0f} s")
            if pending:
                time.sleep(0.05)

    @staticmethod
    def release(ues: Sequence[UeHandle]) -> None:
        for ue in ues:
            with contextlib.suppress(OSError, ValueError):
                ue.proc.stdin.write(b"go\n")
                ue.proc.stdin.flush()

    def wait_all(self, ues: Sequence[UeHandle], timeout_s: float) -> list[int]:
        end = time.monotonic() + timeout_s
        codes = []
        for ue in ues:
            try:
                codes.append(ue.proc.wait(max(0.1, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise LaunchError(f"UE {ue.index} did not finish within {timeout_s:.0f} s") from None
        return codes

    # ---- the shared cell's counters ---------------------------------------------------------------------------
    def watch_cell(self, interval_ms: float = 10.0, ss_interval_ms: float = 0.0) -> Path:
        """Start ``testbed.cellwatch`` on the shared uplink (its own process; stopped by
        ``stop_cell_watch`` or at teardown): the UEs' htb class counters every ``interval_ms``, ``ss -tin``
        in their namespaces every ``ss_interval_ms`` (0: none; a fork per UE each time). Returns the JSON
        lines file it writes. Raises LaunchError without a shared uplink."""
        if self.net is None or self.shared_uplink_mbps is None:
            raise LaunchError("watch_cell needs a shared uplink (netns mode, shared_uplink_mbps)")
        path = self.workdir / "cell.jsonl"
        self._cell_watch = subprocess.Popen(
            [sys.executable, "-m", "testbed.cellwatch", "--netns", self.net.server_ns, "--dev", self.net.cell_if,
             "--ue-prefix", f"{self.net.prefix}ue", "--interval-ms", f"{interval_ms:g}",
             "--ss-interval-ms", f"{ss_interval_ms:g}", "--out", str(path)],
            start_new_session=True, stderr=subprocess.DEVNULL)
        self.procs.append(self._cell_watch)
        return path

    def stop_cell_watch(self) -> None:
        """Stop the cell watch (``watch_cell``) and wait until its file is complete; no-op without one."""
        p = getattr(self, "_cell_watch", None)
        if p is not None and p.poll() is None:
            cgroups.stop_processes([p], grace=5.0)

    # ---- teardown -------------------------------------------------------------------------------------------
    def close(self) -> None:
        REGISTRY.run(self._token)

    def _cleanup(self) -> None:
        self._closed = True
        if self._enforcer is not None:
            self._enforcer.stop()
        for p in self.procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    p.stdin.close()
        cgroups.stop_processes(self.procs)
        for path in self.spec_paths:  # the workers are gone: the specs stay as the run's record, tokens out
            with contextlib.suppress(OSError, ValueError):
                redact_spec(path)
        for r in self.relays:
            with contextlib.suppress(Exception):
                r.stop()
        for cg in self.cgroups:
            with contextlib.suppress(Exception):
                cg.close()
        if self.net is not None:
            self.net.close()
        log.info("testbed %s removed", self.prefix)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShareEnforcer:
    """Sets each watched UE's htb class on the shared uplink to the share it last reported.

    A bench worker run with ``report_shares`` prints ``UPLINK_SHARE <share>`` whenever the server's
    ``ShareChanged`` moves its uplink share; this thread reads the UEs' logs every 50 ms and applies the
    latest share of each (``NetnsTestbed.set_uplink_share``). ``applied`` records (time, UE, share).
    """

    def __init__(self, net: netns.NetnsTestbed, period_s: float = 0.05):
        self.net = net
        self.period_s = period_s
        self.applied: list[tuple[float, int, float]] = []
        self._ues: list[UeHandle] = []
        self._pos: dict[int, int] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="share-enforcer", daemon=True)
        self._thread.start()

    def watch(self, ue: UeHandle) -> None:
        self._ues.append(ue)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for ue in list(self._ues):
                try:
                    self._poll(ue)
                except (OSError, netns.NetnsError) as e:
                    log.warning("UE %d: share not enforced: %s", ue.index, e)

    def _poll(self, ue: UeHandle) -> None:
        if ue.log_path is None or ue.link is None or not ue.log_path.exists():
            return
        with open(ue.log_path, "rb") as f:
            f.seek(self._pos.get(ue.index, 0))
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._pos[ue.index] = self._pos.get(ue.index, 0) + end + 1
        shares = _SHARE_RE.findall(data[:end + 1].decode(errors="replace"))
        if not shares:
            return
        share = min(1.0, max(1 / 64, float(shares[-1])))  # at least the class's default guarantee
        if self._last.get(ue.index) != share:
            self.net.set_uplink_share(ue.link, share)
            self._last[ue.index] = share
            self.applied.append((time.time(), ue.index, share))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)


@contextlib.contextmanager
def edge_server_process(threads: int | None = None, *, workdir: Path | None = None, timeout_s: float = 60.0,
                        extra_args: Sequence[str] = ()) -> Iterator[tuple[subprocess.Popen, int]]:
    """One ``coinfer-edge serve`` subprocess on a free loopback port: ``with ... as (process, port)``.

    A userspace-mode ``Testbed`` with the server only (its log is ``<workdir>/server.log``; a temporary
    directory when ``workdir`` is None), plain text on loopback without authentication, so any tenant
    may connect (tests and single-machine benchmarks; the testbed's runs and the demo are secure). The
    process leads its own session; it is stopped (SIGTERM, then SIGKILL after 2 s) on exit, on an
    exception and on SIGINT/SIGTERM. Raises ``LaunchError`` if it does not report its port within
    ``timeout_s``.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coinfer-edge-")))
        tb = stack.enter_context(Testbed(workdir, mode="userspace", server_threads=threads, secure=False))
        port = tb.start_server(timeout_s, extra_args)
        assert tb.server is not None
        yield tb.server, port


# ---- one scenario: server + N UE workers -------------------------------------------------------------------
def worker_argv(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "testbed.bench.worker", str(spec_path)]


def worker_tenants(spec: dict) -> int:
    """Fresh tenants a bench worker may use for ``spec``: its profile, three per policy (its stream, the local
    stream paired with it and its cold comparison), three per round of the cold comparison (``cold_repeats``:
    local, parallel, serial) and a few to spare (the secure testbed issues a token for each)."""
    extra = 3 * int(spec.get("cold_repeats") or 1) if spec.get("cold_compare") else 0
    return 4 + 3 * len(spec.get("policies") or ["coinfer"]) + extra


def write_spec(path: Path, spec: dict) -> None:
    """A worker's spec file, readable by its owner only (it may hold the UE's tokens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(spec, indent=1))


def redacted(spec: dict) -> dict:
    """A copy of a worker spec with its bearer tokens replaced by ``"<redacted>"`` (the tenant names stay): what a
    worker writes into its result file, which is kept (e.g. under ``docs/results``) after the run."""
    access = spec.get("access")
    tokens = access.get("tokens") if isinstance(access, dict) else None
    if not isinstance(tokens, dict) or not tokens:
        return spec
    return {**spec, "access": {**access, "tokens": {name: "<redacted>" for name in tokens}}}


def redact_spec(path: Path) -> None:
    """Replace the bearer tokens in a worker's spec file with ``"<redacted>"`` (the tenant names stay),
    so a run's output folder (e.g. committed under ``docs/results``) holds no usable credential.
    Raises OSError / ValueError for a missing or unreadable file."""
    spec = json.loads(path.read_text())
    clean = redacted(spec)
    if clean is not spec:
        write_spec(path, clean)


def start_workers(tb: Testbed, specs: Sequence[dict], *, stage_timeout_s: float = 600.0,
                  env: dict[str, str] | None = None) -> list[UeHandle]:
    """Add a UE per spec (keys: uplink_mbps, downlink_mbps, rtt_ms, cpu + the worker's keys), start the
    workers (``env`` plus the spec's own ``env``), wait for their capture, apply the CPU quotas, wait until
    all profiled and connected.

    The caller releases them (``tb.release``) to start their streams together.
    """
    handles = []
    planned = []
    for spec in specs:
        spec = dict(spec)
        ue_env = {**(env or {}), **spec.pop("env", {})}
        ue = tb.add_ue(spec.get("uplink_mbps"), spec.get("downlink_mbps"), spec.get("rtt_ms", 0.0), spec.get("cpu"))
        full = {**spec, "server": ue.server_address, "data_address": ue.data_address, "slowdown": ue.slowdown,
                "handshake": True,
                "threads": spec.get("threads", 1), "out": str(tb.workdir / f"ue{ue.index}.json"),
                "tenant_prefix": spec.get("tenant_prefix") or f"{tb.prefix}ue{ue.index}"}
        if tb.net is not None and tb.server is not None:
            # TCP counters around each request: the UE's namespace (its connection to the delay relay and
            # the relay's to the server) and the server's (``ip netns exec`` execs: the pid is the server's)
            full.setdefault("tcp_namespaces", {"ue": "self", "server": tb.server.pid})
        if tb.shared_uplink_mbps is not None:  # the UE's uplink is the cell (shared); it may know the rate
            full["uplink_mbps"] = tb.shared_uplink_mbps
            if tb.obey_shares:
                full["cell_uplink_mbps"] = tb.shared_uplink_mbps
            if tb.enforce_shares:
                full["report_shares"] = True
        Path(full["out"]).unlink(missing_ok=True)  # an earlier run's result in this workdir is not this one's
        pool = [f"{full['tenant_prefix']}-{j}" for j in range(worker_tenants(full))]
        planned.append((ue, ue_env, full, pool))
    # every UE's tenants in one token-file update (one SIGHUP), before any worker starts
    tb.issue_tenants([t for _, _, full, pool in planned for t in [*pool, *filter(None, [full.get("pre_tenant")])]])
    for ue, ue_env, full, pool in planned:
        access = tb.access_spec(pool, [full["pre_tenant"]] if full.get("pre_tenant") else [])
        if access is not None:
            full["access"] = access
        path = tb.workdir / f"ue{ue.index}.spec.json"
        write_spec(path, full)
        tb.spec_paths.append(path)
        tb.spawn(ue, worker_argv(path), handshake=True, env=ue_env)
        handles.append(ue)
    tb.wait_stage(handles, "captured", stage_timeout_s)
    for ue in handles:
        tb.throttle(ue)
    tb.release(handles)
    tb.wait_stage(handles, "connected", stage_timeout_s)
    return handles


def collect(handles: Sequence[UeHandle]) -> list[dict]:
    out = []
    for ue in handles:
        p = ue.log_path.with_suffix(".json") if ue.log_path else None
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError, AttributeError):
            out.append({"error": f"UE {ue.index} wrote no result", "streams": {}})
    return out


def wait_quiet(path: Path, quiet_s: float, timeout_s: float = 60.0) -> bool:
    """Wait until ``path`` has not grown for ``quiet_s`` seconds (False: still growing after ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    size, since = -1, time.monotonic()
    while time.monotonic() < end:
        try:
            now_size = path.stat().st_size
        except OSError:
            now_size = -1
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return True
        time.sleep(0.1)
    log.warning("%s still growing after %.0f s: releasing the UEs anyway", path, timeout_s)
    return False


UPLINK_MIN_SAMPLE_S = 0.5
"""Shortest uplink sample (one busy period under one share) that is checked against its share."""
UPLINK_MIN_SAMPLE_BYTES = 256 << 10
"""Fewest bytes of a checked uplink sample. At the 1/64 floor of an 8 Mbit/s cell (0.125 Mbit/s) a UE
hands over one 16 KiB chunk (``ue_client.session.SHARE_MIN_CHUNK_BYTES``) about every second, so a sample
of one or two chunks measures the chunking, not the rate: session 8's N = 4 re-run picked such a sample
(17,664 bytes over 1.13 s) as UE 1's longest and read its delivery rate -28 % (two acknowledgements around
one chunk), its goodput -0.04 %."""


def annotate_cell(samples: Sequence[dict], polls: list[dict] | None, classid: str) -> None:
    """Add to each uplink sample (in place) what the shared cell carried for its UE while the UE handed
    the sample's bytes over (``testbed.cellwatch.sample_cell_rate``): ``cell_mbps`` (goodput), ``cell_s``,
    ``cell_backlog_max`` (bytes its htb class held at most), ``cell_dropped``, ``cell_overlimits``; None
    each when the cell was not watched or the sample has no handover times."""
    from testbed.cellwatch import sample_cell_rate

    for x in samples:
        r = sample_cell_rate(polls, classid, x) if polls else None
        x.update({"cell_mbps": r and r["mbps"], "cell_s": r and r["seconds"],
                  "cell_backlog_max": r and r["max_backlog_bytes"], "cell_dropped": r and r["dropped"],
                  "cell_overlimits": r and r["overlimits"]})


def uplink_measure(samples: Sequence[dict], polls: list[dict] | None = None, classid: str | None = None) -> dict:
    """The UE's measured uplink from its stream's goodput samples (``UploadScheduler.uplink_samples``):
    its longest sample taken under a share rate with at least ``UPLINK_MIN_SAMPLE_BYTES`` (else the longest
    under a share, else the longest), as ``uplink_mbps_measured`` (goodput: first chunk handed over to the
    last acknowledgement), ``uplink_share_mbps`` (the rate paced to; None if unpaced), ``uplink_sample_s``
    and ``uplink_error`` (measured / share - 1); the same sample's delivery rate (acknowledgement to
    acknowledgement: ``uplink_delivery_mbps``, ``uplink_delivery_s``, ``uplink_delivery_error``); and, with
    the cell's polls (``testbed.cellwatch``) and the UE's htb class, the rate the cell carried it at while
    it sent the sample (``annotate_cell``, done here on every sample: ``uplink_cell_mbps``,
    ``uplink_cell_error``, ``uplink_cell_backlog_max``)."""
    if classid is not None:
        annotate_cell(samples, polls, classid)
    if not samples:
        return {"uplink_mbps_measured": None, "uplink_share_mbps": None, "uplink_sample_s": None,
                "uplink_error": None, "uplink_delivery_mbps": None, "uplink_delivery_error": None,
                "uplink_cell_mbps": None, "uplink_cell_error": None, "uplink_cell_backlog_max": None}
    paced = [s for s in samples if s.get("share_mbps")]
    big = [s for s in paced if s["bytes"] >= UPLINK_MIN_SAMPLE_BYTES]
    best = max(big or paced or samples, key=lambda s: s["seconds"])
    share = best.get("share_mbps")
    dl = best.get("delivery_mbps")
    cell = best.get("cell_mbps")
    return {"uplink_mbps_measured": best["mbps"], "uplink_share_mbps": share, "uplink_sample_s": best["seconds"],
            "uplink_sample_bytes": best["bytes"],
            "uplink_error": best["mbps"] / share - 1 if share else None,
            "uplink_delivery_mbps": dl, "uplink_delivery_s": best.get("delivery_s"),
            "uplink_delivery_error": dl / share - 1 if share and dl else None,
            "uplink_cell_mbps": cell, "uplink_cell_error": cell / share - 1 if share and cell else None,
            "uplink_cell_backlog_max": best.get("cell_backlog_max")}


def run_scenario(scenario, workdir: Path, *, mode: str = "auto", timeout_s: float = 1800.0,
                 on_mode=None, shared_uplink_mbps: float | None = None, enforce_shares: bool = False,
                 obey_shares: bool = True, server_args: Sequence[str] = (), cpu_period_ms: float | None = None,
                 settle_s: float = 0.0, watch_cell: bool = False,
                 server_env: dict[str, str] | None = None) -> dict:
    """Run a ``testbed.scenarios.Scenario``; returns the per-UE results and a summary. The shared-uplink
    keywords are ``Testbed``'s (a cell all UEs share; each UE's result then has its measured uplink,
    ``uplink_measure``); ``server_args`` go to ``coinfer-edge serve``; ``cpu_period_ms`` and ``server_env``:
    ``Testbed``'s.
    ``settle_s`` > 0: once every UE is connected, let them open their streams' sessions (the workers
    stop at stage ``joined``), then wait until the server's log has been quiet for that long (at most
    60 s) before releasing their requests, so that every UE plans its first request under the allocation
    for all of them (ARA re-plans in the background at every join), not under whatever share it held
    while the others were still joining."""
    t0 = time.time()
    with Testbed(workdir, mode=mode, server_threads=scenario.server_threads, allocator=scenario.allocator,
                 shared_uplink_mbps=shared_uplink_mbps, enforce_shares=enforce_shares,
                 obey_shares=obey_shares, cpu_period_ms=cpu_period_ms, server_env=server_env) as tb:
        if on_mode is not None:
            on_mode(tb)
        cell_path = tb.watch_cell() if watch_cell else None
        tb.start_server(extra_args=server_args)
        specs = [{"model": u.model, "policies": [u.policy], "requests": u.requests, "uplink_mbps": u.uplink_mbps,
                  "downlink_mbps": u.downlink_mbps, "rtt_ms": u.rtt_ms, "cpu": u.cpu, "weight": u.weight,
                  "join_barrier": settle_s > 0}
                 for u in scenario.ues]
        handles = start_workers(tb, specs)
        if settle_s > 0:  # the streams' sessions open, then the allocation for all of them settles
            tb.release(handles)
            tb.wait_stage(handles, "joined", 600.0)
            wait_quiet(tb.workdir / "server.log", settle_s)
        t_start = time.time()
        tb.release(handles)
        codes = tb.wait_all(handles, timeout_s)
        wall = time.time() - t_start
        tb.stop_cell_watch()
        results = collect(handles)
        mode_desc = tb.describe()
        mode_name = tb.mode_name
        enforced = list(tb._enforcer.applied) if tb._enforcer is not None else []
    cell_polls = None
    if cell_path is not None and cell_path.exists():
        from testbed.cellwatch import load

        cell_polls = load(cell_path)[0]
    ues = []
    total = 0
    for k, (ue_spec, res, code) in enumerate(zip(scenario.ues, results, codes)):
        stream = next(iter(res.get("streams", {}).values()), {})
        lat = [r["latency_ms"] for r in stream.get("requests", [])]
        total += len(lat)
        reqs = stream.get("requests", [])
        ues.append({**dataclasses.asdict(ue_spec), "exit_code": code, "latency_ms": lat,
                    "mean_ms": sum(lat) / len(lat) if lat else None,
                    "predicted_ms": [r.get("predicted_ms") for r in reqs],
                    "offloaded": [bool(r.get("server_ops")) and not r.get("fallback") for r in reqs],
                    "share_log": stream.get("share_log") or [],
                    "send_mbps": stream.get("send_mbps"), "send_cpu_mbps": stream.get("send_cpu_mbps"),
                    "send_updates": stream.get("send_updates") or [],
                    "uplink_samples": stream.get("uplink_samples") or [],
                    **(uplink_measure(stream.get("uplink_samples") or [], cell_polls, netns.cell_classid(k))
                       if shared_uplink_mbps else {}),
                    "fallbacks": sum(1 for r in stream.get("requests", []) if r.get("fallback")),
                    "error": stream.get("error") or stream.get("unavailable") or res.get("error")})
    return {"scenario": scenario.to_dict(), "mode": mode_name, "mode_description": mode_desc, "ues": ues,
            "shared_uplink_mbps": shared_uplink_mbps, "enforce_shares": enforce_shares, "obey_shares": obey_shares,
            "enforced_shares": enforced,
            "requests": total, "wall_s": wall, "throughput_rps": total / wall if wall > 0 else None,
            "elapsed_s": time.time() - t0, "ok": all(c == 0 for c in codes)}

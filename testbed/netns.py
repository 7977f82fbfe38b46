"""Root-mode multi-UE network: one server namespace, one namespace per UE, a shaped veth pair each.

Why: to emulate N heterogeneous UEs on one machine with real kernel TCP, each UE gets its own network
namespace joined to the server's namespace by a veth pair with a private /30 (10.77.x.y; these addresses
exist only inside namespaces created here). ``tc`` shapes the rate (tbf) on each side: uplink on the UE's
egress, downlink on the server's egress. Delay needs netem; kernels without it (this project's) get the
delay from the userspace relay (``NetnsTestbed.delay_relay``) while tc keeps the rate.

Shared cell uplink (``NetnsTestbed(shared_uplink_mbps=R)``): the UEs' uplinks meet in one bottleneck, as
in a cell. Each UE's traffic entering the server namespace (its veth's ingress) is redirected to one
``ifb`` device whose ``htb`` has a parent class at R and one child class per UE (classified by the UE's
address). A child class's guaranteed rate is R/64 and it may borrow up to R (work-conserving: who sends
gets the capacity, TCP shares it), unless ``set_uplink_share`` fixes it to share x R (an enforced share).

Everything is named with a unique prefix (``cfr-<pid>-<n>-``), registered for cleanup before it is made,
and removed on normal exit, exceptions, SIGTERM/SIGINT and interpreter exit; ``cleanup_stale`` removes
leftovers of dead owners. ``detect_mode`` says which mode this machine supports and why.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import psutil

from testbed import cgroups
from testbed.cleanup import REGISTRY

log = logging.getLogger(__name__)

T = TypeVar("T")
PREFIX_ROOT = "cfr-"
_STALE_RE = re.compile(r"^cfr-(\d+)-")
_SUBNET = ipaddress.IPv4Network("10.77.0.0/16")
_CLONE_NEWNET = 0x40000000
_instances = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc operation failed (the message has the command and its stderr)."""


def process_prefix(pid: int | None = None) -> str:
    """The prefix of everything a process creates: ``cfr-<pid>-``."""
    return f"{PREFIX_ROOT}{os.getpid() if pid is None else pid}-"


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} not found: install iproute2") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`{' '.join(argv)}` timed out after {timeout} s") from exc
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


# -- capability probe ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mode:
    """What the testbed can use here, and why not where it cannot.

    ``name`` is ``"netns"`` (namespaces + tc rate + cgroup CPU quota) or ``"userspace"`` (the link
    emulator relay on loopback + torch thread limits). ``delay`` says who adds propagation delay.
    """

    name: str
    root: bool
    netns: bool
    veth: bool
    tc: bool
    htb: bool
    netem: bool
    cgroup_version: str | None
    cgroup_writable: bool
    reasons: tuple[str, ...]

    @property
    def network(self) -> str:
        return "netns+tc" if self.netns and self.veth and self.tc else "relay"

    @property
    def delay(self) -> str:
        return "netem" if self.network == "netns+tc" and self.netem else "relay"

    @property
    def cpu(self) -> str:
        return f"cgroup-{self.cgroup_version}" if self.cgroup_writable else "torch-threads"

    def describe(self) -> str:
        parts = [f"mode={self.name}", f"network={self.network}", f"delay={self.delay}", f"cpu={self.cpu}"]
        flags = ", ".join(
            f"{k}={'yes' if getattr(self, k) else 'no'}" for k in ("root", "netns", "veth", "tc", "htb", "netem")
        )
        text = f"{' '.join(parts)} ({flags}, cgroup={self.cgroup_version or 'none'}"
        text += f"{' writable' if self.cgroup_writable else ''})"
        if self.reasons:
            text += "; " + "; ".join(self.reasons)
        return text

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "network": self.network, "delay": self.delay, "cpu": self.cpu}


_mode_cache: Mode | None = None
_mode_lock = threading.Lock()


def detect_mode(refresh: bool = False) -> Mode:
    """Probe (by trying, in a throwaway namespace) root, ``ip netns``, veth, tc tbf/htb/netem and cgroups.

    Cached per process; ``refresh=True`` probes again. Never raises: what fails is a reason in the Mode.
    """
    global _mode_cache
    with _mode_lock:
        if _mode_cache is None or refresh:
            _mode_cache = _probe()
            log.info("testbed %s", _mode_cache.describe())
        return _mode_cache


def _probe() -> Mode:
    reasons: list[str] = []
    root = os.geteuid() == 0
    netns = veth = tc = htb = netem = False
    if not root:
        reasons.append(f"not root (euid {os.geteuid()}): no namespaces, tc or cgroups")
    elif shutil.which("ip") is None:
        reasons.append("`ip` (iproute2) not installed")
    else:
        ns = f"{process_prefix()}probe{next(_instances)}"
        token = REGISTRY.push(f"probe netns {ns}", lambda: _delete_netns(ns))
        try:
            res = _run(["ip", "netns", "add", ns], check=False)
            netns = res.returncode == 0
            if not netns:
                reasons.append(f"`ip netns add` failed: {res.stderr.strip()}")
            else:
                res = _run(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
                veth = res.returncode == 0
                if not veth:
                    reasons.append(f"veth unavailable: {res.stderr.strip()}")
                elif shutil.which("tc") is None:
                    reasons.append("`tc` not installed")
                else:
                    _run(["ip", "-n", ns, "link", "set", "p0", "up"], check=False)
                    res = _run(
                        [
                            "tc",
                            "-n",
                            ns,
                            "qdisc",
                            "add",
                            "dev",
                            "p0",
                            "root",
                            "tbf",
                            "rate",
                            "10mbit",
                            "burst",
                            "32kb",
                            "latency",
                            "50ms",
                        ],
                        check=False,
                    )
                    tc = res.returncode == 0
                    if not tc:
                        reasons.append(f"tc tbf unavailable: {res.stderr.strip()}")
                    res = _run(
                        ["tc", "-n", ns, "qdisc", "add", "dev", "p1", "root", "handle", "1:", "htb"], check=False
                    )
                    htb = res.returncode == 0
                    _run(["tc", "-n", ns, "qdisc", "del", "dev", "p1", "root"], check=False)
                    res = _run(
                        ["tc", "-n", ns, "qdisc", "add", "dev", "p1", "root", "netem", "delay", "1ms"], check=False
                    )
                    netem = res.returncode == 0
                    if not netem:
                        reasons.append(
                            "no netem in this kernel (%s): delay comes from the userspace relay"
                            % (res.stderr.strip() or "unknown qdisc")
                        )
        finally:
            REGISTRY.run(token)
    support = cgroups.detect_cgroups() if root else cgroups.CgroupSupport(None, None, False, "not root")
    if not support.usable:
        reasons.append(f"no cgroup CPU quota ({support.reason}): UE CPU limited by torch threads only")
    full = netns and veth and tc and support.usable
    if not full and not reasons:
        reasons.append("missing capability")
    return Mode(
        name="netns" if full else "userspace",
        root=root,
        netns=netns,
        veth=veth,
        tc=tc,
        htb=htb,
        netem=netem,
        cgroup_version=support.version,
        cgroup_writable=support.usable,
        reasons=tuple(reasons),
    )


# -- namespaces ------------------------------------------------------------------------------------


def _list_netns() -> list[str]:
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def _delete_netns(ns: str, kill: bool = False) -> None:
    """Delete the veths and ifbs in ``ns`` (synchronously; a namespace's own teardown is asynchronous) and ``ns``."""
    if ns not in _list_netns():
        return
    if kill:
        for pid in _netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    for kind in ("veth", "ifb"):
        res = _run(["ip", "-n", ns, "-o", "link", "show", "type", kind], check=False)
        for line in res.stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            _run(["ip", "-n", ns, "link", "del", name], check=False)
    _run(["ip", "netns", "del", ns])


def call_in_netns(ns: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` in a fresh thread that has entered network namespace ``ns``; return its result.

    Sockets created by ``fn`` belong to ``ns`` and stay usable from any thread afterwards, so a test can
    e.g. create a listening server or a client connection inside a namespace without a subprocess.
    """
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise NetnsError(f"setns({ns}) failed: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


@dataclasses.dataclass
class UeLink:
    """One UE: its namespace, its veth ends and addresses, and the link settings applied."""

    index: int
    netns: str
    ue_if: str
    srv_if: str
    ue_addr: str
    srv_addr: str
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float = 0.0
    delay_applied_by_tc: bool = False


# tbf counts whole frames: a full-size TCP segment carries 1448 payload bytes in a 1514-byte frame
# (Ethernet 14 + IP 20 + TCP 20 + timestamps 12). Scaling the tbf rate by this makes ``mbps`` the TCP
# goodput, as in the userspace relay, so both modes mean the same thing by "20 Mbit/s".
L2_PER_GOODPUT = 1514 / 1448


def _link_hosts(k: int) -> list[ipaddress.IPv4Address]:
    """(UE address, server address) of UE link ``k``: the two hosts of its /30 in 10.77.0.0/16."""
    block = ipaddress.IPv4Network((int(_SUBNET.network_address) + 4 * k, 30))
    if not block.subnet_of(_SUBNET):
        raise NetnsError(f"too many UEs: {k} does not fit in {_SUBNET}")
    return list(block.hosts())


def server_address(k: int) -> str:
    """The server-side address of UE link ``k`` (what that UE dials; a TLS certificate must name it)."""
    return str(_link_hosts(k)[1])


def cell_classid(index: int) -> str:
    """The htb class of UE ``index`` on the shared uplink (``tc`` notation, e.g. ``1:a`` for UE 0)."""
    return f"1:{index + 10:x}"


def _htb_rate(mbps: float) -> str:
    """An htb rate for ``mbps`` of TCP goodput (scaled to frames like ``_tbf_args``)."""
    return f"{max(int(mbps * 1e6 * L2_PER_GOODPUT), 8000)}bit"


def _cell_burst(mbps: float) -> str:
    """The bucket of a UE's class on the shared uplink: 5 ms at the cell rate (>= 2 frames), small so
    that an enforced share holds from the first packets on."""
    return str(max(int(mbps * 1e6 / 8 * 0.005), 2 * 1514))


def _tbf_args(mbps: float, queue_ms: float) -> list[str]:
    rate_bps = mbps * 1e6 * L2_PER_GOODPUT
    burst = max(int(rate_bps / 8 * 0.004), 4 * 1514)  # >= 4 ms of data and >= a few frames
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", f"{queue_ms:g}ms"]


class NetnsTestbed:
    """A server namespace plus UE namespaces, each joined to it by a shaped veth pair.

    ``with NetnsTestbed() as tb: ue = tb.add_ue(uplink_mbps=20, rtt_ms=40)``; the server listens in
    ``tb.server_ns`` (on ``0.0.0.0`` or ``ue.srv_addr``), the UE connects to ``ue.srv_addr`` from
    ``ue.netns``. Everything is removed by ``close()``/exit, on signals and at interpreter exit.
    """

    def __init__(self, prefix: str | None = None, *, mode: Mode | None = None, queue_ms: float = 50.0,
                 shared_uplink_mbps: float | None = None) -> None:
        self.mode = mode or detect_mode()
        if self.mode.network != "netns+tc":
            raise NetnsError(f"network namespaces unusable here: {self.mode.describe()}")
        self.prefix = prefix or f"{process_prefix()}{next(_instances)}-"
        if not self.prefix.startswith(PREFIX_ROOT):
            raise NetnsError(f"prefix must start with {PREFIX_ROOT!r} so cleanup_stale finds it: {self.prefix!r}")
        self.queue_ms = queue_ms
        if shared_uplink_mbps is not None and not shared_uplink_mbps > 0:
            raise NetnsError(f"shared uplink rate must be > 0 Mbit/s, got {shared_uplink_mbps!r}")
        if shared_uplink_mbps is not None and not self.mode.htb:
            raise NetnsError(f"a shared uplink needs tc htb: {self.mode.describe()}")
        self.shared_uplink_mbps = shared_uplink_mbps
        self.cell_if = "cell"
        self.server_ns = f"{self.prefix}srv"
        self.ues: list[UeLink] = []
        self.procs: list[subprocess.Popen] = []
        self.relays: list = []
        self._closed = False
        self._token = REGISTRY.push(f"testbed {self.prefix}", self._cleanup)
        try:
            self._add_netns(self.server_ns)
            if shared_uplink_mbps is not None:
                self._make_cell(shared_uplink_mbps)
        except BaseException:
            self.close()
            raise

    def _make_cell(self, mbps: float) -> None:
        """The ifb device of the shared uplink with its htb parent class 1:1 at ``mbps`` (goodput)."""
        ns, dev = self.server_ns, self.cell_if
        _run(["ip", "-n", ns, "link", "add", dev, "type", "ifb"])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "ffff"])
        rate = _htb_rate(mbps)
        _run(["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
              "rate", rate, "ceil", rate])
        # unclassified traffic (none expected) shares the parent like a UE
        _run(["tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:1", "classid", "1:ffff", "htb",
              "rate", _htb_rate(mbps / 64), "ceil", rate])

    @staticmethod
    def _cell_class(ue: UeLink) -> str:
        return cell_classid(ue.index)

    def _join_cell(self, ue: UeLink) -> None:
        """Send the UE's uplink through the shared cell: a class for it, its veth's ingress to the ifb."""
        ns, dev, cell = self.server_ns, ue.srv_if, self.shared_uplink_mbps
        assert cell is not None
        _run(["tc", "-n", ns, "class", "add", "dev", self.cell_if, "parent", "1:1", "classid", self._cell_class(ue),
              "htb", "rate", _htb_rate(cell / 64), "ceil", _htb_rate(cell), "burst", _cell_burst(cell),
              "cburst", _cell_burst(cell), "quantum", "1514"])
        _run(["tc", "-n", ns, "qdisc", "add", "dev", self.cell_if, "parent", self._cell_class(ue),
              "pfifo", "limit", "1000"])
        _run(["tc", "-n", ns, "filter", "add", "dev", self.cell_if, "parent", "1:", "protocol", "ip", "prio", "1",
              "u32", "match", "ip", "src", f"{ue.ue_addr}/32", "flowid", self._cell_class(ue)])
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"])
        _run(["tc", "-n", ns, "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "ip", "u32",
              "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", self.cell_if])

    def set_uplink_share(self, ue: UeLink, share: float | None) -> None:
        """Enforce ``share`` (0, 1] of the shared uplink for ``ue`` (its htb class at share x R, no
        borrowing); None gives the class back its default (R/64 guaranteed, borrowing up to R).
        Raises NetnsError without a shared uplink or for a share outside (0, 1]."""
        cell = self.shared_uplink_mbps
        if cell is None:
            raise NetnsError("no shared uplink in this testbed (shared_uplink_mbps)")
        if share is not None and not 0 < share <= 1:
            raise NetnsError(f"uplink share must be in (0, 1], got {share!r}")
        rate, ceil = (_htb_rate(cell / 64), _htb_rate(cell)) if share is None else (_htb_rate(cell * share),) * 2
        burst = _cell_burst(cell)
        _run(["tc", "-n", self.server_ns, "class", "change", "dev", self.cell_if, "parent", "1:1",
              "classid", self._cell_class(ue), "htb", "rate", rate, "ceil", ceil, "burst", burst, "cburst", burst,
              "quantum", "1514"])

    def cell_bytes(self) -> dict[int, int]:
        """Bytes each UE's class of the shared uplink has sent so far (UE index -> bytes, L2 framing)."""
        res = _run(["tc", "-n", self.server_ns, "-s", "class", "show", "dev", self.cell_if])
        out: dict[int, int] = {}
        by_class = {self._cell_class(u): u.index for u in self.ues}
        cur = None
        for line in res.stdout.splitlines():
            m = re.match(r"class htb (\S+) ", line)
            if m:
                cur = by_class.get(m.group(1))
                continue
            m = re.match(r"\s*Sent (\d+) bytes", line)
            if m and cur is not None:
                out[cur] = int(m.group(1))
                cur = None
        return out

    def _add_netns(self, ns: str) -> None:
        # No registration of its own: the testbed's cleanup removes every namespace with its prefix.
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def add_ue(
        self, uplink_mbps: float | None = None, downlink_mbps: float | None = None, rtt_ms: float = 0.0
    ) -> UeLink:
        """Create the next UE namespace and its veth pair, address both ends, shape them."""
        if self._closed:
            raise NetnsError("testbed is closed")
        k = len(self.ues)
        hosts = _link_hosts(k)
        ue = UeLink(k, f"{self.prefix}ue{k}", "srv", f"ue{k}", str(hosts[0]), str(hosts[1]))
        try:
            self._add_netns(ue.netns)
            # Created directly inside the namespaces: no half-made link is ever left in the root namespace.
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    ue.ue_if,
                    "netns",
                    ue.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    ue.srv_if,
                    "netns",
                    self.server_ns,
                ]
            )
            _run(["ip", "-n", ue.netns, "addr", "add", f"{ue.ue_addr}/30", "dev", ue.ue_if])
            _run(["ip", "-n", self.server_ns, "addr", "add", f"{ue.srv_addr}/30", "dev", ue.srv_if])
            _run(["ip", "-n", ue.netns, "link", "set", ue.ue_if, "up"])
            _run(["ip", "-n", self.server_ns, "link", "set", ue.srv_if, "up"])
            self.ues.append(ue)
            self.shape(ue, uplink_mbps, downlink_mbps, rtt_ms)
            if self.shared_uplink_mbps is not None:
                self._join_cell(ue)
        except BaseException:
            if ue not in self.ues:
                with contextlib.suppress(NetnsError):
                    _delete_netns(ue.netns, kill=True)
            raise
        log.info("UE %d: %s %s <-> %s %s", k, ue.netns, ue.ue_addr, self.server_ns, ue.srv_addr)
        return ue

    def shape(self, ue: UeLink, uplink_mbps: float | None, downlink_mbps: float | None, rtt_ms: float = 0.0) -> None:
        """(Re)apply rate (tbf) per direction and, with netem, half the RTT each way.

        Without netem the delay is recorded but not applied: use ``delay_relay`` for it.
        """
        half = rtt_ms / 2
        use_netem = self.mode.netem and half > 0
        for ns, dev, mbps in ((ue.netns, ue.ue_if, uplink_mbps), (self.server_ns, ue.srv_if, downlink_mbps)):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            parent = ["root"]
            if use_netem:
                _run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "handle",
                        "1:",
                        "netem",
                        "delay",
                        f"{half:g}ms",
                        "limit",
                        "100000",
                    ]
                )
                parent = ["parent", "1:", "handle", "2:"]
            if mbps is not None:
                if not mbps > 0:
                    raise NetnsError(f"rate must be > 0 Mbit/s or None, got {mbps!r}")
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, *_tbf_args(mbps, self.queue_ms)])
        ue.uplink_mbps, ue.downlink_mbps, ue.rtt_ms = uplink_mbps, downlink_mbps, rtt_ms
        ue.delay_applied_by_tc = use_netem
        if rtt_ms > 0 and not use_netem:
            log.info("UE %d: no netem, the %g ms RTT must come from the userspace relay", ue.index, rtt_ms)

    def delay_relay(self, ue: UeLink, server_port: int, rtt_ms: float | None = None):
        """Start a relay inside ``ue.netns`` on 127.0.0.1 that adds the RTT on the way to the server.

        The rate stays with tc; the relay knows it (``behind_mbps``) and holds only its delay line at that
        rate, so the link's queue is tc's. On a shared cell a UE's uplink has no rate of its own: the
        cell's rate is the one behind it (without it the relay took all of a 2 MB upload at once and held
        it in front of every later message). Returns the running ``LinkEmulatorThread`` (``.port``),
        stopped on close.
        """
        from testbed.linkemu import LinkEmulatorThread

        up = ue.uplink_mbps if ue.uplink_mbps is not None else self.shared_uplink_mbps
        relay = LinkEmulatorThread(
            ue.srv_addr, server_port, None, None, ue.rtt_ms if rtt_ms is None else rtt_ms, netns=ue.netns,
            behind_mbps=(up, ue.downlink_mbps),
        )
        self.relays.append(relay)
        relay.start()
        return relay

    def popen(
        self, ns: str, argv: Sequence[str], *, cgroup: cgroups.CpuCgroup | None = None, **kwargs
    ) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``ns`` (and ``cgroup``), in its own session; stopped on close."""
        cmd = ["ip", "netns", "exec", ns, *argv]
        kwargs.setdefault("start_new_session", True)
        proc = cgroup.popen(cmd, **kwargs) if cgroup is not None else subprocess.Popen(cmd, **kwargs)
        self.procs.append(proc)
        return proc

    def exec(self, ns: str, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``ns`` to completion (raises NetnsError on failure)."""
        return _run(["ip", "netns", "exec", ns, *argv], timeout=timeout)

    def names(self) -> list[str]:
        return [self.server_ns, *(u.netns for u in self.ues)]

    def close(self) -> None:
        """Stop processes and relays, delete veths and namespaces. Idempotent."""
        REGISTRY.run(self._token)

    def _cleanup(self) -> None:
        self._closed = True
        for relay in self.relays:
            with contextlib.suppress(Exception):
                relay.stop()
        cgroups.stop_processes(self.procs)
        errors = []
        for ns in [*(u.netns for u in self.ues), self.server_ns]:
            try:
                _delete_netns(ns, kill=True)
            except NetnsError as exc:
                errors.append(str(exc))
        # Anything half-made (a UE namespace whose setup failed) has the prefix too.
        for ns in _list_netns():
            if ns.startswith(self.prefix):
                with contextlib.suppress(NetnsError):
                    _delete_netns(ns, kill=True)
        if errors:
            raise NetnsError("; ".join(errors))
        log.info("testbed %s removed", self.prefix)

    def __enter__(self) -> NetnsTestbed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- stale cleanup ---------------------------------------------------------------------------------


def cleanup_stale(prefix: str | None = None) -> dict[str, list[str]]:
    """Remove namespaces (with their veths and processes) and cgroups named with our prefix.

    ``prefix`` (e.g. ``cfr-1234-``): everything starting with it. None: everything ``cfr-<pid>-...``
    whose owner pid is dead (safe while other testbeds run).
    """
    if prefix is not None and not prefix.startswith(PREFIX_ROOT):
        raise NetnsError(f"refusing to clean a prefix not starting with {PREFIX_ROOT!r}: {prefix!r}")
    removed: dict[str, list[str]] = {"netns": [], "cgroups": []}
    if os.geteuid() != 0:
        return removed
    if shutil.which("ip"):
        for ns in _list_netns():
            if prefix is not None:
                if not ns.startswith(prefix):
                    continue
            else:
                m = _STALE_RE.match(ns)
                if not m or psutil.pid_exists(int(m.group(1))):
                    continue
            _delete_netns(ns, kill=True)
            removed["netns"].append(ns)
            log.info("removed stale netns %s", ns)
    removed["cgroups"] = cgroups.cleanup_stale_cgroups(prefix)
    return removed


def main(argv: list[str] | None = None) -> int:
    """``probe``: print the mode as JSON; ``cleanup [--prefix P]``: remove stale resources."""
    p = argparse.ArgumentParser(prog="python -m testbed.netns")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe", help="what this machine supports")
    c = sub.add_parser("cleanup", help="remove leftovers (default: of dead owners)")
    c.add_argument("--prefix", help="remove everything starting with this prefix (e.g. cfr-1234-)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    if args.cmd == "probe":
        mode = detect_mode()
        print(json.dumps(mode.as_dict(), indent=2))
        print(mode.describe(), file=sys.stderr)
    else:
        print(json.dumps(cleanup_stale(args.prefix), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU quota per emulated UE with cgroups (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), detected at runtime.

Why: heterogeneous UEs on one machine need different CPU budgets; a CFS quota caps a process tree at a
fraction of a core (or several) the way a weak device would be, which torch thread counts alone cannot.
Groups are named with a unique prefix (``cfr-<pid>-...``), registered for cleanup before they are made,
and removed on exit, on signals and on failure; ``cleanup_stale_cgroups`` removes leftovers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from testbed.cleanup import REGISTRY

log = logging.getLogger(__name__)

DEFAULT_PERIOD_US = 10_000
"""CFS period of a UE's quota (10 ms). A quota group runs its quota, then waits for the next period, so a
request's latency moves in steps of about one period: with the kernel's default 100 ms, differences
of tens of ms between policies were alignment, and a request that starts after an idle gap got up to a
period's quota early (resnet18 at 10 % of a core, 89 ms of CPU per request: 542-1000 ms, mean 828, std 122
with 100 ms; mean 892, std 56 with 10 ms: ``bench/bench_cfs_period.py``, ``docs/results/cfs_period/``).
The share is the same; a shorter period only makes it finer grained."""
MIN_QUOTA_US = 1_000
"""The smallest quota the kernel accepts (1 ms): a share below MIN_QUOTA_US / period gets a longer period."""
_STALE_RE = re.compile(r"^cfr-(\d+)-")


class CgroupError(RuntimeError):
    """A cgroup could not be created, configured, joined or removed."""


@dataclasses.dataclass(frozen=True)
class CgroupSupport:
    """What this machine offers for CPU quotas. ``base`` is where our groups are created."""

    version: str | None  # "v2", "v1" or None
    base: Path | None
    writable: bool
    reason: str

    @property
    def usable(self) -> bool:
        return self.version is not None and self.writable


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1].replace("\\040", " "), parts[2], parts[3].split(",")))
    return out


def _own_cgroup_path(v1_controller: str | None) -> str:
    """Path of this process's cgroup in the v2 hierarchy (None) or in the v1 hierarchy of a controller."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            names = controllers.split(",") if controllers else []
            if v1_controller is None and hid == "0" and not controllers:
                return path
            if v1_controller is not None and v1_controller in names:
                return path
    return "/"


def _probe_writable(base: Path) -> str | None:
    """Try to create and remove a group under ``base``; return why not, or None if it works."""
    probe = base / f"cfr-{os.getpid()}-probe"
    try:
        probe.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create a cgroup under {base}: {exc.strerror}"
    try:
        os.rmdir(probe)
    except OSError as exc:
        return f"created but cannot remove {probe}: {exc.strerror}"
    return None


def detect_cgroups() -> CgroupSupport:
    """Find a cgroup hierarchy with the cpu controller (v2 preferred) and check we can create groups."""
    mounts = _mounts()
    reasons = []
    for mnt, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        root = Path(mnt)
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "cpu" not in controllers:
            reasons.append(f"cgroup v2 at {mnt} has no cpu controller (controllers: {controllers or 'none'})")
            continue
        # Create at the hierarchy root: it is exempt from v2's "no internal processes" rule.
        why = _probe_writable(root)
        if why is None:
            try:
                enabled = (root / "cgroup.subtree_control").read_text().split()
                if "cpu" not in enabled:
                    (root / "cgroup.subtree_control").write_text("+cpu")
            except OSError as exc:
                why = f"cannot enable cpu in {root}/cgroup.subtree_control: {exc.strerror}"
        if why is None:
            return CgroupSupport("v2", root, True, f"cgroup v2 at {mnt}")
        reasons.append(why)
    for mnt, fstype, opts in mounts:
        if fstype != "cgroup" or "cpu" not in opts:
            continue
        own = _own_cgroup_path("cpu").lstrip("/")
        base = Path(mnt) / own if own else Path(mnt)
        if not (base / "cpu.cfs_quota_us").exists():
            reasons.append(f"cgroup v1 cpu at {mnt} has no cpu.cfs_quota_us (kernel without CFS bandwidth)")
            continue
        why = _probe_writable(base)
        if why is None:
            return CgroupSupport("v1", base, True, f"cgroup v1 cpu controller at {mnt}")
        return CgroupSupport("v1", base, False, why)
    if not reasons:
        reasons.append("no cgroup hierarchy with the cpu controller is mounted")
    return CgroupSupport(None, None, False, "; ".join(reasons))


def _read_pids(group: Path) -> list[int]:
    try:
        return [int(x) for x in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove_group(group: Path, timeout: float = 3.0) -> None:
    """Move what is left in ``group`` (and its children) to the parent, then rmdir, retrying on EBUSY."""
    if not group.exists():
        return
    for child in [p for p in group.iterdir() if p.is_dir()]:
        _remove_group(child, timeout)
    parent_procs = group.parent / "cgroup.procs"
    deadline = time.monotonic() + timeout
    while True:
        for pid in _read_pids(group):
            with contextlib.suppress(OSError):
                parent_procs.write_text(str(pid))
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove cgroup {group}: {exc.strerror}") from exc
            time.sleep(0.02)


def quota_period(cpus: float | None, period_us: int = DEFAULT_PERIOD_US) -> tuple[int, int]:
    """(quota, period) in microseconds for a share of ``cpus`` cores: quota = cpus x period, with the period
    raised to ceil(MIN_QUOTA_US / cpus) where that quota would be under the kernel's minimum, so the share is
    kept (0.045 cores: 1000 us every 22223 us, not 1000 every 10000); (-1, period) for no limit."""
    period = int(period_us)
    if cpus is None:
        return -1, period
    if cpus * period < MIN_QUOTA_US:
        period = math.ceil(MIN_QUOTA_US / cpus)
    return max(MIN_QUOTA_US, round(cpus * period)), period


class CpuCgroup:
    """A cgroup with a CPU quota of ``cpus`` cores (0.25 = a quarter of one core), for one UE, enforced over
    CFS periods of ``period_us`` (default :data:`DEFAULT_PERIOD_US`, 10 ms; see :func:`quota_period`).

    ``popen`` starts a process already inside the group (it joins before exec, so no instruction runs
    unthrottled); ``close`` stops the processes it started and removes the group.
    """

    def __init__(
        self, name: str, cpus: float, *, support: CgroupSupport | None = None, period_us: int = DEFAULT_PERIOD_US
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise CgroupError(f"invalid cgroup name {name!r}")
        self.support = support or detect_cgroups()
        if not self.support.usable:
            raise CgroupError(f"cgroups unusable here: {self.support.reason}")
        self.name = name
        self.path = self.support.base / name  # type: ignore[operator]
        self.period_us = int(period_us)
        self.procs: list[subprocess.Popen] = []
        self._token = REGISTRY.push(f"cgroup {self.path}", self._cleanup)
        try:
            self.path.mkdir()
        except OSError as exc:
            REGISTRY.discard(self._token)
            raise CgroupError(f"cannot create cgroup {self.path}: {exc.strerror}") from exc
        try:
            self.set_cpus(cpus)
        except BaseException:
            REGISTRY.run(self._token)
            raise
        log.info("cgroup %s (%s): %.3g CPUs", self.path, self.support.version, cpus)

    def set_cpus(self, cpus: float | None) -> None:
        """Set the quota in cores; ``None`` removes the limit. The period is ``period_us``, or longer when
        the share's quota would fall below the kernel's 1 ms minimum (:func:`quota_period`)."""
        if cpus is not None and not cpus > 0:
            raise CgroupError(f"cpus must be > 0 or None, got {cpus!r}")
        quota, period = quota_period(cpus, self.period_us)
        try:
            if self.support.version == "v2":
                value = "max" if quota < 0 else str(quota)
                (self.path / "cpu.max").write_text(f"{value} {period}")
            else:
                if quota >= 0:  # v1: the quota may not exceed what the new period allows: unlimit it first
                    (self.path / "cpu.cfs_quota_us").write_text("-1")
                (self.path / "cpu.cfs_period_us").write_text(str(period))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as exc:
            raise CgroupError(f"cannot set the CPU quota of {self.path}: {exc.strerror}") from exc
        self.cpus = cpus
        self.effective_period_us = period

    def add_pid(self, pid: int) -> None:
        """Move a running process (all its threads) into the group."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {exc.strerror}") from exc

    def pids(self) -> list[int]:
        return _read_pids(self.path)

    def throttle_stats(self) -> dict[str, int]:
        """``cpu.stat`` of the group (nr_periods, nr_throttled, throttled time, ...)."""
        try:
            lines = (self.path / "cpu.stat").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in lines if len(line.split()) == 2)}

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the group (in its own session, so ``close`` can stop its whole tree)."""
        procs_file = str(self.path / "cgroup.procs")

        def join() -> None:  # runs in the child between fork and exec
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))

        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(list(argv), preexec_fn=join, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Stop the processes started here and remove the group. Idempotent."""
        REGISTRY.run(self._token)

    def _cleanup(self) -> None:
        stop_processes(self.procs)
        _remove_group(self.path)
        log.info("removed cgroup %s", self.path)

    def __enter__(self) -> CpuCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stop_processes(procs: Sequence[subprocess.Popen], grace: float = 2.0) -> None:
    """SIGTERM the session of each process we started, SIGKILL what is left after ``grace`` s; reap."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_session(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_session(p, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(2.0)


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group led by ``proc`` (we started it with its own session), else the process."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


def cleanup_stale_cgroups(prefix: str | None = None, support: CgroupSupport | None = None) -> list[str]:
    """Remove our groups: those starting with ``prefix``, or (no prefix) those of dead ``cfr-<pid>-`` owners.

    Processes still inside are moved to the parent group, not killed (they may not be ours).
    """
    support = support or detect_cgroups()
    if support.base is None or not support.base.exists():
        return []
    removed = []
    for group in sorted(support.base.iterdir()):
        if not group.is_dir():
            continue
        if prefix is not None:
            if not group.name.startswith(prefix):
                continue
        else:
            m = _STALE_RE.match(group.name)
            if not m or psutil.pid_exists(int(m.group(1))):
                continue
        _remove_group(group)
        removed.append(str(group))
        log.info("removed stale cgroup %s", group)
    return removed

"""What this machine is: psutil for the CPU, NVML (nvidia-ml-py) for GPUs. Both degrade cleanly."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mb: float
    memory_used_mb: float
    sm_clock_mhz: int | None = None
    max_sm_clock_mhz: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


@dataclass(frozen=True)
class DeviceInfo:
    hostname: str
    cpu_model: str
    logical_cores: int
    physical_cores: int | None
    cpu_freq_mhz: float | None
    memory_total_mb: float
    memory_available_mb: float
    load_avg_1m: float | None
    cpu_quota: float | None
    """CPUs this process may use per its cgroup quota (None: unlimited or unknown)."""
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)
    nvml: str = "absent"
    """'ok', 'absent' (no library), or the error NVML gave."""

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cgroup_cpu_quota(proc_root: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs (float, quota / period) this process may use per the CFS quota of ITS OWN cgroup and every
    ancestor up to the hierarchy's mount (cgroup v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``): the smallest quota / period wins, since the kernel enforces each level. The
    groups come from ``/proc/self/cgroup``, the hierarchies' mount points from ``/proc/self/mountinfo``
    (else the usual places under ``cgroup_root``: ``cpu.max`` at the root or in ``unified/`` for v2,
    ``<controllers>/``, ``cpu/`` or ``cpu,cpuacct/`` for v1).

    None: no quota at any level, or nothing readable. Before session 14 this read the ROOT group's file
    (``/sys/fs/cgroup/cpu.max``), which never carries a quota: a UE in a 10 % group read None."""
    return _quota_cores(Path(proc_root), Path(cgroup_root))


def cpu_share(proc_root: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> float:
    """The share of one core one thread of this process gets on average: its cgroup's CFS quota in cores
    (``cgroup_cpu_quota``) capped at 1, or 1 without a quota (0 < share <= 1). A thread's CPU ms c costs it
    about c / share ms of wall time while the quota is the bottleneck (a 10 % UE: 1 ms of CPU per 10 ms)."""
    q = cgroup_cpu_quota(proc_root, cgroup_root)
    return 1.0 if q is None or not q > 0 else min(1.0, q)


def gpu_info() -> tuple[tuple[GpuInfo, ...], str]:
    try:
        import pynvml
    except ImportError:
        return (), "absent"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, driver missing, ...
        return (), f"unavailable: {e}"
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)

            def opt(fn, *a):
                try:
                    return fn(*a)
                except Exception:
                    return None

            power = opt(pynvml.nvmlDeviceGetPowerUsage, h)
            limit = opt(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
            gpus.append(GpuInfo(
                index=i, name=name.decode() if isinstance(name, bytes) else str(name),
                memory_total_mb=mem.total / 2**20, memory_used_mb=mem.used / 2**20,
                sm_clock_mhz=opt(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
                max_sm_clock_mhz=opt(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
                power_w=None if power is None else power / 1000.0,
                power_limit_w=None if limit is None else limit / 1000.0))
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return tuple(gpus), "ok"


def gpu_energy_mj(index: int = 0) -> float | None:
    """Total energy counter of a GPU in millijoules since driver load (None where unsupported)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(index)))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def device_info() -> DeviceInfo:
    import psutil

    freq = None
    try:
        f = psutil.cpu_freq()
        freq = f.current if f else None
    except (OSError, NotImplementedError, FileNotFoundError):
        pass
    vm = psutil.virtual_memory()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    gpus, nvml = gpu_info()
    return DeviceInfo(
        hostname=platform.node(), cpu_model=_cpu_model(), logical_cores=psutil.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False), cpu_freq_mhz=freq,
        memory_total_mb=vm.total / 2**20, memory_available_mb=vm.available / 2**20, load_avg_1m=load,
        cpu_quota=cgroup_cpu_quota(), gpus=gpus, nvml=nvml)


def affinity_cores() -> int:
    """Cores this process may run on (its scheduler affinity mask; ``os.cpu_count()`` where that is unknown),
    ignoring any CPU quota: the bound for a thread count a user asks for (more threads than this only take turns).
    At least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def usable_cores(proc_root: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """Cores this process may use: the scheduler affinity mask, capped by a CFS quota of its cgroup
    (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, rounded up to whole cores).
    At least 1; a quota that cannot be read counts as none."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _quota_cores(Path(proc_root), Path(cgroup_root))
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def _cgroup_mounts(proc_root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """(v2 mounts, v1 mounts with the cpu controller) from mountinfo, as (the hierarchy's path the mount
    shows, mount point); both empty where mountinfo cannot be read."""
    v2: list[tuple[str, Path]] = []
    v1: list[tuple[str, Path]] = []
    try:
        lines = (proc_root / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = fields[3].replace("\\040", " "), Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            v2.append((root, point))
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            v1.append((root, point))
    return v2, v1


def _read_v2(d: Path) -> float | None:
    quota, period = (d / "cpu.max").read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _read_v1(d: Path) -> float | None:
    quota = int((d / "cpu.cfs_quota_us").read_text())
    return None if quota <= 0 else quota / int((d / "cpu.cfs_period_us").read_text())


def _walk_up(point: Path, root: str, path: str, read) -> list[float]:
    """Quotas of the group ``path`` (as /proc/self/cgroup names it) and its ancestors, in a hierarchy mounted
    at ``point`` whose mount shows the hierarchy's ``root``; stops at the mount point."""
    root = "/" + root.strip("/")
    rel = "/" + path.strip("/")
    if root != "/" and (rel == root or rel.startswith(root + "/")):
        rel = rel[len(root):]
    # else the mount shows the whole hierarchy, or a cgroup namespace names paths from its own root: as they are
    parts: list[str] = []
    for p in rel.split("/"):
        if p == "..":
            if not parts:  # a group outside what this mount shows (a cgroup namespace's "/../sibling"): unknown
                log.debug("cgroup %s is outside the hierarchy mounted at %s: its quota is not read", path, point)
                return []
            parts.pop()
        elif p and p != ".":
            parts.append(p)
    found = []
    for k in range(len(parts), -1, -1):
        d = point.joinpath(*parts[:k])
        try:
            q = read(d)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, ZeroDivisionError) as e:
            log.debug("cannot read the CPU quota of cgroup %s: %s", d, e)
            continue
        if q is not None and q > 0:
            found.append(q)
    return found


def _quota_cores(proc_root: Path, cgroup_root: Path) -> float | None:
    """The CPU quota of this process's cgroup in cores: the smallest quota / period of its own group and its
    ancestors, over the v2 and v1 (cpu) hierarchies it is in; None when unlimited or unknown."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    v2_mounts, v1_mounts = _cgroup_mounts(proc_root)
    found_mounts = bool(v2_mounts or v1_mounts)
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if not found_mounts:  # no mountinfo (or a test's tree): the usual places under cgroup_root
            v2_mounts = [("/", cgroup_root), ("/", cgroup_root / "unified")]
            v1_mounts = [("/", cgroup_root / name) for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")]
        if hid == "0" and controllers == "":  # v2 unified hierarchy
            for root, point in v2_mounts:
                quotas += _walk_up(point, root, path, _read_v2)
        elif "cpu" in controllers.split(","):
            for root, point in v1_mounts:
                if point.is_dir():
                    quotas += _walk_up(point, root, path, _read_v1)
                    break
    return min(quotas) if quotas else None

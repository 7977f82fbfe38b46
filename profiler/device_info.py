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


def cgroup_cpu_quota() -> float | None:
    """CPUs this process may use per its cgroup quota (its own group's or an ancestor's, the smallest:
    ``usable_cores``'s reading; session 13 read only the hierarchy's root, so the grid's meta said None for
    workers in a 10 % group); the root's v2 cpu.max or v1 cfs quota/period when /proc names no group."""
    own = _quota_cores(Path("/proc"), Path("/sys/fs/cgroup"))
    if own is not None:
        return own
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
            return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


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


def _quota_cores(proc_root: Path, cgroup_root: Path) -> float | None:
    """The CPU quota of this process's cgroup in cores (quota / period): the smallest of its own group's and
    every ancestor's (the kernel enforces each), None when all are unlimited or unknown. A process in a
    child group without a quota of its own, under a parent limited to half a core, read no quota and ran
    torch's one thread per machine core (session 14, attack14)."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    best: float | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = [p for p in path.split("/") if p]
        if controllers == "":  # v2 unified hierarchy
            base = cgroup_root
        elif "cpu" in controllers.split(","):
            base = cgroup_root / controllers
            if not base.exists():
                base = cgroup_root / "cpu"
        else:
            continue
        for k in range(len(names), -1, -1):
            q = _group_quota(base.joinpath(*names[:k]), v2=controllers == "")
            if q is not None:
                best = q if best is None else min(best, q)
    return best


def _group_quota(d: Path, *, v2: bool) -> float | None:
    """One cgroup directory's CPU quota in cores: v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / period."""
    try:
        if v2:
            f = d / "cpu.max"
            if f.exists():
                quota, period = f.read_text().split()[:2]
                if quota != "max":
                    return int(quota) / int(period)
            return None
        q = d / "cpu.cfs_quota_us"
        if q.exists():
            quota = int(q.read_text())
            if quota > 0:
                return quota / int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError) as e:
        log.debug("cannot read the CPU quota of cgroup %s: %s", d, e)
    return None

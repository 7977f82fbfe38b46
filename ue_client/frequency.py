"""Apply the planner's CPU frequency at run time, or say why it cannot be applied.

The robust policy (``partitioner.robust``) picks a (partition, frequency) pair. This module makes the
frequency real:

- ``CpuFreq``: Linux cpufreq under a sysfs root (default ``/sys/devices/system/cpu``). With the
  ``userspace`` governor available it is selected and ``scaling_setspeed`` written; else
  ``scaling_max_freq`` is lowered (the governor then runs at or below it). The original governor,
  speed and maximum are restored on ``close``. Where cpufreq is absent or read-only (a VM, no root) the
  control reports why (``note``) and offers only the current frequency, so the planner plans at it.
- ``QuotaFreq``: the testbed's emulation of frequency levels with the UE's cgroup CPU quota, share =
  f / f_max of the UE's full quota (``cpu.max`` of cgroup v2), so the choice changes the UE's speed for
  real: a compute-bound op's time scales by f_max / f (``mem_fraction`` 0).
- ``nvml_clocks``: GPU application clocks through NVML where ``pynvml`` is installed and permitted;
  otherwise a note and nothing else.

``energy_model(control)`` turns a control into the ``partitioner.robust.EnergyModel`` the planner uses
(its levels, the nominal frequency the profile was measured at, the frequency-insensitive share).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from partitioner.robust import EnergyModel
from ue_client.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_CPUFREQ_ROOT = Path("/sys/devices/system/cpu")
EMULATED_LEVELS_GHZ = (0.6, 1.0, 1.4, 1.8, 2.2)
"""Frequency levels of the quota emulation (the default ``EnergyModel``'s levels)."""


class FrequencyControl:
    """Base: a control that cannot change anything (plans at the current frequency).

    ``levels_ghz``: the frequencies the planner may choose (GHz); ``nominal_ghz``: the one the UE's
    profile is measured at (``open`` sets it); ``mem_fraction``: share of op time that does not scale
    with frequency; ``writable``: whether ``apply`` changes anything; ``note``: why not, if not.
    """

    kind = "none"

    def __init__(self, nominal_ghz: float = EnergyModel.f_nominal_ghz, note: str = "no frequency control"):
        self.levels_ghz: tuple[float, ...] = (nominal_ghz,)
        self.nominal_ghz = nominal_ghz
        self.mem_fraction = EnergyModel.mem_fraction
        self.writable = False
        self.note = note
        self.current_ghz = nominal_ghz

    def open(self) -> None:
        """Run at the nominal frequency (the profile's)."""
        self.apply(self.nominal_ghz)

    def apply(self, f_ghz: float) -> bool:
        """Run the UE at ``f_ghz`` (one of ``levels_ghz``); True when it was applied."""
        if f_ghz not in self.levels_ghz:
            raise InputError(f"frequency {f_ghz} GHz is not a level of this control ({self.levels_ghz})")
        return False

    def close(self) -> None:
        """Restore what ``open`` found."""

    def describe(self) -> str:
        lv = ", ".join(f"{f:g}" for f in self.levels_ghz)
        return f"{self.kind}: levels {lv} GHz" + ("" if self.writable else f" (not applied: {self.note})")


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _writable(p: Path) -> bool:
    return p.exists() and os.access(p, os.W_OK)


class CpuFreq(FrequencyControl):
    """Linux cpufreq for the CPUs ``cpus`` (default: every ``cpuN`` with a ``cpufreq`` folder) under
    ``root``. Frequencies in sysfs are kHz; levels here are GHz (``scaling_available_frequencies``, else
    five levels from ``cpuinfo_min_freq`` to ``cpuinfo_max_freq``)."""

    kind = "cpufreq"

    def __init__(self, root: Path | str = DEFAULT_CPUFREQ_ROOT, cpus: list[int] | None = None):
        root = Path(root)
        dirs = sorted(root.glob("cpu[0-9]*/cpufreq"), key=lambda d: int(d.parent.name[3:]))
        if cpus is not None:
            dirs = [d for d in dirs if int(d.parent.name[3:]) in cpus]
        self.dirs = dirs
        self._saved: list[tuple[Path, dict[str, str]]] = []
        self.mode = ""
        if not dirs:
            super().__init__(note=f"no cpufreq under {root} (a VM or a kernel without cpufreq)")
            return
        d0 = dirs[0]
        khz = [int(x) for x in (_read(d0 / "scaling_available_frequencies") or "").split()]
        lo, hi = _read(d0 / "cpuinfo_min_freq"), _read(d0 / "cpuinfo_max_freq")
        if not khz and lo and hi:
            a, b = int(lo), int(hi)
            khz = [round(a + (b - a) * i / 4) for i in range(5)]
        cur = _read(d0 / "scaling_cur_freq")
        if not khz:
            super().__init__(note=f"{d0}: no frequency levels readable")
            if cur:
                self.levels_ghz = (int(cur) / 1e6,)
                self.nominal_ghz = self.current_ghz = int(cur) / 1e6
            return
        levels = tuple(sorted({k / 1e6 for k in khz}))
        super().__init__(nominal_ghz=levels[-1])
        govs = (_read(d0 / "scaling_available_governors") or "").split()
        if "userspace" in govs and all(_writable(d / "scaling_governor") and _writable(d / "scaling_setspeed")
                                       for d in dirs):
            self.mode = "userspace"
        elif all(_writable(d / "scaling_max_freq") for d in dirs):
            self.mode = "max_freq"
        if self.mode:
            self.levels_ghz, self.writable, self.note = levels, True, ""
        else:
            f = int(cur) / 1e6 if cur else levels[-1]
            self.levels_ghz, self.nominal_ghz, self.current_ghz = (f,), f, f
            self.note = f"{d0}: cpufreq is read-only here (needs root and a writable scaling_setspeed or " \
                        "scaling_max_freq)"
        self.mem_fraction = EnergyModel.mem_fraction

    def open(self) -> None:
        if self.writable and not self._saved:
            names = ("scaling_governor", "scaling_setspeed", "scaling_max_freq")
            self._saved = [(d, {n: v for n in names if (v := _read(d / n)) is not None and v != "<unsupported>"})
                           for d in self.dirs]
        super().open()

    def apply(self, f_ghz: float) -> bool:
        super().apply(f_ghz)
        if not self.writable:
            return False
        khz = str(round(f_ghz * 1e6))
        try:
            for d in self.dirs:
                if self.mode == "userspace":
                    if _read(d / "scaling_governor") != "userspace":
                        (d / "scaling_governor").write_text("userspace")
                    (d / "scaling_setspeed").write_text(khz)
                else:
                    (d / "scaling_max_freq").write_text(khz)
        except OSError as e:
            self.writable, self.note = False, f"writing cpufreq failed: {e}"
            self.levels_ghz = (self.current_ghz,)
            log.warning("cpufreq: %s; planning at %g GHz from now on", self.note, self.current_ghz)
            return False
        self.current_ghz = f_ghz
        return True

    def close(self) -> None:
        for d, vals in self._saved:
            for name in ("scaling_max_freq", "scaling_governor", "scaling_setspeed"):
                v = vals.get(name)
                if v is None or (name == "scaling_setspeed" and vals.get("scaling_governor") != "userspace"):
                    continue
                try:
                    (d / name).write_text(v)
                except OSError as e:
                    log.warning("cannot restore %s/%s: %s", d, name, e)
        self._saved = []


class QuotaFreq(FrequencyControl):
    """Emulated frequency levels: the UE cgroup's CPU quota = ``max_cpus`` x f / f_max.

    ``cpu_max``: the quota file the testbed passes: ``cpu.max`` (cgroup v2: "QUOTA PERIOD") or
    ``cpu.cfs_quota_us`` (v1: QUOTA, the period read from ``cpu.cfs_period_us`` beside it);
    ``max_cpus``: the UE's quota at f_max, in cores (> 0). ``close`` restores the file's content.
    """

    kind = "quota"

    def __init__(self, cpu_max: Path | str, max_cpus: float, levels_ghz: tuple[float, ...] = EMULATED_LEVELS_GHZ,
                 period_us: int = 100_000):
        if not max_cpus > 0:
            raise InputError(f"the emulated frequency's full quota must be > 0 cores, got {max_cpus!r}")
        super().__init__(nominal_ghz=max(levels_ghz))
        self.path = Path(cpu_max)
        self.max_cpus = float(max_cpus)
        self.period_us = int(period_us)
        self.levels_ghz = tuple(sorted(levels_ghz))
        self.mem_fraction = 0.0
        self._saved = _read(self.path)
        self.v1 = self.path.name == "cpu.cfs_quota_us"
        if self.v1:
            period = _read(self.path.with_name("cpu.cfs_period_us"))
            self.period_us = int(period) if period and period.isdigit() else self.period_us
        self.writable = self._saved is not None and os.access(self.path, os.W_OK)
        if not self.writable:
            self.levels_ghz = (self.nominal_ghz,)
            self.note = f"{self.path} is not writable"

    def quota_us(self, f_ghz: float) -> int:
        """The quota per period (microseconds) that emulates ``f_ghz``."""
        return max(1000, round(self.max_cpus * f_ghz / self.nominal_ghz * self.period_us))

    def apply(self, f_ghz: float) -> bool:
        super().apply(f_ghz)
        if not self.writable:
            return False
        try:
            q = self.quota_us(f_ghz)
            self.path.write_text(str(q) if self.v1 else f"{q} {self.period_us}")
        except OSError as e:
            self.writable, self.note, self.levels_ghz = False, f"writing {self.path} failed: {e}", (self.nominal_ghz,)
            log.warning("quota frequency emulation: %s", self.note)
            return False
        self.current_ghz = f_ghz
        return True

    def close(self) -> None:
        if self._saved is not None and self.writable:
            try:
                self.path.write_text(self._saved)
            except OSError as e:
                log.warning("cannot restore %s: %s", self.path, e)


def parse_quota_spec(spec: str) -> QuotaFreq:
    """``PATH@CPUS`` (the ``coinfer-ue run --freq-quota`` flag) -> ``QuotaFreq``; InputError if malformed."""
    path, sep, cpus = spec.rpartition("@")
    try:
        n = float(cpus)
    except ValueError:
        n = -1.0
    if not sep or not path or not n > 0:
        raise InputError(f"--freq-quota must be CPU_MAX_FILE@CPUS (e.g. /sys/fs/cgroup/ue/cpu.max@0.5), got {spec!r}")
    return QuotaFreq(path, n)


def energy_model(control: FrequencyControl | None, base: EnergyModel | None = None) -> EnergyModel:
    """The planner's energy model for ``control``: ``base`` (default ``EnergyModel()``) with the control's
    levels, nominal frequency and mem fraction (None: ``base``'s levels and nominal unchanged)."""
    base = base or EnergyModel()
    if control is None:
        return base
    return replace(base, freqs_ghz=control.levels_ghz, f_nominal_ghz=control.nominal_ghz,
                   mem_fraction=control.mem_fraction)


def nvml_clocks(mhz: int | None = None, index: int = 0) -> str:
    """Set GPU ``index``'s application graphics clock to ``mhz`` through NVML (None: only look).

    Returns what happened, in words; never raises: without ``pynvml`` or permission it says so."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return "GPU clocks: pynvml not installed (skipped)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVML raises its own classes; any means "no GPU control"
        return f"GPU clocks: NVML unavailable ({e})"
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        if mhz is None:
            return f"GPU {index}: graphics clock {pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_GRAPHICS)} MHz"
        mem = pynvml.nvmlDeviceGetApplicationsClock(h, pynvml.NVML_CLOCK_MEM)
        pynvml.nvmlDeviceSetApplicationsClocks(h, mem, int(mhz))
        return f"GPU {index}: application clock set to {mhz} MHz"
    except Exception as e:  # as above
        return f"GPU clocks: not permitted ({e})"
    finally:
        pynvml.nvmlShutdown()

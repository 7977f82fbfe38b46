"""How fast this UE's CPU runs a request: the frequency in force and the deciding thread's share of a core.

Owned by the caller's thread (``ue_client.client.RemoteEngine``: its ``cpu``); no other thread touches it.
"""

from __future__ import annotations

import logging

from partitioner.robust import request_energy_mj
from profiler.device_info import cpu_share
from ue_client.frequency import FrequencyControl, energy_model
from ue_client.report import RequestReport

log = logging.getLogger(__name__)


class CpuSpeed:
    """The frequency in force (robust's choice, applied through the optional control; the nominal one for other
    policies) and the share of one core this process's CFS quota gives the deciding thread, with the report
    fields they explain (frequency, modelled energy)."""

    def __init__(self, control: FrequencyControl | None):
        self.control = control
        """The frequency control (``ClientOptions.frequency``; None: the CPU runs as it is)."""
        self.energy = energy_model(control)
        self._open = False
        self.current: tuple[float, bool] = (self.energy.f_nominal_ghz, False)
        """(frequency in force, GHz; whether a control applied it)."""
        self.share = cpu_share()
        """The share of one core this process's CFS quota gives the deciding thread (0 < share <= 1; 1 without a
        quota; ``_read_share``), read here, at each ``open`` and after each emulated frequency change: each
        report's ``plan_at_share_ms`` is its ``plan_cpu_ms`` at the share its decision ran under."""
        self.plan_share = 1.0
        """``share`` when the request in progress began deciding."""

    def open(self) -> None:
        """At connect: open the control (once: the profile is measured at the nominal frequency), then read the
        share again (a quota applied after the client was built: the testbed's UEs)."""
        if self.control is not None and not self._open:
            self.control.open()
            self._open = True
            log.info("frequency control %s", self.control.describe())
        self.share = self._read_share()

    def apply(self, f_ghz: float) -> float:
        """Run the UE at ``f_ghz`` (through the control, when there is one) from now on; the factor the UE's
        times scale by (1.0 when no control applied it)."""
        applied = False
        if self.control is not None:
            applied = self.control.apply(f_ghz)
        self.current = (f_ghz, applied)
        factor = self.energy.time_factor(f_ghz) if applied else 1.0
        if applied and getattr(self.control, "kind", "") == "quota":  # the emulated frequency is a CPU quota
            self.share = self._read_share()
        return factor

    def close(self) -> None:
        """Close the control (it restores the nominal frequency); the nominal frequency is in force again."""
        if self.control is not None and self._open:
            self.control.close()
            self._open = False
        self.current = (self.energy.f_nominal_ghz, False)

    def _read_share(self) -> float:
        """The deciding thread's share of a core now: robust's emulated frequency's quota once its control is
        open (``ue_client.frequency.QuotaFreq``: the quota it wrote, / its period), else this process's cgroup
        quota (``profiler.device_info.cpu_share``); at most 1."""
        f = self.control
        if self._open and getattr(f, "kind", "") == "quota" and f.writable:
            return min(1.0, f.quota_us(f.current_ghz) / f.period_us)
        return cpu_share()

    def report(self, rep: RequestReport, planned: bool, uplink_mbps: float) -> None:
        """The report's frequency fields and its modelled energy (``partitioner.robust.request_energy_mj``) at
        ``uplink_mbps``; ``planned``: the request ran its plan (not a fallback; a request without a plan ran at
        the frequency in force when a control applied it, else at the nominal one)."""
        f, applied = self.current
        if not planned:
            f = f if applied else self.energy.f_nominal_ghz
        rep.frequency_ghz, rep.frequency_applied = f, applied
        sent = rep.uploaded_weight_bytes + rep.sent_tensor_bytes
        idle = max(0.0, rep.measured_ms - rep.ue_compute_ms)
        rep.energy_j = request_energy_mj(self.energy, f, rep.ue_compute_ms, sent, uplink_mbps * 125.0, idle) / 1e3

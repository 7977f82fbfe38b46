"""The CPU quota a process reads is its OWN cgroup's and its ancestors' (``profiler.device_info.cgroup_cpu_quota``,
``usable_cores``), not the root group's: the smallest quota / period of the chain wins. Session 13's
``cgroup_cpu_quota`` read ``/sys/fs/cgroup/cpu.max`` (the root, never limited) and ``usable_cores`` read the own
group only (a quota set on a parent was missed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiler.device_info import cgroup_cpu_quota, cpu_share, usable_cores
from testbed.cgroups import CgroupError, CpuCgroup, detect_cgroups

ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path: Path, cgroup: str, files: dict[str, str], mountinfo: str | None = None) -> tuple[Path, Path]:
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    if mountinfo is not None:
        (proc / "mountinfo").write_text(mountinfo.replace("@", str(tmp_path / "cg")))
    for rel, text in files.items():
        f = tmp_path / "cg" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path / "proc", tmp_path / "cg"


@pytest.mark.parametrize(
    ("cgroup", "files", "mountinfo", "want"),
    [
        # v2: the parent's half core limits an unlimited child
        ("0::/ue/inner\n", {"ue/cpu.max": "50000 100000\n", "ue/inner/cpu.max": "max 100000\n"}, None, 0.5),
        # v2: smallest quota/period of the chain (child 0.25 under a parent's 2)
        ("0::/a/b\n", {"a/cpu.max": "200000 100000\n", "a/b/cpu.max": "2500 10000\n"}, None, 0.25),
        # hybrid: v2 mounted at unified/, no cpu files there; the v1 cpu hierarchy's parent carries the quota
        ("1:cpu:/ue/inner\n0::/ue/inner\n",
         {"cpu/ue/cpu.cfs_quota_us": "1000", "cpu/ue/cpu.cfs_period_us": "10000",
          "cpu/ue/inner/cpu.cfs_quota_us": "-1", "cpu/ue/inner/cpu.cfs_period_us": "100000",
          "unified/ue/inner/cgroup.procs": ""}, None, 0.1),
        # the root group alone is read like any ancestor (a quota there counts)
        ("0::/\n", {"cpu.max": "150000 100000\n"}, None, 1.5),
        ("0::/x\n", {"x/cpu.max": "max 100000\n"}, None, None),
        # mountinfo: a container's mount shows the hierarchy from /kube/pod (its root), the group is below it
        ("0::/kube/pod/c1\n", {"cpu.max": "30000 100000\n", "c1/cpu.max": "max 100000\n"},
         "30 20 0:26 /kube/pod @ rw,nosuid - cgroup2 cgroup2 rw\n", 0.3),
        # mountinfo: a v1 cpu,cpuacct mount elsewhere than the usual place
        ("3:cpu,cpuacct:/g/h\n", {"m/g/cpu.cfs_quota_us": "75000", "m/g/cpu.cfs_period_us": "100000"},
         "31 20 0:27 / @/m rw - cgroup cgroup rw,cpu,cpuacct\n", 0.75),
        # a cgroup namespace names a group outside its root "/../other": nothing outside the mount is read (before
        # session 15 the path was joined as it was, and a sibling's file beside the mount point was taken)
        ("0::/../other\n", {"../other/cpu.max": "10000 100000\n"}, None, None),
        ("0::/a/../b\n", {"b/cpu.max": "20000 100000\n", "a/cpu.max": "90000 100000\n"}, None, 0.2),
    ],
)
def test_own_group_and_ancestors(tmp_path, cgroup, files, mountinfo, want):
    proc, cg = _tree(tmp_path, cgroup, files, mountinfo)
    got = cgroup_cpu_quota(proc, cg)
    assert got == pytest.approx(want) if want is not None else got is None
    affinity = len(os.sched_getaffinity(0))
    import math

    assert usable_cores(proc, cg) == (affinity if want is None else min(affinity, max(1, math.ceil(want))))
    # one thread's share of a core (a plan's CPU at it: ``RequestReport.plan_at_share_ms``): the quota up to 1
    assert cpu_share(proc, cg) == pytest.approx(1.0 if want is None else min(1.0, want))


PROBE = r"""
import json
from profiler.device_info import cgroup_cpu_quota, cpu_share, device_info, usable_cores
from profiler.link import cpu_capacity
print(json.dumps({"quota": cgroup_cpu_quota(), "cores": usable_cores(), "info": device_info().cpu_quota,
                  "capacity": cpu_capacity(), "share": cpu_share()}))
"""


def test_a_real_child_cgroup_under_a_quota():
    """A process in an unlimited group whose PARENT has half a core reads 0.5 (the test makes both groups)."""
    support = detect_cgroups()
    if not support.usable:
        pytest.skip(f"no writable cgroup CPU controller: {support.reason}")
    try:
        cg = CpuCgroup(f"cfr-{os.getpid()}-quota", 0.5, support=support)
    except CgroupError as e:
        pytest.skip(f"cannot create a cgroup here: {e}")
    with cg:  # removes the inner group too (the testbed's removal walks children), also on failure
        inner = cg.path / "inner"
        try:
            inner.mkdir()
        except OSError as e:
            pytest.skip(f"cannot create a nested cgroup here: {e}")
        if support.version == "v2":
            assert (inner / "cpu.max").read_text().split()[0] == "max"
        else:
            assert int((inner / "cpu.cfs_quota_us").read_text()) < 0
        procs = str(inner / "cgroup.procs")

        def join() -> None:  # between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        env = dict(os.environ, PYTHONPATH=str(ROOT))
        res = subprocess.run([sys.executable, "-c", PROBE], preexec_fn=join, capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=120)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
    assert got["quota"] == pytest.approx(0.5)
    assert got["info"] == pytest.approx(0.5)
    assert got["cores"] == 1
    assert got["capacity"] == pytest.approx(0.5)
    assert got["share"] == pytest.approx(0.5)

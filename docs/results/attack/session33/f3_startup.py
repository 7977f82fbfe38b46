"""093f80fa (OMP_WAIT_POLICY=PASSIVE by default): the server's start, flags, exit codes and SIGTERM drain."""

import os
import signal
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
EDGE = os.path.join(ROOT, ".venv/bin/coinfer-edge")


def start(*extra, env=None):
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    e.update(env or {})
    p = subprocess.Popen(
        [EDGE, "serve", "--port", "0", "--memory-mb", "1024", *extra],
        cwd=ROOT,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()
    return p, line


def environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def stop(p, sig=signal.SIGTERM):
    t0 = time.monotonic()
    p.send_signal(sig)
    rc = p.wait(30)
    err = p.stderr.read()
    return rc, time.monotonic() - t0, err


for label, env in (
    ("unset", None),
    ("ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("empty", {"OMP_WAIT_POLICY": ""}),
    ("garbage", {"OMP_WAIT_POLICY": "spin\nFAKE LOG LINE"}),
):
    p, line = start(env=env)
    envp = environ(p.pid).get(b"OMP_WAIT_POLICY")
    from_children = []
    rc, dt, err = stop(p)
    omp = [l for l in err.splitlines() if "OpenMP" in l or "FAKE" in l]  # noqa: E741
    print(
        f"[{label}] first line {line.strip()!r}; server env OMP_WAIT_POLICY={envp!r}; SIGTERM -> rc {rc} in {dt:.1f} s; "  # noqa: E501
        f"log: {omp}"
    )
p, line = start()
rc, dt, err = stop(p, signal.SIGINT)
print(f"[SIGINT] rc {rc} in {dt:.1f} s")
for bad in (
    ["--threads", "999"],
    ["--port", "-1"],
    ["--profile-workers", "65"],
    ["--memory-mb", "-5"],
    ["--host", "0.0.0.0"],
    ["--bogus"],
):
    args = [EDGE, "serve", *bad] if "--port" in bad else [EDGE, "serve", "--port", "0", *bad]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=20)
    print(
        f"[flags {' '.join(bad)}] rc {r.returncode}: {r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else r.stdout[:100]}"  # noqa: E501
    )
r = subprocess.run([EDGE, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
print("[--help] rc", r.returncode, r.stdout.splitlines()[0][:100])

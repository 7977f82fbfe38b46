"""Watch a shared cell uplink while it runs: per-UE htb class counters and the UEs' TCP state, over time.

Why: a UE's uplink samples (``ue_client.uploads.UploadScheduler.uplink_samples``) are taken at the UE,
between handing bytes to the transport and the server's acknowledgements; they cannot tell where bytes
waited on the way. The cell (``testbed.netns.NetnsTestbed(shared_uplink_mbps=R)``: one ``htb`` on the
``cell`` ifb of the server's namespace, class ``1:<index + 0x10>`` per UE) counts what it carried per UE,
what it holds (backlog), what it dropped and how often a class hit its rate (overlimits); ``ss -tin`` in
a UE's namespace shows its relay's TCP connection across the cell (cwnd, pacing and delivery rates,
retransmissions, unacknowledged and unsent bytes).

``python -m testbed.cellwatch --netns SERVER_NS [--ue-ns NS1,NS2 | --ue-prefix PREFIX] --out FILE.jsonl``
polls the cell every ``--interval-ms`` (default 10) through one ``tc -s -batch -`` process (no fork per
poll) and ``ss -tin`` in each UE namespace every ``--ss-interval-ms`` (default 250; a fork each), writing
one JSON line per poll: ``{"t": perf_counter s, "classes": {"1:10": [sent_bytes, sent_pkts, dropped,
overlimits, backlog_bytes, backlog_pkts], ...}}`` and ``{"t": ..., "ss": {ns: [conn, ...]}}``. Times are
``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, the same clock in every process of the machine), so
they line up with the UEs' own sample times. It runs until SIGTERM/SIGINT or until the server namespace
is gone. ``load`` reads such a file; ``class_rate`` gives the rate a class carried over a window.
Needs root (``tc -n``, ``ip netns exec``), like the netns testbed itself.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

_CLASS_RE = re.compile(r"^class htb (\S+) ")
_SENT_RE = re.compile(r"^\s*Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)")
_BACKLOG_RE = re.compile(r"^\s*backlog (\d+)b (\d+)p")
GOODPUT_PER_FRAME = 1448 / 1514
"""tc counts frames; a full TCP segment carries 1448 payload bytes in 1514 (``netns.L2_PER_GOODPUT``)."""
_MARK = "qdisc"
"""The delimiter command's output starts with this (``qdisc show dev lo`` after each class dump)."""
_SS_FIELDS = {
    "cwnd": re.compile(r"\bcwnd:(\d+)"), "rtt_ms": re.compile(r"\brtt:([\d.]+)/"),
    "pacing_rate": re.compile(r"\bpacing_rate (\S+)"), "delivery_rate": re.compile(r"\bdelivery_rate (\S+)"),
    "send": re.compile(r"\bsend (\S+)"), "retrans": re.compile(r"\bretrans:\d+/(\d+)"),
    "unacked": re.compile(r"\bunacked:(\d+)"), "notsent": re.compile(r"\bnotsent:(\d+)"),
    "bytes_acked": re.compile(r"\bbytes_acked:(\d+)"), "bytes_sent": re.compile(r"\bbytes_sent:(\d+)"),
    "app_limited": re.compile(r"\b(app_limited)\b"), "busy_ms": re.compile(r"\bbusy:(\d+)ms"),
    "rwnd_limited": re.compile(r"\brwnd_limited:(\d+)ms"), "sndbuf_limited": re.compile(r"\bsndbuf_limited:(\d+)ms"),
}


def parse_classes(lines: list[str]) -> dict[str, list[int]]:
    """``tc -s class show`` lines -> classid -> [sent bytes, sent packets, dropped, overlimits, backlog bytes,
    backlog packets]."""
    out: dict[str, list[int]] = {}
    cur = None
    for line in lines:
        m = _CLASS_RE.match(line)
        if m:
            cur = m.group(1)
            out[cur] = [0, 0, 0, 0, 0, 0]
            continue
        if cur is None:
            continue
        m = _SENT_RE.match(line)
        if m:
            out[cur][:4] = [int(x) for x in m.groups()]
            continue
        m = _BACKLOG_RE.match(line)
        if m:
            out[cur][4:] = [int(x) for x in m.groups()]
    return out


def parse_ss(text: str) -> list[dict]:
    """``ss -tin`` output -> one dict per connection: ``local``, ``peer`` and the fields of ``_SS_FIELDS``
    found (rates as ss prints them, e.g. ``"7.8Mbps"``)."""
    conns: list[dict] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("State"):
            continue
        if not line[0].isspace():  # a connection's first line: state recv-q send-q local peer
            parts = line.split()
            conns.append({"local": parts[3] if len(parts) > 3 else "", "peer": parts[4] if len(parts) > 4 else ""})
            continue
        if conns:
            for name, rx in _SS_FIELDS.items():
                m = rx.search(line)
                if m:
                    v = m.group(1)
                    conns[-1][name] = int(v) if v.isdigit() else (True if name == "app_limited" else v)
    return conns


class CellWatch:
    """The polling loops (see the module docstring); ``run`` blocks until ``stop``."""

    def __init__(self, server_ns: str, out: Path, *, dev: str = "cell", ue_ns: list[str] | None = None,
                 ue_prefix: str | None = None, interval_s: float = 0.01, ss_interval_s: float = 0.25):
        self.server_ns, self.dev, self.out = server_ns, dev, out
        self.ue_ns, self.ue_prefix = list(ue_ns or []), ue_prefix
        self.interval_s, self.ss_interval_s = interval_s, ss_interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._fh = None

    def stop(self) -> None:
        self._stop.set()

    def _write(self, rec: dict) -> None:
        with self._lock:
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def _namespaces(self) -> list[str]:
        if self.ue_prefix is None:
            return self.ue_ns
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=5)
        return sorted(line.split()[0] for line in res.stdout.splitlines()
                      if line.split() and line.split()[0].startswith(self.ue_prefix))

    def _ss_loop(self) -> None:
        if self.ss_interval_s <= 0:
            return
        while not self._stop.wait(self.ss_interval_s):
            rec: dict = {}
            for ns in self._namespaces():
                res = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH", "state", "established"],
                                     capture_output=True, text=True, timeout=5)
                if res.returncode == 0:
                    # -H drops the header; the first line of a connection starts with its Recv-Q
                    text = "\n".join(("x " + ln) if ln and not ln[0].isspace() else ln
                                     for ln in res.stdout.splitlines())
                    rec[ns] = [c for c in parse_ss(text) if not c["peer"].startswith("127.")]
            self._write({"t": time.perf_counter(), "ss": rec})

    def run(self) -> int:
        """Poll until ``stop`` or the server namespace is gone; returns the number of class polls."""
        polls = 0
        with open(self.out, "w") as self._fh:
            proc = subprocess.Popen(["tc", "-n", self.server_ns, "-s", "-batch", "-"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            ss = threading.Thread(target=self._ss_loop, name="cellwatch-ss", daemon=True)
            ss.start()
            try:
                nxt = time.perf_counter()
                while not self._stop.is_set():
                    try:
                        proc.stdin.write(f"class show dev {self.dev}\nqdisc show dev lo\n")
                        proc.stdin.flush()
                    except (BrokenPipeError, OSError):
                        break  # tc exited: the namespace is gone
                    lines: list[str] = []
                    t = time.perf_counter()
                    while True:
                        line = proc.stdout.readline()
                        if not line:
                            break
                        if line.startswith(_MARK):
                            break
                        lines.append(line)
                    if not line:
                        break
                    self._write({"t": t, "classes": parse_classes(lines)})
                    polls += 1
                    nxt += self.interval_s
                    wait = nxt - time.perf_counter()
                    if wait > 0:
                        self._stop.wait(wait)
                    else:
                        nxt = time.perf_counter()
            finally:
                self._stop.set()
                if proc.poll() is None:
                    proc.terminate()
                proc.wait(timeout=5)
                ss.join(timeout=10)
        return polls


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """A watch file -> (class polls, ss polls), each oldest first."""
    polls, sss = [], []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short when the watcher was stopped
        (polls if "classes" in rec else sss).append(rec)
    return polls, sss


def counter_at(polls: list[dict], classid: str, t: float, field: int = 0) -> float | None:
    """Class ``classid``'s counter ``field`` (0: bytes sent) at time ``t``, linear between the two polls
    around it (a busy class's counter grows about evenly between 10 ms polls); None outside the polls."""
    ts = [p["t"] for p in polls]
    j = bisect.bisect_left(ts, t)
    if j >= len(polls) or (j == 0 and ts[0] > t):
        return None
    b = polls[j]["classes"].get(classid)
    if b is None:
        return None
    if ts[j] == t or j == 0:
        return float(b[field])
    a = polls[j - 1]["classes"].get(classid, [0] * 6)
    f = (t - ts[j - 1]) / (ts[j] - ts[j - 1])
    return a[field] + f * (b[field] - a[field])


def class_rate(polls: list[dict], classid: str, t0: float, t1: float) -> dict | None:
    """What class ``classid`` carried between ``t0`` and ``t1`` (perf_counter s; its byte counter
    interpolated between polls, ``counter_at``): ``mbps`` as goodput (tc counts frames: scaled by
    ``GOODPUT_PER_FRAME``), ``bytes`` (frames), ``seconds``, ``max_backlog_bytes`` (the most the class held
    at a poll in the window), ``dropped`` and ``overlimits`` (their increase). None when the window is
    empty or outside the polls."""
    if not t1 > t0:
        return None
    a, b = counter_at(polls, classid, t0), counter_at(polls, classid, t1)
    if a is None or b is None:
        return None
    ts = [p["t"] for p in polls]
    i, j = bisect.bisect_left(ts, t0), bisect.bisect_right(ts, t1)
    inside = [p["classes"].get(classid, [0] * 6) for p in polls[max(i - 1, 0):j + 1]]
    return {"mbps": (b - a) * 8e-6 / (t1 - t0) * GOODPUT_PER_FRAME, "bytes": b - a, "seconds": t1 - t0,
            "max_backlog_bytes": max((c[4] for c in inside), default=0),
            "dropped": inside[-1][2] - inside[0][2] if inside else 0,
            "overlimits": inside[-1][3] - inside[0][3] if inside else 0}


def sample_window(sample: dict) -> tuple[float, float] | None:
    """A UE's uplink sample (``UploadScheduler.uplink_samples``) -> its sending window in perf_counter s:
    from its first chunk handed to the transport to its last (the last acknowledged weight's last chunk);
    None when the sample does not say (no handover times)."""
    acks = sample.get("acks") or []
    hand = [a[2] for a in acks if len(a) > 2 and a[2] is not None]
    if not hand or not sample.get("first_ack"):
        return None
    t_ack = sample["first_ack"][0] + sample["delivery_s"]
    return t_ack - sample["seconds"], max(hand)


def sample_cell_rate(polls: list[dict], classid: str, sample: dict) -> dict | None:
    """The rate the cell carried UE ``classid``'s traffic while the UE handed over the sample's bytes
    (``class_rate`` over ``sample_window``), as goodput Mbit/s; None without a window or polls over it."""
    w = sample_window(sample)
    return None if w is None else class_rate(polls, classid, *w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.cellwatch", description=__doc__.splitlines()[0])
    p.add_argument("--netns", required=True, help="the server's namespace (holds the cell's ifb)")
    p.add_argument("--dev", default="cell", help="the cell's device (default cell)")
    p.add_argument("--ue-ns", default="", help="UE namespaces for ss (comma list)")
    p.add_argument("--ue-prefix", help="instead of --ue-ns: every namespace whose name starts with this")
    p.add_argument("--interval-ms", type=float, default=10.0, help="class poll interval (default 10)")
    p.add_argument("--ss-interval-ms", type=float, default=250.0, help="ss poll interval (default 250; 0: no ss)")
    p.add_argument("--out", type=Path, required=True, help="JSON lines written here")
    args = p.parse_args(argv)
    w = CellWatch(args.netns, args.out, dev=args.dev, ue_ns=[x for x in args.ue_ns.split(",") if x],
                  ue_prefix=args.ue_prefix, interval_s=args.interval_ms / 1000,
                  ss_interval_s=args.ss_interval_ms / 1000)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: w.stop())
    polls = w.run()
    print(f"{polls} class polls -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

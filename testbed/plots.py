"""PNG plots of a bench run (matplotlib, Agg): stream latency per request, latency vs bandwidth, predicted vs
measured, cold parallel vs serial, multi-UE latencies. ``make_plots(rows, out_dir)`` returns the files."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

COLORS = {"local": "tab:gray", "neurosurgeon-serial": "tab:blue", "dads-serial": "tab:green", "ionn": "tab:orange",
          "coinfer": "tab:red", "neurosurgeon": "tab:blue", "dads": "tab:green",
          "coinfer-parallel": "tab:red", "serial-same-split": "tab:purple"}



def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, plt, w: float = 4.2, h: float = 3.2):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat


def stream_plot(rows: list[dict], out: Path, plt) -> Path | None:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("scenario") == "stream" and r.get("latency_ms"):
            cells[(r["model"], r["ue_cpu"], r["uplink_mbps"])].append(r)
    if not cells:
        return None
    fig, axes = _grid(len(cells), plt)
    for ax, k in zip(axes, sorted(cells)):
        pre = None
        for r in sorted(cells[k], key=lambda r: r["policy"]):
            lat = r["latency_ms"]
            ax.plot(range(1, len(lat) + 1), lat, marker="o", ms=3, label=r["policy"], color=COLORS.get(r["policy"]))
            pre = pre or r.get("predeployed_ms")
        if pre:
            ax.axhline(pre, ls="--", color="k", lw=0.8, label="pre-deployed")
        ax.set_yscale("log")
        ax.set_title(f"{k[0]}, CPU {k[1] * 100:g} %, {k[2]:g} Mbit/s", fontsize=9)
        ax.set_xlabel("request")
        ax.set_ylabel("latency ms")
    axes[0].legend(fontsize=7)
    fig.suptitle("Latency per request over the stream (cold server at request 1)")
    return _save(fig, out / "stream_latency.png", plt)


def bandwidth_plot(rows: list[dict], out: Path, plt) -> Path | None:
    groups: dict[tuple, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("scenario") == "stream" and r.get("mean_ms") is not None:
            groups[(r["model"], r["ue_cpu"])][r["policy"]].append((r["uplink_mbps"], r["mean_ms"]))
    if not groups:
        return None
    fig, axes = _grid(len(groups), plt)
    for ax, k in zip(axes, sorted(groups)):
        for pol, pts in sorted(groups[k].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol, color=COLORS.get(pol))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{k[0]}, UE CPU {k[1] * 100:g} %", fontsize=9)
        ax.set_xlabel("uplink Mbit/s")
        ax.set_ylabel("mean latency over the stream, ms")
    axes[0].legend(fontsize=7)
    return _save(fig, out / "latency_vs_bandwidth.png", plt)


def accuracy_plot(rows: list[dict], out: Path, plt) -> Path | None:
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        preds = r.get("predicted_per_request_ms") or []
        for p, m in zip(preds, r.get("latency_ms") or []):
            if p and m:
                pts[r["policy"]].append((p, m))
        if r.get("scenario") == "cold" and r.get("predicted_ms") and r.get("first_ms"):
            pts[r["policy"]].append((r["predicted_ms"], r["first_ms"]))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = float("inf"), 0.0
    for pol, xs in sorted(pts.items()):
        ax.scatter([p for p, _ in xs], [m for _, m in xs], s=12, alpha=0.7, label=pol, color=COLORS.get(pol))
        lo = min(lo, *(min(p, m) for p, m in xs))
        hi = max(hi, *(max(p, m) for p, m in xs))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted ms")
    ax.set_ylabel("measured ms")
    ax.set_title("Planner accuracy: predicted vs measured")
    ax.legend(fontsize=7)
    return _save(fig, out / "predicted_vs_measured.png", plt)


def cold_plot(rows: list[dict], out: Path, plt) -> Path | None:
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("scenario") == "cold" and r.get("first_ms") is not None:
            cells[(r["model"], r["ue_cpu"], r["uplink_mbps"])][r["policy"]] = r["first_ms"]
    if not cells:
        return None
    keys = sorted(cells)
    pols = ["local", "serial-same-split", "coinfer-parallel"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    w = 0.27
    for j, pol in enumerate(pols):
        ax.bar([i + (j - 1) * w for i in range(len(keys))], [cells[k].get(pol, 0) for k in keys], w, label=pol,
               color=COLORS.get(pol))
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{k[0]}\n{k[1] * 100:g}% {k[2]:g}M" for k in keys], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("first request latency ms")
    ax.set_title("Cold request: parallel vs serial upload of the same partition")
    ax.legend(fontsize=7)
    return _save(fig, out / "cold_parallel_vs_serial.png", plt)


def multi_plot(rows: list[dict], out: Path, plt) -> Path | None:
    by_n: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("scenario") == "multi_ue" and r.get("mean_ms") is not None:
            by_n[r["n_ues"]].append(r)
    if not by_n:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = sorted(by_n)
    for n in ns:
        for r in by_n[n]:
            ax.scatter([n], [r["mean_ms"]], color="tab:red" if "resnet" in r["model"] else "tab:blue", s=18)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("UEs on one edge server")
    ax.set_ylabel("per-UE mean latency ms (red resnet, blue other)")
    ax2 = ax.twinx()
    ax2.plot(ns, [by_n[n][0].get("server_throughput_rps") or 0 for n in ns], "k-o", ms=4)
    ax2.set_ylabel("server throughput req/s")
    ax.set_title("Multi-UE: per-UE latency and throughput")
    return _save(fig, out / "multi_ue.png", plt)


def make_plots(rows: list[dict], out: Path) -> list[str]:
    plt = _plt()
    out = Path(out)
    made = [f(rows, out, plt) for f in (stream_plot, bandwidth_plot, cold_plot, accuracy_plot, multi_plot)]
    return [str(p) for p in made if p is not None]

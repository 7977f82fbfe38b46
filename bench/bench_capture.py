"""Capture benchmark (issue 10): which torchvision names capture, and what capture costs.

For each model: build time, capture time (torch.export + conversion + the eager check) with a static
batch, the time of a ``torch.export`` with a dynamic batch dimension (``torch.export.Dim``; measured
for comparison only: coinfer captures one graph per input signature, see modelgraph/signatures.py),
the cost of a signature miss (a new batch size: SignatureCache capture) and of a hit, op count, and
for a refusal its one-line reason. The plain static ``torch.export`` is timed next to the dynamic one
(same model, same run). The dynamic/miss columns are measured for the synthetic zoo and the
``--dynamic-tv`` names; every other torchvision name gets build + capture only. Prints a table and
writes JSON.

    PYTHONPATH=. .venv/bin/python bench/bench_capture.py --out docs/results/capture/capture.json
    PYTHONPATH=. .venv/bin/python bench/bench_capture.py --zoo-only   # the zoos only (fast)
    PYTHONPATH=. .venv/bin/python bench/bench_capture.py --resume capture.json --out capture.json  # go on

Models with more than ``--max-params`` parameters (default 150 M) are listed, not built (time and
memory on a small machine); ``--max-params 0`` builds everything.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelgraph import CaptureError, ModelGraphError, capture, load_model
from modelgraph.signatures import SignatureCache
from modelgraph.sources import torchvision_family, torchvision_names
from modelgraph.zoo import ZOO

# parameter counts (millions) of the torchvision models too big to build on a 2-core test machine
# (torchvision's documented num_params, rounded): the only ones above the default --max-params
_HUGE = {"vit_h_14": 633, "regnet_y_128gf": 645, "vit_l_16": 304, "vit_l_32": 306}


def _first(e: BaseException) -> str:
    t = str(e).strip()
    return (t.splitlines()[0] if t else type(e).__name__)[:200]


def _dynamic_export_s(module: torch.nn.Module, args: tuple) -> tuple[float | None, str]:
    """Seconds of a torch.export with dim 0 of every batched tensor input dynamic (None: refused). The
    example is batch 2 (torch specialises a size-1 dimension, so a batch-1 example cannot be dynamic)."""
    from torch.export import Dim

    batch = Dim("batch", min=2, max=64)
    if not args or not all(isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[0] == 1 for a in args):
        return None, "inputs are not all batch-1 tensors"
    args2 = tuple(torch.cat([a, a]) for a in args)
    t0 = time.perf_counter()
    try:
        torch.export.export(module, args2, dynamic_shapes=tuple({0: batch} for _ in args2))
    except Exception as e:  # the model does not allow a dynamic batch
        return None, f"{type(e).__name__}: {_first(e)}"
    return time.perf_counter() - t0, ""


class _ModelTimeout(Exception):
    """A model ran past ``--model-timeout-s`` (raised by SIGALRM in the main thread)."""


def _alarm(_signum, _frame):
    raise _ModelTimeout


def bench_one(spec: str, *, dynamic: bool, timeout_s: float = 0.0) -> dict:
    """One model's row; with ``timeout_s`` > 0 (POSIX main thread) a model that takes longer than that in
    all is cut off and recorded as ``status: "timeout"`` with what it had reached."""
    row: dict = {"model": spec, "status": "ok"}
    if timeout_s <= 0:
        return _bench_one(spec, row, dynamic=dynamic)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return _bench_one(spec, row, dynamic=dynamic)
    except _ModelTimeout:
        return {**row, "status": "timeout", "reason": f"over the {timeout_s:.0f} s per-model cap"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _bench_one(spec: str, row: dict, *, dynamic: bool) -> dict:
    t0 = time.perf_counter()
    try:
        lm = load_model(spec)
    except ModelGraphError as e:
        return {**row, "status": "build failed", "reason": str(e)[:200]}
    row["build_s"] = time.perf_counter() - t0
    row["params_m"] = sum(p.numel() for p in lm.module.parameters()) / 1e6
    t0 = time.perf_counter()
    try:
        g = capture(lm.module, lm.example_inputs, name=spec)
    except CaptureError as e:
        row.update(status="refused", capture_s=time.perf_counter() - t0, reason=str(e)[:300])
        return row
    row.update(capture_s=time.perf_counter() - t0, ops=len(g.ops), eager_max_diff=g.eager_max_diff)
    if dynamic:
        t0 = time.perf_counter()
        torch.export.export(lm.module, tuple(lm.example_inputs))
        row["static_export_s"] = time.perf_counter() - t0
        row["dynamic_export_s"], why = _dynamic_export_s(lm.module, lm.example_inputs)
        if why:
            row["dynamic_refused"] = why
        # a signature miss: the same model at batch 2 (where the input has a batch dim)
        ex = tuple(lm.example_inputs)
        if ex and all(isinstance(a, torch.Tensor) and a.dim() >= 2 for a in ex):  # every input has a batch dim
            cache = SignatureCache(lm.module, name=spec, first=(ex, g))
            ex2 = tuple(torch.cat([a, a]) for a in ex)
            t0 = time.perf_counter()
            try:
                cache.get(ex2)
                row["signature_miss_s"] = time.perf_counter() - t0
            except CaptureError as e:
                row["signature_miss_refused"] = _first(e)
            t0 = time.perf_counter()
            cache.get(ex)
            row["signature_hit_ms"] = (time.perf_counter() - t0) * 1e3
    return row


def _table(rows: list[dict]) -> str:
    cols = [
        ("model", "model", "s"),
        ("status", "status", "s"),
        ("ops", "ops", "d"),
        ("capture_s", "capture s", ".2f"),
        ("static_export_s", "export s", ".2f"),
        ("dynamic_export_s", "dyn export s", ".2f"),
        ("signature_miss_s", "sig miss s", ".2f"),
        ("signature_hit_ms", "sig hit ms", ".3f"),
    ]
    lines = ["  ".join(f"{h:>12}" if i else f"{h:<44}" for i, (_, h, _f) in enumerate(cols))]
    for r in rows:
        cells = []
        for i, (k, _h, f) in enumerate(cols):
            v = r.get(k)
            s = "-" if v is None else format(v, f)
            cells.append(f"{s:>12}" if i else f"{s:<44}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def markdown(d: dict) -> str:
    """The README's tables from a run's JSON: the zoos (seconds; hit in ms) and torchvision by family,
    with each name that did not capture and its one-line reason."""
    def f(v, fmt=".2f"):
        return "-" if v is None else format(v, fmt)

    out = ["| model | ops | capture s | export s | dyn export s | sig miss s | sig hit ms |",
           "|---|---|---|---|---|---|---|"]
    for r in d["zoo"]:
        name = r["model"].split(":", 1)[1]
        if r["status"] != "ok":
            out.append(f"| {name} | refused: {r.get('reason', '')[:90]} | | | | | |")
            continue
        dyn = f(r.get("dynamic_export_s"))
        if "dynamic_refused" in r:  # not tried (inputs other than batch-1 tensors) or refused by torch.export
            dyn = "n/a" if r["dynamic_refused"].startswith("inputs are not") else "refused"
        out.append(f"| {name} | {r['ops']} | {f(r.get('capture_s'))} | {f(r.get('static_export_s'))} | {dyn} | "
                   f"{f(r.get('signature_miss_s'))} | {f(r.get('signature_hit_ms'), '.3f')} |")
    tv = d.get("torchvision") or []
    if tv:
        fams: dict[str, list[dict]] = {}
        for r in tv:
            fams.setdefault(r.get("family", "?"), []).append(r)
        out += ["", "| family | names | capture | refused | timeout | not run or skipped (size) | median capture s |",
                "|---|---|---|---|---|---|---|"]
        for fam, rs in sorted(fams.items()):
            ok = sorted(r["capture_s"] for r in rs if r["status"] == "ok")
            med = f(ok[len(ok) // 2]) if ok else "-"
            cnt = {k: sum(r["status"].startswith(k) for r in rs) for k in ("ok", "refused", "timeout", "not run")}
            skipped = sum(r["status"].startswith("skipped") or r["status"] == "build failed" for r in rs)
            cnt["not run"] += skipped
            out.append(f"| {fam} | {len(rs)} | {cnt['ok']} | {cnt['refused']} | {cnt['timeout']} | {cnt['not run']} | "
                       f"{med} |")
        why: dict[str, list[str]] = {}  # one line per reason (the model's own name taken out)
        for r in tv:
            if r["status"] != "ok":
                name = r["model"].split(":", 1)[1]
                reason = r.get("reason", "").replace(r["model"], "<model>")[:200]
                why.setdefault(f"{r['status']}: {reason}" if reason else r["status"], []).append(name)
        out += ["", "Not captured:"] + [f"- {', '.join(ns)}: {w}" for w, ns in why.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results/capture/capture.json")
    ap.add_argument("--zoo-only", action="store_true",
                    help="only the synthetic zoo (modelgraph.zoo) and the users' models (tests/user_zoo.py)")
    ap.add_argument("--resume", type=Path,
                    help="a previous run's JSON: keep its rows and run only the models it did not reach")
    ap.add_argument("--no-user-zoo", action="store_true", help="leave out the users' models of tests/user_zoo.py")
    ap.add_argument("--names", nargs="*", help="torchvision names (default: all of list_models())")
    ap.add_argument(
        "--dynamic-tv",
        nargs="*",
        default=["resnet18", "mobilenet_v3_small", "vit_b_16"],
        help="torchvision names also timed with a dynamic batch and a signature miss",
    )
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop building new torchvision models after this many seconds (0: no limit); the rest "
                    "are listed as not run")
    ap.add_argument("--max-params", type=float, default=150.0, help="skip torchvision models above this many M params")
    ap.add_argument("--model-timeout-s", type=float, default=300.0,
                    help="cut off one model (build + capture + the dynamic/miss timings) after this long (0: no cap)")
    ap.add_argument("--classification-first", action="store_true",
                    help="run the classification names first (default: the other families first)")
    ap.add_argument("--markdown", type=Path, help="print the README tables of this run JSON and exit")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    specs = [f"modelgraph.zoo:{name}" for name in ZOO]
    if not args.no_user_zoo:
        from tests.user_zoo import KINDS

        specs += [f"tests.user_zoo:{name}" for name in KINDS]
    kept: dict[str, dict] = {}
    if args.resume is not None:  # a previous run's rows: keep the zoo and every torchvision name it reached
        prev = json.loads(Path(args.resume).read_text())
        rows = list(prev["zoo"])
        specs = [sp for sp in specs if sp not in {r["model"] for r in rows}]
        kept = {r["model"]: r for r in prev["torchvision"] if not r["status"].startswith("not run")}
    for spec in specs:
        rows.append(bench_one(spec, dynamic=True, timeout_s=args.model_timeout_s))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    tv_rows: list[dict] = []
    if not args.zoo_only:
        names = args.names or torchvision_names()
        tv_rows = [kept[f"torchvision:{n}"] for n in names if f"torchvision:{n}" in kept]
        names = [n for n in names if f"torchvision:{n}" not in kept]
        # the non-classification families first (segmentation, detection, video, optical flow, quantization)
        first_cls = args.classification_first
        names = sorted(names, key=lambda n: ((torchvision_family(n) == "classification") != first_cls, n))
        t_start = time.perf_counter()
        for name in names:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                tv_rows.append({"model": f"torchvision:{name}", "status": "not run (time budget)",
                                "family": torchvision_family(name)})
            elif args.max_params and _HUGE.get(name, 0) > args.max_params:
                tv_rows.append(
                    {
                        "model": f"torchvision:{name}",
                        "status": "skipped (size)",
                        "params_m": _HUGE[name],
                        "family": torchvision_family(name),
                    }
                )
            else:
                r = bench_one(f"torchvision:{name}", dynamic=name in args.dynamic_tv, timeout_s=args.model_timeout_s)
                r["family"] = torchvision_family(name)
                tv_rows.append(r)
            print(_table(tv_rows[-1:]).splitlines()[-1], flush=True)
            gc.collect()
    print("\nzoo\n" + _table(rows))
    summary = {}
    if tv_rows:
        print("\ntorchvision\n" + _table(tv_rows))
        ok = [r["model"] for r in tv_rows if r["status"] == "ok"]
        ran = [r for r in tv_rows if r["status"] in ("ok", "refused", "build failed", "timeout")]
        by_family: dict[str, dict[str, int]] = {}
        for r in tv_rows:
            by_family.setdefault(r["family"], {}).setdefault(r["status"], 0)
            by_family[r["family"]][r["status"]] += 1
        summary = {
            "torchvision_names": len(tv_rows),
            "capture_ok": len(ok),
            "by_family": by_family,
            "capture_ok_names": ok,
            "not_captured": {r["model"]: r.get("reason", r["status"]) for r in tv_rows if r["status"] != "ok"},
        }
        print(f"\n{len(ok)} of {len(ran)} tried ({len(tv_rows)} names) torchvision models capture; "
              f"by family: {json.dumps(by_family)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    out.write_text(
        json.dumps({"env": env, "zoo": rows, "torchvision": tv_rows, "summary": summary}, indent=1, default=str)
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

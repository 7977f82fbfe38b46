# ruff: noqa: E501  (measurement script of session 33)
"""Every field of ``planning.choose`` (``decision_ms`` aside) with the code before this session and after it, each
read from its own tree (``git archive``), in two processes: ``auto`` and ``mjoa`` over random DAGs (links, shares,
send costs, held / in-flight sets, horizons), the captured resnet18 and mobilenet_v2 graphs over a grid, and
sequences of decisions on one graph whose held set grows request by request (what one client's memos see).

    python ab_choose.py BEFORE_ROOT AFTER_ROOT          (prints the count of decisions and of differences)
"""

import os
import pickle
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
MAIN = HERE.parents[4]


def child(out: str) -> None:
    from partitioner.costgraph import CostGraph, Link
    from partitioner.state import ServerState, Shares
    from partitioner.synthetic import KINDS, random_dag
    from partitioner.uecpu import UeCpu
    from tests.decision_grid import held_states
    from ue_client import planning

    rows = []

    def rec(tag, g, link, **kw):
        for pol in ("auto", "mjoa"):
            try:
                c = planning.choose(pol, g, link, **kw)
                d = dict(vars(c))
                d.pop("decision_ms")
                d.get("details", {}).pop("precompute_ms", None)
            except Exception as e:  # (the same exception on both sides is the same answer)
                d = {"error": repr(e)}
            rows.append((tag, pol, repr(sorted(d.items(), key=lambda kv: kv[0]))))

    for seed in range(120):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0, 30.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        for f in (0.05, 0.5, 4.0):
            link = Link(max(1e-3, wsum / ue / 125.0 * f * rng.uniform(0.5, 2.0)), rtt_ms=rng.choice([2.0, 20.0]))
            share = Shares(compute=rng.choice([1.0, 0.5]))
            cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
            for si, st in enumerate(held_states(rng, g, in_flight=3)):
                for h in (2, 8, 40, None):
                    rec(("dag", seed, f, si, h), g, link, state=st, share=share, ue_cpu=cpu, horizon=h,
                        lost_ms=rng.choice([0.0, ue]))
    data = Path(MAIN / "tests/data/costgraphs")
    for name in ("resnet18", "mobilenet_v2", "googlenet"):
        p = data / f"{name}.json"
        if not p.exists():
            continue
        g0 = CostGraph.from_json(p)
        rng = random.Random(7)
        for slow in (1.0, 10.0):
            g = g0.scaled(ue=slow)
            for up in (20.0, 100.0, 400.0, 1000.0):
                for s in (2e-6, 1e-5):
                    for si, st in enumerate(held_states(rng, g, in_flight=3)):
                        for h in (2, 5, 30):
                            rec(("cap", name, slow, up, s, si, h), g, Link(up, rtt_ms=5.0), state=st,
                                ue_cpu=UeCpu(send_ms_per_byte=s), horizon=h)
            # one client's sequence: the held set grows by the need order's next weights, some in flight
            ws = sorted(g.weights)
            rng2 = random.Random(len(ws))
            rng2.shuffle(ws)
            for up in (100.0, 400.0):
                g = g0.scaled(ue=10.0)
                for k in range(0, len(ws) + 1, max(1, len(ws) // 12)):
                    held = frozenset(ws[:k])
                    infl = {w: g.weights[w] // 2 for w in ws[k:k + 2] if g.weights[w] > 1}
                    st = ServerState(held=held, in_flight=infl)
                    rec(("seq", name, up, k), g, Link(up, rtt_ms=5.0), state=st, ue_cpu=UeCpu(send_ms_per_byte=1e-5),
                        horizon=8)
    with open(out, "wb") as f:
        pickle.dump(rows, f)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2])
        raise SystemExit(0)
    got = {}
    for side, root in (("before", sys.argv[1]), ("after", sys.argv[2])):
        fd, out = tempfile.mkstemp(suffix=".pkl")
        os.close(fd)
        env = dict(os.environ, PYTHONPATH=f"{root}:{MAIN}", PYTHONHASHSEED="0")  # (the tree's code first; tests/
        # from this checkout; one hash seed: the sets' order, in their repr and any iteration, the same on both sides)
        subprocess.run([sys.executable, str(HERE), "--child", out], cwd="/tmp", env=env, check=True)
        got[side] = pickle.load(open(out, "rb"))  # noqa: SIM115
        os.unlink(out)
    b, a = got["before"], got["after"]
    assert [r[:2] for r in b] == [r[:2] for r in a]
    diff = [(x[0], x[1]) for x, y in zip(b, a, strict=True) if x[2] != y[2]]
    errs = sum("'error'" in x[2] for x in b)
    print(f"{len(b)} decisions ({errs} raising on both sides alike), {len(diff)} differ" + (f": {diff[:5]}" if diff else ""))

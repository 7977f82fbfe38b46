# ruff: noqa: E501
"""Every field of ``planning.choose`` (``decision_ms`` and the details' ``precompute_ms`` / ``plan_cpu_ms`` aside) with
the code before this session and after it, each read from its own tree, in separate processes with one hash seed.
Session 33's grid (``../session33/ab_choose.py``: random DAGs over links, shares, send costs, held / in-flight sets
and horizons; the captured resnet18, mobilenet_v2 and googlenet graphs over a grid; per graph a sequence of decisions
whose held set grows with weights in flight), extended: the policies ``cic``, ``dads``, ``neurosurgeon``, ``ionn``,
``offload`` and ``local`` beside ``auto`` and ``mjoa`` on part of it, a UE whose sending is free or not CPU-shared,
in-flight bytes that are no whole numbers, states told what they lack of a larger set (``ServerState.with_lacking``,
as the client's ``UploadScheduler.server_state`` makes them; the after tree only), and the real client's recorded calls (``calls.pkl``, ``capture.py``).
Each tree runs the grid twice, in order and shuffled (one seed), and each run is compared with the other tree's
in the same order: what one decision keeps for the next must not change an answer. (Across orders the code before
already differs in the last bits of some predictions: a policy that predicts from a compiled partition uses the
online table of the graph where one was built first, another graph's scale of it.)

    python ab_choose.py BEFORE_ROOT AFTER_ROOT      (prints the count of decisions and of differences)
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
sys.path.insert(0, str(HERE.parent))


def grid():
    """(tag, policy, graph maker, link, keywords) of every decision, in order."""
    from partitioner.costgraph import CostGraph, Link
    from partitioner.state import ServerState, Shares
    from partitioner.synthetic import KINDS, random_dag
    from partitioner.uecpu import UeCpu
    from tests.decision_grid import held_states

    out = []
    others = ("cic", "dads", "neurosurgeon", "ionn", "offload", "local")
    for seed in range(120):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0, 30.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        for f in (0.05, 0.5, 4.0):
            link = Link(max(1e-3, wsum / ue / 125.0 * f * rng.uniform(0.5, 2.0)), rtt_ms=rng.choice([2.0, 20.0]))
            share = Shares(compute=rng.choice([1.0, 0.5]))
            s = rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3
            cpu = rng.choice(
                [
                    UeCpu(send_ms_per_byte=s),
                    UeCpu(send_ms_per_byte=s),
                    UeCpu(send_ms_per_byte=s, shared=False),
                    UeCpu(send_ms_per_byte=0.0),
                    None,
                ]
            )
            for si, st in enumerate(held_states(rng, g, in_flight=3)):
                if (
                    si == 2 and st is not None and st.in_flight and seed % 3 == 0
                ):  # bytes left that are no whole numbers
                    st = ServerState(held=st.held, in_flight={w: b + 0.5 for w, b in st.in_flight.items()})
                if st is not None and seed % 2 and hasattr(ServerState, "with_lacking"):  # (told what it lacks)
                    st = ServerState(held=st.held, in_flight=st.in_flight).with_lacking(frozenset(g.weights))
                for h in (2, 8, 40, None):
                    kw = dict(state=st, share=share, ue_cpu=cpu, horizon=h, lost_ms=rng.choice([0.0, ue]))
                    for pol in ("auto", "mjoa") + (others if h == 8 else ()):
                        out.append((("dag", seed, f, si, h), pol, g, link, kw))
    data = MAIN / "tests/data/costgraphs"
    cold = MAIN / "docs/results/cold/session10/costgraphs"
    for name in ("resnet18", "mobilenet_v2", "googlenet"):
        p = data / f"{name}.json"
        g0 = CostGraph.from_json(p if p.exists() else cold / f"{name}.json")
        rng = random.Random(7)
        for slow in (1.0, 10.0):
            g = g0.scaled(ue=slow)
            for up in (20.0, 100.0, 400.0, 1000.0):
                for s in (2e-6, 1e-5):
                    for si, st in enumerate(held_states(rng, g, in_flight=3)):
                        for h in (2, 5, 30):
                            kw = dict(state=st, ue_cpu=UeCpu(send_ms_per_byte=s), horizon=h)
                            for pol in ("auto", "mjoa") + (("cic", "dads", "neurosurgeon") if h == 5 else ()):
                                out.append((("cap", name, slow, up, s, si, h), pol, g, Link(up, rtt_ms=5.0), kw))
        # one client's sequence: the held set grows by the need order's next weights, some in flight
        ws = sorted(g0.weights)
        rng2 = random.Random(len(ws))
        rng2.shuffle(ws)
        for up in (100.0, 400.0):
            g = g0.scaled(ue=10.0)
            for k in range(0, len(ws) + 1, max(1, len(ws) // 12)):
                held = frozenset(ws[:k])
                infl = {w: g.weights[w] // 2 for w in ws[k : k + 2] if g.weights[w] > 1}
                st = ServerState(held=held, in_flight=infl)
                if hasattr(ServerState, "with_lacking") and k % 2:  # (after: a state told what it lacks of a larger
                    # set, as the client's ``UploadScheduler.server_state`` gives it)
                    st = st.with_lacking(frozenset(g0.weights) | {"not.a.weight"})
                for su in (1.0, 1.3):  # (a calibrated copy: another scale of the table's units)
                    gg = g if su == 1.0 else g.scaled(ue=su, server=1.1)
                    kw = dict(state=st, ue_cpu=UeCpu(send_ms_per_byte=1e-5), horizon=8)
                    for pol in ("auto", "mjoa", "cic", "dads"):
                        out.append((("seq", name, up, k, su), pol, gg, Link(up, rtt_ms=5.0), kw))
    from tests.decision_grid import recorded_calls

    calls = HERE.parent / "calls.pkl"
    if calls.exists():
        for i, (costs, link, kw, c) in enumerate(
            recorded_calls(calls, MAIN / "docs/results/cold/session10/costgraphs")
        ):
            out.append((("rec", i), c["policy"], costs, link, kw))
    return out


def child(out: str, shuffle: int) -> None:
    from replay import canon, fields

    from ue_client import planning

    calls = grid()
    order = list(range(len(calls)))
    if shuffle:
        random.Random(shuffle).shuffle(order)
    rows = {}
    for i in order:
        tag, pol, g, link, kw = calls[i]
        try:
            got = fields(planning.choose(pol, g, link, **kw))
        except Exception as e:  # (the same exception on both sides is the same answer)
            got = repr(canon({"error": repr(e)}))
        rows[i] = (tag, pol, got)
    with open(out, "wb") as f:
        pickle.dump([rows[i] for i in range(len(calls))], f)


CACHE = tempfile.mkdtemp(prefix="ab_choose_cache_")
"""The online tables every child reads (``COINFER_CACHE_DIR``): a copy of the shared cache's ``online/`` made at the
start, so that both trees read the same tables (a table computed afresh keeps what its time-bounded grid search
found, and other processes on the machine rewrite the shared cache); one missing there is computed by the first
child and read by the others."""


def run(root: str, shuffle: int) -> list:
    fd, out = tempfile.mkstemp(suffix=".pkl")
    os.close(fd)
    env = dict(
        os.environ,
        PYTHONPATH=f"{root}:{MAIN}",
        PYTHONHASHSEED="0",  # (the tree's code first; tests/ from
        COINFER_CACHE_DIR=CACHE,
    )  # this checkout)
    subprocess.run([sys.executable, str(HERE), "--child", out, str(shuffle)], cwd="/tmp", env=env, check=True)
    with open(out, "rb") as f:
        got = pickle.load(f)
    os.unlink(out)
    return got


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        raise SystemExit(0)
    import shutil

    from profiler.cache import cache_dir

    if (cache_dir() / "online").is_dir():
        shutil.copytree(cache_dir() / "online", Path(CACHE) / "online")
    tot = 0
    for label, sh in (("in order", 0), ("shuffled", 12345)):
        b, a = run(sys.argv[1], sh), run(sys.argv[2], sh)
        assert [r[:2] for r in b] == [r[:2] for r in a]
        errs = sum("'error'" in x[2] for x in b)
        pols: dict = {}
        for x in b:
            pols[x[1]] = pols.get(x[1], 0) + 1
        diff = [(x[0], x[1]) for x, y in zip(b, a, strict=True) if x[2] != y[2]]
        tot += len(b)
        print(
            f"{label}: {len(b)} decisions ({errs} raising on both sides alike; per policy: {pols}), {len(diff)} differ"
            + (f": {diff[:5]}" if diff else "")
        )
        for x, y in [(x, y) for x, y in zip(b, a, strict=True) if x[2] != y[2]][:3]:
            print("  before", x[2][:3000])
            print("  after ", y[2][:3000])
    print(f"{tot} decisions compared in all")
    shutil.rmtree(CACHE, ignore_errors=True)

# session 18 (newuser18) probe, run from the repository root (commands in results.md)
import sys
import time
import traceback

import torch
from torch.utils._pytree import tree_map

sys.path.insert(0, ".")
from edge_server.testing import ServerThread
from modelgraph.pinning import pin_off_allowlist
from tests import user_models18 as um
from tests.test_user_zoo_splits import FAST, assert_as_eager
from ue_client import CoinferClient, new_tenant


def eager(m, a, k):
    with torch.no_grad():
        return m(*a, **k)


def fresh(tree, seed):
    g = torch.Generator().manual_seed(seed)
    return tree_map(
        lambda t: (
            torch.empty_like(t).copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
            else t
        ),
        tree,
    )


names = sys.argv[1:] or list(um.MODELS)
srv = ServerThread(threads=1).start()
try:
    for name in names:
        t0 = time.time()
        try:
            m, a, k = um.MODELS[name]()
            c0 = CoinferClient(m, a, example_kwargs=k, name=name)
            g = c0.graph
            y = c0(*a, **k)
            assert_as_eager(y, eager(m, a, k), c0.reference(*a, **k), (name, "local"))
            tail = set(pin_off_allowlist(g).tail)
            head = [i for i, op in enumerate(g.ops) if op.name not in tail]
            print(name, "ops", len(g.ops), "head", len(head), "pinned", len(tail), flush=True)
            positions = sorted({0, head[len(head) // 2], head[-1]} if head else set())
            for pos in positions:
                with CoinferClient(
                    g,
                    a,
                    example_kwargs=k,
                    name=name,
                    server=srv.address,
                    policy="offload",
                    server_ops=pos,
                    link=FAST,
                    tenant=new_tenant(),
                    profile_runs=2,
                    fallback=False,
                    probe=False,
                ) as c:
                    for j, (args, kwargs) in enumerate([(a, k), fresh((a, k), pos + 1), (a, k)]):
                        y = c(*args, **kwargs)
                        rep = c.last_report
                        assert not rep.fallback, (pos, j, rep.fallback_reason)
                        assert_as_eager(y, eager(m, args, kwargs), c.reference(*args, **kwargs), (name, pos, j))
            print("OK", name, f"{time.time() - t0:.1f}s", flush=True)
        except Exception as e:
            print("FAIL", name, type(e).__name__, str(e)[:600], flush=True)
            traceback.print_exc(limit=-3)
finally:
    srv.stop()

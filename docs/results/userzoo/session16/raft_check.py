"""Capture check of torchvision raft_small / raft_large (newuser16, session 16): `raft_check.py NAME ...`."""
import sys

from ue_client import CoinferClient

for name in sys.argv[1:]:
    try:
        c = CoinferClient(f"torchvision:{name}")
        print(name, "captures:", len(c.graph.ops), "ops; eager max diff", c.graph.eager_max_diff)
    except Exception as e:
        print(name, "refused:", type(e).__name__, str(e)[:300])

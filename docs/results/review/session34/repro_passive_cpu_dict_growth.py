"""Review repro (session 34, 856a6e40): ``PlannerBudgets.passive_cpu_s`` (new) and ``cpu_s`` keep one entry per
identity ever charged, while the buckets of identities gone are pruned. Without --auth-tokens an identity is
"peer:<ip:port>", one per connection, so a client reconnecting grows both dicts without bound.

Run: .venv/bin/python docs/results/review/session34/repro_passive_cpu_dict_growth.py
"""

from __future__ import annotations

from edge_server.planner_budget import PlannerBudgets


def main() -> None:
    b = PlannerBudgets(0.05, 2.0, 0.5, 20.0)
    for i in range(5000):  # 5000 connections, each gone by the next re-plan (live: the honest causer only)
        b.charge("peer:honest", 0.0001, {"peer:honest"}, {f"peer:10.0.0.1:{i}": 1e-6})
        b.charge(f"peer:10.0.0.2:{i}", 1e-6, {"peer:honest"})
    print(
        f"buckets {len(b._buckets)}, passive buckets {len(b._passive)}, "
        f"cpu_s entries {len(b.cpu_s)}, passive_cpu_s entries {len(b.passive_cpu_s)}"
    )
    if len(b.passive_cpu_s) >= 5000 and len(b._passive) < 100:
        print("BUG: the passive bucket is pruned but passive_cpu_s (and cpu_s) grow per identity ever seen")


if __name__ == "__main__":
    main()

"""Request 2's stages (``../session30/plan_path/stages.py``, 3 rounds, the wrappers' ~2 us a call included) before /
after, side by side: CPU ms medians of the stages either side spends 0.01 ms or more in.

    python docs/results/decisions/session34/stages_summary.py > docs/results/decisions/session34/stages_summary.md
"""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stages(path: Path) -> tuple[str, dict[str, float]]:
    text = path.read_text()
    block = text.split("\nrequest 2,", 1)[1].split("\nrequest 3,", 1)[0]
    head = "request 2," + block.splitlines()[0]
    rows = {}
    for ln in block.splitlines():
        m = re.match(r"\| (.+?) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", ln)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return head, rows


for model in ("resnet18", "mobilenet_v2"):
    (hb, b), (ha, a) = (stages(HERE / f"stages_{model}_{side}.txt") for side in ("before", "after"))
    print(f"### {model}\n\nbefore: {hb}\n\nafter: {ha}\n")
    print("| stage | CPU ms before | after |")
    print("|---|---|---|")
    names = sorted(set(b) | set(a), key=lambda k: -max(b.get(k, 0.0), a.get(k, 0.0)))
    for k in names:
        if max(b.get(k, 0.0), a.get(k, 0.0)) >= 0.01:
            print(f"| {k} | {b.get(k, 0.0):.3f} | {a.get(k, 0.0):.3f} |")
    print()

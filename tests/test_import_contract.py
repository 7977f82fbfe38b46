"""The import contract of DESIGN.md §2 (``[tool.importlinter]`` in pyproject.toml), run by import-linter.

Three checks: the repository keeps every contract; the configuration covers every package of the
project; and the contracts really catch what they forbid (a throwaway tree of packages with the same
names and one planted violation per contract must break each of them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.timeout(120)


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]


def _lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages found first on ``root`` (wide output: one line per contract)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    cmd = [str(LINT_IMPORTS)] if LINT_IMPORTS.exists() else [sys.executable, "-m", "importlinter.cli"]
    return subprocess.run(
        [*cmd, "--config", str(config), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=100
    )


def _verdicts(output: str) -> dict[str, str]:
    """Contract name -> KEPT/BROKEN, from the report's summary lines."""
    names = {c["name"] for c in _config()["contracts"]}
    found = {}
    for line in output.splitlines():
        m = re.fullmatch(r"(.+) (KEPT|BROKEN)", line.strip())
        if m and m.group(1) in names:
            found[m.group(1)] = m.group(2)
    return found


def test_the_repository_keeps_the_import_contract():
    res = _lint_imports(REPO, PYPROJECT)
    verdicts = _verdicts(res.stdout)
    broken = [name for name, v in verdicts.items() if v == "BROKEN"]
    # the report below names the broken rule and the offending import (module -> module, line)
    assert res.returncode == 0 and not broken, f"broken: {broken}\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    assert set(verdicts) == {c["name"] for c in _config()["contracts"]}, res.stdout[-3000:]


def test_the_contract_names_every_package_and_the_rules_of_the_design():
    cfg = _config()
    packages = sorted(
        p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name not in ("tests", "bench", "docs")
    )
    installed = [
        p.rstrip("*") for p in tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    assert sorted(cfg["root_packages"]) == packages == sorted(installed)
    contracts = {c["id"]: c for c in cfg["contracts"]}
    layered = {m.strip() for layer in contracts["layers"]["layers"] for m in layer.split("|")}
    assert layered == set(packages), "every package sits in a layer"
    assert set(contracts["no-circles"]["ancestors"]) == set(packages), "every package is checked for circles"
    assert cfg["include_external_packages"] is True  # needed to forbid torch/grpc
    assert {"torch", "grpc"} <= set(contracts["partitioner-pure"]["forbidden_modules"])
    assert set(contracts["partitioner-pure"]["forbidden_modules"]) >= set(packages) - {"partitioner"}


# One planted violation per contract: (contract id, file, its source, the import the report must show).
VIOLATIONS = [
    ("layers", "modelgraph/upward.py", "import profiler.costs\n", "modelgraph.upward -> profiler.costs"),
    (
        "runtimes-independent",
        "ue_client/peek.py",
        "import edge_server.server\n",
        "ue_client.peek -> edge_server.server",
    ),
    ("partitioner-pure", "partitioner/solver.py", "import torch\n", "partitioner.solver -> torch"),
    ("libraries-no-runtime", "profiler/costs.py", "import ue_client.client\n", "profiler.costs -> ue_client.client"),
    (
        "runtimes-no-testbed",
        "edge_server/server.py",
        "import testbed.linkemu\n",
        "edge_server.server -> testbed.linkemu",
    ),
    ("protos-leaf", "protos/heavy.py", "import torch\n", "protos.heavy -> torch"),
    ("values-no-grpc", "protos/values.py", "import grpc\n", "protos.values -> grpc"),
    ("no-circles", "modelgraph/slice.py", "from modelgraph import execute\n", ".slice -> .execute"),
]


def test_the_contract_catches_each_forbidden_import(tmp_path):
    cfg = _config()
    for pkg in cfg["root_packages"]:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    for path in ("ue_client/client.py", "testbed/linkemu.py", "protos/values.py"):
        (tmp_path / path).write_text("")
    (tmp_path / "modelgraph/execute.py").write_text("from modelgraph import slice\n")
    for _, path, source, _ in VIOLATIONS:
        (tmp_path / path).write_text(source)
    res = _lint_imports(tmp_path, PYPROJECT)
    assert res.returncode != 0
    verdicts = _verdicts(res.stdout)
    names = {c["id"]: c["name"] for c in cfg["contracts"]}
    assert {cid for cid, name in names.items() if verdicts.get(name) == "BROKEN"} == set(names), res.stdout[-6000:]
    flat = re.sub(r"\s+", " ", res.stdout)
    for cid, _, _, shown in VIOLATIONS:
        assert shown in flat, f"{cid}: the report does not show {shown!r}\n{res.stdout[-6000:]}"

"""The checked-in generated code in protos/ must match the .proto (run `make protos` after editing it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("protos/coinfer/v1/coinfer.proto")
GENERATED = ["coinfer_pb2.py", "coinfer_pb2.pyi", "coinfer_pb2_grpc.py"]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        str(PROTO),
    ]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_bytes()
        checked_in = (ROOT / PROTO.parent / name).read_bytes()
        assert fresh == checked_in, f"{PROTO.parent / name} is stale: run `make protos`"


def test_package_imports_are_absolute() -> None:
    from protos.coinfer.v1 import coinfer_pb2, coinfer_pb2_grpc

    assert coinfer_pb2.DESCRIPTOR.package == "coinfer.v1"
    assert hasattr(coinfer_pb2_grpc, "EdgeServiceStub")
    names = set(coinfer_pb2.DESCRIPTOR.services_by_name["EdgeService"].methods_by_name)
    assert names == {"Hello", "ProfileGraph", "QueryWeights", "UploadWeights", "Session", "Stats"}


def test_every_field_is_documented() -> None:
    """Each field line in the .proto has a comment line right above it (the client is written from it)."""
    lines = (ROOT / PROTO).read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package", "option"))
        if is_field and not lines[i - 1].strip().startswith("//"):
            undocumented.append(f"{i + 1}: {s}")
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)

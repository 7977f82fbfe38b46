"""State outside the module that review22 found unwatched (``/tmp/rv22p``: p4_globals, p4d_class_counter, p6 sparse):

- a config class reached through a module global (``Cfg.use_relu``, ``State.calls``): ``_Reached._reach`` marked the
  class walked and then called ``_class``, which returned at once on the mark, so its attributes were never watched:
  the user's ``Cfg.use_relu = True`` after building the client answered 0.876 off eager, and a forward doing
  ``State.calls += 1`` with a period-20 sign flip was captured (1 of 20 calls wrong);
- an environment variable the forward reads (``os.environ.get("X")`` / ``os.getenv("X")``): module globals such as
  ``os`` are not walked, so setting it after building the client answered 1.48 off eager;
- a sparse buffer: ``untyped_storage()`` raised a raw NotImplementedError out of the capture (a traceback from
  ``coinfer-ue run``) instead of a CaptureError.
Each is now refused naming what changed; a model that reads the same state without it changing still answers as
eager."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from tests.checks import warm_client
from ue_client import InputError
from ue_client.verify import max_abs_diff

POLICIES = ["local", "offload"]
ENV = "COINFER_TEST22_FAST"


class Cfg:
    """A config namespace users keep as a class (never instantiated)."""

    use_relu = False


class State:
    """A call counter kept on a class."""

    calls = 0


class ClassFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.fc(x)) if Cfg.use_relu else self.fc(x)


class ClassCounter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        State.calls += 1
        return self.fc(x) * (1.0 if State.calls % 20 else -1.0)


class EnvGet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x) * (2.0 if os.environ.get("COINFER_TEST22_FAST") == "1" else 1.0)


class EnvGetenv(EnvGet):
    def forward(self, x):
        return self.fc(x) * (2.0 if os.getenv("COINFER_TEST22_FAST", "0") == "1" else 1.0)


class SparseBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("mask", torch.eye(6).to_sparse())

    def forward(self, x):
        return self.fc(x) @ self.mask.to_dense()


@pytest.fixture
def flag():
    yield
    Cfg.use_relu = False


@pytest.mark.parametrize("policy", POLICIES)
def test_a_config_class_reached_through_a_global_changed_after_the_client_is_refused(server, policy, flag) -> None:
    torch.manual_seed(0)
    module, x = ClassFlag().eval(), torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        Cfg.use_relu = True
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) > 1e-3  # unrefused, it would be a wrong answer
        with pytest.raises(InputError, match=r"class attribute Cfg\.use_relu changed \(False -> True\)"):
            c(x)


def test_a_forward_moving_a_class_attribute_reached_through_a_global_is_refused() -> None:
    with pytest.raises(CaptureError, match=r"changes the class attribute State\.calls"):
        capture(ClassCounter().eval(), (torch.randn(2, 6),))


@pytest.mark.parametrize("cls", [EnvGet, EnvGetenv])
@pytest.mark.parametrize("policy", POLICIES)
def test_an_environment_variable_the_forward_reads_changed_after_the_client_is_refused(server, policy, cls,
                                                                                      monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    torch.manual_seed(0)
    module, x = cls().eval(), torch.randn(3, 6)
    with warm_client(server, module, x, policy) as (c, y):
        monkeypatch.setenv("OTHER_COINFER_TEST22", "1")  # a variable the forward does not read: still answered
        with torch.inference_mode():
            assert max_abs_diff(c(x), module(x)) <= 1e-5
        monkeypatch.setenv(ENV, "1")
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) > 1e-3
        with pytest.raises(InputError, match=rf"environment variable {ENV} changed \(<unset> -> '1'\)"):
            c(x)


def test_a_sparse_buffer_is_a_capture_error_naming_it() -> None:
    with pytest.raises(CaptureError, match=r"mask \(torch\.sparse_coo\).*keep it dense"):
        capture(SparseBuffer().eval(), (torch.randn(2, 6),))


# ---- review22b: environment variables named at run time, files read without open(), a kept x.stride --------------

from os import environ as ENV_ALIAS  # noqa: E402  (a user's alias: the code never names environ)


class EnvAttrKey(nn.Module):
    """The variable's name held in an attribute (no string constant in the code)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.var = "COINFER_TEST22_FAST"

    def forward(self, x):
        return self.fc(x) * float(os.environ.get(self.var, "1"))


class EnvAlias(EnvGet):
    def forward(self, x):
        return self.fc(x) * float(ENV_ALIAS.get("COINFER_TEST22_FAST", "1"))


class EnvLower(EnvGet):
    def forward(self, x):
        return -self.fc(x) if "coinfer_test22_lower" in os.environ else self.fc(x)


@pytest.mark.parametrize(("cls", "name", "value"), [(EnvAttrKey, ENV, "3"), (EnvAlias, ENV, "3"),
                                                    (EnvLower, "coinfer_test22_lower", "1")])
def test_an_environment_variable_looked_up_under_any_name_is_watched(server, cls, name, value, monkeypatch) -> None:
    """review22b finding 3: a name held in an attribute, ``from os import environ as E``, a lower-case name unset at
    capture: before, setting it after building the client answered wrong on 6-8 of 12 calls, unrefused."""
    monkeypatch.delenv(name, raising=False)
    torch.manual_seed(0)
    module, x = cls().eval(), torch.randn(3, 6)
    with warm_client(server, module, x, "offload") as (c, y):
        monkeypatch.setenv(name, value)
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) > 1e-3
        with pytest.raises(InputError, match=rf"environment variable {name} changed"):
            c(x)


class FileHeld(nn.Module):
    """Reads a number from a file handle it opened in ``__init__``."""

    def __init__(self, path) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.f = open(path)  # noqa: SIM115 (the user's own handle, closed by the test)

    def forward(self, x):
        self.f.seek(0)
        return self.fc(x) * float(self.f.read())


class FileFd(FileHeld):
    def __init__(self, path) -> None:
        super().__init__(path)
        self.fd = self.f.fileno()

    def forward(self, x):
        return self.fc(x) * float(os.pread(self.fd, 16, 0))


class FileSize(FileHeld):
    def forward(self, x):
        return self.fc(x) * (2.0 if os.path.getsize(self.f.name) > 3 else 1.0)


class FileExists(FileHeld):
    def forward(self, x):
        return -self.fc(x) if os.path.exists(self.f.name + ".flip") else self.fc(x)


@pytest.mark.parametrize("cls", [FileHeld, FileFd, FileSize, FileExists])
def test_a_file_read_in_forward_without_open_is_refused(cls, tmp_path) -> None:
    """review22b finding 4: the audit hook saw only ``open``: a handle opened in ``__init__`` and read in forward,
    ``os.pread``, ``os.path.getsize``, ``os.path.exists`` were captured, then wrong on 4-8 of 12 calls when the file
    changed."""
    path = tmp_path / "scale.txt"
    path.write_text("1.0")
    module = cls(path).eval()
    try:
        with pytest.raises(CaptureError, match=r"reads a file in forward"):
            capture(module, (torch.randn(2, 6),))
    finally:
        module.f.close()


class StrideKept(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        st = x.stride
        return self.fc(x) * (1.0 if st(1) == 1 else 3.0)


def test_a_forward_keeping_x_stride_as_a_method_is_keyed_per_layout() -> None:
    """review22b finding 5: ``st = x.stride; st(1)`` (a plain LOAD_ATTR) escaped the per-layout key: a gappy input
    answered as the dense one, 6 of 12 calls wrong."""
    from ue_client import CoinferClient

    torch.manual_seed(0)
    module = StrideKept().eval()
    with CoinferClient(module, (torch.randn(2, 4),)) as c:
        for i in range(4):
            x = torch.randn(2, 8)[:, ::2] if i % 2 else torch.randn(2, 4)
            with torch.inference_mode():
                assert max_abs_diff(c(x), module(x)) <= 1e-5

"""Session 21: a generator made anew inside forward (a fresh tester on session 20, finding 1).

- Silently wrong before: a 50/50 branch on a generator made in forward from OS entropy (``np.random.default_rng()``,
  ``random.Random()`` unseeded) was captured 3 of 6 times, then 8-9 of 15 calls differed from eager: no generator
  state existed before the call, so the draw watch (``pystate.DrawWatch``) had nothing to compare. Now any read of
  OS entropy by the user's code in the check's forward (``os.urandom`` and what reads it: ``SystemRandom``,
  ``secrets``, ``uuid.uuid4``, NumPy's unseeded ``SeedSequence``; ``random.Random`` seeded with None;
  ``torch.Generator.seed()``) refuses the model, naming the line (``pystate.Drawn.entropy``).
- A generator seeded in forward from a value that changes between calls (``random.Random(time.time_ns())``,
  ``np.random.default_rng(time.time_ns())`` kept in a local) is refused by a second eager call that compares the
  seeds and the generators' states at the user frames' return (``Drawn.seeds``), run only where the forward seeded
  a generator, held one in a local, or read the clock.
- A generator seeded with a constant inside forward (``random.Random(0)``, ``np.random.default_rng(42)``) stays
  captured and splits as eager through a real server.
"""

from __future__ import annotations

import os
import random
import secrets
import tempfile
import time
import uuid

import numpy as np
import pytest
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from tests.test_user_zoo_splits import FAST, assert_as_eager
from ue_client import CoinferClient, new_tenant

SEEDS = range(1, 9)
"""Each model is captured once per seed (the torch seed of its weights and inputs): a 50/50 branch on an entropy
draw agrees between the export's trace and the check's forward half of the time, so before the fix about half of
these captures succeeded and the rest were refused only as "differs from the eager module"."""

SEED_RUNS = [pytest.param(SEEDS[:2], id="seeds1-2"), pytest.param(SEEDS[2:], id="seeds3-8", marks=pytest.mark.slow)]
"""The default run captures with two seeds, the slow run with the rest: a refusal that stopped working fails on any
one seed (the capture then goes through, or is refused with another message than the one matched), so the other
six add only the repro's odds (``make test-all``)."""


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eager(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


class Branch(nn.Module):
    """``fc(x)`` or ``-fc(x)``, decided by ``coin()`` (a bool) in forward."""

    def __init__(self, coin) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.coin = coin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if self.coin() else -y


def _np_default_rng() -> bool:
    rng = np.random.default_rng()
    return bool(rng.random() < 0.5)


def _np_random_state() -> bool:
    return bool(np.random.RandomState().rand() < 0.5)


def _py_random() -> bool:
    return random.Random().random() < 0.5


def _system_random() -> bool:
    return random.SystemRandom().random() < 0.5


def _secrets() -> bool:
    return secrets.randbelow(2) == 0


def _uuid4() -> bool:
    return uuid.uuid4().int % 2 == 0


def _urandom() -> bool:
    return os.urandom(1)[0] % 2 == 0


def _torch_seed() -> bool:
    return torch.Generator().seed() % 2 == 0


def _np_seed_sequence() -> bool:
    return bool(np.random.Generator(np.random.PCG64(np.random.SeedSequence())).random() < 0.5)


ENTROPY = {"np.default_rng()": (_np_default_rng, "default_rng"), "np.RandomState()": (_np_random_state, "RandomState"),
           "random.Random()": (_py_random, "random.Random"), "SystemRandom": (_system_random, "SystemRandom"),
           "secrets": (_secrets, "secrets"), "uuid4": (_uuid4, "uuid4"), "os.urandom": (_urandom, "urandom"),
           "torch.Generator.seed": (_torch_seed, "Generator"), "SeedSequence()": (_np_seed_sequence, "SeedSequence")}


@pytest.mark.parametrize("seeds", SEED_RUNS)
@pytest.mark.parametrize("kind", sorted(ENTROPY))
def test_a_branch_on_entropy_read_in_forward_is_refused_naming_the_line(kind, seeds):
    """Every capture refused as an entropy read, the message naming the line of the user's code that read it (the
    tester's repro: 3 of 6 captured, 8-9 of 15 later calls wrong)."""
    coin, text = ENTROPY[kind]
    for seed in seeds:
        torch.manual_seed(seed)
        m = Branch(coin).eval()
        x = torch.randn(2, 4, generator=_g(seed))
        with pytest.raises(CaptureError, match="OS entropy") as e:
            capture(m, (x,))
        assert "test_user_models21.py:" in str(e.value) and text in str(e.value), str(e.value)
    outs = [_eager(m, x) for _ in range(30)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # what the refusal protects


def _time_seeded_random() -> bool:
    return random.Random(time.time_ns()).random() < 0.5


def _time_seeded_numpy() -> bool:
    rng = np.random.default_rng(time.time_ns())
    return bool(rng.random() < 0.5)


def _time_seeded_numpy_temporary() -> bool:
    return bool(np.random.default_rng(time.time_ns()).random() < 0.5)


def _time_seeded_legacy() -> bool:
    rs = np.random.RandomState(time.time_ns() % 2**32)
    return bool(rs.rand() < 0.5)


def _none_seeded_numpy(seed=None) -> bool:
    rng = np.random.default_rng(seed)
    return bool(rng.random() < 0.5)


@pytest.mark.parametrize("coin", [_time_seeded_random, _time_seeded_numpy, _time_seeded_numpy_temporary,
                                  _time_seeded_legacy, _none_seeded_numpy],
                         ids=["random", "numpy", "numpy_temporary", "legacy", "numpy_seed_none"])
@pytest.mark.parametrize("seeds", SEED_RUNS)
def test_a_generator_seeded_from_the_clock_in_forward_is_refused(coin, seeds):
    """A seed that changes between calls: the second eager call's seeds / generator states differ from the first's."""
    for seed in seeds:
        torch.manual_seed(seed)
        m = Branch(coin).eval()
        x = torch.randn(2, 4, generator=_g(seed))
        with pytest.raises(CaptureError, match=r"changes between calls|OS entropy"):
            capture(m, (x,))


class Seeded(nn.Module):
    """A draw from a generator made in forward with a constant seed: the same every call (as eager)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "random":
            s = random.Random(0).random()
        elif self.kind == "numpy":
            rng = np.random.default_rng(42)
            s = float(rng.random())
        else:
            s = float(np.random.RandomState(7).rand())
        y = self.fc(x)
        return y * s if s < 0.5 else y - s


def _split_as_eager(server, m: nn.Module, a: tuple, calls: int = 4) -> None:
    """Full offload of ``m`` through ``server``: ``calls`` calls (cold, then warm on fresh inputs), each as eager."""
    with CoinferClient(m, a, server=server.address, policy="offload", server_ops=0, link=FAST, tenant=new_tenant(),
                       profile_runs=2, fallback=False, probe=False) as c:
        for j in range(calls):
            args = a if j == 0 else tuple(torch.randn(t.shape, generator=_g(100 + j)) for t in a)
            y = c(*args)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback, c.last_report
            assert_as_eager(y, _eager(m, *args), c.reference(*args), j)


@pytest.mark.parametrize("kind", ["random", "numpy", "legacy"])
def test_a_generator_seeded_with_a_constant_in_forward_is_captured_and_splits_as_eager(server, kind):
    m = Seeded(kind).eval()
    x = torch.randn(2, 8, generator=_g(5))
    g = capture(m, (x,))
    assert g.eager_max_diff == 0.0
    _split_as_eager(server, m, (x,))


class Logged(nn.Module):
    """Deterministic, but reads the clock (a timing log) and writes a temporary file (tempfile names from its own
    generator): captured, as eager."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        with tempfile.TemporaryFile() as f:
            f.write(b"x")
        y = self.fc(x)
        return y if time.perf_counter() - t0 < 3600 else -y


def test_a_deterministic_forward_reading_the_clock_and_tempfile_is_captured():
    m = Logged().eval()
    x = torch.randn(2, 4, generator=_g(7))
    g = capture(m, (x,))
    assert g.eager_max_diff == 0.0


def test_an_entropy_read_in_a_compiled_module_is_refused():
    """``m.compile()``: the reads are recorded by ``_draws_seen`` (the compiler would compile the helpers its profile
    function calls: they are skipped; before, InternalTorchDynamoError from the user's forward). Not for
    ``random.Random()``: dynamo makes that generator itself at compile time and the compiled module's answer is
    then the same on every call (6 of 6 seeds: refused as differing from the export, which traced the plain
    forward)."""
    coin, _ = ENTROPY["np.default_rng()"]
    for seed in range(1, 4):
        torch.manual_seed(seed)
        m = Branch(coin).eval()
        m.compile(backend="eager")
        with pytest.raises(CaptureError, match="OS entropy"):
            capture(m, (torch.randn(2, 4, generator=_g(seed)),))

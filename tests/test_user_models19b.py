"""Session 19, second reviewer of the run-time draw check (``/tmp/rv19p``): each case compared with the user's own
eager module over 20 calls.

- Generators the reachability walk did not reach (a class attribute of a plain helper object, a ``__slots__``
  object, an ``nn.Module`` kept in a plain list used through a method, past 64 list items, a ``collections.deque``)
  and forwards the walk did not trace (a compiled module, a capture under ``cProfile``) were captured while 3-8 of 20
  calls differed from eager: the candidates are now every live generator (``pystate.live_rngs``), so they are
  refused.
- Another thread drawing from NumPy's global generator while a model that never draws is captured refused it 5 of
  5 times: a control interval tells that thread's draws apart (``pystate.DrawWatch``); the model is captured and
  answers as eager on 20 calls; a forward that draws from ``random``'s global generator while another thread does
  too is still refused (this thread's C calls are seen).
- Capture's eager runs moved the user's generator (3 draws ahead after a refused capture) and a reachable
  generator cost one more forward (hooks ran 4 times instead of 3): states are put back, no extra forward.
"""

from __future__ import annotations

import collections
import cProfile
import random
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.errors import CaptureError
from modelgraph.execute import run_graph
from ue_client import CoinferClient, InputError

CALLS = 20


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eager(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


def _differs_from_itself(m: nn.Module, x: torch.Tensor) -> int:
    """How many of ``CALLS`` eager calls differ from the first: what a captured graph (one traced draw) gets wrong."""
    first = _eager(m, x)
    return sum(not torch.equal(_eager(m, x), first) for _ in range(CALLS))


class Coin(nn.Module):
    """``fc(x)`` times +1 with probability 0.7, else -1, drawn by ``coin()`` (each subclass its own generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def coin(self) -> float:
        raise NotImplementedError

    def forward(self, x):
        return self.fc(x) * (1.0 if self.coin() < 0.7 else -1.0)


class ClassAttrCfg:
    rng = np.random.default_rng(0)


class ClassAttribute(Coin):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = ClassAttrCfg()

    def coin(self):
        return self.cfg.rng.random()


class Slotted:
    __slots__ = ("rng",)

    def __init__(self) -> None:
        self.rng = np.random.default_rng(3)


class InSlots(Coin):
    def __init__(self) -> None:
        super().__init__()
        self.s = Slotted()

    def coin(self):
        return self.s.rng.random()


class NoiseModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(2)

    def noise(self) -> float:
        return float(self.rng.normal())


class OutsideModuleMethod(Coin):
    def __init__(self) -> None:
        super().__init__()
        self.helpers = [NoiseModule()]

    def coin(self):
        return self.helpers[0].noise() + 0.5


class PastListItems(Coin):
    def __init__(self) -> None:
        super().__init__()
        self.table = [None] * 70 + [np.random.default_rng(3)]

    def coin(self):
        return self.table[-1].random()


class InDeque(Coin):
    def __init__(self) -> None:
        super().__init__()
        self.q = collections.deque([np.random.default_rng(3)])

    def coin(self):
        return self.q[0].random()


class OnModule(Coin):
    def __init__(self, rng) -> None:
        super().__init__()
        self.rng = rng

    def coin(self):
        return self.rng.random()


UNREACHED = {"class_attribute_of_a_helper": (ClassAttribute, r"held by the class attribute ClassAttrCfg\.rng"),
             "slots_object": (InSlots, r"held by Slotted\.rng"),
             "module_outside_the_tree_by_method": (OutsideModuleMethod, r"held by NoiseModule\.rng"),
             "past_64_list_items": (PastListItems, r"held in a list"), "deque": (InDeque, r"held in a deque")}
"""Each model, and the regex its refusal names the generator's holder by (``pystate._held_by``)."""


@pytest.mark.parametrize("name", list(UNREACHED))
def test_a_generator_the_walk_does_not_reach_is_refused(name):
    """Before: captured, 4-8 of 20 calls differed from eager (``p1_draw_fn``)."""
    torch.manual_seed(90)
    factory, held = UNREACHED[name]
    m = factory().eval()
    x = torch.randn(2, 4, generator=_g(91))
    with pytest.raises(CaptureError, match=rf"draws random numbers in Python \(a numpy\.random\.Generator {held}\)"):
        capture(m, (x,))
    assert _differs_from_itself(m, x) > 0  # what the refusal protects


def test_a_compiled_module_that_draws_is_refused():
    """Before: ``m.compile()`` skipped the check (no reads): captured, 3 of 20 calls differed (``p5_compiled``)."""
    torch.manual_seed(92)
    m = OnModule(np.random.default_rng(2)).eval()
    m.compile(backend="eager")
    x = torch.randn(2, 4, generator=_g(93))
    with pytest.raises(CaptureError, match=r"draws random numbers in Python \(a numpy\.random\.Generator held by "
                                           r"OnModule\.rng\)"):
        capture(m, (x,))
    assert _differs_from_itself(m, x) > 0


RNG = np.random.default_rng(2)


class GlobalCoin(Coin):
    def coin(self):
        return RNG.random()


def test_a_draw_under_cprofile_is_refused():
    """Before: under ``cProfile`` no reads were recorded and the global generator was not looked at: captured,
    3 of 20 calls differed (``p9_profiler``)."""
    torch.manual_seed(94)
    m = GlobalCoin().eval()
    x = torch.randn(2, 4, generator=_g(95))
    prof = cProfile.Profile()
    prof.enable()
    try:
        with pytest.raises(CaptureError, match=r"draws random numbers in Python \(a numpy\.random\.Generator held "
                                               r"by the global RNG \(module [\w.]*test_user_models19b\)\)"):
            capture(m, (x,))
    finally:
        prof.disable()
    assert _differs_from_itself(m, x) > 0


def test_a_python_profile_function_is_chained_and_the_forward_still_traced():
    """A profile function set in Python (``profile.Profile``'s kind) keeps its events during capture, and the
    forward's reads are recorded (the refusal names the global generator, which only the traced code finds)."""
    torch.manual_seed(96)
    m = GlobalCoin().eval()
    x = torch.randn(2, 4, generator=_g(97))
    events: list[str] = []

    def mine(frame, event, arg):
        events.append(event)

    sys.setprofile(mine)
    try:
        with pytest.raises(CaptureError, match=r"the global RNG \(module [\w.]*test_user_models19b\)"):
            capture(m, (x,))
        assert sys.getprofile() is mine
    finally:
        sys.setprofile(None)
    assert len(events) > 1000


class TrainOnlyNoise(nn.Module):
    """NumPy noise in training only: eval never draws (``p11_thread_fp``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])

    def forward(self, x):
        if self.training:
            x = x + torch.from_numpy(np.random.randn(*x.shape).astype("float32")) * 0.1
        return self.body(x)


class GlobalRandomCoin(Coin):
    def coin(self):
        return random.random()


class Drawing:
    """Another thread drawing in a tight loop from ``draw`` (an application's data-loading thread)."""

    def __init__(self, draw) -> None:
        self.draw, self.stop, self.n = draw, threading.Event(), 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.draw()
            self.n += 1

    def __enter__(self) -> Drawing:
        self.thread.start()
        while self.n < 10:  # it is drawing before the capture starts
            self.stop.wait(0.001)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def test_another_thread_drawing_from_numpys_global_generator_does_not_refuse_a_model_that_never_draws():
    """Before: refused 5 of 5 builds as "draws random numbers in Python (the numpy.random module's global
    RandomState)" though eval never draws."""
    torch.manual_seed(98)
    x = torch.randn(1, 4, 16, 16, generator=_g(99))
    with Drawing(lambda: np.random.rand(8, 8)):
        for i in range(3):
            m = TrainOnlyNoise().eval()
            with CoinferClient(m, (x,)) as c:
                for j in range(CALLS if i == 0 else 1):
                    xj = x if j == 0 else torch.randn(1, 4, 16, 16, generator=_g(100 + j))
                    torch.testing.assert_close(c(xj), _eager(m, xj), rtol=1e-4, atol=1e-4)


class TrainOnlyCoin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.training and random.random() < 0.5:
            x = -x
        return self.fc(x)


def test_another_thread_drawing_from_randoms_global_generator_does_not_refuse_a_model_that_never_draws():
    """``random.Random``: this thread's C calls tell the forward's draws from the other thread's exactly."""
    torch.manual_seed(109)
    m = TrainOnlyCoin().eval()
    x = torch.randn(2, 4, generator=_g(110))
    with Drawing(random.random):
        g = capture(m, (x,))
        for _ in range(CALLS):
            torch.testing.assert_close(run_graph(g, (x,)), _eager(m, x), rtol=1e-4, atol=1e-4)


def test_a_forward_drawing_from_randoms_global_generator_is_refused_while_another_thread_draws_too():
    torch.manual_seed(101)
    m = GlobalRandomCoin().eval()
    x = torch.randn(2, 4, generator=_g(102))
    with Drawing(random.random), pytest.raises(CaptureError, match=r"random module's global generator"):
        capture(m, (x,))


def test_a_model_drawing_from_its_own_generator_is_refused_while_another_thread_draws_from_the_global_one():
    torch.manual_seed(103)
    m = OnModule(np.random.default_rng(4)).eval()
    x = torch.randn(2, 4, generator=_g(104))
    with Drawing(lambda: np.random.rand(8, 8)), pytest.raises(CaptureError, match=r"OnModule\.rng"):
        capture(m, (x,))


def test_a_refused_capture_leaves_the_users_generator_where_it_was():
    """Before: 3 draws ahead after the refused capture (``p12_state_left_moved``)."""
    m = OnModule(np.random.default_rng(0)).eval()
    with pytest.raises(InputError, match="draws random numbers in Python"):
        CoinferClient(m, (torch.randn(2, 4, generator=_g(105)),))
    assert m.rng.bit_generator.state == np.random.default_rng(0).bit_generator.state
    ref = OnModule(np.random.default_rng(0)).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, generator=_g(106))
    for _ in range(CALLS):  # the user's module draws the very sequence it would have drawn without the capture
        assert torch.equal(_eager(m, x), _eager(ref, x))


class Hooked(nn.Module):
    def __init__(self, log: list, with_rng: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        if with_rng:
            self.aug_rng = np.random.default_rng(0)  # for training only
        self.fc.register_forward_hook(lambda mod, a, out: log.append(out.shape))

    def forward(self, x):
        return self.fc(x)


def test_a_reachable_generator_costs_no_extra_forward():
    """Before: the user's hook ran 4 times during capture with a generator on the module, 3 without."""
    runs = []
    for with_rng in (False, True):
        log: list = []
        m = Hooked(log, with_rng).eval()
        x = torch.randn(2, 4, generator=_g(107))
        g = capture(m, (x,))
        runs.append(len(log))
        for _ in range(CALLS):
            torch.testing.assert_close(run_graph(g, (x,)), _eager(m, x), rtol=1e-4, atol=1e-4)
    assert runs[0] == runs[1]


def test_a_successful_capture_puts_back_what_its_runs_drew():
    """A forward that seeds its generator again in every call is captured; the generator's state after capture is
    the one before it (capture's export and eager runs drew from it)."""

    class Reseeded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.rs = np.random.RandomState(7)

        def forward(self, x):
            self.rs.seed(0)
            return self.fc(x) * float(self.rs.uniform(1.0, 2.0))

    m = Reseeded().eval()
    before = m.rs.get_state(legacy=False)
    x = torch.randn(2, 4, generator=_g(108))
    g = capture(m, (x,))
    after = m.rs.get_state(legacy=False)
    assert np.array_equal(after["state"]["key"], before["state"]["key"]) and after["state"]["pos"] == \
        before["state"]["pos"]
    for _ in range(CALLS):
        torch.testing.assert_close(run_graph(g, (x,)), _eager(m, x), rtol=1e-4, atol=1e-4)

"""Users' models that branch on a clock capture did not fake (session 24, clocks24).

Capture runs a forward that read a clock again on faked clocks (``pystate.fake_clocks``, ``capture._varies``) so a
branch on the clock goes both ways and is refused. Holes found by session 23 ("not seen"), each captured before and
then differing from eager on later calls:
- ``datetime.datetime.now()`` / ``utcnow()``: methods of a C class, not faked (also ``from datetime import datetime``
  or ``NOW = datetime.now`` in the user's module; ``today()`` was, through the ``time.time()`` its C code calls);
- ``os.times()``: neither watched nor faked;
- a branch on another function of the clock than its parity (``time.time_ns() % 5 == 4``, the hour of the day): two
  runs sample two values, so a predicate true on one residue in five was missed.

Deterministic forwards that only log the time (``datetime.now().isoformat()`` kept on the module) stay captured and
split equal to eager.
"""

from __future__ import annotations

import datetime
import itertools
import os
import threading
import time
from datetime import date
from datetime import datetime as DateTime

import pytest
import torch
from torch import nn

from modelgraph.capture import capture
from tests.test_user_models22 import _differing_calls, _refused
from ue_client import CoinferClient, new_tenant
from ue_client.cli_run import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
REAL_DATETIME, REAL_DATE = datetime.datetime, datetime.date


class _Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


# ---- datetime ----------------------------------------------------------------------------------------------------

class NowMicroParity(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if datetime.datetime.now().microsecond % 2:
            x = -x
        return self.fc(x)


class ImportedNowSecond(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # ``from datetime import datetime`` (bound at import)
        return self.fc(x) * (-1.0 if DateTime.now().second % 2 else 1.0)


NOW = DateTime.now  # a clock method bound at import


class BoundNowMicro(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if NOW().microsecond % 2 else 1.0)


class UtcNowMinute(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if DateTime.now(datetime.UTC).minute % 2 else 1.0)


class UtcnowLegacy(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if datetime.datetime.utcnow().microsecond % 2 else 1.0)


class TodayMicro(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if DateTime.today().microsecond % 2 else 1.0)


class WeekendMode(_Base):
    """A 'weekend mode': another answer on Saturdays and Sundays (``date.today()``, bound at import)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if date.today().weekday() >= 5:
            x = x * 0.5
        return self.fc(x)


class DayParity(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if datetime.date.today().toordinal() % 2 else 1.0)


DATETIME_BRANCHES = [NowMicroParity, ImportedNowSecond, BoundNowMicro, UtcNowMinute, UtcnowLegacy, TodayMicro,
                     WeekendMode, DayParity]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # utcnow()
@pytest.mark.parametrize("cls", DATETIME_BRANCHES)
def test_a_branch_on_datetime_now_or_today_is_refused_every_time(cls: type) -> None:
    """Before: ``datetime.now()`` / ``utcnow()`` read the true clock in capture's runs (a C class's methods, not
    faked): the microsecond's parity captured about half the time (``utcnow``: then 10 of 20 calls wrong) or refused
    by chance with no word of the clock, the second's and minute's captured (then wrong across a second, a minute);
    ``today()`` was faked through ``time.time()`` but the two runs a day apart both fell on weekdays: the weekend
    mode captured."""
    for _ in range(5 if cls in (NowMicroParity, BoundNowMicro, UtcnowLegacy, TodayMicro) else 2):
        _refused(cls, r"differ|differently", r"now\(\)|today\(\)|utcnow\(\)")
    assert datetime.datetime is REAL_DATETIME and datetime.date is REAL_DATE
    assert DateTime is REAL_DATETIME and date is REAL_DATE and NOW.__self__ is REAL_DATETIME


class LogsTheTime(_Base):
    """Keeps when it last ran (``datetime.now()``, a date, an isinstance check on them): nothing the output reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        now = DateTime.now()
        assert isinstance(now, DateTime) and isinstance(now, datetime.datetime) and isinstance(now, date)
        assert isinstance(date.today(), datetime.date) and not isinstance(date.today(), DateTime)
        assert issubclass(DateTime, date) and isinstance(DateTime(2024, 1, 1), DateTime)
        self.last_run = now.isoformat()
        self.day = str(datetime.date.today())
        return self.fc(x)


def test_a_forward_logging_the_date_is_captured_and_split_equal_eager(server) -> None:
    torch.manual_seed(0)
    module = LogsTheTime().eval()
    x = torch.randn(2, 4)
    graph = capture(module, (x,))
    assert _differing_calls(module, graph, x, 3) == 0
    assert datetime.datetime is REAL_DATETIME and DateTime is REAL_DATETIME and date is REAL_DATE
    assert abs(DateTime.fromisoformat(module.last_run) - DateTime.now()).total_seconds() < 60
    with CoinferClient(module, (x,), server=server.address, policy="offload", link=FAST, tenant=new_tenant(),
                       fallback=False) as c:
        for _ in range(3):
            y = c(x)
            assert c.last_report.server_ops > 0, c.last_report
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) == 0.0


def test_other_threads_read_the_true_date_while_the_clocks_are_faked() -> None:
    from modelgraph.pystate import clock_bases, fake_clocks

    got: dict = {}

    def other() -> None:
        got["now"] = datetime.datetime.now()
        got["today"] = datetime.date.today()
        got["type"] = type(datetime.datetime(2024, 1, 1))

    base = clock_bases()[0] - 400 * 86_400 * 10**9  # more than a year ago: far from the true time
    with fake_clocks(base):
        mine = datetime.datetime.now()
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert abs((mine - REAL_DATETIME.fromtimestamp(base / 1e9)).total_seconds()) < 5
    assert abs((got["now"] - REAL_DATETIME.now()).total_seconds()) < 5
    assert got["today"] == REAL_DATE.today() or (REAL_DATE.today() - got["today"]).days == 1  # across midnight
    assert got["type"] is REAL_DATETIME
    assert datetime.datetime is REAL_DATETIME and datetime.date is REAL_DATE


# ---- os.times() --------------------------------------------------------------------------------------------------

class ElapsedTicks(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if int(os.times().elapsed * 100) % 2 else 1.0)


class CpuTimeBudget(_Base):
    """Takes a cheaper path once the process has used an odd number of CPU seconds (a user's 'budget' switch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = os.times()
        if int(t.user + t.system) % 2:
            return self.fc(x) * 0.5
        return self.fc(x)


@pytest.mark.parametrize("cls", [ElapsedTicks, CpuTimeBudget])
def test_a_branch_on_os_times_is_refused_every_time(cls: type) -> None:
    """Before: ``os.times()`` was no clock read for capture (no second run at all): captured every time, then the
    elapsed ticks' parity differed from eager on about half of later calls."""
    for _ in range(3):
        _refused(cls, r"differ|differently", r"times\(\)")


# ---- other functions of the clock than its parity ----------------------------------------------------------------

class NsModFive(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if time.time_ns() % 5 == 4:
            x = -x
        return self.fc(x)


class UsModThree(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if (time.time_ns() // 1000) % 3 == 1 else 1.0)


class SecondModFour(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if int(time.time()) % 4 == 3 else 1.0)


class HundredthsModFive(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if int(time.time() * 100) % 5 == 2 else 1.0)


class FirstHalfOfASecond(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if time.time() % 1 < 0.5 else 1.0)


class BusinessHours(_Base):
    """Another answer from 9 to 17 local time (``localtime().tm_hour``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 9 <= time.localtime().tm_hour < 17:
            x = x * 2.0
        return self.fc(x)


class NightMode(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = DateTime.now().hour
        return self.fc(x) * (0.5 if h >= 22 or h < 6 else 1.0)


class MinuteOfHourModFive(_Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (-1.0 if time.gmtime().tm_min % 5 == 0 else 1.0)


RESIDUES = [NsModFive, UsModThree, SecondModFour, HundredthsModFive, FirstHalfOfASecond, BusinessHours, NightMode,
            MinuteOfHourModFive]


@pytest.mark.parametrize("cls", RESIDUES)
def test_a_branch_on_a_residue_or_a_time_of_day_is_refused_every_time(cls: type) -> None:
    """Before: the two faked runs were an odd number of each unit apart, so only a branch on a parity flipped:
    ``time_ns() % 5 == 4`` and the others took the same side in both runs, every time (captured, then differing
    from eager on the calls whose clock fell on the other side)."""
    for _ in range(2):
        _refused(cls, r"differ|differently")


def test_the_clock_runs_cover_every_residue_and_spread_over_the_day() -> None:
    """The property the runs' clocks are chosen for (``pystate.clock_bases``), checked on their values: at every
    unit (ns to a day, decimal fractions of a second, 10 ms ticks) the runs' counts take every residue mod 2..5, and
    the local hour of the day (any UTC offset in quarter hours) is spread over the day."""
    from modelgraph.pystate import CLOCK_RUNS, clock_bases

    bases = clock_bases()
    assert len(bases) == CLOCK_RUNS >= 5
    units = [10**e for e in range(10)] + [60 * 10**9, 3600 * 10**9, 86_400 * 10**9]
    for reads in (1, 2, 7, 50):
        ts = [b + reads * 1000 for b in bases]
        for u in units:
            for k in range(2, 6):
                assert {t // u % k for t in ts} == set(range(k)), (u, k, reads)
    for quarter in range(-48, 57):
        hours = sorted((b // 10**9 + quarter * 900) // 3600 % 24 for b in bases)
        gaps = [b - a for a, b in itertools.pairwise(hours)] + [hours[0] + 24 - hours[-1]]
        assert max(gaps) <= 7, (quarter, hours)
        days = {(b // 10**9 + quarter * 900) // 86_400 % 7 for b in bases}
        assert days & {2, 3} and days - {2, 3}, days  # 1970-01-01 was a Thursday: day % 7 in {2, 3} is a weekend


def test_datetime_made_and_subclassed_inside_the_faked_run_behave_as_usual() -> None:
    from modelgraph.pystate import clock_bases, fake_clocks

    with fake_clocks(clock_bases()[0]):
        class Stamp(datetime.datetime):
            pass

        s = Stamp(2024, 1, 2, 3)
        d = datetime.datetime(2024, 1, 2, 3)
        parsed = datetime.datetime.strptime("2024-01-02", "%Y-%m-%d")
        assert type(s) is Stamp and isinstance(s, datetime.datetime) and not isinstance(d, Stamp)
        assert type(d) is REAL_DATETIME and type(parsed) is REAL_DATETIME and d == s
        assert type(datetime.datetime.now()) is REAL_DATETIME and type(datetime.date.today()) is REAL_DATE
        assert datetime.datetime.fromtimestamp(0, datetime.UTC).year == 1970
        assert datetime.datetime.now().date() == datetime.date.today()
        assert issubclass(REAL_DATETIME, datetime.date) and issubclass(Stamp, datetime.datetime)
        assert repr(datetime.datetime) == "<class 'datetime.datetime'>"
    assert datetime.datetime is REAL_DATETIME and datetime.date is REAL_DATE

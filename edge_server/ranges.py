"""The numbers the edge server takes from outside, and the one check they all go through (``Range.check``).

A float from a client message (``UeProfile``), from the operator's tokens file (quota keys) or from a
``coinfer-edge serve`` flag must be finite, and, where 0 is not a value of its own ("unset", "no
budget"), not so small that what it feeds underflows: ``send_mbps=5e-324`` gave ARA a send-rate cap of
0 (5e-324 / the uplink rate) and its planner raised on every re-plan of that session, and a refill of
5e-324 CPU s per s made a ProfileGraph bucket that never refills. Each number has a :class:`Range`
here, with its unit and what 0 means where 0 is accepted; callers turn the ``ValueError`` into their
own error (INVALID_ARGUMENT for a message, ``AuthConfigError`` naming the key for the tokens file,
exit 2 with one line for a flag).

The bounds are far outside what an honest UE or operator sends (the lower ones are where the
arithmetic of the planner and the budget stays meaningful), so they refuse only the degenerate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CALLS",
    "CALLS_PER_CALLER",
    "READING_CALLS",
    "READING_MB",
    "CELL_MBPS",
    "COST_GRAPH_NUMBER",
    "COMPUTE_WEIGHT",
    "CPU_SECONDS",
    "CPU_SHARE",
    "FIRST_MESSAGE_S",
    "GRACE_S",
    "IDLE_S",
    "OP_TIME_MS",
    "PROGRESS_INTERVAL_MS",
    "QUOTA_INT",
    "RATE_MBPS",
    "RTT_MS",
    "TARPIT_BURST",
    "TARPIT_RATE",
    "UE_PROFILE",
    "UE_WEIGHT",
    "Range",
    "strict_json",
]


@dataclass(frozen=True, slots=True)
class Range:
    """Accepted values of one number: finite, in [``lo``, ``hi``] (in ``unit``), or exactly 0 when
    ``zero`` says what 0 means (e.g. "unset")."""

    lo: float
    hi: float
    unit: str = ""
    zero: str = ""
    """What 0 means where it is accepted below ``lo``; "" : 0 only if ``lo`` is 0."""

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        span = f"a number in [{self.lo:g}, {self.hi:g}]{unit}"
        return f"0 ({self.zero}) or {span}" if self.zero else span

    def check(self, name: str, value: object) -> float:
        """``value`` as a float. Raises ValueError("NAME must be ..., got VALUE") for a bool, a
        non-number, NaN, an infinity or a number outside the range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        v = float(value)
        if v == 0 and self.zero:
            return 0.0
        if not self.lo <= v <= self.hi:  # (NaN fails both comparisons)
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return v


RATE_MBPS = Range(1e-3, 1e6, "Mbit/s", zero="unset")
"""A link or send rate a UE reports: 1 kbit/s to 1 Tbit/s (what ARA may do with a claim is bounded
further, by the cell: ``SessionManager.plausible``)."""
CELL_MBPS = Range(RATE_MBPS.lo, RATE_MBPS.hi, RATE_MBPS.unit)
"""The cell's uplink or downlink rate the operator configures (``--cell-uplink-mbps``,
``--cell-downlink-mbps``)."""
RTT_MS = Range(0.0, 1e5, "ms")
"""A round trip a UE reports: up to 100 s (also the cell's own, ``--cell-rtt-ms``)."""
UE_WEIGHT = Range(1e-3, 1e300, zero="unset")
"""A UE's claimed priority weight w_n (a large claim is no error: the server caps it at the tenant's
``compute_weight``)."""
UE_PROFILE: dict[str, Range] = {
    "uplink_mbps": RATE_MBPS,
    "downlink_mbps": Range(RATE_MBPS.lo, RATE_MBPS.hi, RATE_MBPS.unit, zero="the uplink's"),
    "rtt_ms": RTT_MS,
    "weight": UE_WEIGHT,
    "send_mbps": Range(RATE_MBPS.lo, RATE_MBPS.hi, RATE_MBPS.unit, zero="unknown"),
}
"""``coinfer.v1.UeProfile``'s numbers (``edge_server.profile_intake.decode_profile``)."""

COST_GRAPH_NUMBER = Range(-1e15, 1e15)
"""Any number in a UE's cost graph (``UeProfile.cost_graph_json``: ms, ms^2, bytes): finite and at most
1e15 in magnitude (31,700 years in ms, a petabyte), so ARA's sums and products of them stay finite
(``Infinity`` passed the cost graph's own check, ``NaN`` failed ARA's join and ``1e300`` overflowed its
sums: each left the session with an equal share instead of an error at OpenSession)."""


_NUMBER_TOKEN = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def strict_json(text: str | bytes, name: str, numbers: Range) -> Any:
    """``json.loads`` of standard JSON only, with every number in ``numbers``: Python's parser also takes
    ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, RFC 8259 section 6), integers of any length and
    ``1e400`` (an infinity). Raises ValueError naming ``name`` (and the offending number's text) for any
    of them, for text that is not JSON and for nesting too deep for the parser (RecursionError).

    The parse is C (``json.loads``, only the non-JSON constants call back), the numbers are then checked
    by a walk over the document, instead of a Python call per number: 90 -> 41-45 ms for a 10k-op cost
    graph, 2.8 -> 0.86 s for an 8 MiB list of zeros, 259 -> 154 ms for a 40k-op chain (one run each, on a
    loaded 2-core machine); the walk lets other threads run (the GIL is released between bytecodes, not
    inside the C parse)."""

    def constant(token: str) -> float:
        raise ValueError(f"{name} must be standard JSON: {token} is not a JSON number")

    try:
        doc = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not JSON: {e}") from None
    except ValueError as e:
        if str(e).startswith(name):  # constant()'s
            raise
        # int() of more digits than sys.get_int_max_str_digits()
        raise ValueError(f"a number in {name} must be {numbers.describe()}: {str(e)[:80]}") from None
    lo, hi, zero = numbers.lo, numbers.hi, bool(numbers.zero)
    stack = [doc]
    pop, extend = stack.pop, stack.extend
    while stack:
        x = pop()
        t = type(x)
        if t is dict:
            extend(x.values())
        elif t is list:
            extend(x)
        elif (t is float or t is int) and not (lo <= x <= hi or (zero and x == 0)):  # int vs float: exact
            raise ValueError(f"a number in {name} must be {numbers.describe()}, got {_token_of(text, x)[:40]}")
    return doc


def _token_of(text: str | bytes, value: float | int) -> str:
    """The first number token of ``text`` equal to ``value`` (for an error message), else its repr."""
    data = text.encode() if isinstance(text, str) else text
    for m in _NUMBER_TOKEN.finditer(data):
        tok = m.group()
        try:
            v = float(tok) if any(c in tok for c in b".eE") else int(tok)
        except (OverflowError, ValueError):
            continue
        if v == value or (v != v and value != value):
            return tok.decode()
    return repr(value)


COMPUTE_WEIGHT = Range(1e-3, 1e3)
"""A tenant's weight in the shares of the compute workers and the cell (quota ``compute_weight``)."""
CPU_SECONDS = Range(1e-3, 1e9, "CPU s", zero="no budget")
"""A ProfileGraph CPU budget (quota ``profile_cpu_s``, ``--profile-cpu-s``)."""
CPU_SHARE = Range(1e-6, 1e3, "CPU s per s")
"""The refill of that budget (quota ``profile_cpu_share``, ``--profile-cpu-share``): at 1e-6 one CPU
second takes 11.6 days."""
QUOTA_INT = Range(0, 1e15)
"""A count or MiB quota (``weight_mb``, ``sessions``, ...; truncated to an int)."""

OP_TIME_MS = Range(1e-3, 1e9, "ms")
"""The time budget of one op (``--op-time-ms``)."""
IDLE_S = Range(0.1, 1e9, "s", zero="never")
"""The idle time after which a session is closed (``--session-idle-s``)."""
GRACE_S = Range(0.0, 1e6, "s")
"""The drain time on SIGTERM/SIGINT (``--grace``)."""
TARPIT_RATE = Range(1e-3, 1e6, "error answers per s", zero="no tarpit")
"""The rate a failing caller's error answers slow to (``--tarpit-rate``)."""
TARPIT_BURST = Range(1, 1e9, "error answers")
"""The error answers a caller gets at once (``--tarpit-burst``)."""
CALLS = Range(1, 1e7, "calls")
"""A bound on calls open or waiting (``--max-calls-per-caller``, ``--max-stranger-calls``,
``--max-waiting-calls``)."""
CALLS_PER_CALLER = Range(CALLS.lo, CALLS.hi, CALLS.unit, zero="no call gate")
"""``--max-calls-per-caller``: 0 turns the call gate off."""
READING_CALLS = Range(CALLS.lo, CALLS.hi, CALLS.unit, zero="no bound on reads")
READING_MB = Range(1, 1e7, "MiB", zero="no server-wide bound on reads")
"""``--max-reading-calls``: 0 leaves a caller's unary reads unbounded (and grpc's BDP probing on)."""
FIRST_MESSAGE_S = Range(0.1, 1e6, "s", zero="no deadline")
"""The deadline of a call's first message (``--first-message-s``)."""
READ_WINDOW_KB = Range(64, 1 << 20, "KiB")
"""Each stream's receive window while reads are bounded (``--read-window-kb``): grpc's initial 64 KiB up to 1 GiB."""
CONTENDED_FIRST_MESSAGE_S = Range(0.1, 1e6, "s", zero="until --first-message-s")
"""How long a call keeps a reading slot within its caller's share without its first message while another caller
waits (``--contended-first-message-s``)."""
READING_GRACE_S = Range(0.0, 1e6, "s")
"""How long a call keeps a reading slot its caller holds beyond its share while another caller waits
(``--reading-grace-s``; 0: taken back at once)."""
PROGRESS_KB = Range(1, 1 << 20, "KiB")
"""The weight bytes not held already an upload with a weight half-received must bring per idle period
(``--upload-progress-kb``, ``--data-progress-kb``): 1 KiB to 1 GiB."""
PROGRESS_INTERVAL_MS = Range(10, 3_600_000, "ms", zero="no progress reports")
"""How often a request in flight may be reported to its client (``--progress-interval-ms``): 10 ms to an hour, or 0.
Unchecked (session 24's tester), ``inf`` or over 2^32 ms started a server that answered every Hello and Session
INTERNAL (``Limits.progress_interval_ms`` is a uint32), and 0.001 ms kept its event loop busy (10.1 CPU s in 10 s)
reporting one client's 16 requests."""
CHUNK_BYTES = Range(16 << 10, 64 << 20, "bytes")
"""The largest chunk payload a server takes (``ServerConfig.max_chunk_bytes``): 16 KiB to 64 MiB, the range the
project's client takes a server's ``Limits.max_chunk_bytes`` in (``ue_client.wire.SERVER_CHUNK_BYTES``; outside it the
client clamps, as against a hostile server, and a server configured below 16 KiB would refuse every chunk it sent)."""
DATA_IDLE_S = Range(IDLE_S.lo, IDLE_S.hi, IDLE_S.unit)
"""How long a data connection with a weight half-received may go without progress (``--data-idle-s``). No 0: the
data channel also waits this long for its UE to read its acknowledgements, which 0 would give up at once."""

"""TCP counters of a network namespace, read from ``/proc`` (what ``nstat`` reads), and their deltas.

Why: a request that waits seconds with an idle CPU is often waiting for TCP (a retransmission timeout, a
SYN retransmitted after 1 s, a tail loss probe); the kernel counts each of those per network namespace.
A benchmark worker snapshots the counters of its own namespace (``/proc/self/net``) and of the edge
server's (``/proc/<server pid>/net``) around each request and records what moved, so a slow request can
be matched to the TCP events that happened while it ran. No packet capture (tcpdump is not installed on
this project's machines) and no subprocess (a fork costs a throttled UE tens of ms of its CPU quota).

Counters (Linux ``/proc/net/snmp`` ``Tcp:`` and ``/proc/net/netstat`` ``TcpExt:`` rows; see the kernel's
``Documentation/networking/snmp_counter.rst``): ``RetransSegs`` segments retransmitted, ``TCPTimeouts``
retransmission timer (RTO) expiries, ``TCPLossProbes`` tail loss probes sent, ``TCPSynRetrans`` SYN/SYN-ACK
retransmits, ``TCPSpuriousRTOs`` RTOs undone by F-RTO, ``TCPFastRetrans`` fast retransmits,
``ActiveOpens``/``PassiveOpens`` connections opened, ``AttemptFails`` failed connects, ``EstabResets``
resets of established connections, ``TCPAbortOnTimeout`` connections killed by too many RTOs,
``TCPBacklogDrop``/``TCPRcvQDrop`` segments dropped by a full receiver, ``TCPZeroWindowDrop``,
``TCPToZeroWindowAdv`` zero windows advertised (a receiver that stopped reading), ``TCPWinProbe`` zero
window probes sent. On a loopback or veth path with no loss every one of these stays 0 during a request
except the opens.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

COUNTERS = (
    "RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPSynRetrans", "TCPSpuriousRTOs", "TCPFastRetrans",
    "ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets", "TCPAbortOnTimeout", "TCPBacklogDrop",
    "TCPRcvQDrop", "TCPZeroWindowDrop", "TCPToZeroWindowAdv", "TCPWinProbe",
)
"""The counters kept (see the module docstring for what each counts)."""

LOSS_COUNTERS = ("RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPSynRetrans", "AttemptFails", "EstabResets",
                 "TCPAbortOnTimeout", "TCPBacklogDrop", "TCPRcvQDrop", "TCPZeroWindowDrop", "TCPWinProbe")
"""Counters any nonzero delta of which means TCP lost, re-sent or refused something (opens excluded)."""


def _parse_pairs(text: str, prefixes: tuple[str, ...]) -> dict[str, int]:
    """``/proc/net/snmp`` and ``/proc/net/netstat`` hold pairs of lines ``Prefix: names...`` then
    ``Prefix: values...``; returns name -> value for the rows whose prefix is in ``prefixes``."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        hp, _, names = head.partition(":")
        vp, _, values = vals.partition(":")
        if hp != vp or hp not in prefixes:
            continue
        for name, value in zip(names.split(), values.split()):
            try:
                out[name] = int(value)
            except ValueError:
                continue
    return out


def read_counters(pid: int | str = "self") -> dict[str, int]:
    """The ``COUNTERS`` of the network namespace of process ``pid`` ("self": the caller's), monotonic
    totals since the namespace was made. Raises ``OSError`` when the process is gone or ``/proc`` is not
    readable (another user's process without privileges)."""
    base = Path("/proc") / str(pid) / "net"
    values = _parse_pairs((base / "snmp").read_text(), ("Tcp",))
    values.update(_parse_pairs((base / "netstat").read_text(), ("TcpExt",)))
    return {k: values[k] for k in COUNTERS if k in values}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after - before`` for every counter in both that moved (an empty dict: nothing happened)."""
    return {k: after[k] - before[k] for k in after if k in before and after[k] != before[k]}


def losses(d: dict[str, int]) -> dict[str, int]:
    """The part of a delta that is loss, retransmission or refusal (``LOSS_COUNTERS``), nonzero only."""
    return {k: v for k, v in d.items() if k in LOSS_COUNTERS and v}


class NamespaceCounters:
    """Snapshots of TCP counters of several namespaces, named (e.g. ``{"ue": "self", "server": 1234}``).

    ``snap()`` returns the current totals per name; a namespace that cannot be read (process gone, no
    permission) is left out after one warning, so a benchmark keeps running without it."""

    def __init__(self, pids: dict[str, int | str]) -> None:
        self.pids = dict(pids)

    def snap(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, pid in list(self.pids.items()):
            try:
                out[name] = read_counters(pid)
            except OSError as e:
                log.warning("TCP counters of %s (pid %s) unreadable, no longer recorded: %s", name, pid, e)
                self.pids.pop(name)
        return out

    @staticmethod
    def diff(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """Per name, the counters that moved between two ``snap()`` results."""
        return {name: delta(before[name], after[name]) for name in after if name in before}

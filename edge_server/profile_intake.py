"""A UE's profile from the wire (``coinfer.v1.UeProfile``): bounded before its cost graph is parsed,
parsed off the event loop, and the parse's memory charged to the tenant's ``--memory-mb`` share.

The cost graph (``UeProfile.cost_graph_json``, up to the 8 MiB message limit) is a claim the server
parses strictly (``edge_server.ranges.strict_json``) at OpenSession and on every profile update. Parsed
on the event loop, an 8 MiB graph stalled every session of the server: 0.26 s for a 40k-op chain,
2.8 s for a list of 4M zeros (one Python call per number), and as Python objects it is up to ~24x its
text (185 MiB for ``{}`` ops), outside the memory budget. Now:

1. The text's structure bounds what parsing it can build, and is counted before anything is parsed
   (``bytes.count``, ~1 ms per MiB): every op of a cost graph is one JSON object with at most
   ``ARRAYS_PER_OP`` arrays and ``SEPARATORS_PER_OP`` separators (``,`` and ``:``), so a text with more
   objects, arrays or separators than ``max_ops`` ops can hold is refused (INVALID_ARGUMENT naming
   ``Limits.max_cost_graph_ops``) unparsed. Honest graphs of the captured zoo: 1 object, 3.0 arrays and
   27 separators per op (3 profiling runs; each further run adds 1 separator per op).
2. What the parse may allocate (:meth:`CostGraphShape.parse_bytes`, an upper bound from those counts)
   is reserved from the server's memory budget for the caller's tenant before parsing
   (RESOURCE_EXHAUSTED over it) and held until the parsed document has been handed to the allocator
   (where it waits for ARA's planner thread, at most one per session, unreserved).
3. The count and the parse run on a worker thread (``asyncio.to_thread``), and the strict check is a
   C ``json.loads`` followed by a Python walk over the numbers (``ranges.strict_json``): the event loop
   waits only for the C parts, bounded by the counts. ``bench/bench_profile_stall.py`` (a victim's
   Hello latency while another client opens sessions with large graphs): longest Hello 18 ms for the
   40k-op chain (refused unparsed) and 22 ms / 53 ms for a 10k-op honest graph / floats up to the
   separator limit, against 565 ms, 4.9 s (an 8 MiB list of zeros), 155 ms and 1.3 s before.

After the parse the exact op count is checked too (``len(ops) <= max_ops``), and the document is built
into the partitioner's ``CostGraph`` in the same job (:func:`cost_graph_of`): a graph no planner may use
(an op cost negative, null or a string, a dangling or cyclic reference, a sample row per op missing, a
sample negative) is INVALID_ARGUMENT naming the op and field, at OpenSession and on every update. Before,
such a graph was accepted and ARA logged it and gave the session an equal share (the client got no
error). The built graph is what the allocator plans with (it parsed the document again on its planner
thread before, uncharged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edge_server.errors import InvalidArgument
from edge_server.memory import MemoryBudget, Reservation
from edge_server.ranges import COST_GRAPH_NUMBER, UE_PROFILE, strict_json
from partitioner import CostGraph
from protos.values import UeProfile

logger = logging.getLogger(__name__)

__all__ = [
    "ARRAYS_PER_OP",
    "BYTES_PER_ITEM",
    "SEPARATORS_PER_OP",
    "SLACK",
    "CostGraphShape",
    "check_profile_fields",
    "cost_graph_of",
    "decode_profile",
    "decode_profile_async",
]

ARRAYS_PER_OP = 4
"""JSON arrays a cost graph may have per op: ``inputs``, ``weights`` and its row of ``ue_samples_ms``
(3 per op in every captured graph), one spare."""
SEPARATORS_PER_OP = 96
"""``,`` and ``:`` a cost graph may have per op: 27 in the captured zoo's graphs at 3 profiling runs
(``profiler.oplatency``'s default of 20 runs: ~44); room for ~70 runs."""
SLACK = 64
"""Objects, arrays and separators allowed beyond the per-op counts (the top level, ``inputs``,
``weights``, ``meta`` and their entries)."""
BYTES_PER_ITEM = 160
"""Upper bound of the Python memory one JSON item (object, array or separated value) costs when parsed,
beyond 3x the text: at most 88 B measured (tracemalloc peaks of texts at the shape limits built to
allocate much per byte: one-key dicts 88, distinct keys 69, 2-character strings 62, floats 48 per
separator; ``tests/test_profile_intake.py``)."""


@dataclass(frozen=True, slots=True)
class CostGraphShape:
    """What a cost graph's text can build, counted without parsing it (bytes of UTF-8 JSON)."""

    nbytes: int
    objects: int
    """``{`` in the text (each JSON object has one; a ``{`` in a string counts too, so this is an upper
    bound)."""
    arrays: int
    """``[`` in the text (upper bound of its arrays)."""
    separators: int
    """``,`` and ``:`` in the text: every value but the first of each container follows one."""
    ascii: bool = True
    """Every byte is ASCII (else a ``str`` of it may take up to 4 bytes per byte: one character beyond
    U+FFFF widens the whole string)."""

    @classmethod
    def of(cls, text: bytes) -> CostGraphShape:
        return cls(
            len(text), text.count(b"{"), text.count(b"["), text.count(b",") + text.count(b":"), text.isascii()
        )

    def fits(self, max_ops: int) -> str:
        """"" when the text can be a cost graph of at most ``max_ops`` ops, else why not."""
        if self.objects > max_ops + SLACK:
            return f"{self.objects} JSON objects (at most {max_ops} ops + {SLACK})"
        if self.arrays > ARRAYS_PER_OP * max_ops + SLACK:
            return f"{self.arrays} JSON arrays (at most {ARRAYS_PER_OP} per op + {SLACK})"
        if self.separators > SEPARATORS_PER_OP * max_ops + SLACK:
            return f"{self.separators} separators (at most {SEPARATORS_PER_OP} per op + {SLACK})"
        return ""

    def parse_bytes(self) -> int:
        """Upper bound of the bytes parsing the text allocates (the text decoded to ``str``, the document,
        the parser's key memo): 3x the text's bytes (13x where it is not ASCII: one character beyond U+FFFF
        makes a ``str`` 4 bytes per character; 9.0x measured) + ``BYTES_PER_ITEM`` per object, array and
        separator."""
        width = 1 if self.ascii else 4
        return (1 + 3 * width) * self.nbytes + BYTES_PER_ITEM * (self.objects + self.arrays + self.separators + 1)


def check_profile_fields(p, *, update: bool = False) -> None:
    """The numbers of ``p`` (a ``coinfer.v1.UeProfile``) and its required fields; InvalidArgument for a
    number outside its range (``edge_server.ranges.UE_PROFILE``), no uplink rate or no cost graph
    (OpenSession's profile; an ``update`` may leave them empty)."""
    for name, rng in UE_PROFILE.items():
        try:
            rng.check(f"profile.{name}", getattr(p, name))
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
    if p.uplink_mbps <= 0 and not update:
        raise InvalidArgument("profile.uplink_mbps must be > 0")
    if not p.cost_graph_json and not update:
        raise InvalidArgument("profile.cost_graph_json is empty")


def cost_graph_of(doc: dict) -> CostGraph:
    """A cost graph's JSON document (``CostGraph.to_dict``'s form, already within ``ranges.strict_json``)
    -> the ``partitioner.CostGraph`` planners use. Raises InvalidArgument (``profile.cost_graph_json: ...``)
    for what ``CostGraph`` refuses (op costs and sizes not numbers >= 0, duplicate names, references to
    nothing or to later ops, outputs naming nothing, ``ue_samples_ms`` without one row per op or rows of
    different lengths), for a per-run sample that is not a number >= 0 and for a JSON boolean, string or
    null where a number is expected (``"ue_ms": true`` was accepted as 1 ms: a Python bool is an int;
    ``partitioner.costgraph._check_json_types``). Linear in the document."""
    try:
        return CostGraph.from_dict(doc)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # CostGraphError is a ValueError
        raise InvalidArgument(f"profile.cost_graph_json: {str(e)[:300]}") from None


def _parse_graph(data: bytes, max_ops: int, reserve) -> tuple[str, CostGraph | None, Reservation | None]:
    """The cost graph's text, its ``CostGraph`` and the reservation its parse holds (see the module)."""
    if not data:
        return "", None, None
    shape = CostGraphShape.of(data)
    why = shape.fits(max_ops) if max_ops else ""
    if why:
        raise InvalidArgument(f"profile.cost_graph_json has {why}: more than max_cost_graph_ops={max_ops}")
    hold = reserve(shape.parse_bytes()) if reserve is not None else None
    try:
        try:
            graph = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("profile.cost_graph_json is not UTF-8") from None
        try:
            doc = strict_json(graph, "profile.cost_graph_json", COST_GRAPH_NUMBER)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if not isinstance(doc, dict):
            raise InvalidArgument("profile.cost_graph_json must be a JSON object")
        ops = doc.get("ops")
        if max_ops and isinstance(ops, list | dict) and len(ops) > max_ops:
            raise InvalidArgument(f"profile.cost_graph_json has {len(ops)} ops: more than max_cost_graph_ops={max_ops}")
        built = cost_graph_of(doc)
    except BaseException:
        if hold is not None:
            hold.release()
        raise
    return graph, built, hold


def _profile(p, graph: str, doc: CostGraph | None, update: bool) -> UeProfile:
    weight = p.weight if update else (p.weight or 1.0)
    return UeProfile(graph, p.uplink_mbps, p.rtt_ms, p.downlink_mbps, weight, p.send_mbps, cost_graph=doc)


def decode_profile(p, *, update: bool = False, max_ops: int = 0) -> UeProfile:
    """``coinfer.v1.UeProfile`` -> :class:`protos.values.UeProfile`, on the calling thread and uncharged (for
    callers off the event loop; the servicer uses :func:`decode_profile_async`). InvalidArgument for a
    number outside its range (:func:`check_profile_fields`), a cost graph over ``max_ops`` ops (0: no
    limit; by its text's shape or after the parse), not UTF-8, not a JSON object, not standard JSON
    with every number finite and within ``ranges.COST_GRAPH_NUMBER`` (``NaN``, ``Infinity``, ``1e300``:
    ``ranges.strict_json``), or not a cost graph a planner may use (:func:`cost_graph_of`); the profile's
    ``cost_graph`` is the built ``CostGraph``. ``update`` (SessionRequest.profile): an empty cost graph,
    uplink_mbps 0 and weight 0 are allowed (they keep the session's; weight then reads 0)."""
    check_profile_fields(p, update=update)
    graph, doc, _ = _parse_graph(bytes(p.cost_graph_json), max_ops, None)
    return _profile(p, graph, doc, update)


async def decode_profile_async(
    p, *, update: bool = False, max_ops: int, memory: MemoryBudget, holder: str,
    run: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
) -> tuple[UeProfile, Reservation | None]:
    """:func:`decode_profile` with the cost graph counted and parsed on a worker thread, its parse's memory
    (:meth:`CostGraphShape.parse_bytes`) reserved from ``memory`` for ``holder`` (the caller's tenant)
    before the parse: :class:`~edge_server.errors.ResourceExhausted` over the holder's share. Returns the
    profile and the reservation (None without a cost graph); the caller releases it once the parsed
    document has been handed over (``Session.receive``, ``EdgeServicer.Session``). ``run``: how the count
    and parse run (an awaitable of ``fn()``'s value); default ``asyncio.to_thread``. The servicer runs a
    session's profile updates on the compute scheduler in the session's fair turn (see
    ``EdgeServicer._profile_update``)."""
    check_profile_fields(p, update=update)
    data = bytes(p.cost_graph_json)
    if not data:
        return _profile(p, "", None, update), None

    def reserve(nbytes: int) -> Reservation:
        return memory.reserve(holder, nbytes, "a profile's cost graph")

    def job():
        return _parse_graph(data, max_ops, reserve)

    parse = asyncio.ensure_future(run(job) if run is not None else asyncio.to_thread(job))
    try:
        graph, doc, hold = await asyncio.shield(parse)
    except asyncio.CancelledError:  # the thread parses on: give its reservation back when it is done
        parse.add_done_callback(_release_result)
        raise
    return _profile(p, graph, doc, update), hold


def _release_result(parse: asyncio.Future) -> None:
    if not parse.cancelled() and parse.exception() is None:
        hold = parse.result()[2]
        if hold is not None:
            hold.release()

"""The one schedule simulator every planner and report is measured with (DESIGN.md §5).

Rules: the UE runs its ops in topological order; the server runs its ops in topological order, each
as soon as the previous server op finished, its input tensors arrived and (cold) its weights arrived;
one uplink carries weights and tensors, at each moment sending, among released items, the one the
server needs earliest (preemptive; fluid model of chunk granularity); an item arrives one-way latency L
after its last byte left. Latency = max(UE finish, last server finish + L + result bytes / R_dn), or the
UE finish when nothing is offloaded. Server ops cannot start before L (the request has to reach it).

Modes: ``cold`` uploads every needed weight the server does not hold (``state``), in parallel with the
local part; ``warm`` assumes every weight is held; ``serial`` uploads all needed weights first and only
then starts the inference (the baseline of MJOA-MU).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from partitioner.costgraph import CostGraph, CostGraphError, Link
from partitioner.errors import PartitionError
from partitioner.prep import SCALE_FREE, Prepared, prepare
from partitioner.state import ServerState, Shares

MODES = ("cold", "warm", "serial")
_INF = float("inf")


@dataclass(frozen=True)
class Rates:
    """Link and share folded into the numbers the hot loop needs (bytes/ms, ms): ``up`` the weights' uplink
    rate, ``tup`` the cut tensors' (None: ``up``; ``Shares.tensor_uplink``), ``dn`` the downlink, ``L`` the
    one-way latency, ``phi`` the compute share."""

    up: float
    dn: float
    L: float
    phi: float
    tup: float | None = None

    def __post_init__(self) -> None:
        if self.tup is None:
            object.__setattr__(self, "tup", self.up)

    @classmethod
    def of(cls, link: Link, share: Shares | None = None) -> Rates:
        beta = share.uplink if share is not None else 1.0
        phi = share.compute if share is not None else 1.0
        up = link.uplink_mbps * 125.0
        tup = None if share is None or share.tensor_uplink is None else up * share.tensor_uplink
        return cls(up=up * beta, dn=link.downlink * 125.0, L=link.one_way_ms, phi=phi, tup=tup)


@dataclass(frozen=True)
class Segment:
    """One busy interval of one resource: ``kind`` is op, weight, tensor or result."""

    resource: str
    name: str
    kind: str
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Timeline:
    ue: tuple[Segment, ...]
    uplink: tuple[Segment, ...]
    """Preempted items appear as several segments."""
    server: tuple[Segment, ...]
    downlink: tuple[Segment, ...]

    def to_dict(self) -> dict:
        def seg(s: Segment) -> dict:
            return {"name": s.name, "kind": s.kind, "start_ms": s.start_ms, "end_ms": s.end_ms}
        return {k: [seg(s) for s in getattr(self, k)] for k in ("ue", "uplink", "server", "downlink")}


@dataclass(frozen=True)
class SimResult:
    latency_ms: float
    ue_finish_ms: float
    server_finish_ms: float | None
    upload_bytes: int
    """Weight bytes this request puts on the uplink (not held, remaining part of in-flight ones)."""
    sent_tensor_bytes: int
    upload_order: tuple[str, ...]
    """Uplink items (weight and tensor names) in need order: the static priority the runtime uses."""
    timeline: Timeline | None = None


def _weights_needed(P: Prepared, server: list[int], state: ServerState | None) -> list[tuple[int, str, int]]:
    """(need position, weight name, bytes to send) for weights the server part reads, need-ordered."""
    out, seen = [], set()
    held = state.held if state is not None else frozenset()
    infl = state.in_flight if state is not None else {}
    wb = P.weight_bytes
    for k, s in enumerate(server):
        for w in P.op_weights[s]:
            if w in seen:
                continue
            seen.add(w)
            if w in held:
                continue
            b = infl.get(w, wb[w])
            if b > 0:
                out.append((k, w, b))
    return out


def check_partition(P: Prepared, smask: int) -> None:
    """Raise PartitionError unless the server set is closed under successors and avoids pinned ops."""
    for i in range(P.n):
        if smask >> i & 1:
            if P.pinned[i]:
                raise PartitionError(f"op {P.names[i]!r} is pinned to the UE (offloadable=False)")
            if P.desc[i] & ~smask:
                bad = next(j for j in P.succs[i] if not smask >> j & 1)
                raise PartitionError(
                    f"server op {P.names[i]!r} feeds UE op {P.names[bad]!r}: partitions must be "
                    "predecessor-closed on the UE")


def run(P: Prepared, smask: int, r: Rates, mode: str = "cold", state: ServerState | None = None,
        order: Sequence[str] | None = None, a: Sequence[float] | None = None,
        c: Sequence[float] | None = None, record: bool = False) -> SimResult:
    """Simulate one partition given as a bitmask of server ops (no validation; see ``simulate``)."""
    n = P.n
    a = P.a if a is None else a
    c = P.c if c is None else c
    server = [i for i in range(n) if smask >> i & 1]
    weights = [] if mode == "warm" or not server else _weights_needed(P, server, state)
    t_w = sum(b for _, _, b in weights) / r.up if mode == "serial" else 0.0
    # UE part
    t = t_w
    ue_fin = [0.0] * n
    ue_segs = []
    for i in range(n):
        if not smask >> i & 1:
            if record:
                ue_segs.append(Segment("ue", P.names[i], "op", t, t + a[i]))
            t += a[i]
            ue_fin[i] = t
    F = t
    if not server:
        tl = Timeline(tuple(ue_segs), (), (), ()) if record else None
        return SimResult(F, F, None, 0, 0, (), tl)
    items, sent_bytes, need_order = uplink_items(P, smask, server, weights, ue_fin, t_w, r, mode, order)
    # preemptive priority uplink
    items.sort(key=lambda it: it[0])
    m = len(items)
    done = [0.0] * m
    rem = [it[2] for it in items]
    heap: list = []
    up_segs = []
    tt = 0.0
    i = 0
    seg_start = None
    while i < m or heap:
        if not heap and tt < items[i][0]:
            tt = items[i][0]
        while i < m and items[i][0] <= tt:
            heapq.heappush(heap, (items[i][1], i))
            i += 1
        _, j = heap[0]
        nxt = items[i][0] if i < m else _INF
        if record and seg_start is None:
            seg_start = (j, tt)
        if tt + rem[j] <= nxt:
            tt += rem[j]
            rem[j] = 0.0
            done[j] = tt
            heapq.heappop(heap)
            if record:
                up_segs.append(Segment("uplink", items[j][3], items[j][4], seg_start[1], tt))
                seg_start = None
        else:
            rem[j] -= nxt - tt
            tt = nxt
            if record:
                # a release may preempt: close the segment, a new one opens on the next pass
                up_segs.append(Segment("uplink", items[j][3], items[j][4], seg_start[1], tt))
                seg_start = None
    f, res_bytes, srv_segs = serve(P, server, items, done, r, t_w + r.L, c, record)
    back = f + r.L
    lat = back + res_bytes / r.dn
    tl = None
    if record:
        dn = (Segment("downlink", "result", "result", back, lat),) if res_bytes else ()
        tl = Timeline(tuple(ue_segs), tuple(_merge(up_segs)), tuple(srv_segs), dn)
    upload = sum(b for _, _, b in weights) if mode != "warm" else 0
    return SimResult(max(F, lat), F, f, upload, sent_bytes, need_order, tl)


def uplink_items(P: Prepared, smask: int, server: list[int], weights: list[tuple[int, str, int]],
                 ue_fin: Sequence[float], t_w: float, r: Rates, mode: str,
                 order: Sequence[str] | None = None) -> tuple[list[list], int, tuple[str, ...]]:
    """The uplink's items of one partition, their sent tensor bytes and the need order.

    An item is ``[release ms, priority, size in link ms, name, kind, need position, bytes, producer]``:
    weights (cold only) are released at 0, tensors when their UE producer finishes (``ue_fin``; the
    producer's op index is kept, -1 for weights and graph inputs), graph inputs at ``t_w``. Priority =
    need order (a tensor before the weights of the same server op), or ``order`` when given.
    """
    items = []
    if mode == "cold":
        for k, w, b in weights:
            items.append([0.0, 2 * k + 1, b / r.up, w, "weight", k, b, -1])
    sent: set = set()
    sent_bytes = 0
    for k, s in enumerate(server):
        for p in P.preds[s]:
            if not smask >> p & 1 and p not in sent:
                sent.add(p)
                sent_bytes += P.d[p]
                items.append([ue_fin[p], 2 * k, P.d[p] / r.tup, P.names[p], "tensor", k, P.d[p], p])
        for inp in P.in_reads[s]:
            if inp not in sent:
                sent.add(inp)
                b = P.input_bytes[inp]
                sent_bytes += b
                items.append([t_w, 2 * k, b / r.tup, inp, "tensor", k, b, -1])
    need_order = tuple(it[3] for it in sorted(items, key=lambda it: (it[1], it[3])))
    if order is not None:
        pos = {nm: j for j, nm in enumerate(order)}
        big = len(pos)
        for it in items:
            it[1] = pos.get(it[3], big + it[1])
    return items, sent_bytes, need_order


def serve(P: Prepared, server: list[int], items: list[list], done: Sequence[float], r: Rates, floor: float,
          c: Sequence[float], record: bool = False) -> tuple[float, int, list[Segment]]:
    """The server part given each item's last-byte time ``done``: (last server finish, result bytes,
    segments). Op k starts when op k-1 finished, its items arrived (``done`` + L) and not before ``floor``."""
    ns = len(server)
    ready = [floor] * ns
    for j, it in enumerate(items):
        arr = done[j] + r.L
        k = it[5]
        if arr > ready[k]:
            ready[k] = arr
    f = 0.0
    srv_segs = []
    phi = r.phi
    res_bytes = 0
    for k, s in enumerate(server):
        st = ready[k] if ready[k] > f else f
        f = st + c[s] / phi
        res_bytes += P.result_bytes[s]
        if record:
            srv_segs.append(Segment("server", P.names[s], "op", st, f))
    return f, res_bytes, srv_segs


def _merge(segs: list[Segment]) -> list[Segment]:
    """Join back-to-back segments of the same item (a release that did not preempt)."""
    out: list[Segment] = []
    for s in segs:
        if out and out[-1].name == s.name and out[-1].kind == s.kind and abs(out[-1].end_ms - s.start_ms) < 1e-12:
            out[-1] = Segment(s.resource, s.name, s.kind, out[-1].start_ms, s.end_ms)
        elif s.end_ms > s.start_ms or s.kind == "tensor":
            out.append(s)
    return out


def with_transport(latency_ms: float, ue_finish_ms: float, server_ms: float, transport_ms: float) -> float:
    """A split's predicted latency (ms) with ``transport_ms`` added: what the transport of recent split
    requests measured beyond the link model (``ue_client.calibration.CostModel.transport_ms``, a mean over
    requests of other plans too; may be negative). The plan's own transport, ``latency_ms - ue_finish_ms -
    server_ms`` (``server_ms``: its server ops' compute at the compute share, ms), cannot become negative,
    so a negative residual takes off at most that much; with ``transport_ms`` = 0 the latency is unchanged.

    Before (session 8) the floor was the UE finish alone: a residual of -2 ms (loopback transfers faster
    than the 100 Mbit/s, 1 ms RTT link given) on an all-offload plan of 2 ms predicted it at 0.0 ms (UE
    finish 0), a request that the server computes."""
    return latency_ms + max(transport_ms, min(0.0, ue_finish_ms + server_ms - latency_ms))


def server_ms(P: Prepared, smask: int, r: Rates) -> float:
    """Compute time (ms) of the server ops of ``smask`` at the compute share ``r.phi`` (what ``serve``
    charges them, without waits)."""
    return sum(P.c[i] for i in range(P.n) if smask >> i & 1) / r.phi


def server_mask(graph: CostGraph, server_ops: Iterable[str]) -> int:
    idx = graph.index
    m = 0
    for nm in server_ops:
        if nm not in idx:
            raise PartitionError(f"server op {nm!r} is not an op of the graph")
        m |= 1 << idx[nm]
    return m


def simulate(graph: CostGraph, link: Link, server_ops: Iterable[str], *, mode: str = "cold",
             state: ServerState | None = None, share: Shares | None = None,
             upload_order: Sequence[str] | None = None, timeline: bool = True) -> SimResult:
    """Latency and per-resource timeline of one partition (``server_ops`` = the op names on the server).

    ``upload_order`` overrides the need order with an explicit uplink priority (items not listed
    follow in need order); it exists to show that the need order is never worse.
    """
    if mode not in MODES:
        raise CostGraphError(f"unknown simulation mode {mode!r}; valid: {', '.join(MODES)}")
    P = prepare(graph)
    smask = server_mask(graph, server_ops)
    check_partition(P, smask)
    return run(P, smask, Rates.of(link, share), mode, state, upload_order, record=timeline)


_SPLIT_SENT = "_split_sent_bytes"
SCALE_FREE.add(_SPLIT_SENT)  # the structure's: a calibrated copy has its base's


def split_sent_bytes(P: Prepared) -> list[float]:
    """Bytes the UE sends for every single split k of the topological order (UE = first k ops), k = 0..n:
    each tensor (op output or model input) once if it has a consumer at or after k; O(n+E) once per prepared
    graph and its calibrated copies (it depends on the structure alone: kept on ``P``, carried to a scaled copy
    by ``SCALE_FREE``; session 18: IONN recomputed it in every re-plan, as each moved cost scale is a new copy),
    then a copy of the kept list."""
    got = P.__dict__.get(_SPLIT_SENT)
    if got is None:
        src, B = P.graph.scaled_from(), P
        while src is not None:  # kept on the profile a chain of copies came from, for the copies made later
            B = prepare(src[0])
            src = src[0].scaled_from()
        got = B.__dict__.get(_SPLIT_SENT)
        if got is None:
            got = B.__dict__[_SPLIT_SENT] = tuple(_split_sent_bytes(B))
        P.__dict__[_SPLIT_SENT] = got
    return list(got)


def _split_sent_bytes(P: Prepared) -> list[float]:
    n = P.n
    last = [-1] * n
    last_in: dict[str, int] = {}
    for v in range(n):
        for p in P.preds[v]:
            last[p] = max(last[p], v)
        for x in P.in_reads[v]:
            last_in[x] = max(last_in.get(x, -1), v)
    diff = [0.0] * (n + 2)
    for p in range(n):
        if last[p] > p:  # sent for p < k <= last[p]
            diff[p + 1] += P.d[p]
            diff[last[p] + 1] -= P.d[p]
    for x, lv in last_in.items():
        diff[0] += P.input_bytes[x]
        diff[lv + 1] -= P.input_bytes[x]
    out, sent = [], 0.0
    for k in range(n + 1):
        sent += diff[k]
        out.append(sent)
    return out


def split_costs(P: Prepared, r: Rates) -> list[float]:
    """Additive warm cost of every single split k of the topological order (UE = first k ops), O(n+E)."""
    n = P.n
    A = [0.0] * (n + 1)
    for i in range(n):
        A[i + 1] = A[i] + P.a[i]
    C = [0.0] * (n + 1)
    R = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        C[i] = C[i + 1] + P.c[i] / r.phi
        R[i] = R[i + 1] + P.result_bytes[i]
    sent = split_sent_bytes(P)
    return [A[n] if k == n else A[k] + C[k] + sent[k] / r.tup + 2 * r.L + R[k] / r.dn for k in range(n + 1)]


def additive_terms(P: Prepared, smask: int) -> tuple[float, float, float, float]:
    """(UE ms, server ms, sent bytes, result bytes) of a server set: each tensor sent once."""
    A = C = 0.0
    sent = res = 0
    seen: set = set()
    for i in range(P.n):
        if smask >> i & 1:
            C += P.c[i]
            res += P.result_bytes[i]
            for p in P.preds[i]:
                if not smask >> p & 1 and p not in seen:
                    seen.add(p)
                    sent += P.d[p]
            for x in P.in_reads[i]:
                if x not in seen:
                    seen.add(x)
                    sent += P.input_bytes[x]
        else:
            A += P.a[i]
    return A, C, float(sent), float(res)


def additive_warm_ms(P: Prepared, smask: int, r: Rates) -> float:
    """DADS' additive warm objective: sum a (UE) + sum c (server) + sent bytes / R + 2L + results / R_dn.

    It is an upper bound of the simulator's warm latency (the simulator overlaps UE and server work on
    DAG branches and the uplink with the UE); on a chain the two coincide.
    """
    if not smask:
        return sum(P.a)
    A, C, sent, res = additive_terms(P, smask)
    return A + C / r.phi + sent / r.tup + 2 * r.L + res / r.dn


def chain_closed_form(graph: CostGraph, link: Link, k: int, *, mode: str = "cold",
                      share: Shares | None = None) -> float:
    """DESIGN.md §5 closed form for a chain split after its first ``k`` ops (k = n: all local).

    warm: F_k + d_k/R + 2L + C_{k+1} + d_out/R_dn; cold: max_j [max(F_k, W_j/R) + d_k/R + L + C_j]
    + L + d_out/R_dn, with W_j the (first-use) weight bytes of ops k+1..j and C_j the server time of
    ops j..n. Used to check the simulator.
    """
    P = prepare(graph)
    n = P.n
    for i in range(n):
        if P.preds[i] != ((i - 1,) if i else ()) or (i == 0 and len(P.in_reads[0]) != 1) or (i and P.in_reads[i]):
            raise CostGraphError("chain_closed_form needs a chain graph (op i reads only op i-1)")
    r = Rates.of(link, share)
    F = sum(P.a[:k])
    if k == n:
        return F
    d_k = P.d[k - 1] if k else P.input_bytes[P.in_reads[0][0]]
    d_out = P.result_bytes[n - 1]
    C = [0.0] * (n + 1)
    for j in range(n - 1, k - 1, -1):
        C[j] = C[j + 1] + P.c[j] / r.phi
    if mode == "warm":
        return F + d_k / r.tup + 2 * r.L + C[k] + d_out / r.dn
    if mode != "cold":
        raise CostGraphError("chain_closed_form supports warm and cold")
    best = -_INF
    W = 0
    seen: set = set()
    for j in range(k, n):
        for w in P.op_weights[j]:
            if w not in seen:
                seen.add(w)
                W += P.weight_bytes[w]
        best = max(best, max(F, W / r.up) + d_k / r.tup + r.L + C[j])
    return max(F, best + r.L + d_out / r.dn)

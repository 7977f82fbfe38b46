"""The device runtime's options: one frozen, validated value, and the one source of their defaults.

``ClientOptions()`` holds every default the library (``CoinferClient``) and the CLI (``coinfer-ue run``)
use. Each option has exactly one type; the public boundary (``ClientOptions.build``, which
``CoinferClient`` calls) converts the looser forms callers may pass (a link as a mapping or a pair, a
fixed split as a position) before the value is built, and ``__post_init__`` rejects anything else with
an ``InputError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from modelgraph import ModelGraph, ModelGraphError, PartitionError
from partitioner import CostGraph, Link
from partitioner.uecpu import UeCpu
from ue_client import planning, wire
from ue_client.errors import InputError


@dataclass(frozen=True)
class LinkOverride:
    """Values that replace the measured link estimates for planning; None keeps the estimate.

    Rates in Mbit/s (> 0), RTT in ms (>= 0). Raises ``InputError`` on anything else.
    """

    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float | None = None

    def __post_init__(self) -> None:
        for k in ("uplink_mbps", "downlink_mbps"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise InputError(f"{k} must be > 0, got {v!r}")
        if self.rtt_ms is not None and not self.rtt_ms >= 0:
            raise InputError(f"rtt_ms must be >= 0, got {self.rtt_ms!r}")

    def apply(self, est: Link) -> Link:
        """The estimate ``est`` with the overridden values replaced (downlink defaults to the uplink)."""
        return Link(self.uplink_mbps or est.uplink_mbps,
                    self.downlink_mbps or (self.uplink_mbps if est.downlink_mbps is None else est.downlink_mbps),
                    est.rtt_ms if self.rtt_ms is None else self.rtt_ms)

    @classmethod
    def of(cls, link: Link | LinkOverride | Mapping | Sequence | None) -> LinkOverride | None:
        """Convert the forms the public API accepts: a ``partitioner.Link``, a mapping with
        ``uplink_mbps``/``downlink_mbps``/``rtt_ms``, or an ``(uplink_mbps, rtt_ms)`` pair."""
        if link is None or isinstance(link, LinkOverride):
            return link
        if isinstance(link, Link):
            return cls(link.uplink_mbps, link.downlink_mbps, link.rtt_ms)
        if isinstance(link, Mapping):
            unknown = set(link) - {"uplink_mbps", "downlink_mbps", "rtt_ms"}
            if unknown:
                raise InputError(f"unknown link keys {sorted(unknown)}; use uplink_mbps, downlink_mbps, rtt_ms")
            return cls(link.get("uplink_mbps"), link.get("downlink_mbps"), link.get("rtt_ms"))
        if isinstance(link, Sequence) and not isinstance(link, str) and len(link) == 2:
            up, rtt = link
            return cls(None if up is None else float(up), None, None if rtt is None else float(rtt))
        raise InputError(f"link must be a Link, a mapping or an (uplink_mbps, rtt_ms) pair, got {link!r}")


def _positive(name: str, v: float | None, *, zero: bool = False, none: bool = False, finite: bool = False) -> None:
    """Raise InputError unless ``v`` is a number > 0 (>= 0 with ``zero``; None with ``none``; not inf with
    ``finite``: for a quantity the planner computes with, where inf would fail later, per request)."""
    if v is None and none:
        return
    if (isinstance(v, bool) or not isinstance(v, int | float) or not (v >= 0 if zero else v > 0)
            or (finite and math.isinf(v))):
        raise InputError(f"{name} must be a {'finite ' if finite else ''}number {'>= 0' if zero else '> 0'}, "
                         f"got {v!r}")


DEFAULT_TENANT = "default"

WEIGHT_CHECKS = ("sampled", "full")
"""``ClientOptions.weight_check``'s values."""


@dataclass(frozen=True)
class ClientOptions:
    """How one device client plans, uploads and falls back. Every field has one type; see ``build``.

    Raises ``InputError`` (from ``__post_init__``) when a value is out of range.
    """

    policy: str = "auto"
    """Partitioning policy (``planning.POLICIES``); ``auto`` is MJOA with progressive offloading."""
    link: LinkOverride | None = None
    """Replaces the measured link estimates for planning (None: plan with the measurements)."""
    tenant: str = DEFAULT_TENANT
    """Weight namespace on the server. With ``token`` the server takes the tenant from the token: the
    default then becomes "" (the token's tenant); another name must be the token's (else
    ``AccessDenied``, PERMISSION_DENIED)."""
    token: str | None = None
    """Bearer token sent as ``authorization: Bearer`` call metadata (a server run with --auth-tokens)."""
    tls_ca: str | None = None
    """PEM file of the CA that signed the server's certificate: connect with TLS (None: plain text)."""
    tls_cert: str | None = None
    """PEM client certificate for mutual TLS (with ``tls_key``)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    data_channel: bool = True
    """Send the session's weights on the server's data channel (``ue_client.data_channel``: raw bytes on a
    side TCP/TLS connection, less UE CPU per byte) when the server advertises one; False, or a server
    without one, or a connection that fails: in the Session stream."""
    data_address: str | None = None
    """"HOST:PORT" to reach the data channel at instead of the gRPC host and the advertised port (a relay
    in between, e.g. the testbed's delay relay); None: the server's."""
    timeout_ms: float | None = None
    """Give up on the server after this long and complete locally (None: from the prediction's spread
    and the request's progress, ``ue_client.deadline``)."""
    deadline_ms: float | None = None
    """The latency deadline D, ms: the ``robust`` policy plans for P(latency > D) <= ``eps`` (required
    by it); with any policy each request's report says whether it met D. Not a give-up time
    (``timeout_ms``)."""
    eps: float = 0.05
    """``robust``: the allowed probability of missing ``deadline_ms``, in (0, 1)."""
    uplink_cv: float | None = None
    """``robust``: the uplink rate's coefficient of variation the plan hedges against (>= 0); None: the
    one the UE measures from its recent uplink rate samples (``profiler.link.LinkEstimator.uplink_cv``;
    0 until it has enough). A number overrides the measurement."""
    frequency: Any = None
    """A ``ue_client.frequency.FrequencyControl`` that applies the plan's CPU frequency (None: plan at
    the current frequency, apply nothing)."""
    deadline_slack_ms: float = 1000.0
    """Without ``timeout_ms``: the shortest silence (no progress) after which a late request is given up."""
    threads: int | None = None
    """torch intra-op threads the profile is measured with (None: torch's)."""
    profile_runs: int = 10
    """Timed runs of each op when the model is profiled (>= 2: the profile estimates each op's variance)."""
    weight_check: str = "sampled"
    """How each call checks that the weights are the ones captured (``ue_client.model.WeightWatch``), beyond torch's
    version counters: ``"sampled"`` (default) compares a fixed sample of every watched tensor's elements (all of a
    small tensor, else every index of every dimension; ``ue_client.weight_values``; 0.23 ms per call for resnet18,
    0.9 for densenet121 at a full core), which sees a whole tensor, a row, a column or a channel changed through
    ``param.data`` (scaled, copied over, clamped, refilled, zeroed); ``"full"`` compares every byte's sha256 with the
    capture's (exact; ~0.8 ns per weight byte, 40 ms per resnet18 call); a change through ``.data`` to a few elements
    of a large matrix that no sample reads is seen only by ``"full"``."""
    chunk_bytes: int = wire.MAX_CHUNK_BYTES
    """Largest uplink chunk while a request is in flight (a cut tensor waits at most one chunk), in
    [wire.MIN_CHUNK_BYTES, wire.MAX_CHUNK_BYTES]; a lone upload uses the server's chunk limit."""
    probe: bool = True
    """Time one upload when the first session opens: send CPU per byte, and the uplink unless overridden."""
    probe_bytes: int = 1 << 20
    """Weight bytes the uplink probe uploads (an int >= 1)."""
    connect_timeout_s: float = 5.0
    plan_budget_s: float = 0.3
    """Time budget of one planner call (MJOA's tree search), seconds."""
    backoff_s: tuple[float, float] = (0.5, 30.0)
    """(first, largest) wait before the server is tried again after a failure; doubles per failure."""
    costs: CostGraph | None = None
    """A cost graph measured before (skips profiling), planned as given: its UE times are this device's as it
    runs, ``ue_slowdown`` included (what ``engine.costs`` of a client with the same ``ue_slowdown`` reports),
    rescaled by measured requests like a profiled graph (``calibration.CostModel``); ``ue_slowdown`` does not
    scale it."""
    pace: bool = True
    """Pace the uplink at the link's rate (and watch the queue's RTT)."""
    ue_slowdown: float = 1.0
    """Emulate a device this many times slower than this CPU (>= 1; demos and tests on one machine): each UE
    op sleeps (``ue_slowdown`` - 1) x its CPU time (``model.pacer``) and a profile taken here has its UE times
    multiplied by it (``model.slow_costs``); a given ``costs`` is not scaled."""
    fallback: bool = True
    """Complete locally when the server fails (False: raise the ``ServerError``)."""
    op_timings: bool = False
    """Ask the server for every request's per-op timings (``OpenSession.op_timings``; each report's
    ``RequestReport.server_op_times``). Off: the server sends none (one entry per server op per request)."""
    server_ops: frozenset[str] | None = None
    """A fixed partition: the op names that run on the server (None: the policy decides)."""
    horizon: int | None = None
    """Requests this client will serve (None: unknown): ``auto`` invests in uploads only if they pay."""
    send_cpu: UeCpu | None = None
    """What sending costs this UE, when known (None: measured by the uplink probe and passively)."""
    transport_memory: bool = True
    """Start from the transport residuals the earlier clients of this process measured with the same server,
    model and planning link (``calibration.TRANSPORT_MEMORY``; with them the server's cost scale and the calls'
    times after their runs), and keep this client's there for the next ones; a client with none from its process
    starts from what the last process of this UE kept on disk for the same server process, model, given link,
    slowdown and CPU share (``ue_client.transport_cache``, written when a client closes); False: start from none
    and keep them to this client."""
    suspend_idle: bool = True
    """Close the session while plans stay local and nothing is queued."""
    plan_background: bool = True
    """Decide the next request on a background thread after each request returns, while the caller is away
    (``ue_client.background``), when the caller was away before this request at least
    ``background.BACKGROUND_MIN_GAP_MS`` and twice the last background decision (a closed loop decides inside
    the requests: there the worker's decision cost more, session 12); the next request waits for it if it
    still runs (inside its ``plan_ms``) and takes it only when every input it was made with is the same, else
    decides itself: the decision is the one the request would have made. (It replaced session 11's
    ``plan_after``, which decided after each request before the call returned, on the caller's clock.)"""
    quick_reuse: bool = True
    """A request whose previous decision holds takes it through ``DecisionCache.reuse`` (the reuse rules on
    the raw estimates: a few comparisons and at most one copy of the choice) before the inputs of a full
    ``decide`` are gathered; the decision is the same either way (``tests/test_quick_reuse.py``); and ``auto``'s
    re-plans of a held warm target take the search's answer without the search (``DecisionCache.held_answer``,
    ``tests/test_held_shortcut.py``). False: every request goes through ``decide`` and every re-plan searches (kept
    to measure what the shortcuts save: ``bench/bench_ue_request_cpu.py``)."""
    refresh_s: float = 30.0
    """A suspended session is re-opened at least this often, to learn what the server holds."""
    gc_freeze: bool = True
    """Take the objects alive once the model is captured (and once it is profiled) out of Python's cyclic
    garbage collections (``gc.freeze``, ``ue_client.heap.freeze_gc``): a full collection in a UE process
    walks ~400,000 objects (180 ms of CPU for googlenet's at a full core) whenever one lands in a request.
    They go back to the collector after the last open client has closed ``heap.UNFREEZE_AFTER`` (8) times.
    False: leave the collector alone."""
    cell_uplink_mbps: float | None = None
    """The shared cell's uplink rate (Mbit/s goodput) that the server's uplink shares divide (MJOA-MU's
    beta_n). Given: the UE paces its uplink to its share x this rate (``ShareChanged.uplink_share``),
    plans with this as the uplink rate (unless ``link`` sets one) and its share, and skips the uplink
    rate probe. None: shares are not obeyed (the UE sends at its link's rate)."""
    weight: float = 1.0
    """This UE's priority w_n in the server's weighted sum of latencies (ARA, DESIGN.md §5), sent in its
    profile (``UeProfile.weight``); the server caps it at the tenant's quota ``compute_weight``."""

    def __post_init__(self) -> None:
        if self.policy not in planning.POLICIES:
            raise InputError(f"unknown policy {self.policy!r}; choose one of {', '.join(planning.POLICIES)}")
        if self.link is not None and not isinstance(self.link, LinkOverride):
            raise InputError(f"link must be a LinkOverride (see LinkOverride.of), got {type(self.link).__name__}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise InputError("token must be a non-empty string")
        if self.token and self.tenant == DEFAULT_TENANT:
            object.__setattr__(self, "tenant", "")  # the token names the tenant
        if not isinstance(self.tenant, str) or not (self.tenant or self.token):
            raise InputError(f"tenant must be a non-empty string, got {self.tenant!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InputError("tls_cert and tls_key go together (a client certificate for mutual TLS)")
        _positive("timeout_ms", self.timeout_ms, none=True)
        _positive("deadline_ms", self.deadline_ms, none=True, finite=True)
        if self.policy == "robust" and self.deadline_ms is None:
            raise InputError("policy 'robust' needs a deadline: deadline_ms (coinfer-ue run --deadline-ms D)")
        if isinstance(self.eps, bool) or not isinstance(self.eps, int | float) or not 0 < self.eps < 1:
            raise InputError(f"eps must be in (0, 1), got {self.eps!r}")
        _positive("uplink_cv", self.uplink_cv, zero=True, none=True, finite=True)
        if self.frequency is not None:
            from ue_client.frequency import FrequencyControl

            if not isinstance(self.frequency, FrequencyControl):
                raise InputError(f"frequency must be a ue_client.frequency.FrequencyControl, got "
                                 f"{type(self.frequency).__name__}")
        _positive("deadline_slack_ms", self.deadline_slack_ms, zero=True)
        if self.weight_check not in WEIGHT_CHECKS:
            raise InputError(f"weight_check must be one of {', '.join(WEIGHT_CHECKS)}, got {self.weight_check!r}")
        # checked here, not at the first call: profile_runs=1 built a client whose first call failed with a raw
        # ProfilerError traceback (break31 F6), ue_slowdown=inf one whose call overflowed a sleep
        for name, least in (("threads", 1), ("profile_runs", 2), ("horizon", 1), ("probe_bytes", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
                why = " (the profile estimates each op's variance from its runs)" if name == "profile_runs" else ""
                raise InputError(f"{name} must be an int >= {least}{why}, got {v!r}")
        if not (isinstance(self.chunk_bytes, int) and wire.MIN_CHUNK_BYTES <= self.chunk_bytes <= wire.MAX_CHUNK_BYTES):
            raise InputError(f"chunk_bytes must be an int in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}], "
                             f"got {self.chunk_bytes!r}")
        _positive("connect_timeout_s", self.connect_timeout_s)
        _positive("plan_budget_s", self.plan_budget_s)
        lo_hi = self.backoff_s
        if not (isinstance(lo_hi, tuple) and len(lo_hi) == 2
                and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in lo_hi)
                and 0 < lo_hi[0] <= lo_hi[1]):
            raise InputError(f"backoff_s must be (first, largest) finite seconds with 0 < first <= largest, "
                             f"got {lo_hi!r}")
        if self.costs is not None and not isinstance(self.costs, CostGraph):
            raise InputError(f"costs must be a CostGraph, got {type(self.costs).__name__}")
        if (isinstance(self.ue_slowdown, bool) or not isinstance(self.ue_slowdown, int | float)
                or not 1.0 <= self.ue_slowdown < math.inf):
            raise InputError(f"ue_slowdown must be a finite number >= 1, got {self.ue_slowdown!r}")
        if self.server_ops is not None and not (isinstance(self.server_ops, frozenset)
                                                and all(isinstance(n, str) for n in self.server_ops)):
            raise InputError("server_ops must be a frozenset of op names (ClientOptions.build converts a position)")
        if self.send_cpu is not None and not isinstance(self.send_cpu, UeCpu):
            raise InputError(f"send_cpu must be a partitioner.uecpu.UeCpu, got {type(self.send_cpu).__name__}")
        _positive("refresh_s", self.refresh_s, zero=True)
        _positive("cell_uplink_mbps", self.cell_uplink_mbps, none=True, finite=True)
        _positive("weight", self.weight, finite=True)
        for name in ("data_channel", "op_timings", "gc_freeze", "transport_memory", "quick_reuse"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.data_address is not None:
            from ue_client.inputs import parse_data_address

            parse_data_address(self.data_address)

    def data_target(self, address: str):
        """The data channel target (``ue_client.data_channel.DataTarget``) for a server at ``address``, or
        None (``data_channel`` off, or an address without a host part). Raises InputError (bad
        ``data_address``, unreadable TLS files)."""
        if not self.data_channel:
            return None
        from ue_client.data_channel import target_for

        return target_for(address, data_address=self.data_address, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                          tls_key=self.tls_key)

    def channel_args(self) -> dict[str, Any]:
        """The keyword arguments of ``wire.channel`` these options ask for (TLS files, token)."""
        return {"tls_ca": self.tls_ca, "tls_cert": self.tls_cert, "tls_key": self.tls_key, "token": self.token}

    @classmethod
    def build(cls, graph: ModelGraph | None = None, base: ClientOptions | None = None, **given: Any) -> ClientOptions:
        """``base`` (default ``ClientOptions()``) with ``given`` applied, loose forms converted.

        ``link``: anything ``LinkOverride.of`` takes. ``server_ops``: an int ``k`` (ops from position
        ``k`` of ``graph.ops`` run on the server) or an iterable of op names, checked against ``graph``
        (a valid split). Raises ``InputError`` on an unknown option or a bad value.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InputError(f"unknown client option(s) {unknown}; known: {', '.join(sorted(names))}")
        if "link" in given:
            given["link"] = LinkOverride.of(given["link"])
        if given.get("server_ops") is not None:
            given["server_ops"] = fixed_split(graph, given["server_ops"])
        if isinstance(given.get("backoff_s"), list):
            given["backoff_s"] = tuple(given["backoff_s"])
        return replace(base or cls(), **given)


DEFAULTS = ClientOptions()
"""The defaults the library and the CLI share."""


def fixed_split(graph: ModelGraph | None, server_ops: int | Iterable[str]) -> frozenset[str]:
    """Server op names of a fixed partition: ``k`` (every op from position ``k`` on) or op names."""
    if graph is None:
        raise InputError("a fixed split (server_ops) needs the model's graph")
    if isinstance(server_ops, bool) or not isinstance(server_ops, int | Iterable) or isinstance(server_ops, str):
        raise InputError(f"server_ops must be a position or op names, got {server_ops!r}")
    names = [op.name for op in graph.ops[server_ops:]] if isinstance(server_ops, int) else list(server_ops)
    try:
        return graph.split(names).server_ops
    except (ModelGraphError, PartitionError) as e:
        raise InputError(str(e)) from None

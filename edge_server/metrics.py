"""Prometheus metrics of the edge server (``coinfer-edge serve --metrics-port N``), per tenant.

The one metrics module of the server. Two kinds of series, all named ``coinfer_*``:

* observed where they happen (thread-safe ``prometheus_client`` objects): the latency histogram of
  finished requests (``coinfer_request_seconds``), request failures by status
  (``coinfer_request_failures_total``), and the statuses the RPC error boundary answered
  (``coinfer_rpc_errors_total``, by method and code: the errors that make clients fall back);
* read from the server's own counters at scrape time (:class:`RuntimeCollector`, which takes its
  snapshot on the server's event loop, so nothing is read while it changes): requests done/failed,
  bytes received, sessions opened and open, weight-cache bytes, entries, commits, evictions,
  rejected uploads and staging bytes, each per tenant; and what bounds strangers (session 21): the memory budget's
  reservations per tenant and in all, the call gate's open calls, server-wide reading slots held and waited for per
  tenant, slots taken back and waits that ran out, and the validation slot's running / paused / waiting
  validations. An operator sees a leak (reservations that stay) or a slot hog (one tenant's slots) from outside.

Label cardinality: ``tenant`` is the token's tenant (a set the operator's tokens file bounds); callers without a
token are summed under ``(address)`` (their addresses are no bounded set), and a series of the gate's or the
budget's shows at most ``MAX_TENANT_LABELS`` values (the largest, the rest summed under ``(other)``).

No grpc here; the runtime hands :class:`ServerMetrics` to the parts that observe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: from a fast warm slice on a GPU to a cold request that waited for its weights."""


class ServerMetrics:
    """The observed series; ``registry`` is what the HTTP endpoint serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "coinfer_request_seconds",
            "Server time of finished requests, BeginRequest to last output (s)",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_failures = Counter(
            "coinfer_request_failures_total",
            "Requests answered RequestFailed, by gRPC status name",
            ["tenant", "code"],
            registry=self.registry,
        )
        self.rpc_errors = Counter(
            "coinfer_rpc_errors_total",
            "Calls ended with a non-OK status by the error boundary, by method and status name",
            ["method", "code"],
            registry=self.registry,
        )

        self._tenants: set[str] = set()
        """Tenant labels the two per-tenant series above have used (:meth:`_tenant_label`)."""
        self.tarpit_delays = Counter(
            "coinfer_tarpit_delays_total",
            "Error answers the tarpit delayed (callers past their burst of client errors: edge_server.tarpit)",
            registry=self.registry,
        )
        self.tarpit_seconds = Counter(
            "coinfer_tarpit_delay_seconds_total",
            "Seconds those error answers waited, summed",
            registry=self.registry,
        )

    def tarpit_delayed(self, seconds: float) -> None:
        """The tarpit held an error answer for ``seconds``."""
        self.tarpit_delays.inc()
        self.tarpit_seconds.inc(seconds)

    def _tenant_label(self, tenant: str) -> str:
        """``tenant`` while fewer than ``MAX_TENANT_LABELS - 1`` tenants were seen (first come), else ``OTHER_LABEL``:
        without ``--auth-tokens`` a caller names its tenant, and each name would be a series kept for ever (review21b
        finding 7: 300 names, 300 labels)."""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= MAX_TENANT_LABELS - 1:
            return OTHER_LABEL
        self._tenants.add(tenant)
        return tenant

    def request_finished(self, tenant: str, code: str | None, total_ms: float) -> None:
        """A request ended: ``code`` None when it succeeded (then ``total_ms`` is observed); the tenant's label
        bounded (:meth:`_tenant_label`)."""
        tenant = self._tenant_label(tenant)
        if code is None:
            self.request_seconds.labels(tenant).observe(total_ms / 1e3)
        else:
            self.request_failures.labels(tenant, code).inc()

    def rpc_error(self, method: str, code: str) -> None:
        self.rpc_errors.labels(method, code).inc()


MAX_TENANT_LABELS = 50
"""Label values one per-tenant series of the call gate's or the memory budget's shows at most (:func:`by_tenant`)."""
ADDRESS_LABEL = "(address)"
"""The tenant label of callers without a valid token (keys ``peer:HOST``), summed."""
OTHER_LABEL = "(other)"
"""The tenant label of the values past ``MAX_TENANT_LABELS``, summed."""


def by_tenant(values: dict[str, float], cap: int = MAX_TENANT_LABELS) -> dict[str, float]:
    """``values`` by caller key or memory holder (``tenant:NAME`` / ``peer:HOST`` / a tenant's name) -> by tenant
    label: ``tenant:NAME`` -> NAME, every ``peer:`` key summed under ``ADDRESS_LABEL``; over ``cap`` labels, the
    ``cap - 1`` largest (ties by name) and the rest summed under ``OTHER_LABEL``."""
    out: dict[str, float] = {}
    for key, v in values.items():
        label = key[7:] if key.startswith("tenant:") else ADDRESS_LABEL if key.startswith("peer:") else key
        out[label] = out.get(label, 0) + v
    if len(out) > cap:
        ranked = sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))
        out = dict(ranked[:cap - 1])
        out[OTHER_LABEL] = sum(v for _, v in ranked[cap - 1:])
    return out


class RuntimeCollector:
    """Per-tenant series read from the runtime at scrape time. ``snapshot()`` runs on the server's
    event loop and returns ``{series: {tenant: value}}``."""

    COUNTERS = {
        "requests_done": "Requests completed",
        "requests_failed": "Requests failed (including refused and cancelled)",
        "bytes_received": "Bytes received on session streams (weights and cut tensors)",
        "sessions_opened": "Sessions opened",
        "cache_commits": "Weights committed to the cache",
        "cache_evictions": "Weight-cache entries evicted",
        "uploads_rejected": "Weight uploads rejected or abandoned",
        "profile_cpu_seconds": "ProfileGraph CPU seconds charged to the tenant's budget (validation and profile "
        "run, abandoned calls included; anonymous callers: tenant __profile__)",
        "profile_refused": "ProfileGraph calls refused because the tenant's ProfileGraph CPU budget was spent",
    }
    GAUGES = {
        "sessions_open": "Sessions open now",
        "cache_bytes": "Bytes of verified weights the tenant holds",
        "cache_entries": "Weights the tenant holds",
        "pinned_bytes": "Bytes of weights pinned by the tenant's open sessions",
        "staging_bytes": "Bytes of partial uploads and request tensors the tenant has declared now (its staging "
        "quota's use, at most half the area with tokens; the server-wide area holds only what arrived: "
        "coinfer_staging_area_bytes)",
        "memory_reserved_bytes": "Bytes of the memory budget for work in flight the tenant holds now (decoded "
        "requests, validations, slices, profiles, outputs; edge_server.memory)",
        "calls_open": "Calls open now in the call gate (edge_server.calls)",
        "reading_slots_held": "Server-wide reading slots (--max-reading-mb) the tenant's calls hold now, each "
        "receiving a first message",
        "reading_calls_waiting": "The tenant's calls waiting for a server-wide reading slot now",
    }
    SERVER_COUNTERS = {
        "memory_refused": "Reservations the memory budget refused (RESOURCE_EXHAUSTED), since start",
        "request_holds_refused": "Calls refused because their decoded request did not fit the memory budget",
        "reading_slots_taken_back": "Calls ended UNAVAILABLE to give their reading slot to a caller under its "
        "share (--reading-grace-s, --contended-first-message-s)",
        "reading_slot_timeouts": "Calls ended UNAVAILABLE at --first-message-s still waiting for a reading slot",
        "first_message_ended": "Calls ended waiting for their first message (past --first-message-s, or a "
        "caller's oldest over --max-waiting-calls)",
        "health_calls_paced": "Tokenless health calls that waited for their host's slot (with --auth-tokens: past "
        "its burst of health calls; edge_server.health_admission)",
    }
    SERVER_GAUGES = {
        "memory_budget_bytes": "The memory budget for work in flight (--memory-mb less the process, cache, staging "
        "and reading slots; 0: unbounded)",
        "memory_reserved_total_bytes": "Bytes of the memory budget reserved now, all holders",
        "staging_area_bytes": "Bytes of the server-wide staging area held now: partial uploads' and request "
        "tensors' bytes that arrived (whole pages), all tenants",
        "staging_area_capacity_bytes": "The server-wide staging area (--staging-mb)",
        "reading_slots": "Server-wide reading slots (--max-reading-mb // the message limit; 0: no bound)",
        "reading_slots_free": "Server-wide reading slots free now",
        "validations_running": "Slice/ProfileGraph validations running now (the validation slot: 0 or 1)",
        "validations_paused": "Validations paused, holding their working memory, while another tenant's runs",
        "validations_waiting": "Validations waiting for their first turn",
        "health_budget_bytes": "The health service's own budget for tokenless health calls' receive windows (with "
        "--auth-tokens; taken off the memory budget; 0: none)",
        "health_reserved_bytes": "Bytes of the health service's own budget held now (tokenless health calls)",
    }

    def __init__(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], dict[str, dict[str, float]]]):
        self._loop = loop
        self._snapshot = snapshot

    def collect(self):
        async def take():
            return self._snapshot()

        try:
            snap = asyncio.run_coroutine_threadsafe(take(), self._loop).result(timeout=5)
        except Exception:  # the server is stopping, or busy past the timeout: no per-tenant series now
            logger.debug("metrics snapshot failed", exc_info=True)
            return
        for name, doc in self.COUNTERS.items():
            fam = CounterMetricFamily(f"coinfer_{name}", doc, labels=["tenant"])
            for tenant, v in sorted(snap.get(name, {}).items()):
                fam.add_metric([tenant], v)
            yield fam
        for name, doc in self.GAUGES.items():
            fam = GaugeMetricFamily(f"coinfer_{name}", doc, labels=["tenant"])
            for tenant, v in sorted(snap.get(name, {}).items()):
                fam.add_metric([tenant], v)
            yield fam
        server = snap.get("server", {})
        for name, doc in self.SERVER_COUNTERS.items():
            if name in server:
                yield CounterMetricFamily(f"coinfer_{name}", doc, value=server[name])
        for name, doc in self.SERVER_GAUGES.items():
            if name in server:
                yield GaugeMetricFamily(f"coinfer_{name}", doc, value=server[name])


def serve_metrics(metrics: ServerMetrics, host: str, port: int):
    """Start the HTTP endpoint (a daemon thread); returns the WSGI server (``.server_port``,
    ``.shutdown()``). Raises OSError if the address cannot be bound."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise OSError(e.errno, f"cannot bind the metrics port {host}:{port}: {e.strerror or e}") from None
    return server

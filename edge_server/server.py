"""Create and stop the edge server (grpc.aio), gRPC-examples style.

    server, port = await create_server("127.0.0.1:0")   # bound and started
    ...
    await server.stop(grace=5)     # drains, then closes sessions and the compute workers

``create_server`` registers the coinfer ``EdgeService`` and the standard ``grpc.health.v1`` service
(overall status and ``coinfer.v1.EdgeService`` both SERVING once started; NOT_SERVING while stopping), with
a bounded service name and bounded ``Watch`` streams (``edge_server.health_service``: it needs no token),
admitted on a budget of its own (``edge_server.health_admission``: strangers' other calls cannot starve a prober).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from edge_server.allocation import ShareAllocator
from edge_server.auth import Authenticator
from edge_server.config import MiB, ServerConfig
from edge_server.data_channel import DataChannel, server_ssl_context
from edge_server.health_listener import start_health_listener
from edge_server.health_service import BoundedHealthServicer
from edge_server.interceptor import AuthInterceptor
from edge_server.metrics import RuntimeCollector, serve_metrics
from edge_server.runtime import EdgeRuntime
from edge_server.servicer import EdgeServicer
from edge_server.wire import add_edge_service, add_health_service, health_gate
from protos.coinfer.v1 import coinfer_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EdgeService"].full_name


class EdgeServer:
    """A started-or-not grpc.aio server plus the runtime behind it."""

    def __init__(self, server: grpc.aio.Server, runtime: EdgeRuntime, health_servicer: health.aio.HealthServicer):
        self.grpc_server = server
        self.runtime = runtime
        self.health = health_servicer
        self._stopped = False
        self._started = False
        self.metrics_server = None
        """The Prometheus HTTP endpoint (``.server_port``), if ``config.metrics_port`` was set."""
        self.health_server: grpc.aio.Server | None = None
        """The health service's own listener (``edge_server.health_listener``), if ``config.health_port`` was set."""
        self.health_port: int | None = None
        """Its bound port."""
        self.probe_health: health.aio.HealthServicer | None = None
        """The health servicer on that listener (its status set with :attr:`health`'s)."""

    async def start(self) -> None:
        """Start serving (create_server already did; a second call does nothing)."""
        if self._started:
            return
        self._started = True
        await self.grpc_server.start()
        for servicer in self._health_servicers():
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            await servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def _health_servicers(self) -> list[health.aio.HealthServicer]:
        return [self.health] + ([self.probe_health] if self.probe_health is not None else [])

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, give running ones ``grace`` seconds, then close everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for servicer in self._health_servicers():  # probes see NOT_SERVING while the calls drain
            await servicer.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.runtime.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)


async def create_server(
    address: str = "127.0.0.1:0",
    *,
    device: str | None = None,
    cache_mb: int | None = None,
    staging_mb: int | None = None,
    threads: int | None = None,
    max_sessions: int | None = None,
    memory_mb: int | None = None,
    op_time_ms: float | None = None,
    config: ServerConfig | None = None,
    allocator: ShareAllocator | None = None,
) -> tuple[EdgeServer, int]:
    """Build and start the server bound to ``address`` (port 0: any free port); returns it and the port.

    Settings come from ``config`` (default ``ServerConfig()``, the one source of defaults); each keyword
    given (not None) replaces its field. ``staging_mb`` None: the config's rule (half the cache).
    Raises OSError if the address cannot be bound, ValueError for a bad device.
    """
    config = config or ServerConfig()
    changes: dict = {}
    if device is not None:
        changes["device"] = device
    if cache_mb is not None:
        changes["cache_bytes"] = cache_mb * MiB
        if staging_mb is None:
            changes["staging_bytes"] = None  # re-derived from the new cache size
    if staging_mb is not None:
        changes["staging_bytes"] = staging_mb * MiB
    if threads is not None:
        changes["threads"] = threads
    if max_sessions is not None:
        changes["max_sessions"] = max_sessions
    if memory_mb is not None:
        changes["memory_bytes"] = memory_mb * MiB
        if memory_mb and cache_mb is None:  # under a cap the cache defaults to a quarter of it
            changes["cache_bytes"] = max(16, memory_mb // 4) * MiB
        if staging_mb is None:
            changes["staging_bytes"] = None  # re-derived under the cap
    if op_time_ms is not None:
        changes["op_time_ms"] = op_time_ms
    if changes:
        config = replace(config, **changes)
    if config.max_chunk_bytes + 64 * 1024 > config.max_message_bytes:
        config = replace(config, max_message_bytes=config.max_chunk_bytes + 64 * 1024)
    credentials = server_credentials(config)
    if credentials is None and not config.insecure and not is_loopback(address):
        raise ValueError(
            f"refusing to serve plain text on {address}: give a TLS certificate and key (--tls-cert, --tls-key), "
            "bind a loopback address, or say --insecure"
        )
    if not config.auth_tokens_file and not is_loopback(address):
        if not config.insecure:
            raise ValueError(
                f"refusing to serve {address} without --auth-tokens: with no tokens every caller may name any "
                "tenant (single-tenant mode is for loopback); give --auth-tokens FILE, bind a loopback address, "
                "or say --insecure"
            )
        logger.warning("--insecure: serving %s without authentication: every caller may name any tenant", address)
    # the tenants' weight quotas are room of the cache reserved for each (break31 F4): resolved against it
    auth = (
        Authenticator(config.auth_tokens_file, weight_capacity=config.cache_bytes) if config.auth_tokens_file else None
    )
    runtime = EdgeRuntime(config, allocator, auth=auth)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(auth, runtime.metrics, runtime.tarpit, runtime.calls)] if auth else None,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
            # bounded reads (--max-reading-calls): without BDP probing a stream's receive window stays at its
            # initial 64 KiB until a read asks for a message, so an unread call holds at most that; with it, grpc
            # grew the windows and took in 200 x 7 MiB of one token's Hellos whatever was read (session 18)
            # (session 21) and a fixed receive window per stream instead (``read_window_bytes``): with the initial
            # 64 KiB each message over it waited a round trip, uploads at 400 Mbit/s, 40 ms RTT took 2.8-3.1x as
            # long (docs/results/attack/session21/); an unread call holds up to the window
            *([("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", config.read_window_bytes)]
              if runtime.reads_bounded else []),
        ],
    )
    add_edge_service(EdgeServicer(runtime), server)
    health_servicer = BoundedHealthServicer()
    add_health_service(health_servicer, server, None if runtime.calls is None else health_gate(
        runtime.health, runtime.calls.window_bytes, runtime.metrics.rpc_error), auth=runtime.auth,
        admission=runtime.health)
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        await runtime.close()
        raise OSError(f"cannot bind {address}: {e}") from None
    if port == 0:
        await runtime.close()
        raise OSError(f"cannot bind {address}")
    if config.data_port is not None and not has_tcp_host(address):
        logger.info("no data channel for %s (not a TCP host:port): weights go in-stream", address)
    elif config.data_port is not None:
        try:
            runtime.attach_data_channel(
                DataChannel(
                    host_of(address),
                    config.data_port,
                    runtime.store,
                    max_chunk_bytes=config.max_chunk_bytes,
                    ssl_context=server_ssl_context(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
                    if credentials is not None
                    else None,
                    max_connections=config.data_max_connections,
                    idle_timeout_s=config.data_idle_s,
                    progress_bytes=config.data_progress_bytes,
                )
            )
        except (OSError, ValueError) as e:
            await runtime.close()
            raise OSError(f"cannot open the data channel on {host_of(address)}:{config.data_port}: {e}") from None
    edge = EdgeServer(server, runtime, health_servicer)
    try:
        if config.health_port is not None:
            edge.probe_health = BoundedHealthServicer()
            await edge.probe_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            edge.health_server, edge.health_port = await start_health_listener(
                health_address(address, config.health_port), edge.probe_health, runtime.metrics.rpc_error)
        await edge.start()
        if config.metrics_port is not None:
            reg = runtime.metrics.registry
            reg.register(RuntimeCollector(asyncio.get_running_loop(), runtime.metrics_snapshot))
            edge.metrics_server = serve_metrics(runtime.metrics, config.metrics_host, config.metrics_port)
            logger.info(
                "Prometheus metrics on http://%s:%d/metrics", config.metrics_host, edge.metrics_server.server_port
            )
    except BaseException:
        await edge.stop(0)
        raise
    logger.info(
        "edge server listening on %s (port %d, %s), device %s, %d torch intra-op thread(s)%s",
        address,
        port,
        ("mutual TLS" if config.tls_client_ca_file else "TLS") if credentials is not None else "plain text",
        runtime.device,
        torch.get_num_threads(),
        "" if config.threads else " (torch's default: set --threads to the cores this server may use)",
    )
    if runtime.data is not None:
        logger.info("weights may come on the data channel, port %d", runtime.data.port)
    if edge.health_port is not None:
        logger.info("health probes may use port %d (plain text, grpc.health.v1 only)", edge.health_port)
    if auth is None:
        logger.info("no --auth-tokens: single tenant, no authentication (the tenant is whatever clients name)")
    else:
        logger.info("authentication on: %d tenant(s) from %s", len(auth.tenants), config.auth_tokens_file)
    return edge, port


def health_address(address: str, port: int) -> str:
    """The health listener's address: the server's host (``address``'s; a unix socket's or another scheme's: all
    interfaces' loopback, 127.0.0.1) with ``port``. Raises ValueError for a port out of 0-65535."""
    if not 0 <= port <= 65535:
        raise ValueError(f"health port {port} out of range 0-65535")
    host = host_of(address) if has_tcp_host(address) else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_of(address: str) -> str:
    """The host part of "host:port" / "[v6]:port" (brackets removed)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]")


def has_tcp_host(address: str) -> bool:
    """True for a "host:port" / "[v6]:port" address (one the data channel can bind beside); False for gRPC's
    other schemes ("unix:PATH", "unix-abstract:NAME", "vsock:CID:PORT")."""
    return not address.startswith(("unix:", "unix-abstract:", "vsock:"))


def is_loopback(address: str) -> bool:
    """True if ``address`` ("host:port", "[v6]:port", "localhost:port") binds only a loopback interface."""
    host = host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files (None without a certificate). With a client CA, clients
    must present a certificate it signed (mutual TLS). Raises ValueError for a missing/unreadable file."""
    if config.tls_cert_file is None and config.tls_key_file is None:
        if config.tls_client_ca_file is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert_file is None or config.tls_key_file is None:
        raise ValueError("give both --tls-cert and --tls-key")
    cert = _read(config.tls_cert_file, "TLS certificate")
    key = _read(config.tls_key_file, "TLS key")
    ca = _read(config.tls_client_ca_file, "client CA") if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

"""Connection and session lifetime of one device client: channel, Session stream, queue watch,
suspension while plans stay local, and backoff after server failures.

Owned by the caller's thread (see ``ue_client.client.RemoteEngine``). The only other threads that
touch a ``Connection`` are the progress display, which reads ``session`` once per look (never
check-then-use), and a suspension's linger timer, which takes the idle channel off under ``_chan_lock``
(as ``open`` and ``detach`` read it) when the same suspension is still in force.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from partitioner.state import ServerState
from ue_client import data_channel, wire
from ue_client.data_channel import DataSender, DataTarget
from ue_client.errors import ProtocolError, ServerError, ServerUnavailable
from ue_client.session import QueueWatch, SessionStream

log = logging.getLogger(__name__)

CHANNEL_LINGER_S = 0.0
"""Seconds a suspended session's channel is kept idle for a re-open before it is closed (0: closed at once,
on a timer thread). Kept, it saves the close (gRPC's teardown when it was the process's last channel) and
the re-open's dial and start-up (+0.6 ms of CPU, googlenet's process at a full core), but gRPC's threads
cost the idle process CPU meanwhile: 0.2-0.5 ms/s at a full core, and 0.5-0.8 ms/s on the testbed's 25 %
UE in the seconds after a suspension, more than closing saves there (README "A suspension's cost and
Python's collector": kept 5 s, the stream's requests cost more in total). A UE at full CPU whose suspensions
end within seconds may keep it (``Connection.linger_s``; the ski-rental rule: about what closing and
re-opening cost / the idle cost per second)."""


class TlsMismatch(ServerUnavailable):
    """The server's TLS and this client's disagree: it speaks TLS and the client connected in plain text (no
    ``--tls-ca``), or the handshake failed (the certificate is not signed by ``--tls-ca``, a name mismatch, TLS
    against a plain-text server). Unreachable as before (a client with ``fallback`` answers locally), but the
    message says what to pass; before session 33 it was one "UNAVAILABLE ... Socket closed" line."""

    reason = "TLS mismatch"


_HANDSHAKE_WORDS = ("handshake", "ssl", "certificate", "tsi_", "peer name", "wrong_version")


def speaks_tls(address: str, timeout_s: float) -> bool:
    """Whether ``address`` (HOST:PORT, [IPv6]:PORT) completes a TLS handshake (no certificate check; ALPN h2 as
    gRPC offers it). False for anything else: plain text, refused, silent past ``timeout_s``, a unix socket."""
    if address.startswith("unix:"):
        return False
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host or None):
            return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def tls_problem(e: ServerError, address: str, channel_args: dict, timeout_s: float) -> ServerError:
    """``e`` (a failed first call to ``address``) as a ``TlsMismatch`` naming the flag to pass when TLS is the
    cause, else ``e`` itself. With TLS files the gRPC error text tells (handshake, certificate); without them a
    server that closed the connection is asked once for a TLS handshake (``speaks_tls``, at most 2 s): gRPC's
    text is then only "Socket closed"."""
    if not isinstance(e, ServerUnavailable) or isinstance(e, TlsMismatch):
        return e
    text = str(e)
    low = text.lower()
    ca = channel_args.get("tls_ca")
    if ca is not None or channel_args.get("tls_cert") is not None:
        if not any(w in low for w in _HANDSHAKE_WORDS):
            return e
        if "certificate_verify_failed" in low or "unable to get local issuer" in low:
            why = f"its certificate is not signed by --tls-ca {ca}: pass the CA that signed it"
        elif "wrong_version" in low:
            why = "it does not seem to speak TLS (a plain-text server?): drop --tls-ca"
        else:
            why = "check --tls-ca (the CA that signed the server's certificate) and the address's name in it"
        out = TlsMismatch(f"TLS handshake with {address} failed: {why} ({text})")
    else:
        if ("socket closed" not in low and "connection reset" not in low) or not speaks_tls(address,
                                                                                            min(2.0, timeout_s)):
            return e
        out = TlsMismatch(f"{address} speaks TLS and this client connected in plain text: pass --tls-ca PEM, the "
                          "CA that signed the server's certificate (ClientOptions.tls_ca; mutual TLS also needs "
                          f"--tls-cert/--tls-key) ({text})")
    out.code = e.code
    return out


@dataclass(frozen=True)
class Suspension:
    """What the client knew when it closed its session: planning goes on with it, offline."""

    state: ServerState
    share: float
    """The compute share the server gave this session, in (0, 1]."""
    since: float
    """``time.monotonic()`` at suspension."""
    uplink: float = 1.0
    """The uplink share the UE planned with on that session, in (0, 1] (1: it does not obey uplink shares)."""


class Connection:
    """One channel and at most one open Session stream to an edge server.

    ``open`` dials (or takes the channel a suspension kept) and says Hello; ``start_session`` opens the
    stream; ``detach`` takes the parts off (to close them elsewhere); ``suspend`` ends the stream, keeps
    the channel and remembers a ``Suspension``. ``note_failure`` starts an exponential backoff
    (``backoff_s`` = first, largest).
    """

    def __init__(self, address: str, tenant: str, *, connect_timeout_s: float, backoff_s: tuple[float, float],
                 channel_args: dict | None = None, data_target: DataTarget | None = None,
                 linger_s: float = CHANNEL_LINGER_S):
        self.address = address
        self.linger_s = linger_s
        """Seconds a suspension keeps the idle channel before closing it (``CHANNEL_LINGER_S``; 0: at once)."""
        self._chan_lock = threading.Lock()
        self._linger: threading.Timer | None = None
        self.data_target = data_target
        """Where the server's data channel is reached (None: weights always in-stream)."""
        self.tenant = tenant
        self.channel_args = dict(channel_args or {})
        """Keyword arguments of ``wire.channel``: TLS files and the bearer token."""
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s = backoff_s
        self.channel = None
        self.stub = None
        self.session: SessionStream | None = None
        self.watch: QueueWatch | None = None
        self.server_info: wire.ServerInfo | None = None
        self.generation = 0
        """Counts opened sessions: events a session's threads post carry it, so a late one is recognised."""
        self.suspended: Suspension | None = None
        self.suspensions = 0
        self.failures = 0
        self.retry_at = 0.0
        self.local_reason = ""
        self.last_error: ServerError | None = None
        self._ended: SessionStream | None = None
        """The stream the last suspension half-closed: its receiver ends when the server answers; cancelled
        if it has not by the next ``open`` or ``close``."""

    @property
    def alive(self) -> bool:
        s = self.session
        return s is not None and s.alive

    def open(self) -> list[float]:
        """Dial, Hello (sets ``server_info``) and three pings; returns the ping RTTs in seconds. After a
        suspension the channel it kept is used again (no new connection, no gRPC start-up); a Hello that
        fails on it raises as on a new one (the caller tears it down)."""
        with self._chan_lock:  # the linger timer closes a suspension's channel only while it is in force
            kept = self.channel if self.suspended is not None and self.session is None else None
            self.suspended = None
        self._stop_linger()
        self._reap()
        if kept is None:
            self.teardown()
            self.channel = wire.channel(self.address, **self.channel_args)
            self.stub = wire.stub(self.channel)
        try:
            self.server_info = wire.hello(self.stub, self.tenant, self.connect_timeout_s)
        except ServerUnavailable as e:  # a TLS mismatch is named (the flag to pass), not "Socket closed"
            better = tls_problem(e, self.address, self.channel_args, self.connect_timeout_s)
            if better is e:
                raise
            raise better from e
        return [wire.ping(self.channel, self.connect_timeout_s) for _ in range(3)]

    def start_session(self, model_id: str, profile: wire.UeProfile, *, chunk_bytes: int, rate_bps,
                      ack_handler, cell_uplink_mbps: float | None = None, op_timings: bool = False) -> SessionStream:
        """Open the Session stream. ``ack_handler(generation)`` gives the ``on_weight_ack(ack, t)``
        callback its receiver thread calls, told which session (generation) it serves;
        ``cell_uplink_mbps`` (when known) makes the session pace its uplink to its share of it;
        ``op_timings``: the server sends every request's per-op timings."""
        self.generation += 1
        self.session = SessionStream(self.stub, self.tenant, model_id, chunk_bytes=chunk_bytes,
                                     open_timeout_s=self.connect_timeout_s, rate_bps=rate_bps,
                                     on_weight_ack=ack_handler(self.generation), profile=profile,
                                     cell_uplink_mbps=cell_uplink_mbps, op_timings=op_timings)
        self._start_data_channel(self.session)
        return self.session

    def _start_data_channel(self, sess: SessionStream) -> None:
        """Connect the session's data channel in the background when the server offers one, waiting at most
        a second for it (until it is up, and if it never is, weights go in-stream); not at all when the last
        attempt to reach that address failed (a firewall dropping the port cost every session that second)."""
        opened = sess.opened
        if self.data_target is None or opened is None or not opened.limits.data_port or not opened.data_ticket:
            return
        sess.data_sender = DataSender(sess.queue, self.data_target, opened.limits.data_port, opened.data_ticket,
                                      opened.session_id, is_held=sess.held.__contains__,
                                      block_bytes=opened.limits.max_chunk_bytes,
                                      connect_timeout_s=self.connect_timeout_s)
        # the first weights are queued right after this: give a quick connection the chance to take them
        if sess.data_sender.where not in data_channel.unreachable:
            sess.data_sender.settled.wait(min(1.0, self.connect_timeout_s))

    def start_watch(self, base_rtt_s: float, on_idle_rtt, socket_backlog_s=None) -> None:
        """Watch the uplink's queue while weights are on it (see ``session.QueueWatch``): the data channel's socket
        (``socket_backlog_s``) where it carries them, else pings on the session's channel."""
        ch = self.channel
        self.watch = QueueWatch(lambda: wire.ping(ch, 10.0), self.session.queue, base_rtt_s, on_idle_rtt=on_idle_rtt,
                                socket_backlog_s=socket_backlog_s)

    def teardown(self) -> None:
        """Cancel everything at once (no goodbye): after a failure."""
        self._close_parts(*self.detach(), timeout_s=None)

    def detach(self) -> tuple:
        """Take the parts off: (queue watch, session, channel), any of them None."""
        with self._chan_lock:
            parts = (self.watch, self.session, self.channel)
            self.watch = self.session = self.channel = None
        return parts

    @staticmethod
    def _close_parts(watch, session, channel, timeout_s: float | None) -> None:
        """Close detached parts: gracefully (half-close, wait up to ``timeout_s`` for the server's end)
        or, with ``timeout_s`` None, by cancelling the stream."""
        if watch is not None:
            watch.stop()
        if session is not None:
            if timeout_s is None:
                session.cancel()
            else:
                session.close(timeout_s)
        if channel is not None:
            channel.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the session gracefully, then the channel, and forget any suspension."""
        self._stop_linger()
        self._reap()
        self._close_parts(*self.detach(), timeout_s=timeout_s)
        self.suspended = None

    def suspend(self, state: ServerState, share: float, uplink: float = 1.0) -> None:
        """End the session and remember ``state``, the compute ``share`` and the ``uplink`` share for
        offline planning; the channel is closed by a timer after ``linger_s`` (``CHANNEL_LINGER_S``, default
        0: at once), and a session that re-opens before that uses it again.

        The caller does not wait: the stream is half-closed (``SessionStream.end``), the queue watch told to
        stop, and the channel's close (which ends the stream's threads and, for the process's last channel,
        gRPC's own) runs on the timer's thread. Until session 10 the closer thread also waited for the
        server's answer and the data channel's sender first."""
        self._stop_linger()
        self._reap()
        watch, session = self.watch, self.session
        self.watch = self.session = None
        if watch is not None:
            watch.stop(wait=False)
        if session is not None:
            session.end()
            self._ended = session
        susp = Suspension(state, share, time.monotonic(), uplink)
        self.suspended = susp
        self.suspensions += 1
        if self.channel is not None:
            self._linger = threading.Timer(max(0.0, self.linger_s), self._close_idle, args=(susp,))
            self._linger.name, self._linger.daemon = "coinfer-linger", True
            self._linger.start()

    def _close_idle(self, susp: Suspension) -> None:
        """The linger timer: close the channel if ``susp`` is still the suspension in force."""
        with self._chan_lock:
            if self.suspended is not susp or self.session is not None or self.channel is None:
                return
            ch, self.channel, self.stub = self.channel, None, None
        ch.close()  # the ended stream, if the server never answered it, is cancelled with the channel

    def _stop_linger(self) -> None:
        t, self._linger = self._linger, None
        if t is not None:
            t.cancel()

    def _reap(self) -> None:
        """Cancel the stream the last suspension ended if the server has not ended it yet."""
        ended, self._ended = self._ended, None
        if ended is not None and ended.receiving:
            ended.cancel()

    # ---- failures ------------------------------------------------------------------------------------
    def backoff_left(self) -> float:
        """Seconds until the server may be tried again (<= 0: now)."""
        return self.retry_at - time.monotonic()

    def note_failure(self, e: ServerError, *, loud: bool = True, at: float | None = None) -> None:
        """Back off exponentially from ``at`` (``time.monotonic()`` when the failure was seen; default now); a
        broken stream (unavailable, protocol error) is torn down."""
        self.failures += 1
        lo, hi = self.backoff_s
        delay = min(hi, lo * 2 ** (self.failures - 1))
        self.retry_at = (time.monotonic() if at is None else at) + delay
        self.local_reason = f"{e.reason}"
        self.last_error = e
        if isinstance(e, ServerUnavailable | ProtocolError):
            self.teardown()
        (log.warning if loud else log.debug)("server trouble (%s); next try in %.1f s", e, delay)

    def note_success(self) -> None:
        self.failures = 0

"""Userspace link emulation: a TCP relay on loopback with a rate cap and a one-way delay per direction.

Why: the project's kernels have no netem and tests may run without root, so the testbed needs a link
model that works anywhere. A client (e.g. a gRPC channel) connects to the relay's port instead of the
server's; every byte it sends goes through the *uplink* model, every byte coming back through the
*downlink* model.

Model of one direction (a real FIFO bottleneck + a delay line, not a sleep per read):
  a chunk arriving at time ``t`` starts serialising at ``max(t, previous end of serialisation)``, takes
  ``bytes / rate`` on the wire and is delivered ``delay`` later (``delay = rtt / 2``). The relay stops
  reading from the sender while more than ``queue_ms`` of data waits for the wire, so TCP backpressure
  reaches the sender as it would behind a real bottleneck, and the bottleneck never idles during a bulk
  transfer (goodput ~= rate). Chunks are split into quanta of about 2 ms of wire time so delivery is
  smooth at low rates.

Connections share nothing by default (one bottleneck per TCP connection, i.e. per gRPC channel);
``shared_uplink=True`` / ``shared_downlink=True`` put all connections of one emulator behind one
bottleneck (the "shared uplink" scenario).

A relay in front of another shaper (the netns testbed's delay relay, before ``tc``'s rate) is given that
shaper's rates (``behind_mbps``): an unlimited direction then holds only its delay line at that rate
instead of up to 16 MiB, and keeps its socket's unsent bytes short, so that the bottleneck's queue is the
shaper's own (a tbf of 50 ms) and not seconds of data buffered in the relay (measured before: 15 MB
queued in the relay during a 100 Mbit/s upload, 1.2 s in front of any later message).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import logging
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

BYTES_PER_MBIT = 1e6 / 8
_MIN_READ = 16 * 1024
_MAX_READ = 64 * 1024
_QUANTUM_S = 0.002  # wire time per delivered piece: smoothness vs. wake-ups
_MIN_QUANTUM = 4096
_UNLIMITED_INFLIGHT = 16 * 1024 * 1024  # bytes held in the delay line of an unshaped direction
_CONNECT_TIMEOUT_S = 10.0
# Timer wake-ups are a fraction of a ms late: data due within _EARLY_S is released at once and naps aim
# early by the measured lag (at most _MAX_LAG_S), so the emulated delay is not inflated.
_EARLY_S = 0.0001
_MAX_LAG_S = 0.002
_KEEP = object()  # sentinel: leave a setting unchanged in set_link()
STALL_S = 0.050
"""A delivery later than its due time by more than this (not explained by the previous write's wait), or a
write that waited this long for the destination socket (``drain``), is recorded in ``LinkStats.stalls``."""
MAX_STALLS = 200


class LinkEmulatorError(RuntimeError):
    """The emulator could not start, was misconfigured or was used in the wrong state."""


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """Settings of an emulated link. ``None`` rate means unlimited; ``rtt_ms`` is split half each way."""

    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float = 0.0
    queue_ms: float = 20.0

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LinkEmulatorError(f"{name} must be > 0 or None (unlimited), got {value!r}")
        if not self.rtt_ms >= 0:
            raise LinkEmulatorError(f"rtt_ms must be >= 0, got {self.rtt_ms!r}")
        if not self.queue_ms > 0:
            raise LinkEmulatorError(f"queue_ms must be > 0, got {self.queue_ms!r}")

    @property
    def one_way_delay_s(self) -> float:
        return self.rtt_ms / 2000.0


@dataclasses.dataclass
class LinkStats:
    """Counters of delivered bytes (after shaping) and connections."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections_total: int = 0
    connections_active: int = 0
    connect_failures: int = 0
    max_late_ms: float = 0.0
    """The most any delivery came after its due time (relay scheduling: event loop or GIL busy), ms."""
    max_drain_ms: float = 0.0
    """The longest a delivery waited for the destination socket to take it (the next hop's backpressure), ms."""
    max_queued_bytes: int = 0
    """The most bytes one direction of one connection held in the relay at once."""
    stalls: list = dataclasses.field(default_factory=list)
    """The first ``MAX_STALLS`` stalls over ``STALL_S``: ``(unix time, direction, "late"|"drain", ms,
    bytes queued in that direction)``, so a slow request can be matched to them by time."""

    def snapshot(self) -> LinkStats:
        """A copy (the stalls list included) safe to read from another thread."""
        return dataclasses.replace(self, stalls=list(self.stalls))


class _Shaper:
    """One direction of a link: serialisation at ``rate`` bytes/s, then a fixed propagation delay.

    Shared by all connections that share a bottleneck: departures are computed against one ``tx_free``
    clock, so the sum of their goodputs is the rate.
    """

    def __init__(self, rate_mbps: float | None, delay_s: float, queue_s: float,
                 behind_mbps: float | None = None) -> None:
        self.tx_free = 0.0
        self.behind = None if behind_mbps is None else behind_mbps * BYTES_PER_MBIT
        """Bytes/s of a shaper after the relay (tc in netns mode), or None (see ``LinkEmulator``)."""
        self.configure(rate_mbps, delay_s, queue_s)

    def configure(self, rate_mbps: float | None, delay_s: float, queue_s: float) -> None:
        self.rate = None if rate_mbps is None else rate_mbps * BYTES_PER_MBIT  # bytes/s
        self.delay = delay_s
        self.queue_s = queue_s

    @property
    def read_size(self) -> int:
        if self.rate is None:
            return _MAX_READ
        return int(min(_MAX_READ, max(_MIN_READ, self.rate * self.queue_s)))

    @property
    def quantum(self) -> int:
        if self.rate is None:
            return _MAX_READ
        return int(max(_MIN_QUANTUM, self.rate * _QUANTUM_S))

    @property
    def inflight_limit(self) -> int:
        """Bytes that may sit in the relay for this direction (wire queue + delay line + slack)."""
        if self.rate is None:
            if self.behind is not None:  # only the delay line at the rate of the shaper behind
                return int(self.behind * self.delay + 2 * _MAX_READ)
            return _UNLIMITED_INFLIGHT
        return int(self.rate * (self.delay + self.queue_s) + 2 * _MAX_READ)

    def schedule(self, nbytes: int, now: float) -> float:
        """Enqueue ``nbytes`` arriving at ``now``; return the delivery time at the far end."""
        if self.rate is None:
            return now + self.delay
        start = max(now, self.tx_free)
        self.tx_free = start + nbytes / self.rate
        return self.tx_free + self.delay

    def backlog(self, now: float) -> float:
        """Seconds of data still waiting to be serialised."""
        return max(0.0, self.tx_free - now)


class _Pipe:
    """Moves bytes of one direction of one connection through a shaper, keeping order."""

    def __init__(
        self,
        name: str,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        shaper: _Shaper,
        on_delivered,
        stats: LinkStats | None = None,
    ) -> None:
        self.name = name
        self.stats = stats
        self.src = src
        self.dst = dst
        self.shaper = shaper
        self.on_delivered = on_delivered
        self.items: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.wake = asyncio.Event()
        self.space = asyncio.Event()
        self._lag = 0.0
        self._drained_s = 0.0  # how long the previous write waited for the destination

    async def run(self) -> None:
        """Read and deliver until the source closes and everything queued has been delivered."""
        tasks = {
            asyncio.create_task(self._receive(), name=f"linkemu-{self.name}-receive"),
            asyncio.create_task(self._deliver(), name=f"linkemu-{self.name}-deliver"),
        }
        try:
            # Either side failing (reset, closed peer) ends the pipe; a clean EOF waits for delivery.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.buffered > self.shaper.inflight_limit:
                    self.space.clear()
                    await self.space.wait()
                backlog = self.shaper.backlog(loop.time())
                if backlog > self.shaper.queue_s:
                    await asyncio.sleep(backlog - self.shaper.queue_s)
                data = await self.src.read(self.shaper.read_size)
                if not data:
                    return
                now = loop.time()
                q = self.shaper.quantum
                for off in range(0, len(data), q):
                    piece = data[off : off + q] if len(data) > q else data
                    self.items.append((self.shaper.schedule(len(piece), now), piece))
                self.buffered += len(data)
                self.wake.set()
        finally:
            self.eof = True
            self.wake.set()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        items = self.items
        while True:
            if not items:
                if self.eof:
                    break
                self.wake.clear()
                await self.wake.wait()
                continue
            now = loop.time()
            due = items[0][0]
            if due > now + _EARLY_S:
                # Wake-ups come late by a fraction of a ms: aim early by the lag seen so far (EWMA).
                nap = max(0.0, due - now - self._lag)
                await asyncio.sleep(nap)
                late = loop.time() - now - nap
                self._lag = min(_MAX_LAG_S, max(0.0, 0.7 * self._lag + 0.3 * late))
                continue
            late = now - due
            now += _EARLY_S
            batch = []
            while items and items[0][0] <= now:
                batch.append(items.popleft()[1])
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            queued = self.buffered
            self.dst.write(data)
            self.buffered -= len(data)
            self.on_delivered(len(data))
            self.space.set()
            t_drain = loop.time()
            await self.dst.drain()
            self._note(late, loop.time() - t_drain, queued)
        if self.dst.can_write_eof() and not self.dst.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.dst.write_eof()

    def _note(self, late_s: float, drain_s: float, queued: int) -> None:
        """Record a delivery's lateness and its wait for the destination (``LinkStats``)."""
        st = self.stats
        if st is None:
            return
        st.max_queued_bytes = max(st.max_queued_bytes, queued)
        st.max_late_ms = max(st.max_late_ms, late_s * 1e3)
        st.max_drain_ms = max(st.max_drain_ms, drain_s * 1e3)
        # lateness behind a write that waited for the destination is that wait, recorded once as "drain"
        own_late = late_s if self._drained_s <= STALL_S else 0.0
        self._drained_s = drain_s
        for kind, sec in (("late", own_late), ("drain", drain_s)):
            if sec > STALL_S and len(st.stalls) < MAX_STALLS:
                st.stalls.append((round(time.time() - sec, 4), self.name, kind, round(sec * 1e3, 1), queued))


class LinkEmulator:
    """Asyncio TCP relay emulating a link between its clients and one target server.

    Use ``port = await emu.start()``, point the client at ``127.0.0.1:port``, ``await emu.stop()``.
    All methods must be called from the event loop that runs the emulator (see ``LinkEmulatorThread``
    for synchronous code). ``behind_mbps`` = (uplink, downlink) rates of a shaper after the relay (None:
    none): an unlimited direction then holds at most ``delay x rate + 128 KiB`` and ~5 ms of unsent bytes.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        uplink_mbps: float | None = None,
        downlink_mbps: float | None = None,
        rtt_ms: float = 0.0,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        shared_uplink: bool = False,
        shared_downlink: bool = False,
        queue_ms: float = 20.0,
        behind_mbps: tuple[float | None, float | None] = (None, None),
    ) -> None:
        self.target = (target_host, int(target_port))
        self.behind_mbps = behind_mbps
        self.listen = (listen_host, int(listen_port))
        self.spec = LinkSpec(uplink_mbps, downlink_mbps, rtt_ms, queue_ms)
        self.shared_uplink = shared_uplink
        self.shared_downlink = shared_downlink
        self.stats = LinkStats()
        self._server: asyncio.base_events.Server | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._shapers_up: list[_Shaper] = []
        self._shapers_down: list[_Shaper] = []
        self._shared_up = self._new_shaper(up=True) if shared_uplink else None
        self._shared_down = self._new_shaper(up=False) if shared_downlink else None
        self.port: int | None = None

    # -- configuration -------------------------------------------------------------------------

    def _new_shaper(self, *, up: bool) -> _Shaper:
        s = self.spec
        rate = s.uplink_mbps if up else s.downlink_mbps
        shaper = _Shaper(rate, s.one_way_delay_s, s.queue_ms / 1000.0, self.behind_mbps[0 if up else 1])
        (self._shapers_up if up else self._shapers_down).append(shaper)
        return shaper

    def set_link(self, uplink_mbps=_KEEP, downlink_mbps=_KEEP, rtt_ms=_KEEP, queue_ms=_KEEP) -> LinkSpec:
        """Change the link at runtime; applies to every live connection from the next chunk on.

        An argument left out keeps its value; ``None`` for a rate means unlimited.
        """
        old = self.spec
        self.spec = LinkSpec(
            old.uplink_mbps if uplink_mbps is _KEEP else uplink_mbps,
            old.downlink_mbps if downlink_mbps is _KEEP else downlink_mbps,
            old.rtt_ms if rtt_ms is _KEEP else rtt_ms,
            old.queue_ms if queue_ms is _KEEP else queue_ms,
        )
        s = self.spec
        for shaper in self._shapers_up:
            shaper.configure(s.uplink_mbps, s.one_way_delay_s, s.queue_ms / 1000.0)
        for shaper in self._shapers_down:
            shaper.configure(s.downlink_mbps, s.one_way_delay_s, s.queue_ms / 1000.0)
        log.info("link set to %s", s)
        return s

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen and return the bound port."""
        if self._server is not None:
            raise LinkEmulatorError("link emulator already started")
        try:
            self._server = await asyncio.start_server(self._on_client, *self.listen, limit=_MAX_READ)
        except OSError as exc:
            raise LinkEmulatorError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("link emulator %s:%d -> %s:%d (%s)", self.listen[0], self.port, *self.target, self.spec)
        return self.port

    async def stop(self) -> None:
        """Stop listening, abort every relayed connection and wait for all tasks to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- relaying ------------------------------------------------------------------------------

    def _on_client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # stopping
            c_writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._relay(c_reader, c_writer))
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    def _count_up(self, n: int) -> None:
        self.stats.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.stats.bytes_down += n

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        peer = c_writer.get_extra_info("peername")
        _nodelay(c_writer)
        s_writer = None
        self.stats.connections_total += 1
        self.stats.connections_active += 1
        up_shaper = self._shared_up or self._new_shaper(up=True)
        down_shaper = self._shared_down or self._new_shaper(up=False)
        try:
            try:
                s_reader, s_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target, limit=_MAX_READ), _CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as exc:
                self.stats.connect_failures += 1
                log.warning("relay for %s: cannot reach target %s:%d: %s", peer, *self.target, exc)
                return
            _nodelay(s_writer)
            _notsent_lowat(s_writer, up_shaper)
            _notsent_lowat(c_writer, down_shaper)
            up = _Pipe("up", c_reader, s_writer, up_shaper, self._count_up, self.stats)
            down = _Pipe("down", s_reader, c_writer, down_shaper, self._count_down, self.stats)
            t_up = asyncio.create_task(up.run(), name="linkemu-up")
            t_down = asyncio.create_task(down.run(), name="linkemu-down")
            try:
                done, _ = await asyncio.wait({t_up, t_down}, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()
            except OSError as exc:
                log.debug("relay for %s ended: %r", peer, exc)
            finally:
                for t in (t_up, t_down):
                    t.cancel()
                await asyncio.gather(t_up, t_down, return_exceptions=True)
        finally:
            self.stats.connections_active -= 1
            if not self._shared_up:
                self._shapers_up.remove(up_shaper)
            if not self._shared_down:
                self._shapers_down.remove(down_shaper)
            for w in (c_writer, s_writer):
                if w is not None:
                    w.transport.abort()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _notsent_lowat(writer: asyncio.StreamWriter, shaper: _Shaper) -> None:
    """Behind a shaper of its own (``behind_mbps``), keep at most ~5 ms of that rate (>= 64 KiB) unsent in
    the kernel's socket buffer (``TCP_NOTSENT_LOWAT``; Linux): the send buffer autotunes up to
    ``tcp_wmem``'s 4 MiB, which at 100 Mbit/s is 0.3 s of queue in front of the link's own."""
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    sock = writer.get_extra_info("socket")
    if shaper.rate is not None or shaper.behind is None or lowat is None or sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, lowat, max(_MAX_READ, int(shaper.behind * 0.005)))


class _PreciseEpollSelector(selectors.EpollSelector):
    """Epoll selector whose timeouts have microsecond resolution instead of whole milliseconds.

    Why: asyncio's epoll selector rounds every timeout up to the next ms, which would add 0-1 ms to each
    emulated one-way delay. Waiting on the epoll fd itself with select() (microsecond timeout) first keeps
    epoll's scalability; it falls back to plain epoll if the fd does not fit select()'s FD_SETSIZE.
    """

    def select(self, timeout=None):
        if timeout is not None and timeout > 0:
            fd = self._selector.fileno()
            if fd < 1024:
                with contextlib.suppress(InterruptedError):
                    select.select([fd], [], [], timeout)
                timeout = 0
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop with microsecond timer resolution (see ``_PreciseEpollSelector``) where available."""
    if hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(_PreciseEpollSelector())
    return asyncio.new_event_loop()


# -- synchronous wrapper ---------------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000


def _enter_netns(name: str) -> None:
    """Move the calling *thread* into network namespace ``name`` (sockets it opens live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LinkEmulatorError(f"setns into network namespace {name!r} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class LinkEmulatorThread:
    """Hosts a ``LinkEmulator`` on its own event loop thread, for synchronous code and tests.

    ``netns`` runs the relay inside that network namespace (the thread enters it), e.g. to add the delay
    that tc cannot add on a kernel without netem.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        uplink_mbps: float | None = None,
        downlink_mbps: float | None = None,
        rtt_ms: float = 0.0,
        *,
        netns: str | None = None,
        **kwargs,
    ) -> None:
        self._args = (target_host, target_port, uplink_mbps, downlink_mbps, rtt_ms)
        self._kwargs = kwargs
        self._netns = netns
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._emu: LinkEmulator | None = None
        self.port: int | None = None

    def start(self, timeout: float = 10.0) -> int:
        """Start the loop thread and the relay; return the bound port."""
        if self._thread is not None:
            raise LinkEmulatorError("link emulator thread already started")
        ready = threading.Event()
        outcome: dict[str, object] = {}

        def main() -> None:
            try:
                if self._netns:
                    _enter_netns(self._netns)
                loop = new_event_loop()
                self._loop = loop
                self._emu = LinkEmulator(*self._args, **self._kwargs)
                outcome["port"] = loop.run_until_complete(self._emu.start())
            except BaseException as exc:
                outcome["error"] = exc
                ready.set()
                if self._loop is not None:
                    self._loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._emu.stop())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="linkemu", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise LinkEmulatorError(f"link emulator did not start within {timeout} s")
        if "error" in outcome:
            self._thread.join()
            self._thread = None
            err = outcome["error"]
            if isinstance(err, LinkEmulatorError):
                raise err
            raise LinkEmulatorError(f"link emulator failed to start: {err!r}") from err  # type: ignore[misc]
        self.port = int(outcome["port"])  # type: ignore[arg-type]
        return self.port

    def _call(self, fn, timeout: float = 10.0):
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            raise LinkEmulatorError("link emulator thread is not running")

        async def call():
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def set_link(self, uplink_mbps=_KEEP, downlink_mbps=_KEEP, rtt_ms=_KEEP, queue_ms=_KEEP) -> LinkSpec:
        """Thread-safe ``LinkEmulator.set_link``; returns once the change is in effect."""
        return self._call(lambda: self._emu.set_link(uplink_mbps, downlink_mbps, rtt_ms, queue_ms))

    def stats(self) -> LinkStats:
        """A snapshot of the counters."""
        return self._call(lambda: self._emu.stats.snapshot())

    @property
    def spec(self) -> LinkSpec:
        return self._emu.spec

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the relay (aborting live connections) and join the thread. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if thread.is_alive():
                raise LinkEmulatorError(f"link emulator thread did not stop within {timeout} s")
        self._thread = None
        self._loop = None

    def __enter__(self) -> LinkEmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def emulated_link(
    target_host: str,
    target_port: int,
    uplink_mbps: float | None = None,
    downlink_mbps: float | None = None,
    rtt_ms: float = 0.0,
    **kwargs,
) -> Iterator[int]:
    """``with emulated_link("127.0.0.1", 50051, uplink_mbps=20, rtt_ms=40) as port:`` -> relay port."""
    emu = LinkEmulatorThread(target_host, target_port, uplink_mbps, downlink_mbps, rtt_ms, **kwargs)
    emu.start()
    try:
        yield emu.port  # type: ignore[misc]
    finally:
        emu.stop()


# -- CLI -------------------------------------------------------------------------------------------


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _rate(text: str) -> float | None:
    if text.lower() in ("none", "inf", "unlimited", "0"):
        return None
    return float(text)


async def _serve(args: argparse.Namespace) -> None:
    emu = LinkEmulator(
        *args.target,
        args.uplink_mbps,
        args.downlink_mbps,
        args.rtt_ms,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        shared_uplink=args.shared_uplink,
        shared_downlink=args.shared_downlink,
        queue_ms=args.queue_ms,
    )
    port = await emu.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {args.listen[0]}:{port}", flush=True)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.stats_interval or None)
            if args.stats_interval and not stop.is_set():
                log.info("stats %s", emu.stats)
    finally:
        await emu.stop()
        log.info("stopped; %s", emu.stats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.linkemu", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--target", type=_hostport, required=True, help="server HOST:PORT")
    p.add_argument("--uplink-mbps", type=_rate, default=None, help="client->server rate (default unlimited)")
    p.add_argument("--downlink-mbps", type=_rate, default=None, help="server->client rate (default unlimited)")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip propagation delay, half each way")
    p.add_argument("--queue-ms", type=float, default=20.0, help="bottleneck queue in ms of wire time")
    p.add_argument("--shared-uplink", action="store_true", help="one uplink bottleneck for all connections")
    p.add_argument("--shared-downlink", action="store_true", help="one downlink bottleneck for all connections")
    p.add_argument("--stats-interval", type=float, default=0.0, help="log counters every N s (0: never)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(args))
    except LinkEmulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

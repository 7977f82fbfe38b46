"""Weight uploads in progress on one stream (a session's, or an UploadWeights call's).

Chunks of one weight arrive in order, chunks of different weights may interleave. A weight is
verified and committed when its last chunk arrives (:class:`~edge_server.weight_store.Upload`); a
stream that ends or breaks drops the rest (:meth:`UploadTracker.abort_all`), so nothing half-written
ever becomes visible. A stream has at most :data:`MAX_UPLOADS_IN_PROGRESS` weights half-received at once, and each
counts for at least ``WeightStore.min_weight_charge`` bytes of its tenant's staging and ``WeightStore.min_area_charge``
of the server-wide area (break37 F4, break39 F2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edge_server.errors import InvalidArgument, ResourceExhausted
from edge_server.tensor_codec import WeightPiece, dtype_name
from edge_server.weight_store import CommitResult, Upload, WeightStore

MAX_UPLOADS_IN_PROGRESS = 1024
"""Weights one stream (an UploadWeights call, a Session stream's in-stream weights, a data connection) may have
half-received at once; the first chunk of one more is refused with RESOURCE_EXHAUSTED and the stream ends (break37
F4). Each upload in progress holds an ``Upload`` (a sha256 hasher, its buffer, this table's entry: 0.5-0.7 KiB
measured) whatever its declared size; its staging charges (``WeightStore.min_weight_charge``, ``min_area_charge``)
bound them per tenant and server-wide, and this cap bounds one stream's table on its own, also without tokens (no
per-tenant staging limit) and for re-sent weights the tenant holds (charged nothing: they store nothing). Before,
114,524 first chunks of 8-byte weights on one stream held 74 MiB of a ``--memory-mb 1024`` server. Our UE client
sends one weight at a time per stream and leaves one half-sent only when something more urgent interrupts it (a
foreground weight, a re-keyed or parked queue), then resumes it: a handful at most, far below this
(``tests/test_break37_uploads.py`` counts them for a real upload). 1024 in progress at the 8 KiB floor are 8 MiB of
their tenant's staging (2 MiB of the area's)."""


class UploadTracker:
    """The weight uploads in progress on one stream of ``tenant``."""

    def __init__(self, store: WeightStore, tenant: str) -> None:
        self.store = store
        self.tenant = tenant
        self._uploads: dict[str, Upload] = {}
        self._fresh_done = 0
        """Bytes received of weights the tenant did not hold already whose upload ended (committed or not)."""

    def feed(self, piece: WeightPiece) -> CommitResult | None:
        """Add one chunk; returns the commit result when it completed its weight, else None.

        Raises InvalidArgument (out of order, metadata changed, hash mismatch), ResourceExhausted
        (staging or cache full, or the first chunk of a weight beyond :data:`MAX_UPLOADS_IN_PROGRESS`).
        """
        up = self._upload_for(piece.sha256, piece.dtype, piece.shape, piece.offset, piece.total_bytes)
        if not up.write(piece.offset, piece.data):
            return None
        return self._commit(up)

    @property
    def fresh_bytes(self) -> int:
        """Bytes received on this stream, since it began, of weights the tenant did not hold already (a re-sent
        weight it holds is counted and stores nothing: not progress), the bytes of a weight still half-received
        included as they arrive (a data connection's within one frame). Safe to read from another thread (the
        data channel's watchdog): it only reads, and a weight's end is counted after it leaves the table (at
        worst, a moment too few)."""
        ups = list(self._uploads.values())  # one C call: not changed under it by the stream's thread
        return self._fresh_done + sum(up.received for up in ups if not up.skip)

    @property
    def staging_in_progress(self) -> bool:
        """Some weight half-received here holds staging bytes (one the tenant did not hold already when its upload
        began; a re-sent held weight stores nothing). Safe from another thread, as :attr:`fresh_bytes`."""
        return any(not up.skip for up in list(self._uploads.values()))

    def _ended(self, up: Upload) -> None:
        if not up.skip:
            self._fresh_done += up.received

    def feed_from(
        self,
        span: tuple[str, torch.dtype, tuple[int, ...], int],
        offset: int,
        size: int,
        read_into: Callable[[memoryview], int],
        scratch: memoryview,
    ) -> CommitResult | None:
        """As :meth:`feed`, for a chunk whose ``size`` bytes are still on a socket: ``span`` is
        (sha256, dtype, shape, total bytes) as ``tensor_codec.check_weight_span`` validated it; the bytes
        are read by ``read_into`` straight into the staging buffer (:meth:`Upload.write_from`), whose
        bytes were reserved before the first byte is read. Also raises ConnectionError (peer gone)."""
        sha, dtype, shape, total = span
        up = self._upload_for(sha, dtype, shape, offset, total)
        if not up.write_from(offset, size, read_into, scratch):
            return None
        return self._commit(up)

    def _upload_for(self, sha: str, dt: torch.dtype, shape: tuple[int, ...], offset: int, total: int) -> Upload:
        """The upload in progress of ``sha`` (a chunk at ``offset`` continues it), or a new one (offset 0):
        its staging bytes are charged to the tenant's quota here, before any byte is received. Raises
        ResourceExhausted for a new one while :data:`MAX_UPLOADS_IN_PROGRESS` are in progress here."""
        up = self._uploads.get(sha)
        dtype = dtype_name(dt)
        if up is None:
            if offset != 0:
                raise InvalidArgument(f"weight {sha[:12]}: chunk at offset {offset} but no upload in progress")
            if len(self._uploads) >= MAX_UPLOADS_IN_PROGRESS:
                raise ResourceExhausted(
                    f"weight {sha[:12]}: {len(self._uploads)} weights already half-received on this stream, the most "
                    f"one stream may have in progress ({MAX_UPLOADS_IN_PROGRESS}); finish some before beginning more"
                )
            up = self.store.begin_upload(self.tenant, sha, total, dtype=dtype, shape=shape)
            self._uploads[sha] = up
        elif up.total_bytes != total or up.shape != shape or up.dtype != dtype:
            raise InvalidArgument(f"weight {sha[:12]}: metadata changed mid-upload")
        return up

    def _commit(self, up: Upload) -> CommitResult:
        """Verify and publish a complete upload (the one commit path of every stream)."""
        del self._uploads[up.sha256]
        self._ended(up)
        try:
            return up.commit()
        finally:
            up.abort()

    @property
    def in_progress(self) -> int:
        """Weights half-received on this stream (at most :data:`MAX_UPLOADS_IN_PROGRESS`)."""
        return len(self._uploads)

    def abort_all(self) -> None:
        """Drop every unfinished upload (their staging bytes are given back)."""
        ups = list(self._uploads.values())
        self._uploads.clear()
        for up in ups:
            self._ended(up)
            up.abort()


class ProgressClock:
    """The idle rule of every weight upload stream (an UploadWeights call, a Session stream's in-stream weights,
    a data connection): its idle time restarts only on progress, i.e. whenever no weight holding staging bytes is
    half-received on ``tracker`` (:attr:`UploadTracker.staging_in_progress`), or once ``need_bytes`` (>= 1) of
    weights the tenant does not hold already (:attr:`UploadTracker.fresh_bytes`) arrived since the last restart.
    Neither a trickle of bytes (review22: a byte every 299 s held a weight's staging), nor a weight's end (review23
    F2: a held 1-byte weight re-sent every 0.3 s), nor a message or frame of any other kind is progress while such a
    weight is half-received. A weight the tenant holds already, re-sent, stores nothing and is not bounded (session
    23's tester: a UE re-sending at twice the bound a weight another UE of its tenant had just committed was cut as
    idle, its session too in-stream, freeing nothing).

    Times are the caller's clock in seconds (``time.monotonic()`` or the event loop's time); :meth:`check` is
    called as often as the caller likes (each message, or a watchdog's sweep): a restart is seen at the first
    check after the bytes arrived. Only reads ``tracker``: any thread may check it.
    """

    __slots__ = ("_base", "need_bytes", "since", "tracker")

    def __init__(self, tracker: UploadTracker, need_bytes: int, now: float) -> None:
        self.tracker = tracker
        self.need_bytes = need_bytes
        self.since = now
        """When the idle time began (the last restart)."""
        self._base = tracker.fresh_bytes

    def check(self, now: float) -> bool:
        """Restart the idle time at ``now`` if there was progress since the last restart; True if it did."""
        fresh = self.tracker.fresh_bytes
        if fresh - self._base < self.need_bytes and self.tracker.staging_in_progress:
            return False
        self.since, self._base = now, fresh
        return True

    def restart(self, now: float) -> None:
        """Restart the idle time whatever arrived (e.g. a session's request is computing)."""
        self.since, self._base = now, self.tracker.fresh_bytes

    def idle_s(self, now: float) -> float:
        """Seconds without progress at ``now`` (after a :meth:`check`)."""
        self.check(now)
        return now - self.since


class UploadStream:
    """The domain side of one UploadWeights call: feed chunks, then :meth:`finish` or :meth:`abort`.

    ``on_commit(sha256)`` is called for every committed weight (the runtime routes it to the tenant's
    sessions and pins it for the session named in the header, if any); ``on_piece()``, if given, for
    every chunk (the session named in the header is not idle while its weights arrive here).
    """

    def __init__(
        self,
        tracker: UploadTracker,
        on_commit: Callable[[str], None],
        on_piece: Callable[[], None] | None = None,
    ) -> None:
        self._tracker = tracker
        self._on_commit = on_commit
        self._on_piece = on_piece
        self.committed: list[CommitResult] = []

    @property
    def tenant(self) -> str:
        return self._tracker.tenant

    def feed(self, piece: WeightPiece) -> None:
        if self._on_piece is not None:
            self._on_piece()
        result = self._tracker.feed(piece)
        if result is not None:
            self._on_commit(result.sha256)
            self.committed.append(result)

    def progress_clock(self, need_bytes: int, now: float) -> ProgressClock:
        """The idle rule of this call (:class:`ProgressClock`) from ``now``."""
        return ProgressClock(self._tracker, need_bytes, now)

    @property
    def in_progress(self) -> int:
        """Weights half-received on this stream."""
        return self._tracker.in_progress

    def finish(self) -> list[CommitResult]:
        """The client ended the stream: every weight must be complete (else InvalidArgument)."""
        if self._tracker.in_progress:
            raise InvalidArgument(f"stream ended with {self._tracker.in_progress} incomplete weight(s)")
        return self.committed

    def abort(self) -> None:
        """Nothing half-written stays behind, whatever happened (idempotent)."""
        self._tracker.abort_all()

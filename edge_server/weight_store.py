"""Content-addressed, byte-bounded weight store with per-tenant visibility.

Keys are the lowercase hex SHA-256 of a weight's raw bytes. Design choices:

* **Shared content, per-tenant namespaces.** Each distinct content (a *blob*) is held once in memory,
  whoever uploaded it: N devices running the same model cost the server the model's bytes once. But a
  tenant *sees* a weight (QueryWeights, sessions) only after it has uploaded the complete bytes itself
  and they verified against the hash: proof of possession. Otherwise QueryWeights would tell any tenant
  which models other tenants run, and let it use weights it never had. The price is that a second
  tenant still transfers the bytes once (they are verified, then dropped in favour of the shared blob).
* **Accounting per tenant.** Each tenant is charged the full size of every weight it sees
  (``tenant_bytes``); an optional per-tenant quota bounds that. The global capacity bounds physical
  bytes (each blob once).
* **Quotas are reservations, the rest is shared fairly** (with authentication, ``isolated``; break31 F4,
  revised in session 31). A tenant's ``weight_mb`` in the tokens file is room reserved for it alone; the given
  ones sum to at most the capacity (``edge_server.auth.resolve_weight_quotas``) and a tenant over its own quota
  first loses its own least recently used unpinned weights, so a tenant within its reservation always fits. The
  tenants without one share the rest: each may fill it while there is room, and when one needs room the least
  recently used unpinned weights of the others holding more than a fair share of it (the rest over the sharers
  holding weights) go first, then its own (:meth:`WeightStore._make_shared_room`); the sharers' charged bytes stay
  within the rest, so physical bytes are at most the capacity. A refusal names only the caller's own numbers:
  before, one tenant's idle weights filled the cache and locked every other tenant out, and the refusal's numbers
  gave away how many bytes the others held. Session 30 divided the rest equally among every tenant of the file
  instead: with a tokens file of hundreds of tenants (the testbed's full grid, a deployment listing its devices)
  each one's share was a few MiB and uploads of larger weights were refused. Room short anyway is held past a
  quota the tokens file lowered or removed, or by sharers past their fair share of a rest a reload shrank: such
  weights, unpinned, go first (:meth:`WeightStore._make_room`). What a sharer can still learn (break36 F4): that
  its own weights were evicted (its Stats), and, by bisecting which upload sizes are admitted without evicting its
  own, how many bytes the other sharers hold in all: a share that lets tenants use free room cannot hide how much
  room is free. With two or more sharers none pins more than half the rest (break36 F3). Eviction goes by whole
  weights, least recently used first: a sharer just over its fair share may lose a large weight and end well under
  it (break36 F5).
* **Bookkeeping is charged** (break36 F1): in a server's store a weight counts for at least ``MIN_WEIGHT_CHARGE``
  bytes in the cache, its tenants' bytes and quotas: its record costs ~1.3 KB its bytes do not count. So does an
  upload in progress (break37 F4), in its tenant's staging and in the server-wide staging area, from its first
  chunk: its ``Upload`` (hasher, buffer, a stream's table entry) costs ~0.5-0.7 KB its declared bytes do not count.
* **LRU by blob, pinning** (without authentication: one tenant, whose names are labels). Capacity is enforced
  by evicting least recently used blobs (with all their tenant entries). A blob pinned by an open session is
  never evicted; if the new weight cannot fit without evicting pinned ones, the commit fails with
  RESOURCE_EXHAUSTED.
* **Staging.** Partial uploads live in a staging area (bounded by bytes, RESOURCE_EXHAUSTED beyond) and
  become visible atomically on :meth:`Upload.commit` after the hash check. An upload that is aborted or
  never committed (client gone) leaves nothing visible and gives its staging bytes back. The server-wide
  area is charged as bytes arrive (an upload's buffer is an anonymous mapping whose pages commit only when
  written, or, under ``LAZY_MIN_BYTES``, a buffer that grows with the bytes): a tenant's declared but unsent
  bytes take no other tenant's room (session 22: one tenant declaring 120 MiB and sending 1 MiB filled the
  128 MiB area). Each tenant is charged what its uploads declare (its ``staging_mb`` quota), and, with
  quotas, at most half the server's area (``tenant_staging_limit``): one tenant alone never fills it. In a
  server's store an upload counts for at least ``min_weight_charge`` bytes in its tenant's staging and at least
  ``min_area_charge`` in the area from its first chunk (the area's floor held from :meth:`WeightStore.begin_upload`,
  its received bytes charged beyond it): 80,000 half-received 8-byte uploads held 53 MiB of RSS charged 320 KB
  (break37 F4). The area's floor is the bookkeeping's own size, not the tenant's 8 KiB (break39 F2).
* **Thread safety.** Metadata is guarded by one lock; chunk copies and hashing run outside it (one
  :class:`Upload` belongs to one stream). Usable from asyncio code and executor threads alike.

The store holds bytes only (no torch): sessions turn them into tensors with the slice's dtype and shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from edge_server.auth import Quota
from edge_server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from edge_server.tensor_codec import LAZY_MIN_BYTES, check_shape, dtype_from_name, nbytes_of
from modelgraph.tensors import aligned_buffer

logger = logging.getLogger(__name__)


MIN_WEIGHT_CHARGE = 8192
"""Bytes a stored weight is charged at least, in the cache, the tenants' bytes and their quotas (break36 F1): each
weight also holds ~1.3 KB of Python objects (its record, its entry, its tensor's header) that its bytes do not
count, so 900,000 weights of 4 bytes, charged 3.6 MB, took a ``--memory-mb 1024`` server from 363 to 1481 MiB of RSS
and every room-making scan over them held the store's lock for over a second. At 8 KiB the uncharged part is at most
about a sixth of what is charged; a real model's small tensors (biases, norms: a few hundred in a ResNet-50) are
charged a few MB more in all. The server's store uses it (``edge_server.runtime``); a bare ``WeightStore`` charges
exact bytes unless given ``min_weight_charge``.

An upload in progress counts for at least as much in its tenant's staging and in the server-wide staging area
(break37 F4, :meth:`WeightStore.begin_upload`): each holds an ``Upload`` (a sha256 hasher, its buffer, a stream's
table entry), measured at 0.5-0.7 KiB of RSS per half-received 8-byte upload (80,000 of them on 4 streams took a
``--memory-mb 1024`` server from 363 to 416 MiB, charged 4 bytes each in the area and 8 in the tenant's staging).
At 8 KiB that is at most a twelfth of what is charged, the same floor the weight gets once stored, and a client
with a few uploads in progress at a time (ours keeps one per stream) pays a few tens of KiB more; one stream has at
most ``edge_server.uploads.MAX_UPLOADS_IN_PROGRESS`` in progress. In the server-wide area it counts for at least
:data:`MIN_AREA_CHARGE` instead (break39 F2)."""

MIN_AREA_CHARGE = 2048
"""Bytes an upload in progress counts for at least in the server-wide staging area (``WeightStore.min_area_charge``
in a server's store), and what each request tensor adds there (``edge_server.requests``): the memory its bookkeeping
holds whatever its bytes, measured at 0.5-0.7 KiB per half-received upload and 0.9 / 1.5 KiB per half-received /
arrived request tensor of 4 bytes. The area bounds memory, so it is charged what is held; the tenant's own staging
keeps the 8 KiB floor (:data:`MIN_WEIGHT_CHARGE`, a quota). Break39 F2: with the area charged 8 KiB per upload,
two tenants, each within its half of the area, filled a ``--memory-mb 1024`` server's 128 MiB with 16,384
half-sent 8-byte weights (1.4 MB of messages, 2.6 s; RSS +8 MiB), and every other tenant's uploads and request
tensors were refused "staging area full" for as long as they kept them (before break37 it took 128 MiB of bytes).
At 2 KiB a tenant's floors hold at most a quarter of its staging limit in the area."""


class WeightIntegrityError(InvalidArgument):
    """The uploaded bytes do not hash to the declared sha256 (or their size is wrong)."""


class ByteBudget:
    """A thread-safe counter of reserved bytes with a hard capacity."""

    def __init__(self, capacity: int, what: str = "staging") -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.what = what
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        with self._lock:
            if self._used + n > self.capacity:
                # not the bytes used: they are every tenant's uploads in flight, not the caller's to learn
                raise ResourceExhausted(
                    f"{self.what} area full: {n} more bytes do not fit its {self.capacity} bytes now; try again"
                )
            self._used += n
            self._peak = max(self._peak, self._used)

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n
            if self._used < 0:  # a bug, not client input
                logger.error("%s budget released more than reserved (%d)", self.what, self._used)
                self._used = 0

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak


@dataclass(slots=True)
class StoreStats:
    """Counters of a :class:`WeightStore` (a snapshot)."""

    bytes_used: int = 0
    capacity_bytes: int = 0
    staging_bytes: int = 0
    staging_capacity_bytes: int = 0
    entries: int = 0
    blobs: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    commits: int = 0
    rejected: int = 0
    pinned_bytes: int = 0


@dataclass(slots=True)
class StoredWeight:
    """A verified weight: raw bytes (do not modify) plus the dtype/shape its first uploader declared
    (informational: slices read the bytes under their own meta, ``edge_server.slices.weight_tensor``; a
    later upload of the same sha256 under another meta of the same size is ``already_present``)."""

    sha256: str
    data: memoryview  # ALIGN_BYTES-aligned (modelgraph.tensors.aligned_buffer)
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(slots=True)
class CommitResult:
    sha256: str
    nbytes: int
    already_present: bool


@dataclass(slots=True)
class _Blob:
    weight: StoredWeight
    tenants: set[str] = field(default_factory=set)
    pins: dict[str, int] = field(default_factory=dict)  # owner -> pin count
    domain: str = ""


class WeightStore:
    """See the module docstring."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        staging_bytes: int | None = None,
        tenant_quota_bytes: int | None = None,
        domain_of: Callable[[str], str] | None = None,
        isolated: bool = False,
        quota_of: Callable[[str], Quota | None] | None = None,
        min_weight_charge: int = 0,
        min_area_charge: int | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError("capacity_bytes must be > 0")
        self.min_weight_charge = min_weight_charge
        """Bytes a stored weight counts for at least (``MIN_WEIGHT_CHARGE`` in a server); an upload in progress
        too, in its tenant's staging (:meth:`begin_upload`)."""
        self.min_area_charge = min_weight_charge if min_area_charge is None else min_area_charge
        """Bytes an upload in progress counts for at least in the server-wide staging area (:data:`MIN_AREA_CHARGE`
        in a server; default ``min_weight_charge``)."""
        self.capacity_bytes = capacity_bytes
        self.tenant_quota_bytes = tenant_quota_bytes
        self.domain_of = domain_of or (lambda _tenant: "")
        """Tenant -> dedup domain: content is shared only among tenants of one domain ("": everyone)."""
        self.isolated = isolated
        """Never evict a weight another tenant holds within its quota (else: global LRU), :meth:`_make_room`."""
        self.quota_of = quota_of or (lambda _tenant: None)
        """Tenant -> its limits (weight, pinned and staging bytes), None: only ``tenant_quota_bytes``."""
        self._tenant_staging: dict[str, int] = {}
        self._owner_tenant: dict[str, str] = {}
        self._tstats: dict[str, StoreStats] = {}
        """Tenant -> its own hits, misses, evictions, commits, rejected."""
        self.staging = ByteBudget(capacity_bytes if staging_bytes is None else staging_bytes, "staging")
        self._lock = threading.RLock()
        self._blobs: OrderedDict[str, _Blob] = OrderedDict()  # LRU order: oldest first
        self._tenant_bytes: dict[str, int] = {}
        self._owner_pins: dict[str, dict[str, int]] = {}  # owner -> blob key -> count
        self._bytes_used = 0
        self._charged_total = 0
        """The sum of every tenant's charged bytes (``_tenant_bytes``' values): a bound of the sharers' own, which
        lets a commit that fits the shared rest skip the per-tenant scan (``_make_shared_room``)."""
        self._stats = StoreStats(capacity_bytes=capacity_bytes, staging_capacity_bytes=self.staging.capacity)

    def _charged(self, nbytes: int) -> int:
        """The bytes a weight of ``nbytes`` counts for in the cache and its tenants' bytes (``min_weight_charge``)."""
        m = self.min_weight_charge
        return nbytes if nbytes >= m else m

    def _key(self, tenant: str, sha256: str) -> str:
        domain = self.domain_of(tenant)
        return f"{domain}/{sha256}" if domain else sha256

    def _tcount(self, tenant: str) -> StoreStats:
        st = self._tstats.get(tenant)
        if st is None:
            st = self._tstats[tenant] = StoreStats()
        return st

    def _weight_quota(self, tenant: str) -> int | None:
        q = self.quota_of(tenant)
        w = q.weight_bytes if q is not None else None
        return w if w is not None else self.tenant_quota_bytes

    def _shared_rest(self, tenant: str) -> int | None:
        """The bytes of the cache ``tenant`` shares with the other tenants without a reservation
        (``Quota.weight_shared``), None when it has a reservation of its own (or no resolved quota)."""
        q = self.quota_of(tenant)
        return q.weight_bytes if q is not None and q.weight_shared else None

    # -- staging (global bound, and each tenant's quota) ---------------------------------------------

    def staging_for(self, tenant: str) -> StagingAccount:
        """The staging account of ``tenant``: reserves count against its quota and the global bound."""
        return StagingAccount(self, tenant)

    def tenant_staging_limit(self, tenant: str) -> int | None:
        """Bytes of staging ``tenant`` may hold (declared uploads plus request tensors): its quota's
        ``staging_mb`` and at most half the server's staging area, so that no one tenant can fill it
        (session 22); None without quotas (no authentication: callers name their tenant)."""
        q = self.quota_of(tenant)
        if q is None:
            return None
        return min(q.staging_bytes, self.staging.capacity // 2)

    def _reserve_tenant(self, tenant: str, n: int) -> None:
        """Charge ``n`` bytes to the tenant's own staging (lock held). Raises ResourceExhausted over
        :meth:`tenant_staging_limit`."""
        used = self._tenant_staging.get(tenant, 0)
        limit = self.tenant_staging_limit(tenant)
        if limit is not None and used + n > limit:
            q = self.quota_of(tenant)
            half = q is not None and limit < q.staging_bytes
            raise ResourceExhausted(
                f"tenant {tenant!r} over its staging limit: {used} + {n} bytes > {limit}"
                + (f" (half the server's staging area of {self.staging.capacity} bytes, --staging-mb)" if half
                   else " (its staging_mb quota)")
            )
        self._tenant_staging[tenant] = used + n

    def _release_tenant(self, tenant: str, n: int) -> None:
        left = self._tenant_staging.get(tenant, 0) - n
        if left > 0:
            self._tenant_staging[tenant] = left
        else:
            self._tenant_staging.pop(tenant, None)

    def _pinned_bytes(self, tenant: str) -> int:
        """Bytes of weights pinned by ``tenant``'s owners (lock held)."""
        return sum(
            self._charged(len(b.weight.data)) for b in self._blobs.values()
            if any(self._owner_tenant.get(o) == tenant for o in b.pins)
        )

    # -- lookups -------------------------------------------------------------------------------------

    def has(self, tenant: str, sha256: str) -> bool:
        """True if the tenant sees this weight. Does not touch LRU order or counters."""
        with self._lock:
            blob = self._blobs.get(self._key(tenant, sha256))
            return blob is not None and tenant in blob.tenants

    def query(self, tenant: str, sha256s: Iterable[str]) -> list[str]:
        """The subset the tenant sees, in query order (counts hits/misses; refreshes LRU for hits)."""
        out: list[str] = []
        with self._lock:
            ts = self._tcount(tenant)
            for sha in sha256s:
                key = self._key(tenant, sha)
                blob = self._blobs.get(key)
                if blob is not None and tenant in blob.tenants:
                    self._blobs.move_to_end(key)
                    self._stats.hits += 1
                    ts.hits += 1
                    out.append(sha)
                else:
                    self._stats.misses += 1
                    ts.misses += 1
        return out

    def get(self, tenant: str, sha256: str) -> StoredWeight | None:
        with self._lock:
            key = self._key(tenant, sha256)
            blob = self._blobs.get(key)
            if blob is None or tenant not in blob.tenants:
                self._stats.misses += 1
                self._tcount(tenant).misses += 1
                return None
            self._blobs.move_to_end(key)
            self._stats.hits += 1
            self._tcount(tenant).hits += 1
            return blob.weight

    # -- pinning -------------------------------------------------------------------------------------

    def pin(self, tenant: str, sha256: str, owner: str) -> StoredWeight:
        """Pin a weight the tenant sees, on behalf of ``owner`` (a session id). Re-entrant per owner."""
        with self._lock:
            key = self._key(tenant, sha256)
            blob = self._blobs.get(key)
            if blob is None or tenant not in blob.tenants:
                raise NotFound(f"weight {sha256[:12]} not held for tenant {tenant!r}")
            q = self.quota_of(tenant)
            if q is not None and not any(self._owner_tenant.get(o) == tenant for o in blob.pins):
                held = self._pinned_bytes(tenant)
                size = self._charged(len(blob.weight.data))  # (break37 F1: raw bytes let 2048 one-float weights,
                # charged the whole shared rest, pin 8 KiB against a half-rest cap and lock the other sharers out)
                if held + size > q.pinned_bytes:
                    raise ResourceExhausted(
                        f"tenant {tenant!r} over its pinned-weights quota: {held} + {size} bytes > {q.pinned_bytes}"
                    )
            self._owner_tenant[owner] = tenant
            blob.pins[owner] = blob.pins.get(owner, 0) + 1
            per_owner = self._owner_pins.setdefault(owner, {})
            per_owner[key] = per_owner.get(key, 0) + 1
            self._blobs.move_to_end(key)
            return blob.weight

    def unpin(self, sha256: str, owner: str, *, tenant: str = "") -> None:
        with self._lock:
            key = self._key(tenant, sha256)
            per_owner = self._owner_pins.get(owner, {})
            if key not in per_owner:
                return
            per_owner[key] -= 1
            if per_owner[key] == 0:
                del per_owner[key]
            blob = self._blobs.get(key)
            if blob is not None:
                blob.pins[owner] -= 1
                if blob.pins[owner] == 0:
                    del blob.pins[owner]
            if not per_owner:
                self._owner_pins.pop(owner, None)

    def unpin_all(self, owner: str) -> int:
        """Drop every pin of ``owner``; returns how many weights it had pinned."""
        with self._lock:
            per_owner = self._owner_pins.pop(owner, {})
            self._owner_tenant.pop(owner, None)
            for sha in per_owner:
                blob = self._blobs.get(sha)
                if blob is not None:
                    blob.pins.pop(owner, None)
            return len(per_owner)

    def is_pinned(self, sha256: str, *, tenant: str = "") -> bool:
        with self._lock:
            blob = self._blobs.get(self._key(tenant, sha256))
            return blob is not None and bool(blob.pins)

    # -- uploads -------------------------------------------------------------------------------------

    def begin_upload(
        self,
        tenant: str,
        sha256: str,
        total_bytes: int,
        *,
        dtype: str = "uint8",
        shape: tuple[int, ...] | None = None,
    ) -> Upload:
        """Start staging a weight. Charges ``total_bytes``, and at least ``min_weight_charge`` (the upload's own
        bookkeeping: break37 F4), to the tenant's staging unless the tenant already has it; the server-wide area is
        charged ``min_area_charge`` bytes now and the bytes beyond them as they arrive (:meth:`Upload.write`).
        Both are given back when the upload ends (:meth:`Upload.commit`, :meth:`Upload.abort`).

        ``dtype`` (a wire dtype name) and ``shape`` (None: ``(total_bytes,)`` of uint8 bytes) must account
        for exactly ``total_bytes`` (prod(shape) * itemsize); an upload of a weight the tenant already
        holds must declare that weight's byte size (its bytes are then counted and dropped). Raises
        InvalidArgument for either mismatch, an unknown dtype or a bad dimension; ResourceExhausted over
        the cache, the tenant's weight quota or its staging limit (:meth:`tenant_staging_limit`), a weight
        larger than the whole staging area, or with no room left in the area for the upload's floor.
        """
        if total_bytes < 0:
            raise InvalidArgument("total_bytes must be >= 0")
        shape = check_weight_size(sha256, total_bytes, dtype, shape)
        held = self.held_nbytes(tenant, sha256)
        if held is not None:
            if held != total_bytes:
                raise InvalidArgument(
                    f"weight {sha256[:12]} is held with {held} bytes; this upload declares {total_bytes}"
                )
            return Upload(self, tenant, sha256, total_bytes, dtype, shape, skip=True)
        quota = self._weight_quota(tenant)  # first: with reservations it is at most the cache (break31 F4)
        if quota is not None and total_bytes > quota:
            raise ResourceExhausted(
                f"weight {sha256[:12]} of {total_bytes} bytes exceeds the weight quota of tenant {tenant!r}: {quota} "
                "bytes (weight_mb)"
            )
        if total_bytes > self.capacity_bytes:
            raise ResourceExhausted(
                f"weight {sha256[:12]} of {total_bytes} bytes exceeds the cache ({self.capacity_bytes} bytes)"
            )
        if total_bytes > self.staging.capacity:
            raise ResourceExhausted(
                f"weight {sha256[:12]} of {total_bytes} bytes exceeds the staging area ({self.staging.capacity} bytes)"
            )
        charge = self._charged(total_bytes)
        with self._lock:
            try:
                self._reserve_tenant(tenant, charge)
            except ResourceExhausted as e:
                if charge == total_bytes:
                    raise
                raise ResourceExhausted(f"{e} (an upload in progress counts for at least {charge} bytes)") from None
        try:
            return Upload(self, tenant, sha256, total_bytes, dtype, shape, skip=False)
        except BaseException:
            with self._lock:
                self._release_tenant(tenant, charge)
            raise

    def held_nbytes(self, tenant: str, sha256: str) -> int | None:
        """Byte size of the weight if the tenant sees it, else None (no LRU or counter change)."""
        with self._lock:
            blob = self._blobs.get(self._key(tenant, sha256))
            return len(blob.weight.data) if blob is not None and tenant in blob.tenants else None

    def put(self, tenant: str, data: bytes | bytearray, *, sha256: str | None = None) -> CommitResult:
        """Store a whole weight at once (tests, tools). Verifies ``sha256`` when given."""
        sha = sha256 or hashlib.sha256(data).hexdigest()
        up = self.begin_upload(tenant, sha, len(data))
        try:
            up.write(0, data)
            return up.commit()
        finally:
            up.abort()

    def _commit(self, up: Upload, data: bytearray) -> CommitResult:
        size = len(data)
        n = self._charged(size)
        with self._lock:
            key = self._key(up.tenant, up.sha256)
            blob = self._blobs.get(key)
            if blob is not None and up.tenant in blob.tenants:
                self._blobs.move_to_end(key)
                return CommitResult(up.sha256, size, already_present=True)
            self._make_room_for_tenant(up.tenant, n)
            shared = self._shared_rest(up.tenant)
            if shared is not None:
                self._make_shared_room(up.tenant, n, shared, keep=key)
            if blob is None:
                self._make_room(n, up.tenant)
                blob = _Blob(StoredWeight(up.sha256, data, up.dtype, tuple(up.shape)))
                blob.domain = self.domain_of(up.tenant)
                self._blobs[key] = blob
                self._bytes_used += n
            else:
                self._blobs.move_to_end(key)
            blob.tenants.add(up.tenant)
            self._tenant_bytes[up.tenant] = self._tenant_bytes.get(up.tenant, 0) + n
            self._charged_total += n
            self._stats.commits += 1
            self._tcount(up.tenant).commits += 1
            return CommitResult(up.sha256, size, already_present=False)

    def _make_room(self, n: int, tenant: str) -> None:
        """Evict unpinned blobs until ``n`` more bytes of ``tenant``'s fit (lock held). Without isolation (one
        tenant): the least recently used first. With it (break31 F4): only what tenants hold past their own
        weight quota (a tokens file reloaded with a lower quota, or without the tenant), least recently used
        first; a tenant without a resolved quota (a store outside a server) may also evict its own domain's. The
        refusal then names no number but ``n``: the others' bytes are not the caller's to learn."""
        if self._bytes_used + n <= self.capacity_bytes:
            return
        if not self.isolated:
            freeable = sum(self._charged(len(b.weight.data)) for b in self._blobs.values() if not b.pins)
            if self._bytes_used - freeable + n > self.capacity_bytes:
                raise ResourceExhausted(
                    f"weight cache full: {self._bytes_used} bytes used, {self._bytes_used - freeable} pinned by "
                    f"open sessions, {n} more do not fit in {self.capacity_bytes}"
                )
            self._evict_lru(n, lambda _b: True)
            return
        self._trim_surplus(n)
        if self._bytes_used + n > self.capacity_bytes and self._weight_quota(tenant) is None:
            domain = self.domain_of(tenant)
            self._evict_lru(n, lambda b: b.domain == domain)
        if self._bytes_used + n > self.capacity_bytes:
            raise ResourceExhausted(
                f"weight cache full: no room for {n} more bytes of tenant {tenant!r} until weights held past a "
                "lowered or removed quota (a reloaded tokens file) are unpinned; other tenants' weights within "
                "their quotas are never evicted"
            )

    def _evict_lru(self, n: int, allowed: Callable[[_Blob], bool]) -> None:
        """Drop the least recently used unpinned blobs ``allowed`` passes until ``n`` more bytes fit (lock held)."""
        for key in list(self._blobs):
            if self._bytes_used + n <= self.capacity_bytes:
                return
            b = self._blobs[key]
            if not b.pins and allowed(b):
                self._drop_blob(key)

    def _trim_surplus(self, n: int) -> None:
        """Drop, least recently used first, the unpinned entries of tenants holding more than their weight quota
        (lock held), until ``n`` more bytes fit or none is over. A blob goes when its last entry does."""

        sharers = self._sharers()
        rest = self._shared_rest(next(iter(sharers))) if sharers else None
        fair = None  # sharers holding more than the rest (a reload shrank it): each one's fair share of it
        if rest is not None and sum(self._tenant_bytes[t] for t in sharers) > rest:
            fair = rest // len(sharers)

        def is_over(t: str) -> bool:
            quota = self._weight_quota(t)
            if fair is not None and t in sharers and self._tenant_bytes.get(t, 0) > fair:
                return True
            return quota is not None and self._tenant_bytes.get(t, 0) > quota

        over = {t for t in self._tenant_bytes if is_over(t)}
        if not over:
            return
        for key in list(self._blobs):
            if self._bytes_used + n <= self.capacity_bytes or not over:
                return
            blob = self._blobs[key]
            if blob.pins:
                continue
            for t in sorted(blob.tenants & over):
                self._drop_entry(t, key)
                if not is_over(t):
                    over.discard(t)
                if key not in self._blobs:
                    break

    def _sharers(self, tenant: str | None = None) -> set[str]:
        """The tenants without a reservation that hold weights (and ``tenant``), lock held."""
        out = {t for t, b in self._tenant_bytes.items() if b > 0 and self._shared_rest(t) is not None}
        if tenant is not None:
            out.add(tenant)
        return out

    def _make_shared_room(self, tenant: str, n: int, shared: int, keep: str = "") -> None:
        """Make room for ``n`` more bytes of ``tenant`` in the cache's shared rest (``shared`` bytes: what the
        reservations leave, ``edge_server.auth.resolve_weight_quotas``), lock held: while the sharers' bytes and
        ``n`` do not fit it, the least recently used unpinned entries of the other sharers holding more than a fair
        share (the rest over the sharers holding weights, the caller counted) go, then the caller's own. Nothing
        is dropped when that cannot make the room (the rest of it is pinned by open sessions or within the others'
        fair shares): ResourceExhausted, naming only the caller's numbers (break31 F4: nothing about the others'
        bytes), to be retried. The sharers' charged bytes stay within the rest, so a reservation always fits.
        ``keep``: the key being committed, whose entries stay (break36 F2: in a dedup group the weight being
        committed could be another member's oldest; dropping it deleted the blob under the commit: INTERNAL)."""
        if self._charged_total + n <= shared:  # all tenants' bytes fit with it, so the sharers' do (O(1), usual)
            return
        members = self._sharers(tenant)
        held = {t: self._tenant_bytes.get(t, 0) for t in members}
        used = sum(held.values())
        if used + n <= shared:
            return
        fair = shared // len(members)
        drops: list[tuple[str, str]] = []
        for own in (False, True):  # the others over their fair share first, then the caller's own
            for key, blob in self._blobs.items():
                if used + n <= shared:
                    break
                if blob.pins or key == keep:
                    continue
                size = self._charged(len(blob.weight.data))
                for t in sorted(blob.tenants & members):
                    if (t == tenant) if own else (t != tenant and held[t] > fair):
                        drops.append((t, key))
                        held[t] -= size
                        used -= size
        if used + n > shared:
            mine = self._tenant_bytes.get(tenant, 0)
            pinned = sum(self._charged(len(b.weight.data)) for b in self._blobs.values()
                         if tenant in b.tenants and b.pins)
            raise ResourceExhausted(
                f"weight of {n} bytes does not fit tenant {tenant!r}'s room in the weight cache now: it holds "
                f"{mine} bytes, {pinned} of them pinned by its open sessions, and the rest of the cache it shares is "
                "pinned by open sessions or within the other tenants' fair shares; retry later"
            )
        for t, key in drops:
            self._drop_entry(t, key)

    def _make_room_for_tenant(self, tenant: str, n: int) -> None:
        """Enforce the per-tenant quota by dropping the tenant's own LRU unpinned entries (lock held)."""
        quota = self._weight_quota(tenant)
        if quota is None or self._tenant_bytes.get(tenant, 0) + n <= quota:
            return
        for key in list(self._blobs):
            if self._tenant_bytes.get(tenant, 0) + n <= quota:
                return
            blob = self._blobs[key]
            if tenant in blob.tenants and not blob.pins:
                self._drop_entry(tenant, key)
        if n > quota:  # a quota lowered (reloaded tokens file) while this upload was in flight (break32 G5)
            raise ResourceExhausted(
                f"weight of {n} bytes exceeds the weight quota of tenant {tenant!r}: {quota} bytes (weight_mb)"
            )
        if self._tenant_bytes.get(tenant, 0) + n > quota:
            raise ResourceExhausted(
                f"weight of {n} bytes does not fit the weight quota of tenant {tenant!r}, {quota} bytes: "
                f"{self._tenant_bytes.get(tenant, 0)} bytes of its weights are pinned by open sessions"
            )

    def _drop_entry(self, tenant: str, key: str) -> None:
        blob = self._blobs[key]
        blob.tenants.discard(tenant)
        c = self._charged(len(blob.weight.data))
        self._tenant_bytes[tenant] -= c
        self._charged_total -= c
        self._stats.evictions += 1
        self._tcount(tenant).evictions += 1
        if not blob.tenants:
            del self._blobs[key]
            self._bytes_used -= self._charged(len(blob.weight.data))

    def _drop_blob(self, key: str) -> None:
        blob = self._blobs.pop(key)
        n = self._charged(len(blob.weight.data))
        for t in blob.tenants:
            self._tenant_bytes[t] -= n
            self._charged_total -= n
            self._tcount(t).evictions += 1
        self._bytes_used -= n
        self._stats.evictions += 1
        logger.debug("evicted weight %s (%d bytes)", blob.weight.sha256[:12], n)

    def _rejected(self, tenant: str) -> None:
        with self._lock:
            self._stats.rejected += 1
            self._tcount(tenant).rejected += 1

    # -- stats ---------------------------------------------------------------------------------------

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._tenant_bytes.get(tenant, 0)

    @property
    def bytes_used(self) -> int:
        return self._bytes_used

    def stats(self, tenant: str | None = None) -> StoreStats:
        """Counters of the whole store, or (``tenant``) of what that tenant holds and did: its bytes,
        entries and pinned bytes, its own hits/misses/evictions/commits/rejections, and no staging or
        capacity use of others (so nothing about other tenants can be read from it)."""
        if tenant is not None:
            return self._tenant_stats(tenant)
        with self._lock:
            s = self._stats
            return StoreStats(
                bytes_used=self._bytes_used,
                capacity_bytes=self.capacity_bytes,
                staging_bytes=self.staging.used,
                staging_capacity_bytes=self.staging.capacity,
                entries=sum(len(b.tenants) for b in self._blobs.values()),
                blobs=len(self._blobs),
                hits=s.hits,
                misses=s.misses,
                evictions=s.evictions,
                commits=s.commits,
                rejected=s.rejected,
                pinned_bytes=sum(self._charged(len(b.weight.data)) for b in self._blobs.values() if b.pins),
            )

    def tenants(self) -> set[str]:
        """Tenants that hold weights, stage data or have counters."""
        with self._lock:
            return set(self._tenant_bytes) | set(self._tstats) | set(self._tenant_staging)

    def _tenant_stats(self, tenant: str) -> StoreStats:
        with self._lock:
            s = self._tstats.get(tenant) or StoreStats()
            quota = self._weight_quota(tenant)
            mine = [b for b in self._blobs.values() if tenant in b.tenants]
            return StoreStats(
                bytes_used=self._tenant_bytes.get(tenant, 0),
                capacity_bytes=min(self.capacity_bytes, self.capacity_bytes if quota is None else quota),
                staging_bytes=self._tenant_staging.get(tenant, 0),
                staging_capacity_bytes=self.staging.capacity,
                entries=len(mine),
                blobs=len(mine),
                hits=s.hits,
                misses=s.misses,
                evictions=s.evictions,
                commits=s.commits,
                rejected=s.rejected,
                pinned_bytes=sum(self._charged(len(b.weight.data)) for b in mine if b.pins),
            )


def check_weight_size(sha256: str, total_bytes: int, dtype: str, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of an upload whose dtype/shape must give exactly ``total_bytes`` (None: raw bytes).
    Raises InvalidArgument (unknown dtype, bad dimension, size mismatch): the wire's own checks
    (``tensor_codec``), here for callers that do not come through the codec."""
    if shape is None:
        if dtype != "uint8":
            raise InvalidArgument(f"weight {sha256[:12]}: a {dtype} weight needs a shape")
        return (total_bytes,)
    dims = check_shape(shape)
    size = nbytes_of(dims, dtype_from_name(dtype))
    if size != total_bytes:
        raise InvalidArgument(
            f"weight {sha256[:12]}: shape {list(dims)[:16]} {dtype} is {size} bytes, the upload declares {total_bytes}"
        )
    return dims


class StagingAccount:
    """One tenant's view of the staging area (see :meth:`WeightStore.staging_for`), for a request's tensors (bytes):
    what the tenant declares is charged to its own staging at once (:meth:`declare`, ResourceExhausted over
    :meth:`WeightStore.tenant_staging_limit`), the server-wide area only as the bytes arrive (:meth:`reserve_area`,
    ResourceExhausted when it is full); :meth:`undeclare` and :meth:`release_area` give them back. A tensor counts
    for at least its bookkeeping in both (:meth:`declare_tensor`, break39 F1)."""

    def __init__(self, store: WeightStore, tenant: str) -> None:
        self.store = store
        self.tenant = tenant

    def declare(self, n: int) -> None:
        """Charge ``n`` declared bytes to the tenant only (not yet the server-wide area: :meth:`reserve_area`
        as they arrive). Raises ResourceExhausted over :meth:`WeightStore.tenant_staging_limit` or for more than
        the whole area (it could never arrive)."""
        if n > self.store.staging.capacity:
            raise ResourceExhausted(f"{n} bytes exceed the staging area ({self.store.staging.capacity} bytes)")
        with self.store._lock:
            self.store._reserve_tenant(self.tenant, n)

    def declare_tensor(self, n: int) -> tuple[int, int]:
        """Begin a request tensor of ``n`` bytes: charge the tenant ``n`` and at least ``store.min_weight_charge``
        (:meth:`declare`), and the server-wide area ``store.min_area_charge`` now for its bookkeeping (its assembler,
        then its tensor: 0.9 / 1.5 KiB measured for 4 bytes; its bytes are charged beyond it as they arrive). Returns
        (tenant bytes, area bytes) charged, for :meth:`undeclare` and :meth:`release_area` at its request's end.
        Raises ResourceExhausted as :meth:`declare`, or when the area is full (nothing is then held). Break39 F1: a
        tensor was charged its bytes only, and one session's 16 requests of 20,000 declared 4-byte inputs held +500
        MiB of a ``--memory-mb 1024`` server's RSS, charged 1.3 MB (a 0-byte one: nothing)."""
        staged = self.store._charged(n)
        self.declare(staged)
        area = self.store.min_area_charge
        try:
            self.reserve_area(area)
        except BaseException:
            self.undeclare(staged)
            raise
        return staged, area

    def undeclare(self, n: int) -> None:
        with self.store._lock:
            self.store._release_tenant(self.tenant, n)

    def reserve_area(self, n: int) -> None:
        """Charge ``n`` bytes that arrived to the server-wide area. Raises ResourceExhausted when it is full."""
        self.store.staging.reserve(n)

    def release_area(self, n: int) -> None:
        self.store.staging.release(n)


READ_STEP_BYTES = 256 << 10
""":meth:`Upload.write_from` charges and reads a chunk's bytes this many at a time."""


class Upload:
    """One weight being staged. Chunks arrive in order; :meth:`commit` verifies and publishes it.

    The tenant's staging is charged ``total_bytes`` (at least ``store.min_weight_charge``) at
    :meth:`WeightStore.begin_upload`; the server-wide staging area (``store.staging``) ``store.min_area_charge``
    bytes when it is made (its bookkeeping: break37 F4; ResourceExhausted when the area is full) and beyond that
    only as bytes arrive (``charged``): each write first reserves its bytes (ResourceExhausted when the area is
    full), so a client's declared-but-unsent bytes hold no memory.

    Always finish with :meth:`commit` or :meth:`abort` (``abort`` after ``commit`` is a no-op), e.g. in a
    ``finally``: that is what keeps a broken stream from leaving staging bytes behind.
    """

    def __init__(
        self,
        store: WeightStore,
        tenant: str,
        sha256: str,
        total_bytes: int,
        dtype: str,
        shape: tuple[int, ...],
        *,
        skip: bool,
    ) -> None:
        self.store = store
        self.tenant = tenant
        self.sha256 = sha256
        self.total_bytes = total_bytes
        self.dtype = dtype
        self.shape = shape
        self.skip = skip  # the tenant already has it: count bytes, store nothing
        self.received = 0
        self.charged = 0
        """Bytes of the server-wide staging area this upload holds (received, whole pages of a mapping; at least
        ``store.min_area_charge`` until it ends)."""
        self.tenant_charge = 0 if skip else store._charged(total_bytes)
        """Bytes of its tenant's staging this upload holds until it ends (:meth:`WeightStore.begin_upload`)."""
        self._map: mmap.mmap | None = None
        self._buf: memoryview | None = None  # the mapping's bytes (big uploads)
        self._grow: bytearray | None = None  # the bytes so far (small uploads)
        if not skip:
            floor = store.min_area_charge  # its bookkeeping, held from now (break37 F4, break39 F2)
            if floor:
                store.staging.reserve(floor)  # first: nothing else is held yet if the area is full
            self.charged = floor
            if total_bytes >= LAZY_MIN_BYTES:
                try:
                    self._map = mmap.mmap(-1, total_bytes, flags=mmap.MAP_PRIVATE,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError as e:  # e.g. a host that does not overcommit (vm.overcommit_memory 2)
                    store.staging.release(floor)
                    self.charged = 0
                    raise ResourceExhausted(f"weight {sha256[:12]}: no memory to map {total_bytes} bytes: {e}") from e
                self._buf = memoryview(self._map)
            else:
                self._grow = bytearray()
        self._hash = None if skip else hashlib.sha256()
        self._done = False

    @property
    def complete(self) -> bool:
        return self.received == self.total_bytes

    def _charge(self, end: int) -> None:
        """Reserve the server-wide staging for bytes up to ``end`` before they are written (whole pages of
        a mapping). Raises ResourceExhausted when the area is full."""
        if self.skip:
            return
        if self._map is not None:
            end = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, len(self._map))
        if end > self.charged:
            self.store.staging.reserve(end - self.charged)
            self.charged = end

    def _check(self, offset: int, n: int) -> None:
        if self._done:
            raise FailedPrecondition(f"upload of {self.sha256[:12]} already finished")
        if offset != self.received:
            raise InvalidArgument(
                f"weight {self.sha256[:12]}: chunk at offset {offset}, expected {self.received} (in order)"
            )
        if offset + n > self.total_bytes:
            raise InvalidArgument(f"weight {self.sha256[:12]}: chunk past the end ({self.total_bytes} bytes)")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Append a chunk at ``offset`` (must equal the bytes received so far). True when complete.
        Raises InvalidArgument (out of order, past the end), ResourceExhausted (the staging area is full),
        FailedPrecondition (already finished)."""
        n = len(data)
        self._check(offset, n)
        self._charge(offset + n)
        if self._buf is not None:
            self._buf[offset : offset + n] = data
        elif self._grow is not None:
            self._grow += data
        if self._hash is not None:
            self._hash.update(data)
        self.received += n
        return self.complete

    def write_from(self, offset: int, n: int, read_into: Callable[[memoryview], int], scratch: memoryview) -> bool:
        """Receive the next ``n`` bytes at ``offset`` straight into the staging buffer (no intermediate copy):
        ``read_into(view)`` fills a prefix of ``view`` and returns its length, 0 when the peer is gone
        (``socket.recv_into``). Bytes of a weight the tenant already holds go to ``scratch`` and are
        dropped. Same order/bounds checks as :meth:`write`; the staging area is charged ``READ_STEP_BYTES`` at a
        time before they are read (a frame's header declaring 4 MiB held 4 MiB before its bytes came: session 22);
        True when the weight is complete. Raises ConnectionError
        when ``read_into`` returns 0 (the caller aborts the upload), InvalidArgument, ResourceExhausted.
        """
        self._check(offset, n)
        start, end = offset, offset + n
        tmp: bytearray | None = None
        if self._buf is not None:
            target, base = self._buf, 0
        elif self._grow is not None:  # small: into a chunk-sized buffer, appended below
            tmp = bytearray(n)
            target, base = memoryview(tmp), offset
        else:
            target, base = None, 0
        try:
            while self.received < end:
                left = end - self.received
                if target is not None:  # charged a step at a time: a frame declared but not sent holds little
                    step = min(end, self.received + READ_STEP_BYTES)
                    self._charge(step)
                    view = target[self.received - base : step - base]
                else:
                    view = scratch[: min(len(scratch), left)]
                k = read_into(view)
                if not k:
                    raise ConnectionError(f"connection closed {left} bytes into a chunk of weight {self.sha256[:12]}")
                if self._hash is not None:
                    self._hash.update(view[:k])
                self.received += k
        finally:
            if tmp is not None and self._grow is not None:
                self._grow += tmp[: self.received - start]
        return self.complete

    def commit(self) -> CommitResult:
        """Verify the hash and publish the weight atomically. Raises WeightIntegrityError on mismatch."""
        if self._done:
            raise FailedPrecondition(f"upload of {self.sha256[:12]} already finished")
        if not self.complete:
            raise InvalidArgument(f"weight {self.sha256[:12]} incomplete: {self.received}/{self.total_bytes} bytes")
        if self.skip:
            self._done = True
            return CommitResult(self.sha256, self.total_bytes, already_present=True)
        digest = self._hash.hexdigest()  # type: ignore[union-attr]
        if digest != self.sha256:
            self._release()
            self.store._rejected(self.tenant)
            raise WeightIntegrityError(f"weight declared sha256 {self.sha256[:12]}.. hashes to {digest[:12]}..")
        if self._grow is not None:  # small: one aligned copy (the kernels read aligned bytes)
            data = aligned_buffer(self.total_bytes)
            data[:] = self._grow
        else:
            data = self._buf  # the mapping is the stored weight's memory from now on
            self._map = None
        try:
            result = self.store._commit(self, data)  # type: ignore[arg-type]
        finally:
            self._release()
        return result

    def abort(self) -> None:
        """Drop the partial data and give the staging bytes back. Idempotent."""
        if not self._done:
            self._release()
            if not self.skip:
                self.store._rejected(self.tenant)

    def _release(self) -> None:
        self._done = True
        self._hash = None
        self._grow = None
        if self._map is not None:  # aborted: unmap now (not at the next garbage collection)
            with contextlib.suppress(BufferError):  # a view still exported (a traceback's frame): freed with it
                if self._buf is not None:
                    self._buf.release()
                self._map.close()
            self._map = None
        self._buf = None
        if not self.skip:
            with self.store._lock:
                self.store._release_tenant(self.tenant, self.tenant_charge)
                self.store.staging.release(self.charged)
            self.charged = 0

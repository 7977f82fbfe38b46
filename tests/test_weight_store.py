"""WeightStore: content addressing, LRU under a byte cap, pinning, staging, tenants, concurrency."""

from __future__ import annotations

import contextlib
import hashlib
import threading

import pytest

from edge_server.errors import InvalidArgument, NotFound, ResourceExhausted
from edge_server.weight_store import ByteBudget, WeightIntegrityError, WeightStore


def blob(n: int, seed: int = 0) -> bytes:
    return bytes((seed * 31 + i) % 251 for i in range(n))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_chunked(store: WeightStore, tenant: str, data: bytes, chunk: int = 7, digest: str | None = None):
    up = store.begin_upload(tenant, digest or sha(data), len(data))
    try:
        for off in range(0, len(data), chunk):
            up.write(off, data[off : off + chunk])
        return up.commit()
    finally:
        up.abort()


def test_put_get_roundtrip_and_stats() -> None:
    s = WeightStore(1000)
    d = blob(100)
    r = upload_chunked(s, "a", d)
    assert r.sha256 == sha(d) and r.nbytes == 100 and not r.already_present
    w = s.get("a", sha(d))
    assert w is not None and bytes(w.data) == d
    assert s.get("a", "0" * 64) is None
    st = s.stats()
    assert (st.bytes_used, st.blobs, st.entries, st.commits, st.hits, st.misses) == (100, 1, 1, 1, 1, 1)
    assert st.staging_bytes == 0
    # uploading again: already present, nothing staged
    r2 = upload_chunked(s, "a", d)
    assert r2.already_present and s.stats().commits == 1 and s.staging.used == 0


def test_lru_eviction_under_cap() -> None:
    s = WeightStore(250)
    ds = [blob(100, i) for i in range(3)]
    s.put("a", ds[0])
    s.put("a", ds[1])
    assert s.query("a", [sha(ds[0])]) == [sha(ds[0])]  # touch 0: 1 is now the LRU
    s.put("a", ds[2])
    assert s.has("a", sha(ds[0])) and s.has("a", sha(ds[2]))
    assert not s.has("a", sha(ds[1]))
    st = s.stats()
    assert st.bytes_used == 200 and st.evictions == 1 and st.bytes_used <= st.capacity_bytes


def test_weight_bigger_than_cache_is_refused_upfront() -> None:
    s = WeightStore(50)
    with pytest.raises(ResourceExhausted):
        s.begin_upload("a", sha(blob(51)), 51)
    assert s.staging.used == 0


def test_pinned_weights_are_never_evicted() -> None:
    s = WeightStore(250)
    d0, d1, d2 = (blob(100, i) for i in range(3))
    s.put("a", d0)
    s.put("a", d1)
    s.pin("a", sha(d0), owner="sess1")
    s.put("a", d2)  # must evict d1 (LRU is d0 but pinned)
    assert s.has("a", sha(d0)) and not s.has("a", sha(d1)) and s.has("a", sha(d2))
    s.pin("a", sha(d2), owner="sess2")
    with pytest.raises(ResourceExhausted):
        s.put("a", blob(100, 9))  # everything pinned
    assert s.staging.used == 0 and s.stats().pinned_bytes == 200
    assert s.unpin_all("sess1") == 1
    s.put("a", blob(100, 9))  # now d0 can go
    assert not s.has("a", sha(d0)) and s.has("a", sha(d2))


def test_pin_counts_and_unpin() -> None:
    s = WeightStore(1000)
    d = blob(10)
    s.put("a", d)
    s.pin("a", sha(d), "x")
    s.pin("a", sha(d), "x")
    s.pin("a", sha(d), "y")
    s.unpin(sha(d), "x")
    assert s.is_pinned(sha(d))
    s.unpin(sha(d), "x")
    assert s.is_pinned(sha(d))
    s.unpin_all("y")
    assert not s.is_pinned(sha(d))
    with pytest.raises(NotFound):
        s.pin("b", sha(d), "z")  # another tenant does not see it


def test_hash_mismatch_rejected_and_nothing_visible() -> None:
    s = WeightStore(1000)
    d = blob(64)
    wrong = sha(b"something else")
    with pytest.raises(WeightIntegrityError) as ei:
        upload_chunked(s, "a", d, digest=wrong)
    assert isinstance(ei.value, InvalidArgument)
    assert not s.has("a", wrong) and s.stats().blobs == 0
    assert s.staging.used == 0 and s.stats().rejected == 1


def test_partial_upload_invisible_and_abort_frees_staging() -> None:
    s = WeightStore(1000, staging_bytes=500)
    d = blob(300)
    up = s.begin_upload("a", sha(d), len(d))
    up.write(0, d[:100])
    assert not s.has("a", sha(d)) and s.query("a", [sha(d)]) == []
    # the server-wide area holds what arrived, the tenant is charged what it declared (session 22)
    assert s.staging.used == 100 and s.stats("a").staging_bytes == 300
    with pytest.raises(InvalidArgument):
        up.commit()  # incomplete
    up.abort()  # the client went away
    assert s.staging.used == 0 and not s.has("a", sha(d)) and s.stats().blobs == 0


def test_out_of_order_and_overlong_chunks_rejected() -> None:
    s = WeightStore(1000)
    d = blob(20)
    up = s.begin_upload("a", sha(d), 20)
    with pytest.raises(InvalidArgument):
        up.write(5, d[5:10])
    up.write(0, d[:10])
    with pytest.raises(InvalidArgument):
        up.write(10, d[10:] + b"x")
    up.abort()
    assert s.staging.used == 0


def test_staging_budget_is_bounded() -> None:
    s = WeightStore(10_000, staging_bytes=250)
    a = s.begin_upload("a", sha(blob(200)), 200)
    a.write(0, blob(200))
    b = s.begin_upload("a", sha(blob(100, 1)), 100)
    with pytest.raises(ResourceExhausted, match="staging area full"):
        b.write(0, blob(100, 1))  # the bytes that arrive are charged, and refused when the area is full
    with pytest.raises(ResourceExhausted, match="exceeds the staging area"):
        s.begin_upload("a", sha(blob(300, 2)), 300)  # never fits: refused before any byte
    a.abort()
    b.write(0, blob(100, 1))
    b.abort()
    assert s.staging.used == 0 and s.staging.peak == 200 and s.stats("a").staging_bytes == 0


def test_tenants_share_content_but_not_visibility() -> None:
    s = WeightStore(1000)
    d = blob(100)
    s.put("a", d)
    assert not s.has("b", sha(d)) and s.query("b", [sha(d)]) == []
    assert s.get("b", sha(d)) is None
    r = s.put("b", d)  # b proves possession by uploading the bytes
    assert not r.already_present
    st = s.stats()
    assert st.blobs == 1 and st.entries == 2 and st.bytes_used == 100
    assert s.tenant_bytes("a") == 100 and s.tenant_bytes("b") == 100
    assert s.get("a", sha(d)).data is s.get("b", sha(d)).data  # one copy in memory


def test_tenant_quota_drops_own_lru_entries_only() -> None:
    s = WeightStore(10_000, tenant_quota_bytes=250)
    a0, a1, a2 = (blob(100, i) for i in range(3))
    s.put("a", a0)
    s.put("b", blob(100, 7))
    s.put("a", a1)
    s.put("a", a2)  # a is over quota: drops a0, b untouched
    assert not s.has("a", sha(a0)) and s.has("a", sha(a2)) and s.has("b", sha(blob(100, 7)))
    assert s.tenant_bytes("a") == 200


def test_byte_budget() -> None:
    b = ByteBudget(10)
    b.reserve(6)
    with pytest.raises(ResourceExhausted):
        b.reserve(5)
    b.release(6)
    b.reserve(10)
    assert b.used == 10


def test_concurrent_uploads_and_pins_keep_invariants() -> None:
    s = WeightStore(4000, staging_bytes=4000)
    datas = [blob(97 + i, i) for i in range(40)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i, d in enumerate(datas):
                if (i + k) % 3 == 0:
                    continue
                tenant = f"t{k % 2}"
                try:
                    upload_chunked(s, tenant, d, chunk=13)
                except ResourceExhausted:
                    continue  # staging or pinned-full under contention is allowed
                owner = f"w{k}"
                with contextlib.suppress(NotFound):  # evicted in between by another thread
                    s.pin(tenant, sha(d), owner)
                if i % 4 == 0:
                    s.unpin_all(owner)
            s.unpin_all(f"w{k}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    st = s.stats()
    assert st.bytes_used <= st.capacity_bytes
    assert st.staging_bytes == 0 and st.pinned_bytes == 0
    for sha_ in [sha(d) for d in datas]:
        w = s.get("t0", sha_) or s.get("t1", sha_)
        if w is not None:
            assert hashlib.sha256(w.data).hexdigest() == sha_
    held = sum(len(w.data) for w in (s.get("t0", sha(d)) or s.get("t1", sha(d)) for d in datas) if w)
    assert held == st.bytes_used


# ------------------------------------------------------------------------------------------------------
# session 22: declared-but-unsent bytes take no one's staging; one tenant never fills the area


def _quota_store(staging: int, tenant_staging_mb: int = 128) -> WeightStore:
    from edge_server.auth import Quota

    return WeightStore(1 << 30, staging_bytes=staging, quota_of=lambda _t: Quota(staging_mb=tenant_staging_mb))


def test_declared_but_unsent_bytes_hold_no_staging_area() -> None:
    """Tenant a declares a big weight and sends 1 MiB: the server-wide area holds that MiB (its pages),
    not the declared size, so tenant b's upload fits; the mapping's pages commit only when written."""
    MiB = 1 << 20
    s = _quota_store(128 * MiB)
    a = s.begin_upload("a", "a" * 64, 60 * MiB)
    a.write(0, b"\x01" * MiB)
    assert s.staging.used == MiB and s.stats("a").staging_bytes == 60 * MiB
    d = blob(40 * 1024) * 1024  # 40 MiB
    up = s.begin_upload("b", sha(d), len(d))
    for off in range(0, len(d), 4 * MiB):
        up.write(off, d[off : off + 4 * MiB])
    assert up.commit().nbytes == len(d)
    up.abort()
    w = s.get("b", sha(d))
    assert w is not None and bytes(w.data) == d and w.data.nbytes == len(d)
    a.abort()
    assert s.staging.used == 0 and s.stats("a").staging_bytes == 0 and s.stats("b").staging_bytes == 0


def test_one_tenant_stages_at_most_half_the_area() -> None:
    """With quotas, a tenant's staging (declared uploads and request tensors) is at most half the server's
    area, whatever its staging_mb: a tenant declaring the whole area is refused before any byte."""
    MiB = 1 << 20
    s = _quota_store(128 * MiB)
    assert s.tenant_staging_limit("a") == 64 * MiB
    with pytest.raises(ResourceExhausted, match="half the server's staging area"):
        s.begin_upload("a", "a" * 64, 128 * MiB)
    with pytest.raises(ResourceExhausted, match="half the server's staging area"):
        s.begin_upload("a", "a" * 64, 64 * MiB + 4)
    up = s.begin_upload("a", "a" * 64, 48 * MiB)
    with pytest.raises(ResourceExhausted, match="over its staging limit"):
        s.staging_for("a").declare(17 * MiB)  # a request tensor counts too
    s.staging_for("b").declare(64 * MiB)  # another tenant still has its half
    assert s.stats("b").staging_bytes == 64 * MiB and s.staging.used == 0  # declared: the area charges arrivals
    s.staging_for("b").undeclare(64 * MiB)
    up.abort()
    assert s.staging.used == 0 and s.stats("a").staging_bytes == 0
    small = _quota_store(128 * MiB, tenant_staging_mb=3)
    assert small.tenant_staging_limit("a") == 3 * MiB  # a smaller quota stays the limit


def test_big_upload_is_page_charged_and_matches_small_path() -> None:
    """A mapping-backed upload (>= LAZY_MIN_BYTES) is charged whole pages as its bytes arrive, a small one
    exactly its bytes; both commit the same bytes, 64-byte aligned, and free everything on abort."""
    import mmap

    from edge_server.weight_store import LAZY_MIN_BYTES

    s = WeightStore(1 << 30, staging_bytes=64 << 20)
    big = blob(4096) * ((LAZY_MIN_BYTES // 4096) + 3)
    up = s.begin_upload("a", sha(big), len(big))
    up.write(0, big[:10])
    assert s.staging.used == mmap.PAGESIZE
    up.write(10, big[10 : 3 * mmap.PAGESIZE + 1])
    assert s.staging.used == 4 * mmap.PAGESIZE
    up.write(3 * mmap.PAGESIZE + 1, big[3 * mmap.PAGESIZE + 1 :])
    up.commit()
    up.abort()
    assert s.staging.used == 0
    small = blob(5000, 3)
    upload_chunked(s, "a", small, chunk=999)
    for d in (big, small):
        w = s.get("a", sha(d))
        assert bytes(w.data) == d and s.staging.used == 0
        import torch

        assert torch.frombuffer(w.data, dtype=torch.uint8).data_ptr() % 64 == 0
    half = s.begin_upload("a", "c" * 64, 2 * LAZY_MIN_BYTES)
    half.write(0, b"\x00" * LAZY_MIN_BYTES)
    half.abort()
    assert s.staging.used == 0 and s.stats("a").staging_bytes == 0 and not s.has("a", "c" * 64)


def test_a_mapping_the_host_refuses_is_resource_exhausted(monkeypatch) -> None:
    """A host that does not overcommit (vm.overcommit_memory 2) may refuse an upload's mapping: the client gets
    RESOURCE_EXHAUSTED (before this, an OSError: INTERNAL) and the tenant's staging is given back."""
    import mmap

    from edge_server.auth import Quota
    from edge_server.tensor_codec import TensorAssembler

    def refuse(*_a, **_k):
        raise OSError(12, "Cannot allocate memory")

    s = WeightStore(1 << 30, staging_bytes=64 << 20, quota_of=lambda _t: Quota())
    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(ResourceExhausted, match="no memory to map"):
        s.begin_upload("a", "a" * 64, 8 << 20)
    assert s.stats("a").staging_bytes == 0 and s.staging.used == 0
    import torch

    with pytest.raises(ResourceExhausted, match="no memory to map"):
        TensorAssembler("x", torch.float32, (1 << 20,), 4 << 20, charge=lambda _n: None)


def test_shared_rest_random_walk_keeps_its_invariants() -> None:
    """Tenants sharing the cache's rest (``Quota.weight_shared``), two of them in one dedup group, one with a
    reservation, upload, pin and unpin at random with a minimum charge: after every step the running total equals
    the tenants' charged bytes (``_make_shared_room``'s O(1) early exit reads it), the sharers' bytes stay within the
    rest, the reserved tenant within its reservation, physical bytes within the capacity, and a refusal drops
    nothing."""
    import random

    from edge_server.auth import Quota

    rest, reserved = 40_000, 24_000
    quotas = {t: Quota(weight_mb=0, weight_shared=True) for t in ("a", "b", "c", "d")}
    quotas["r"] = Quota(weight_mb=0)

    store = WeightStore(rest + reserved, isolated=True, quota_of=quotas.__getitem__, min_weight_charge=2048,
                        domain_of=lambda t: "g" if t in ("a", "b") else t)
    # byte-sized room (weight_mb's MiB would need MiB-sized weights): the store's two quota readings, by tenant
    store._weight_quota = lambda t: reserved if t == "r" else rest
    store._shared_rest = lambda t: None if t == "r" else rest
    rng = random.Random(7)
    blobs = [bytes([i]) * rng.choice((100, 3000, 9000, 15000)) for i in range(40)]
    refused = 0
    for step in range(600):
        t = rng.choice("abcdr")
        data = rng.choice(blobs)
        before = dict(store._tenant_bytes)
        try:
            if rng.random() < 0.15:
                owner = f"s-{t}"
                with contextlib.suppress(NotFound, ResourceExhausted):
                    store.pin(t, hashlib.sha256(data).hexdigest(), owner)
                if rng.random() < 0.5:
                    store.unpin_all(owner)
            else:
                store.put(t, data)
        except ResourceExhausted:
            refused += 1
            assert store._tenant_bytes == before, step  # a refusal drops nothing
        tb = store._tenant_bytes
        assert store._charged_total == sum(tb.values()), step
        assert sum(v for k, v in tb.items() if k != "r") <= rest, step
        assert tb.get("r", 0) <= reserved and store._bytes_used <= rest + reserved, step
    assert refused and store.stats().evictions, (refused, store.stats())  # the walk met both

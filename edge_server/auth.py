"""Who is calling: bearer tokens -> tenants, their quotas and dedup groups (DESIGN.md §10, identity).

The operator's tokens file (``coinfer-edge serve --auth-tokens FILE``, re-read on SIGHUP)::

    {"tenants": {"alice": {"token": "s3cret", "quota": {"weight_mb": 512, "sessions": 4}},
                 "bob":   {"token_sha256": "<hex sha256 of bob's token>"},
                 "ops":   {"token_sha256": "...", "operator": true}},
     "groups":  {"lab": ["alice", "bob"]}}

A client sends ``authorization: Bearer <token>`` call metadata; the token names the tenant (never the
message body). ``operator: true`` tenants may read every tenant's Stats. Tenants of one group share
deduplicated weight storage (an upload of content another member holds costs no new bytes); tenants
of no group get a private namespace, so storage accounting tells nothing about other tenants.

Quota keys (all optional; defaults in :class:`Quota`): ``weight_mb`` (verified weights held: room of the
weight cache reserved for the tenant alone, see :func:`resolve_weight_quotas`),
``pinned_mb`` (weights pinned by its open sessions), ``staging_mb`` (partial uploads and request
tensors in flight), ``sessions`` (open at once), ``requests_in_flight`` (over all its sessions),
``compute_weight`` (its weight in the fair share of the compute workers; sessions share it),
``profile_cpu_s`` and ``profile_cpu_share`` (its ProfileGraph CPU budget: a bucket of CPU seconds and
its refill rate in CPU seconds per second, :mod:`edge_server.profile_budget`; default: the server's
``--profile-cpu-s`` / ``--profile-cpu-share``), ``slice_cpu_s`` and ``slice_cpu_share`` (the same for its
sessions' slice validations; ``--slice-cpu-s`` / ``--slice-cpu-share``). Each value must be in its range
(:mod:`edge_server.ranges`: e.g. ``compute_weight`` in [1e-3, 1e3], ``profile_cpu_s`` 0 or in [1e-3, 1e9],
``profile_cpu_share`` in [1e-6, 1e3]); a file with one outside it is refused naming the key.

No grpc here: :mod:`edge_server.interceptor` and the servicer use it (the interceptor records each call's
caller once, :func:`remember_caller`, for the handler to read).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

from edge_server.errors import PermissionDenied, Unauthenticated
from edge_server.ids import check_id
from edge_server.ranges import COMPUTE_WEIGHT, CPU_SECONDS, CPU_SHARE, QUOTA_INT

logger = logging.getLogger(__name__)

MiB = 1 << 20


class AuthConfigError(ValueError):
    """The tokens file is missing, unreadable or malformed (the message says where)."""


_FLOAT_KEYS = {"compute_weight": COMPUTE_WEIGHT, "profile_cpu_s": CPU_SECONDS, "profile_cpu_share": CPU_SHARE,
               "slice_cpu_s": CPU_SECONDS, "slice_cpu_share": CPU_SHARE}
"""The quota keys that are floats, and their ranges (the others: ``QUOTA_INT``, truncated to ints)."""


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-tenant limits (bytes are given in MiB in the tokens file)."""

    weight_mb: int | None = None
    """Verified weights it may hold, MiB: given in the file, room of the weight cache reserved for it alone
    (break31 F4). None in the file: the tenant shares the cache's unreserved rest with the other tenants without one
    (:func:`resolve_weight_quotas` sets it to that rest and ``weight_shared``, when the file is read against a cache:
    the server's tokens are; None stays only outside a server)."""
    weight_shared: bool = False
    """Set by :func:`resolve_weight_quotas`, never read from the file: ``weight_mb`` is the shared rest of the cache,
    of which the tenant keeps a fair share when others need room (``edge_server.weight_store``)."""
    pinned_mb: int = 256
    staging_mb: int = 128
    sessions: int = 8
    requests_in_flight: int = 32
    compute_weight: float = 1.0
    profile_cpu_s: float | None = None
    """ProfileGraph CPU budget (CPU seconds; 0: none); None: the server's ``--profile-cpu-s``."""
    profile_cpu_share: float | None = None
    """Refill of that budget (CPU seconds per second, > 0); None: the server's ``--profile-cpu-share``."""
    slice_cpu_s: float | None = None
    """Slice validation CPU budget of its sessions (CPU seconds; 0: none); None: the server's ``--slice-cpu-s``."""
    slice_cpu_share: float | None = None
    """Refill of that budget (CPU seconds per second, > 0); None: the server's ``--slice-cpu-share``."""

    @property
    def weight_bytes(self) -> int | None:
        """``weight_mb`` in bytes; None: not resolved against a cache (no bound of its own)."""
        return None if self.weight_mb is None else self.weight_mb * MiB

    @property
    def pinned_bytes(self) -> int:
        return self.pinned_mb * MiB

    @property
    def staging_bytes(self) -> int:
        return self.staging_mb * MiB

    @classmethod
    def from_dict(cls, d: object, where: str) -> Quota:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise AuthConfigError(f"{where}: quota must be an object")
        known = {f.name: f for f in fields(cls) if f.name != "weight_shared"}
        kw = {}
        for k, v in d.items():
            if k not in known:
                raise AuthConfigError(f"{where}: unknown quota key {k!r} (known: {', '.join(known)})")
            rng = _FLOAT_KEYS.get(k)
            try:
                x = (rng or QUOTA_INT).check(f"quota {k}", v)
            except ValueError as e:
                raise AuthConfigError(f"{where}: {e}") from None
            if rng is None and x != int(x):  # (break35 L1: weight_mb 0.5 became 0, silently, and 47.9 became 47)
                raise AuthConfigError(f"{where}: quota {k} must be a whole number, got {v!r}")
            kw[k] = x if rng is not None else int(x)
        return cls(**kw)


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    tenant: str
    operator: bool = False
    """May read every tenant's Stats."""
    domain: str = ""
    """Dedup domain of the weight store: ``group:NAME`` for a group member, ``tenant:NAME`` otherwise
    (``""``: the single shared domain of a server without authentication)."""
    quota: Quota | None = None
    """Its limits (None: none beyond the server-wide ones, as on a server without authentication)."""


def token_digest(token: str) -> str:
    """Lowercase hex sha256 of a token (what ``token_sha256`` holds)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenTable:
    """A parsed tokens file: token digest -> principal."""

    by_digest: dict[str, Principal]

    tenants: dict[str, Principal]
    """Tenant name -> principal (derived)."""

    @classmethod
    def parse(cls, doc: object, where: str = "tokens file", weight_capacity: int | None = None) -> TokenTable:
        """Raises AuthConfigError with the offending key for anything malformed. ``weight_capacity``: the weight
        cache's bytes, to resolve the tenants' ``weight_mb`` against (:func:`resolve_weight_quotas`; None: left as
        given, for tools that read a file without a server)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("tenants"), dict) or not doc["tenants"]:
            raise AuthConfigError(f'{where}: expected {{"tenants": {{NAME: {{"token": ...}}, ...}}}}')
        groups = doc.get("groups", {})
        if not isinstance(groups, dict):
            raise AuthConfigError(f"{where}: groups must be an object NAME -> [tenant, ...]")
        group_of: dict[str, str] = {}
        for g, members in groups.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise AuthConfigError(f"{where}: group {g!r} must be a list of tenant names")
            for m in members:
                if m in group_of:
                    raise AuthConfigError(f"{where}: tenant {m!r} is in two groups")
                if m not in doc["tenants"]:
                    raise AuthConfigError(f"{where}: group {g!r} names unknown tenant {m!r}")
                group_of[m] = g
        by_digest: dict[str, Principal] = {}
        for name, entry in doc["tenants"].items():
            w = f"{where}: tenant {name!r}"
            if not name or len(name) > 256 or not name.isprintable():
                raise AuthConfigError(f"{w}: name must be printable, 1-256 characters")
            if not isinstance(entry, dict):
                raise AuthConfigError(f"{w}: must be an object")
            unknown = set(entry) - {"token", "token_sha256", "quota", "operator"}
            if unknown:
                raise AuthConfigError(f"{w}: unknown key(s) {sorted(unknown)}")
            if ("token" in entry) == ("token_sha256" in entry):
                raise AuthConfigError(f"{w}: give exactly one of token, token_sha256")
            if "token" in entry:
                tok = entry["token"]
                if not isinstance(tok, str) or len(tok) < 8:
                    raise AuthConfigError(f"{w}: token must be a string of at least 8 characters")
                digest = token_digest(tok)
            else:
                digest = entry["token_sha256"]
                if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise AuthConfigError(f"{w}: token_sha256 must be 64 lowercase hex digits")
            if digest in by_digest:
                raise AuthConfigError(f"{w}: the same token as tenant {by_digest[digest].tenant!r}")
            operator = entry.get("operator", False)
            if not isinstance(operator, bool):
                raise AuthConfigError(f"{w}: operator must be true or false")
            domain = f"group:{group_of[name]}" if name in group_of else f"tenant:{name}"
            by_digest[digest] = Principal(name, operator, domain, Quota.from_dict(entry.get("quota"), w))
        if weight_capacity is not None:
            resolved = resolve_weight_quotas({p.tenant: p.quota for p in by_digest.values()}, weight_capacity, where)
            by_digest = {d: replace(p, quota=resolved[p.tenant]) for d, p in by_digest.items()}
        return cls(by_digest, {p.tenant: p for p in by_digest.values()})


def resolve_weight_quotas(quotas: dict[str, Quota | None], capacity_bytes: int, where: str) -> dict[str, Quota]:
    """Each tenant's ``weight_mb`` against the weight cache (break31 F4, revised in session 31): a tenant that gives
    ``weight_mb`` has that room reserved for it alone; the others share what those leave of the cache (the *shared
    rest*, whole MiB) and get ``weight_mb`` = the shared rest with ``weight_shared`` set. A shared tenant may fill the
    rest while there is room; when another shared tenant needs room, the weights of those holding more than a fair
    share (the rest over the shared tenants holding weights) go first, least recently used and unpinned
    (``edge_server.weight_store.WeightStore``), so idle weights lock nobody out and nobody within its fair share is
    evicted for another. With two or more sharers, a sharer's ``pinned_mb`` is at most half the rest (its open
    sessions' weights cannot be evicted: one sharer pinning the whole rest locked the others out, break36 F3).

    Session 30 divided the rest equally among every tenant of the file, whether it ever connected or not: the
    testbed's full grid, whose tokens file grows by a tenant per UE client (585 by its cold cells), had 7 MiB per
    tenant of a 4 GiB cache, and every upload of a weight over 7 MiB was refused (a deployment listing its devices
    in the file would be the same).

    Raises AuthConfigError (the server refuses to start; a reload keeps the current tokens) when the given
    ``weight_mb`` sum to more than the cache, or leave under 1 MiB to share while some tenant gives none."""
    cap_mb = capacity_bytes // MiB
    given = {t: q.weight_mb for t, q in quotas.items() if q is not None and q.weight_mb is not None}
    rest = sorted(t for t in quotas if t not in given)
    total = sum(given.values())
    if total > cap_mb:
        raise AuthConfigError(
            f"{where}: the tenants' weight_mb quotas sum to {total} MiB, more than the {cap_mb} MiB weight cache "
            "(--cache-mb): each quota is room reserved for its tenant alone; lower them or raise --cache-mb"
        )
    shared = cap_mb - total
    if rest and shared < 1:
        shown = ", ".join(repr(t) for t in rest[:8]) + (", ..." if len(rest) > 8 else "")
        raise AuthConfigError(
            f"{where}: {len(rest)} tenant(s) without weight_mb ({shown}) would share the {shared} MiB that the "
            "other tenants' weight_mb leave of the weight cache (--cache-mb), under 1 MiB; give them weight_mb "
            "(0: no weights) or raise --cache-mb"
        )
    logger.info(
        "weight quotas: %d tenant(s) with weight_mb (%d MiB reserved), %d sharing the other %d MiB of the %d MiB "
        "weight cache",
        len(given),
        total,
        len(rest),
        shared,
        cap_mb,
    )
    # with two or more sharers, none pins more than half the rest (break36 F3: at --memory-mb 1024 one tenant's
    # session pinned the whole 256 MiB rest, pinned_mb's default, and every other sharer was refused any upload
    # for as long as it stayed open)
    pin_cap = max(1, shared // 2) if len(rest) >= 2 else None

    def sharer(q: Quota | None) -> Quota:
        q = q or Quota()
        pinned = q.pinned_mb if pin_cap is None else min(q.pinned_mb, pin_cap)
        return replace(q, weight_mb=shared, weight_shared=True, pinned_mb=pinned)

    return {t: replace(q or Quota(), weight_mb=given[t]) if t in given else sharer(q) for t, q in quotas.items()}


class Authenticator:
    """Bearer tokens -> :class:`Principal`, from the operator's tokens file (thread-safe; :meth:`reload`
    swaps the table atomically and keeps the old one if the new file is bad)."""

    def __init__(self, path: str | Path, *, weight_capacity: int | None = None) -> None:
        """``weight_capacity``: the weight cache's bytes; the tenants' ``weight_mb`` are resolved against it at
        every read of the file (:func:`resolve_weight_quotas`: a file whose quotas over-commit it is refused, at
        start and at a reload alike). None: taken as given (tools and tests without a server)."""
        self.path = Path(path)
        self.weight_capacity = weight_capacity
        self._gone = Quota() if weight_capacity is None else Quota(weight_mb=0)
        """The limits of a tenant no longer in the file: with reservations, none of the cache (what it still
        holds is the first to go when room is short, ``WeightStore``)."""
        self._lock = threading.Lock()
        self._table = self._load()

    def _load(self) -> TokenTable:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as e:
            raise AuthConfigError(f"cannot read tokens file {self.path}: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:
            raise AuthConfigError(f"tokens file {self.path} is not valid JSON: {e}") from None
        return TokenTable.parse(doc, str(self.path), self.weight_capacity)

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). Returns False (and keeps the current tokens) if it is bad."""
        try:
            table = self._load()
        except AuthConfigError as e:
            logger.error("tokens file not reloaded, keeping the current tokens: %s", e)
            return False
        with self._lock:
            self._table = table
        logger.info("tokens file reloaded: %d tenant(s)", len(table.by_digest))
        return True

    @property
    def tenants(self) -> dict[str, Principal]:
        return self._table.tenants

    def domain_of(self, tenant: str) -> str:
        """The weight-store dedup domain of ``tenant`` (its group's, or its own)."""
        p = self._table.tenants.get(tenant)
        return p.domain if p is not None else f"tenant:{tenant}"

    def quota_of(self, tenant: str) -> Quota:
        """The limits of ``tenant`` (for a tenant no longer in the file: the defaults, and no weights under
        reservations)."""
        p = self._table.tenants.get(tenant)
        return p.quota if p is not None and p.quota is not None else self._gone

    def digest_of(self, authorization: str | None) -> str:
        """The sha256 of an ``authorization`` value's bearer token ("" if it has none)."""
        scheme, _, token = (authorization or "").partition(" ")
        return token_digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""

    def holds(self, tenant: str, digest: str) -> bool:
        """True if the current tokens file maps the token of sha256 ``digest`` to ``tenant``."""
        p = self._table.by_digest.get(digest)
        return p is not None and p.tenant == tenant

    def identify(self, authorization: str | None) -> tuple[Principal, str] | None:
        """The principal of an ``authorization`` metadata value and its token's sha256 (one hash), None if
        unknown."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_digest(token.strip())
        p = self._table.by_digest.get(digest)
        return None if p is None else (p, digest)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of an ``authorization`` metadata value (``Bearer <token>``), None if unknown."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._table.by_digest.get(token_digest(token.strip()))


def caller_of(auth: Authenticator | None, authorization: str | None, claimed_tenant: str, *,
              need_tenant: bool = True, principal: Principal | None = None) -> Principal:
    """Who is calling. With authentication (``auth``) the tenant comes from the bearer token (``authorization``,
    the call's metadata value): a message naming another tenant is PermissionDenied ("" means the token's tenant);
    without it (single-tenant mode, loopback or ``--insecure`` only: ``server.create_server``), the tenant is the
    one the message names (InvalidArgument if empty and ``need_tenant``, or not a valid id) and nobody is an
    operator: the names are labels of the one tenant, which sees the whole server as its own (Stats), and nothing
    more. Raises Unauthenticated if the token is unknown (the interceptor normally refused it already).
    ``principal``: the caller the interceptor already authenticated (:func:`remembered_caller`; with
    authentication only): ``authorization`` is then not read."""
    if auth is None:
        if need_tenant or claimed_tenant:
            check_id("tenant", claimed_tenant)
        return Principal(claimed_tenant)
    p = principal if principal is not None else auth.authenticate(authorization)
    if p is None:
        raise Unauthenticated("missing or unknown bearer token")
    if claimed_tenant and claimed_tenant != p.tenant:
        raise PermissionDenied(f"this token is tenant {p.tenant!r}; the message names another tenant")
    return p


def view_of(auth: Authenticator | None, who: Principal) -> str | None:
    """The tenant whose part of the server ``who`` may see (its sessions, weights, counters); None: the whole
    server (an operator token, or any caller without authentication)."""
    return None if auth is None or who.operator else who.tenant


_CALLER: contextvars.ContextVar[tuple[object, Principal, str] | None] = contextvars.ContextVar(
    "coinfer_caller", default=None)


def remember_caller(principal: Principal, digest: str) -> None:
    """Record the current call's authenticated caller (its principal and token digest) for its handler: the
    authentication interceptor (``edge_server.interceptor``) calls it, and the call gate's admission and the
    servicer read it (:func:`remembered_caller`) instead of hashing the token again. grpc.aio runs a server
    interceptor and the call's handler in one task (grpc 1.85, checked by tests/test_attack18.py); the record
    names that task, so a handler elsewhere finds nothing and authenticates itself."""
    _CALLER.set((asyncio.current_task(), principal, digest))


def remembered_caller() -> tuple[Principal, str] | None:
    """The (principal, token digest) :func:`remember_caller` recorded for the current task's call, else None."""
    found = _CALLER.get()
    if found is None or found[0] is not asyncio.current_task():
        return None
    return found[1], found[2]


def authorization_of(metadata) -> str | None:
    """The ``authorization`` value of gRPC invocation metadata (a sequence of (key, value))."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None

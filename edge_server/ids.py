"""Client-chosen identifiers: validation, and a bounded memory of ids already used."""

from __future__ import annotations

import collections

from edge_server.errors import InvalidArgument

MAX_ID_LEN = 256
"""Longest tenant, model, session or slice id accepted (characters)."""


def check_id(what: str, value: str, *, allow_empty: bool = False) -> str:
    """Return ``value`` if it is a usable id; raises InvalidArgument (empty, too long, not printable)."""
    if not value and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_ID_LEN or not value.isprintable():
        raise InvalidArgument(f"{what} must be printable and at most {MAX_ID_LEN} characters")
    return value


class RecentIds:
    """A set that keeps only the ``limit`` most recently added members."""

    def __init__(self, limit: int):
        self.limit = limit
        self._set: set[int] = set()
        self._order: collections.deque[int] = collections.deque()

    def add(self, x: int) -> None:
        if x in self._set:
            return
        self._set.add(x)
        self._order.append(x)
        if len(self._order) > self.limit:
            self._set.discard(self._order.popleft())

    def __contains__(self, x: object) -> bool:
        return x in self._set

    def __len__(self) -> int:
        return len(self._set)

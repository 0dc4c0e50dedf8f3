"""`open_store`: the state store a URL names."""

from __future__ import annotations

from coordinator.store.interface import ACCEPTED_URLS, StateStore, StoreError
from coordinator.store.redis_store import RedisStore
from coordinator.store.sqlite_store import SQLiteStore


def open_store(url: str) -> StateStore:
    """Open the store a URL names (see `ACCEPTED_URLS`); a bare path means an SQLite file.

    Raises StoreError for a URL of another form, a missing directory, or a Redis that does not
    answer.
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"empty state store URL {url!r}; expected {ACCEPTED_URLS}")
    if url in ("sqlite://:memory:", "sqlite:///:memory:"):
        return SQLiteStore(":memory:")
    if url.startswith("sqlite:///"):
        # As in SQLAlchemy: all after the third slash is the path, so a fourth makes it absolute.
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith("sqlite:"):
        raise StoreError(f"bad SQLite URL {url!r}: put three slashes before the path")
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url)
    if "://" in url:
        raise StoreError(f"unsupported state store URL {url!r}; expected {ACCEPTED_URLS}")
    return SQLiteStore(url)

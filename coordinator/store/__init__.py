"""The coordinator's durable state: jobs, plans, workers, metrics, checkpoints and blobs.

One interface, `StateStore` (`interface`), with two implementations: `SQLiteStore`
(`sqlite_store`, the embedded default, stdlib only) and `RedisStore` (`redis_store`, needs
the `redis` package, imported only when used). `open_store(url)` (`urls`) picks one from a
URL. See `interface` for the guarantees every store gives.
"""

from coordinator.store.interface import ACCEPTED_URLS, StateStore, StoreError
from coordinator.store.redis_store import RedisStore
from coordinator.store.sqlite_store import SQLiteStore
from coordinator.store.urls import open_store

__all__ = ["ACCEPTED_URLS", "RedisStore", "SQLiteStore", "StateStore", "StoreError", "open_store"]

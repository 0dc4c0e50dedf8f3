"""A dataset in the coordinator's store (`coordinator.datasets`, over a real SQLite file) and
in a worker's disk cache (`worker.dataset_cache`): chunks stored only under their own hash,
a manifest only once every chunk is there, puts that repeat store nothing, the size bound,
and a cache that checks every chunk, drops a damaged copy and fetches nothing after a
restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from coordinator.datasets import DatasetNotFound, DatasetRefused, Datasets
from coordinator.store import open_store
from coordinator.store.interface import StateStore
from opdag.data import DataError
from opdag.data.formats import Prepared, read_dataset
from opdag.data.manifest import CHUNK_BYTES
from worker.dataset_cache import DatasetCache

pytestmark = pytest.mark.unit


class StoreFetcher:
    """What the coordinator serves a worker (`GetDatasetManifest`, `GetDatasetChunk`), read
    straight from its store; counts the chunks asked for."""

    def __init__(self, datasets: Datasets) -> None:
        self.datasets = datasets
        self.chunks_asked = 0

    async def manifest(self, dataset_sha: str) -> bytes:
        return (await self.datasets.manifest(dataset_sha)).to_json()

    async def chunk(self, dataset_sha: str, index: int) -> bytes:
        self.chunks_asked += 1
        return (await self.datasets.chunk(dataset_sha, index))[1]


def three_chunks(tmp_path: Path) -> Prepared:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50_000, (3 * CHUNK_BYTES) // 2 - 100).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    p = read_dataset(tmp_path / "ids.npy", name="ids")
    assert len(p.manifest.chunks) == 3
    return p


async def put(datasets: Datasets, p: Prepared) -> int:
    """Put `p` as the CLI does; returns the chunks sent."""
    m = p.manifest
    missing = await datasets.missing(m.total_bytes, [sha for sha, _ in m.chunks])
    for index, (sha, _) in enumerate(m.chunks):
        if sha in missing:
            data = p.stream[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
            await datasets.put_chunk(sha, data, m.total_bytes)
    await datasets.put_manifest(m.to_json())
    return len(missing)


def blob_keys(store: StateStore) -> list[str]:
    db = store._conn  # type: ignore[attr-defined]  # the SQLite store's own table
    return sorted(k for (k,) in db.execute("SELECT key FROM blobs WHERE key LIKE 'dataset/%'"))


def test_the_store_takes_chunks_by_their_hash_and_a_manifest_once_complete(
    tmp_path: Path,
) -> None:
    p = three_chunks(tmp_path)
    m = p.manifest

    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            datasets = Datasets(store)
            first = p.stream[:CHUNK_BYTES]
            with pytest.raises(DatasetRefused, match="its bytes hash to"):
                await datasets.put_chunk(m.chunks[1][0], first, m.total_bytes)
            with pytest.raises(DatasetRefused, match=r"chunk 0 \(\w+\) is not stored"):
                await datasets.put_manifest(m.to_json())
            assert blob_keys(store) == []
            assert await put(datasets, p) == 3
            keys = blob_keys(store)
            assert len(keys) == 5  # three chunks, the manifest, the name
            assert await put(datasets, p) == 0  # again: nothing sent, nothing new
            assert blob_keys(store) == keys
            assert (await datasets.resolve("ids")).sha256 == m.sha256
            sha, data = await datasets.chunk(m.sha256, 2)
            assert (sha, data) == (m.chunks[2][0], p.stream[2 * CHUNK_BYTES :])
            with pytest.raises(DatasetNotFound, match="no dataset 'other'"):
                await datasets.resolve("other")
            small = Datasets(store, max_bytes=CHUNK_BYTES)
            with pytest.raises(
                DatasetRefused, match=f"exceed this coordinator's bound of {CHUNK_BYTES}"
            ):
                await small.missing(m.total_bytes, [s for s, _ in m.chunks])

    asyncio.run(run())


def test_the_worker_cache_checks_every_chunk_and_survives_a_restart(tmp_path: Path) -> None:
    p = three_chunks(tmp_path)
    m = p.manifest

    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            datasets = Datasets(store)
            await put(datasets, p)
            fetcher = StoreFetcher(datasets)
            cache = DatasetCache(tmp_path / "cache", fetcher)
            dataset = await cache.ensure(m.sha256, [0, 2])  # only the chunks asked for
            assert fetcher.chunks_asked == 2
            assert dataset.read(0, 100) == p.stream[:100]
            assert not (tmp_path / "cache" / "chunks" / m.chunks[1][0]).exists()
            # A restarted worker (a new cache on the same directory) fetches nothing.
            again = DatasetCache(tmp_path / "cache", StoreFetcher(datasets))
            await again.ensure(m.sha256, [0, 2])
            assert again.fetched == 0
            # A damaged copy on disk is dropped and fetched again; reading it is refused.
            path = tmp_path / "cache" / "chunks" / m.chunks[2][0]
            path.write_bytes(b"\0" * 10)
            with pytest.raises(DataError, match=r"chunk 2 \(\w+\) refused: its bytes hash to"):
                dataset.read(2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 10)
            await again.ensure(m.sha256, [2])
            assert again.fetched == 1 and path.read_bytes() == p.stream[2 * CHUNK_BYTES :]
            # A chunk damaged in the store is refused by the worker, and nothing is cached.
            store.put_blob(f"dataset/chunk/{m.chunks[1][0]}", b"garbage")
            with pytest.raises(DataError, match=r"chunk 1 \(\w+\) refused"):
                await again.ensure(m.sha256, [1])
            assert not (tmp_path / "cache" / "chunks" / m.chunks[1][0]).exists()

    asyncio.run(run())

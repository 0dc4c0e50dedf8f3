"""A worker's disk cache of users' datasets: the chunks stage 0 needs, each checked by hash.

`open` reads the manifest the plan's fingerprint names (its SHA-256 must be that
fingerprint), works out which chunks the stage's steps read (`chunks_for_steps`), and fetches
those the cache lacks from the coordinator. Every chunk is checked against the SHA-256 the
manifest gives it before it is used: one fetched that does not match is refused with an
error naming it (nothing is written, the stage is not loaded); one in the cache that does
not match (damaged on disk) is dropped and fetched again. A restarted worker finds its
chunks in the cache and fetches nothing.

Layout under the cache directory: `manifests/{sha}.json` and `chunks/{sha}`, each written
to a temporary file and renamed, so workers sharing a directory never read half a file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from opdag.data import DataError
from opdag.data.dataset import StoredDataset, dataset_source
from opdag.data.manifest import Manifest, sha256_hex, verified_chunk
from worker.stage_plan import StagePlan

log = logging.getLogger("archipelago.worker")

CACHE_ENV = "ARCHIPELAGO_DATA_CACHE"


def default_cache_dir() -> Path:
    """$ARCHIPELAGO_DATA_CACHE, else ~/.cache/archipelago/datasets."""
    given = os.environ.get(CACHE_ENV)
    return Path(given) if given else Path.home() / ".cache" / "archipelago" / "datasets"


class Fetcher(Protocol):
    async def manifest(self, dataset_sha: str) -> bytes: ...

    async def chunk(self, dataset_sha: str, index: int) -> bytes: ...


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class DatasetCache:
    """The chunks of users' datasets on this worker's disk, under `root`."""

    def __init__(self, root: Path, fetcher: Fetcher) -> None:
        self.root = root
        self.fetcher = fetcher
        self.fetched = 0  # chunks fetched from the coordinator (a restart fetches none)

    def _chunk_path(self, sha: str) -> Path:
        return self.root / "chunks" / sha

    async def manifest(self, dataset_sha: str) -> Manifest:
        """The manifest whose SHA-256 is `dataset_sha`, from the cache or the coordinator."""
        path = self.root / "manifests" / f"{dataset_sha}.json"
        raw = await asyncio.to_thread(_read, path)
        if raw is None or sha256_hex(raw) != dataset_sha:
            raw = await self.fetcher.manifest(dataset_sha)
            if sha256_hex(raw) != dataset_sha:
                raise DataError(
                    f"dataset {dataset_sha[:12]}: the manifest sent does not hash to it"
                )
            await asyncio.to_thread(_write, path, raw)
        manifest = Manifest.from_json(raw)
        if manifest.to_json() != raw:
            raise DataError(f"dataset {dataset_sha[:12]}: the manifest is not in canonical form")
        return manifest

    async def _ensure(self, dataset_sha: str, manifest: Manifest, index: int) -> None:
        sha = manifest.chunks[index][0]
        path = self._chunk_path(sha)
        cached = await asyncio.to_thread(_read, path)
        if cached is not None:
            try:
                verified_chunk(manifest, index, cached)
                return
            except DataError as e:
                log.warning("%s: the cached copy is dropped and fetched again", e)
                await asyncio.to_thread(path.unlink, missing_ok=True)
        data = await self.fetcher.chunk(dataset_sha, index)
        verified_chunk(manifest, index, data)  # refused: nothing written, the stage fails
        await asyncio.to_thread(_write, path, data)
        self.fetched += 1

    def _reader(self, manifest: Manifest) -> StoredDataset:
        def read(index: int) -> bytes:
            return verified_chunk(
                manifest, index, _read(self._chunk_path(manifest.chunks[index][0]))
            )

        return StoredDataset(manifest, read)

    async def ensure(self, dataset_sha: str, indices: Iterable[int]) -> StoredDataset:
        """The dataset `dataset_sha`, with chunks `indices` in the cache and checked."""
        manifest = await self.manifest(dataset_sha)
        for index in sorted(set(indices)):
            if not 0 <= index < len(manifest.chunks):
                raise DataError(f"dataset {manifest.name!r} has no chunk {index}")
            await self._ensure(dataset_sha, manifest, index)
        return self._reader(manifest)

    async def open(self, plan: StagePlan) -> StoredDataset:
        """The plan's dataset, with every chunk its steps read in the cache and checked."""
        dataset_sha = plan.fingerprint
        manifest = await self.manifest(dataset_sha)
        if manifest.name != plan.data.dataset:
            raise DataError(
                f"dataset {dataset_sha[:12]} is {manifest.name!r}, not {plan.data.dataset!r}"
            )
        source = dataset_source(plan.data, self._reader(manifest), context=plan.context)
        needed = await asyncio.to_thread(source.chunks_for_steps, plan.start_step, plan.total_steps)
        dataset = await self.ensure(dataset_sha, needed)
        log.info(
            "dataset %s (%s): %d of %d chunks needed, %d fetched so far",
            manifest.name,
            dataset_sha[:12],
            len(needed),
            len(manifest.chunks),
            self.fetched,
        )
        return dataset

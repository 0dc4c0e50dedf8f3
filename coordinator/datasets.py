"""Users' own datasets in the coordinator's store: content-addressed chunks and manifests.

`archipelago data put` asks which chunks are missing (`missing`), sends those (`put_chunk`:
each one's SHA-256 is checked here, so the store only ever holds a chunk under its own
hash), then the manifest (`put_manifest`: it must parse, name only stored chunks, and keep
within the size bound); the manifest is stored under its own SHA-256 and the dataset's name
points at it. Putting the same content again stores nothing new.

A job that names a dataset is pinned at submission to the manifest its name points at then
(`resolve`, whose SHA-256 becomes the job's data fingerprint), after `check_dataset_fits`
found that the dataset feeds the job's model. Stage-0 workers read the manifest and chunks
by that SHA-256 (`manifest`, `chunk`) and check every chunk's hash themselves.

Store keys: `dataset/chunk/{sha}`, `dataset/manifest/{sha}`, `dataset/name/{name}`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from coordinator.limits import DEFAULT_MAX_DATASET_BYTES
from coordinator.store.interface import StateStore
from opdag.data import DataError
from opdag.data.dataset import StoredDataset, check_fits
from opdag.data.manifest import (
    CHUNK_BYTES,
    Manifest,
    check_dataset_name,
    sha256_hex,
    verified_chunk,
)
from opdag.ir import Graph, dtype_of

if TYPE_CHECKING:
    from coordinator.job_record import Job

_SHA_CHARS = 64


class DatasetRefused(DataError):
    """A dataset (or a chunk of one) is refused: too big, malformed, or incomplete."""


class DatasetNotFound(DataError):
    """No dataset (or chunk) by that name or hash."""


def _chunk_key(sha: str) -> str:
    return f"dataset/chunk/{sha}"


def _manifest_key(sha: str) -> str:
    return f"dataset/manifest/{sha}"


def _name_key(name: str) -> str:
    return f"dataset/name/{name}"


def _check_sha(sha: str, what: str) -> str:
    if len(sha) != _SHA_CHARS or any(c not in "0123456789abcdef" for c in sha):
        raise DatasetRefused(f"{what} {sha[:80]!r} is not a SHA-256 in lower-case hex")
    return sha


class Datasets:
    """The datasets of one coordinator's store (every store call off the event loop)."""

    def __init__(self, store: StateStore, max_bytes: int = DEFAULT_MAX_DATASET_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes

    def _check_size(self, dataset_bytes: int) -> None:
        if dataset_bytes > self.max_bytes:
            raise DatasetRefused(
                f"dataset refused: {dataset_bytes} bytes exceed this coordinator's bound of "
                f"{self.max_bytes} (--max-dataset-mb)"
            )

    async def missing(self, dataset_bytes: int, shas: list[str]) -> list[str]:
        """Of `shas`, those the store holds no chunk of (in the order given, once each)."""
        self._check_size(dataset_bytes)
        if len(shas) > self.max_bytes // CHUNK_BYTES + 1:
            raise DatasetRefused(f"{len(shas)} chunks are more than the size bound allows")
        out: list[str] = []
        for sha in dict.fromkeys(shas):
            _check_sha(sha, "chunk")
            if not await asyncio.to_thread(self.store.get_blob, _chunk_key(sha)):
                out.append(sha)
        return out

    async def put_chunk(self, sha: str, data: bytes, dataset_bytes: int) -> None:
        """Store one chunk under its SHA-256, after checking that hash and the bounds."""
        self._check_size(dataset_bytes)
        _check_sha(sha, "chunk")
        if not 0 < len(data) <= CHUNK_BYTES:
            raise DatasetRefused(f"chunk {sha[:12]}: {len(data)} bytes, not 1 to {CHUNK_BYTES}")
        actual = sha256_hex(data)
        if actual != sha:
            raise DatasetRefused(f"chunk {sha[:12]} refused: its bytes hash to {actual[:12]}")
        await asyncio.to_thread(self.store.put_blob, _chunk_key(sha), data)

    async def put_manifest(self, raw: bytes) -> Manifest:
        """Store a dataset's manifest (and point its name at it) once every chunk it names is
        stored; returns it."""
        manifest = Manifest.from_json(raw)
        self._check_size(manifest.total_bytes)
        for index, (sha, _) in enumerate(manifest.chunks):
            if not await asyncio.to_thread(self.store.get_blob, _chunk_key(sha)):
                raise DatasetRefused(f"dataset refused: chunk {index} ({sha[:12]}) is not stored")
        sha = manifest.sha256
        await asyncio.to_thread(self.store.put_blob, _manifest_key(sha), manifest.to_json())
        await asyncio.to_thread(self.store.put_blob, _name_key(manifest.name), sha.encode())
        return manifest

    async def resolve(self, name: str) -> Manifest:
        """The manifest the dataset `name` points at now."""
        check_dataset_name(name)
        sha = await asyncio.to_thread(self.store.get_blob, _name_key(name))
        if not sha:
            raise DatasetNotFound(
                f"data.dataset: no dataset {name!r} on this coordinator (put it with "
                "`archipelago data put FILE --name NAME`)"
            )
        return await self.manifest(sha.decode())

    async def manifest(self, sha: str) -> Manifest:
        """The manifest whose SHA-256 is `sha`."""
        _check_sha(sha, "dataset")
        raw = await asyncio.to_thread(self.store.get_blob, _manifest_key(sha))
        if not raw:
            raise DatasetNotFound(f"no dataset manifest {sha[:12]}")
        return Manifest.from_json(raw)

    async def chunk(self, dataset_sha: str, index: int) -> tuple[str, bytes]:
        """Chunk `index` of the dataset `dataset_sha` (its SHA-256 and bytes, as stored: the
        reader checks the hash, so a chunk damaged in the store is caught where it is used)."""
        manifest = await self.manifest(dataset_sha)
        if not 0 <= index < len(manifest.chunks):
            raise DatasetNotFound(f"dataset {manifest.name!r} has no chunk {index}")
        sha = manifest.chunks[index][0]
        data = await asyncio.to_thread(self.store.get_blob, _chunk_key(sha))
        if data is None:
            raise DatasetNotFound(f"chunk {index} of dataset {manifest.name!r} is not stored")
        return sha, data

    def reader(self, manifest: Manifest) -> StoredDataset:
        """The dataset read from the store with checked hashes, for code running in a thread
        (the coordinator's validation; the store's calls run in threads anyway)."""

        def read(index: int) -> bytes:
            data = self.store.get_blob(_chunk_key(manifest.chunks[index][0]))
            return verified_chunk(manifest, index, data)

        return StoredDataset(manifest, read)


def check_reader(jobs: Iterable[Job], worker_id: str, dataset_sha: str) -> None:
    """PermissionError unless worker `worker_id` runs stage 0 of a job's current plan whose
    data is the dataset `dataset_sha`: only those read a dataset."""
    for job in jobs:
        if job.fingerprint != dataset_sha or not job.spec.data.dataset or job.plan is None:
            continue
        if any(p.stage == 0 and p.worker_id == worker_id for p in job.plan.placements):
            return
    raise PermissionError(
        f"worker {worker_id} runs stage 0 of no job reading dataset {dataset_sha[:12]}"
    )


def graph_example(graph: Graph) -> dict[str, torch.Tensor]:
    """A batch (on the meta device) shaped and typed as the data inputs of a captured
    model's `graph`, for `check_dataset_fits`."""
    out = {}
    for name in graph.inputs:
        meta = graph.node(name).meta
        if meta is not None:
            out[name] = torch.empty(meta.shape, dtype=dtype_of(meta.dtype), device="meta")
    return out


def check_dataset_fits(
    manifest: Manifest,
    example: dict[str, torch.Tensor],
    *,
    vocab: int | None,
    context: int | None,
    below: dict[str, int] | None = None,
) -> None:
    """The submission's check: DatasetRefused (one line, `data.dataset: ...`) unless the
    dataset feeds the model whose data inputs look like `example`."""
    try:
        check_fits(manifest, example, vocab=vocab, context=context, below=below)
    except DataError as e:
        raise DatasetRefused(f"data.dataset: {e}") from None


__all__ = [
    "DEFAULT_MAX_DATASET_BYTES",
    "DatasetNotFound",
    "DatasetRefused",
    "Datasets",
    "check_dataset_fits",
]

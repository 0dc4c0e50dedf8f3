"""The coordinator's wire boundary for users' own datasets (`coordinator.datasets`).

Requests are read into plain values with their sizes bounded here; what they mean (hashes,
the manifest's fields, the size bound) is checked by `coordinator.datasets`.
"""

from __future__ import annotations

from opdag.data import DataError
from opdag.data.manifest import CHUNK_BYTES, MAX_MANIFEST_BYTES, Manifest
from proto import coordinator_pb2

DatasetChunksQuery = coordinator_pb2.DatasetChunksQuery
DatasetChunksMissing = coordinator_pb2.DatasetChunksMissing
DatasetChunk = coordinator_pb2.DatasetChunk
DatasetManifest = coordinator_pb2.DatasetManifest
DatasetInfo = coordinator_pb2.DatasetInfo
DatasetRequest = coordinator_pb2.DatasetRequest
DatasetChunkRequest = coordinator_pb2.DatasetChunkRequest

# The most chunks one query may name (a 64 GiB dataset's): the size bound refuses sooner.
MAX_QUERY_CHUNKS = 1 << 16


def _sha(value: str, what: str) -> str:
    if len(value) != 64:
        raise DataError(f"{what} {value[:80]!r} is not a SHA-256 in hex")
    return value


def chunks_query_from_pb(q: DatasetChunksQuery) -> tuple[int, list[str]]:
    if len(q.sha256) > MAX_QUERY_CHUNKS:
        raise DataError(f"{len(q.sha256)} chunks in one query exceed {MAX_QUERY_CHUNKS}")
    return int(q.dataset_bytes), [_sha(s, "chunk") for s in q.sha256]


def chunks_missing_pb(shas: list[str]) -> DatasetChunksMissing:
    return DatasetChunksMissing(sha256=shas)


def chunk_from_pb(c: DatasetChunk) -> tuple[str, bytes, int]:
    if len(c.data) > CHUNK_BYTES:
        raise DataError(f"a chunk of {len(c.data)} bytes exceeds {CHUNK_BYTES}")
    return _sha(c.sha256, "chunk"), bytes(c.data), int(c.dataset_bytes)


def manifest_json_from_pb(m: DatasetManifest) -> bytes:
    if len(m.manifest_json) > MAX_MANIFEST_BYTES:
        raise DataError(f"a manifest of {len(m.manifest_json)} bytes exceeds {MAX_MANIFEST_BYTES}")
    return bytes(m.manifest_json)


def dataset_info_pb(m: Manifest) -> DatasetInfo:
    return DatasetInfo(name=m.name, sha256=m.sha256)


def dataset_request_from_pb(r: DatasetRequest) -> str:
    return _sha(r.sha256, "dataset")


def manifest_pb(m: Manifest) -> DatasetManifest:
    return DatasetManifest(manifest_json=m.to_json())


def chunk_request_from_pb(r: DatasetChunkRequest) -> tuple[str, int]:
    return _sha(r.dataset_sha256, "dataset"), int(r.index)


def chunk_pb(sha: str, data: bytes) -> DatasetChunk:
    return DatasetChunk(sha256=sha, data=data)

"""The client's messages for users' own datasets (`archipelago data put`)."""

from __future__ import annotations

from proto import coordinator_pb2


def chunks_query(dataset_bytes: int, shas: list[str]) -> coordinator_pb2.DatasetChunksQuery:
    return coordinator_pb2.DatasetChunksQuery(dataset_bytes=dataset_bytes, sha256=shas)


def missing_shas(reply: coordinator_pb2.DatasetChunksMissing) -> list[str]:
    return [str(s) for s in reply.sha256]


def chunk(sha: str, data: bytes, dataset_bytes: int) -> coordinator_pb2.DatasetChunk:
    return coordinator_pb2.DatasetChunk(sha256=sha, data=data, dataset_bytes=dataset_bytes)


def manifest(manifest_json: bytes) -> coordinator_pb2.DatasetManifest:
    return coordinator_pb2.DatasetManifest(manifest_json=manifest_json)


def dataset_info(reply: coordinator_pb2.DatasetInfo) -> tuple[str, str]:
    """(name, sha256) of the stored dataset."""
    return str(reply.name), str(reply.sha256)

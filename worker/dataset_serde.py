"""The worker's calls for users' own datasets: a dataset's manifest and chunks, read from
the coordinator with the worker's credential (the bytes are checked by `worker.dataset_cache`).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from opdag.data import DataError
from opdag.data.manifest import CHUNK_BYTES, MAX_MANIFEST_BYTES
from proto import coordinator_pb2, coordinator_pb2_grpc
from proto.cluster_tls import ClientTls
from proto.rpc import Metadata, open_channel

FETCH_TIMEOUT_S = 60.0


class DatasetFetcher:
    """Reads datasets from the coordinator at `address` (the channel opens on first use,
    once this worker has registered)."""

    def __init__(self, address: str, tls: ClientTls | None, metadata: Callable[[], Metadata]):
        self.address = address
        self.tls = tls
        self.metadata = metadata
        self._channel: grpc.aio.Channel | None = None
        self._stub: coordinator_pb2_grpc.CoordinatorStub | None = None

    def _stub_now(self) -> coordinator_pb2_grpc.CoordinatorStub:
        if self._stub is None:
            self._channel = open_channel(self.address, self.tls)
            self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        return self._stub

    async def manifest(self, dataset_sha: str) -> bytes:
        """The manifest's JSON, as the coordinator holds it."""
        request = coordinator_pb2.DatasetRequest(sha256=dataset_sha)
        try:
            reply = await self._stub_now().GetDatasetManifest(
                request, metadata=self.metadata(), timeout=FETCH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise DataError(
                f"dataset {dataset_sha[:12]}: manifest not read: {e.details()}"
            ) from None
        if len(reply.manifest_json) > MAX_MANIFEST_BYTES:
            raise DataError(f"dataset {dataset_sha[:12]}: the manifest is too big")
        return bytes(reply.manifest_json)

    async def chunk(self, dataset_sha: str, index: int) -> bytes:
        """Chunk `index` of the dataset, as the coordinator sends it."""
        request = coordinator_pb2.DatasetChunkRequest(dataset_sha256=dataset_sha, index=index)
        try:
            reply = await self._stub_now().GetDatasetChunk(
                request, metadata=self.metadata(), timeout=FETCH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise DataError(
                f"dataset {dataset_sha[:12]}: chunk {index} not read: {e.details()}"
            ) from None
        if len(reply.data) > CHUNK_BYTES:
            raise DataError(f"dataset {dataset_sha[:12]}: chunk {index} is too big")
        return bytes(reply.data)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

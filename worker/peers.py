"""Sending values and gradients to peer workers.

Each transfer is one client-streaming call: a header (job, epoch, step, micro-batch, the
values' structure and tensor descriptions) and then the tensors' bytes in 1 MiB chunks.
Forward values go through `Activations` and gradients through `Gradients`, so the two
directions never queue behind each other. A peer that is briefly unreachable is retried
with backoff; after that the error surfaces and the coordinator re-plans.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import grpc

from opdag.values import Value
from proto import worker_pb2, worker_pb2_grpc
from proto.rpc import TlsConfig, open_channel, token_metadata
from proto.tensor_stream import EncodedTensor, encode_values, header_of, iter_chunks
from worker.serde import StagePlan, transfer_header_pb

log = logging.getLogger("archipelago.worker")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class PeerLinks:
    """Channels to the other stages of one job, and the sends over them."""

    def __init__(
        self,
        plan: StagePlan,
        *,
        token: str,
        tls: TlsConfig | None,
        retries: int = 5,
        backoff_s: float = 0.2,
    ) -> None:
        self.plan = plan
        self.token = token
        self.tls = tls
        self.retries = retries
        self.backoff_s = backoff_s
        self._stubs: dict[int, worker_pb2_grpc.WorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, stage: int) -> worker_pb2_grpc.WorkerStub:
        stub = self._stubs.get(stage)
        if stub is None:
            channel = open_channel(self.plan.peers[stage], self.tls)
            self._channels.append(channel)
            stub = worker_pb2_grpc.WorkerStub(channel)
            self._stubs[stage] = stub
        return stub

    async def send(
        self,
        kind: str,
        dst: int,
        step: int,
        mb: int,
        values: Mapping[str, Value | EncodedTensor],
    ) -> int:
        """Send one micro-batch's values ("F") or gradients ("B") to stage `dst`; returns
        the tensor bytes sent."""
        named, tensors = encode_values(values)
        header = transfer_header_pb(
            job_id=self.plan.job_id,
            epoch=self.plan.epoch,
            job_secret=self.plan.job_secret,
            step=step,
            micro_batch=mb,
            src_stage=self.plan.stage,
            values=named,
            tensors=[header_of(name, t) for name, t in tensors],
        )
        nbytes = sum(h.nbytes for h in header.tensors)

        async def parts() -> AsyncIterator[worker_pb2.TransferPart]:
            yield worker_pb2.TransferPart(header=header)
            for chunk in iter_chunks([t for _, t in tensors]):
                yield worker_pb2.TransferPart(chunk=chunk)

        stub = self._stub(dst)
        call = stub.Activations if kind == "F" else stub.Gradients
        for attempt in range(self.retries + 1):
            try:
                await call(parts(), metadata=token_metadata(self.token))
                return nbytes
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise PeerError(
                        f"sending {'values' if kind == 'F' else 'gradients'} of step {step}, "
                        f"micro-batch {mb} to stage {dst} ({self.plan.peers[dst]}) failed: "
                        f"{e.code().name}: {e.details()}"
                    ) from None
                log.warning("stage %d unreachable (%s); retrying", dst, e.code().name)
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


class PeerError(Exception):
    """A peer could not be reached or refused a transfer."""

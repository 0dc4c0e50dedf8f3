"""Sending values and gradients to peer workers.

Each transfer is one client-streaming call: a header (job, epoch, the secret this stage
shares with the receiving one, step, micro-batch, the values' structure and tensor
descriptions; the call's metadata carries the join token) and then the tensors' bytes in
1 MiB chunks. Forward values go through `Activations` and gradients through `Gradients`, so the two
directions never queue behind each other. A peer that is briefly unreachable is retried
with backoff (`PEER_RETRY`: about six seconds in all); after that the error surfaces and
the coordinator re-plans.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from opdag.values import Value
from proto.cluster_tls import ClientTls
from proto.retry import RetryPolicy, retry
from proto.rpc import token_metadata, worker_channel
from proto.tensor_stream import EncodedTensor
from worker.serde import StagePlan, WorkerStub, transfer_parts, worker_stub
from worker.transfer_kind import TransferKind

log = logging.getLogger("archipelago.worker")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Six tries, 0.2 s apart and doubling: 6.2 s of waiting at most before the send fails.
PEER_RETRY = RetryPolicy(attempts=6, first_delay_s=0.2, backoff=2.0, max_delay_s=3.2)


class PeerLinks:
    """Channels to the other stages of one job, and the sends over them."""

    def __init__(
        self,
        plan: StagePlan,
        *,
        token: str,
        tls: ClientTls | None,
        retry_policy: RetryPolicy = PEER_RETRY,
    ) -> None:
        self.plan = plan
        self.token = token
        self.tls = tls
        self.retry_policy = retry_policy
        self._stubs: dict[int, WorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, stage: int) -> WorkerStub:
        stub = self._stubs.get(stage)
        if stub is None:
            channel = worker_channel(
                self.plan.peers[stage], self.tls, self.plan.peer_ids.get(stage, "")
            )
            self._channels.append(channel)
            stub = worker_stub(channel)
            self._stubs[stage] = stub
        return stub

    async def send(
        self,
        kind: TransferKind,
        dst: int,
        step: int,
        mb: int,
        values: Mapping[str, Value | EncodedTensor],
    ) -> int:
        """Send one micro-batch's values (FORWARD) or gradients (BACKWARD) to stage `dst`;
        returns the tensor bytes sent."""
        nbytes, parts = transfer_parts(
            plan=self.plan, dst=dst, step=step, micro_batch=mb, values=values
        )
        stub = self._stub(dst)
        call = stub.Activations if kind == TransferKind.FORWARD else stub.Gradients

        def log_retry(e: grpc.aio.AioRpcError, wait_s: float) -> None:
            log.warning("stage %d unreachable (%s); retrying", dst, e.code().name)

        try:
            await retry(
                lambda: call(parts(), metadata=token_metadata(self.token)),
                self.retry_policy,
                retry_on=RETRYABLE,
                on_retry=log_retry,
            )
        except grpc.aio.AioRpcError as e:
            raise PeerError(
                f"sending {kind.carries} of step {step}, micro-batch {mb} to stage {dst} "
                f"({self.plan.peers[dst]}) failed: {e.code().name}: {e.details()}"
            ) from None
        return nbytes

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


class PeerError(Exception):
    """A peer could not be reached or refused a transfer."""

"""The calls the coordinator makes on workers: hand over a stage, start, stop, measure.

Each call carries the coordinator's credential toward that worker (`coordinator.roles`),
which the worker demands of every call only the coordinator may make; a link measurement
also carries the ticket that lets the measuring worker probe its target.
"""

from __future__ import annotations

import logging

import grpc
import torch

from coordinator.handover import StageHandover
from coordinator.inquiry_serde import (
    measure_link_pb,
    measured_links_from_pb,
    open_spot_evidence,
    spot_request_pb,
)
from coordinator.roles import Gatekeeper
from coordinator.serde import (
    WorkerStub,
    job_control_pb,
    load_stage_parts,
    worker_stub,
)
from opdag.values import Value
from proto.certificates import CertificateError
from proto.cluster_tls import ClientTls
from proto.rpc import Metadata, coordinator_metadata, worker_channel

log = logging.getLogger("archipelago.coordinator")


class WorkerCallError(Exception):
    """A worker refused or could not be reached; `unreachable` tells which."""

    def __init__(self, worker_id: str, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.unreachable = unreachable


class WorkerClient:
    """One channel per worker address, reused across calls. `gate` gives each worker's
    coordinator credential (without one, calls carry none and workers refuse them);
    `token`, the join token, is not sent to workers."""

    def __init__(
        self,
        *,
        token: str,
        tls: ClientTls | None,
        call_timeout_s: float = 30.0,
        gate: Gatekeeper | None = None,
    ) -> None:
        self.token = token
        self.tls = tls
        self.call_timeout_s = call_timeout_s
        self.gate = gate
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def _metadata(self, worker_id: str, address: str) -> Metadata:
        """The coordinator's credential toward the worker (found by address without an id)."""
        if self.gate is None:
            return ()
        return coordinator_metadata(self.gate.coordinator_credential(worker_id, address))

    def _stub(self, address: str, worker_id: str = "") -> WorkerStub:
        """A stub on the channel to the worker at `address`: over TLS the channel verifies
        the name of the worker registered there (`worker_id`, or found by the address)."""
        if not worker_id and self.gate is not None:
            found = self.gate.registry.at_address(address)
            worker_id = found.worker_id if found is not None else ""
        key = (address, worker_id)
        channel = self._channels.get(key)
        if channel is None:
            try:
                channel = worker_channel(address, self.tls, worker_id)
            except CertificateError as e:
                raise WorkerCallError(
                    worker_id, f"calling {address}: {e}", unreachable=True
                ) from None
            self._channels[key] = channel
        return worker_stub(channel)

    def _error(self, worker_id: str, what: str, e: grpc.aio.AioRpcError) -> WorkerCallError:
        unreachable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return WorkerCallError(
            worker_id, f"{what}: {e.code().name}: {e.details()}", unreachable=unreachable
        )

    async def load_stage(
        self,
        worker_id: str,
        address: str,
        handover: StageHandover,
    ) -> None:
        parts = load_stage_parts(handover)
        try:
            await self._stub(address, worker_id).LoadStage(
                parts,
                metadata=self._metadata(worker_id, address),
                timeout=10 * self.call_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(
                worker_id, f"loading stage {handover.stage.index} on {address}", e
            ) from None

    async def start(self, worker_id: str, address: str, job_id: str, epoch: int) -> None:
        try:
            await self._stub(address, worker_id).StartJob(
                job_control_pb(job_id, epoch),
                metadata=self._metadata(worker_id, address),
                timeout=self.call_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(worker_id, f"starting job {job_id} on {address}", e) from None

    async def stop(
        self,
        address: str,
        job_id: str,
        epoch: int,
        *,
        drain: bool,
        steps_done: int = 0,
        alone: bool = False,
    ) -> bool:
        """Ask a worker to stop (or drain) a job, or (`alone`) to go on as the one replica
        the job keeps; best effort, False if it did not answer."""
        try:
            await self._stub(address).StopJob(
                job_control_pb(job_id, epoch, drain=drain, steps_done=steps_done, alone=alone),
                metadata=self._metadata("", address),
                timeout=5,
            )
            return True
        except grpc.aio.AioRpcError as e:
            log.info("stop of job %s on %s: %s", job_id, address, e.code().name)
            return False
        except WorkerCallError as e:
            log.info("stop of job %s on %s: %s", job_id, address, e)
            return False

    async def measure_link(
        self,
        worker_id: str,
        address: str,
        target_id: str,
        target_address: str,
        max_bytes: int,
        target_seconds: float,
    ) -> tuple[float, float, str]:
        """Ask a worker to measure its link to another: (bytes/s, rtt s, error or "")."""
        ticket = self.gate.probe_ticket(worker_id, target_id, target_address) if self.gate else ""
        request = measure_link_pb(
            target_id,
            target_address,
            max_bytes=max_bytes,
            target_seconds=target_seconds,
            ticket=ticket,
        )
        try:
            reply = await self._stub(address, worker_id).MeasureLinks(
                request,
                metadata=self._metadata(worker_id, address),
                timeout=self.call_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(worker_id, f"measuring links from {address}", e) from None
        links = measured_links_from_pb(reply)
        if len(links) != 1 or links[0].worker_id != target_id:
            return 0.0, 0.0, "the worker answered for other links than asked"
        fig = links[0]
        if fig.error:
            return 0.0, 0.0, fig.error
        if not (0 < fig.bandwidth < 1e13 and 0 <= fig.rtt_s < 60):
            return 0.0, 0.0, f"implausible figures ({fig.bandwidth} B/s, rtt {fig.rtt_s} s)"
        return fig.bandwidth, fig.rtt_s, ""

    async def spot_evidence(
        self,
        worker_id: str,
        address: str,
        *,
        job_id: str,
        epoch: int,
        step: int,
        micro_batch: int,
        params: bool,
        max_bytes: int,
        gradients: bool = False,
    ) -> dict[str, Value] | dict[str, torch.Tensor]:
        """A stage's evidence for a spot check (`coordinator.spot_checks`): its inputs of
        one micro-batch of `step` (named values), the `gradients` it received for it (by
        "SRC/NAME"), or (`params`) its parameters and buffers at that step; at most
        `max_bytes` of tensors, else WireError before they are read."""
        request = spot_request_pb(
            job_id, epoch, step, micro_batch, params=params, gradients=gradients
        )
        asked = "parameters" if params else "gradients" if gradients else "inputs"
        what = f"{asked} of step {step} from {address}"
        try:
            call = self._stub(address, worker_id).SpotEvidence(
                request,
                metadata=self._metadata(worker_id, address),
                timeout=self.call_timeout_s,
            )
            header, incoming = await open_spot_evidence(call.__aiter__())
            if (header.job_id, header.epoch, header.step, header.micro_batch) != (
                job_id,
                epoch,
                step,
                micro_batch,
            ):
                raise WorkerCallError(
                    worker_id, f"{what}: the answer is of another step", unreachable=False
                )
            if params:
                return dict(await incoming.read(max_bytes=max_bytes))
            return await incoming.read_values(max_bytes=max_bytes, device=torch.device("cpu"))
        except grpc.aio.AioRpcError as e:
            raise self._error(worker_id, what, e) from None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

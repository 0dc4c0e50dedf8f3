"""A worker's state: the stage it holds, the compute thread, its links to peers.

A worker runs one stage of one job at a time. Torch compute happens on a single dedicated
thread so the asyncio loop stays free to receive and send while a stage computes.

A peer's transfer is taken only with the secret of its stage pair: each stage is given the
secrets it shares with every other stage of its replica, so a sender cannot claim a stage
it does not hold. A replica's share is taken with its sync group's secret: one for the
group (a share is sent to every member alike), so a member could claim another member's
replica number, never another stage's (the group's robust aggregate bounds one share).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from opdag.errors import OpDagError
from opdag.values import Value
from proto.cluster_tls import ClientTls
from proto.rpc import secret_matches
from worker.credentials import NodeCredentials
from worker.dataset_cache import DatasetCache
from worker.peers import PeerLinks
from worker.replica_sync import ReplicaSync
from worker.serde import StagePlan
from worker.stage_job import Reporter, StageJob
from worker.states import NodeState, StageState
from worker.transfer_kind import TransferKind

log = logging.getLogger("archipelago.worker")


class JobStateError(OpDagError):
    """A control request that does not fit what the worker holds (wrong job, epoch...)."""


@dataclass(frozen=True)
class NodeStatus:
    """What a worker holds and where it is, as its heartbeat and status report it."""

    job_id: str = ""
    epoch: int = 0
    stage: int = 0
    step: int = 0
    state: NodeState | StageState = NodeState.IDLE


class WorkerNode:
    """What one worker process holds and does."""

    def __init__(
        self,
        *,
        token: str,
        tls: ClientTls | None,
        reporter: Reporter,
        device: torch.device | None = None,
        credentials: NodeCredentials | None = None,
        datasets: DatasetCache | None = None,
    ) -> None:
        self.token = token
        # Users' datasets, for the stage 0 this worker runs (`worker.dataset_cache`).
        self.datasets = datasets
        # This worker's id and secrets, from its registration (shared with its coordinator link).
        self.credentials = credentials or NodeCredentials()
        self.tls = tls
        self.reporter = reporter
        self.device = device or torch.device("cpu")
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.job: StageJob | None = None
        self._task: asyncio.Task[None] | None = None
        self._peers: PeerLinks | None = None
        self.leaving = False

    # -- control (from the coordinator) ------------------------------------------------------

    async def load_stage(self, plan: StagePlan, tensors: dict[str, torch.Tensor]) -> None:
        if self.leaving:
            raise JobStateError("this worker is leaving and takes no new stage")
        # The coordinator only hands a stage to a worker it considers free: whatever this
        # worker still holds belongs to an abandoned plan.
        await self._drop_job()
        peers = PeerLinks(plan, token=self.token, tls=self.tls)
        dataset = None
        if plan.loads_data and plan.data.dataset:  # users' own data, chunks checked
            if self.datasets is None:
                raise OpDagError("this worker has no dataset cache for a user's dataset")
            dataset = await self.datasets.open(plan)
        sync = ReplicaSync(plan, token=self.token, tls=self.tls) if plan.replicas > 1 else None
        loop = asyncio.get_running_loop()
        try:
            job = await loop.run_in_executor(
                self.compute,
                lambda: StageJob.build(
                    plan,
                    tensors,
                    device=self.device,
                    compute=self.compute,
                    sender=peers.send,
                    reporter=self.reporter,
                    sync=sync,
                    dataset=dataset,
                ),
            )
        except BaseException:
            await peers.close()
            if sync is not None:
                await sync.close()
            raise
        self.job, self._peers = job, peers
        log.info(
            "loaded job %s epoch %d stage %d/%d replica %d/%d (%d operators), steps %d..%d",
            plan.job_id,
            plan.epoch,
            plan.stage,
            plan.num_stages,
            plan.replica,
            plan.replicas,
            len(plan.graph.compute_nodes),
            plan.start_step,
            plan.total_steps,
        )

    def _held(self, job_id: str, epoch: int) -> StageJob:
        job = self.job
        if job is None or job.plan.job_id != job_id or job.plan.epoch != epoch:
            held = f"{job.plan.job_id} epoch {job.plan.epoch}" if job else "nothing"
            raise JobStateError(f"this worker holds {held}, not job {job_id} epoch {epoch}")
        return job

    async def start(self, job_id: str, epoch: int) -> None:
        job = self._held(job_id, epoch)
        if job.state != StageState.LOADED:
            raise JobStateError(f"job {job_id} is {job.state}, not waiting to start")
        self._task = asyncio.create_task(job.run(), name=f"job {job_id}")

    async def stop(
        self, job_id: str, epoch: int, *, drain: bool, steps_done: int = 0, alone: bool = False
    ) -> None:
        """Drop the job, or drain it (stop at a step boundary); `alone`: the coordinator
        keeps only this replica, which goes on (and drains, if asked)."""
        job = self._held(job_id, epoch)
        if alone and job.state == StageState.RUNNING:
            job.go_alone()
            if not drain:
                return
        if drain and job.state == StageState.RUNNING:
            job.request_drain(steps_done)
            return
        await self._drop_job()

    async def _drop_job(self) -> None:
        task, peers, job = self._task, self._peers, self.job
        self._task, self._peers, self.job = None, None, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if job is not None:
            if job.state.live:
                job.state = StageState.ABORTED
            log.info("dropped job %s epoch %d (%s)", job.plan.job_id, job.plan.epoch, job.state)
            # Wait for the compute thread to be done with the job's tensors.
            await asyncio.get_running_loop().run_in_executor(self.compute, job.runner.discard)
        if peers is not None:
            await peers.close()
        if job is not None and job.sync is not None:
            await job.sync.close()

    # -- data (from peers) ---------------------------------------------------------------------

    def job_for_transfer(self, job_id: str, epoch: int, src_stage: int, secret: str) -> StageJob:
        """The held job a transfer from stage `src_stage` is for, once the secret of that
        stage and this one is checked."""
        job = self._live_job(job_id, epoch)
        expected = job.plan.pair_secrets.get(src_stage, "")
        if not secret_matches(secret, expected):
            raise PermissionError(
                f"wrong stage-pair secret for stage {src_stage} -> {job.plan.stage}: the "
                "sender does not hold the stage it claims"
            )
        return job

    def job_for_share(self, job_id: str, epoch: int, secret: str) -> StageJob:
        """The held job a replica's share is for, once its sync group's secret is checked."""
        job = self._live_job(job_id, epoch)
        if not secret_matches(secret, job.plan.sync_secret):
            raise PermissionError(f"wrong sync-group secret for stage {job.plan.stage}")
        return job

    def _live_job(self, job_id: str, epoch: int) -> StageJob:
        job = self.job
        if job is None or job.plan.job_id != job_id or job.plan.epoch != epoch:
            raise JobStateError(f"no stage of job {job_id} epoch {epoch} here")
        if not job.state.live:
            raise JobStateError(f"job {job_id} is {job.state} here")
        return job

    async def deliver(
        self, job: StageJob, kind: str, step: int, mb: int, src: int, values: dict[str, Value]
    ) -> None:
        """Hand one peer transfer to the job; `kind` is a `TransferKind` or its string."""
        await job.deliver(TransferKind(kind), step, mb, src, values)

    # -- status and shutdown ---------------------------------------------------------------

    def status(self) -> NodeStatus:
        job = self.job
        if job is None:
            return NodeStatus(state=NodeState.LEAVING if self.leaving else NodeState.IDLE)
        p = job.plan
        return NodeStatus(
            job_id=p.job_id, epoch=p.epoch, stage=p.stage, step=job.step, state=job.state
        )

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.state.live

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until the held job (if any) is no longer running; True if it stopped."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.busy:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def close(self) -> None:
        await self._drop_job()
        self.compute.shutdown(wait=False, cancel_futures=True)

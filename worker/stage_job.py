"""One stage of one job, running on a worker: remote autodiff with a network in between.

Each training step follows the stage's 1F1B schedule. A forward waits in the `Inbox` for
the values of that micro-batch from every stage that sends to this one, runs in the compute
thread, and hands its outputs to the peers that read them; a backward waits for the
gradients from every stage that read a value of ours, sums them, runs local autograd, and
sends the gradients of what we received back to where it came from. Sends run as their own
tasks: compute never waits on a transfer, and forward and backward traffic travel on
separate calls. After the last backward the stage steps its own optimizer, reports the step
and, on schedule, uploads a checkpoint of its parameters and optimizer state.

In a plan with replicas, each replica's stage 0 loads its own share of the step's
micro-batches, and before stepping a stage averages its gradients with the same stage of
the other replicas (`worker.replica_sync`); the replicas then hold the same state, so
one replica (replica 0, unless the coordinator kept another when a replica was lost) speaks
for the stage: its report of the step (with the loss over the global batch) sets the job's
progress, and it alone checkpoints. Every replica reports its steps, for their metrics.

With `sync: local-sgd` a stage steps on its own gradients and averages its parameters with
its group after each step that ends an averaging round. Replica 0 still reports (the loss
is exchanged every step) and checkpoints alone: a checkpoint holds replica 0's parameters
and optimizer state. One taken right after a round (`checkpoint.every` a multiple of the
period, and the run's end) holds the group's averaged parameters; one between rounds (a
drain, or an interval that is not a multiple) holds replica 0's local parameters, and what
the other replicas learnt since the last round is not in it. A run resumed from any
checkpoint starts every replica from that one copy, optimizer state included.

Every received value passes `worker.value_guard` (within the job's `trust.values` bounds)
before the inbox or the group takes it: a refused one names its sender to the coordinator
(a report with `suspects`). With spot checks on, the stage keeps its last steps' inputs and
parameters for the coordinator to recompute one of its micro-batches (`worker.spot_evidence`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

import torch

from opdag.data import build_source, replica_micro_batches
from opdag.data.dataset import StoredDataset
from opdag.errors import CodecError, OpDagError
from opdag.optim import (
    OPTIM_PREFIX,
    build_optimizer,
    load_optimizer_state,
    optimizer_state_tensors,
)
from opdag.partition import Stage
from opdag.rad import StageRunner
from opdag.schedule import one_f_one_b
from opdag.stage import StageModule
from opdag.values import Value, add_grads
from proto.tensor_stream import EncodedTensor
from worker.edge_compression import EdgeCodecs
from worker.inbox import Inbox, check_value
from worker.replica_sync import OUTER_KEYS, ReplicaSync
from worker.serde import StagePlan
from worker.spot_evidence import SpotEvidence, copy_state
from worker.states import StageState
from worker.step_report import Reporter, StepReport
from worker.transfer_kind import TransferKind
from worker.value_guard import ACTIVATION, GRADIENT, ValueGuard

log = logging.getLogger("archipelago.worker")
T = TypeVar("T")


# Sends one micro-batch's values to one peer stage; returns the bytes it sent.
Sender = Callable[
    [TransferKind, int, int, int, Mapping[str, Value | EncodedTensor]], Awaitable[int]
]


class StageJob:
    """A loaded stage: built module, optimizer, data (stage 0), inbox; `run()` trains."""

    def __init__(
        self,
        plan: StagePlan,
        runner: StageRunner,
        *,
        source: Any,
        compute: Executor,
        sender: Sender,
        reporter: Reporter,
        sync: ReplicaSync | None = None,
    ) -> None:
        self.plan = plan
        # The stage's sync group (other replicas of this stage), when the plan has replicas.
        self.sync = sync
        self.runner = runner
        self.source = source
        self.compute = compute
        self.sender = sender
        self.reporter = reporter
        # Only what the schedule can have in flight: this step's and the next one's messages.
        self.inbox = Inbox(
            current_step=lambda: self.step,
            micro_batches=plan.local_micro_batches,
            senders=len(plan.forward_sources()) + len(plan.backward_sources()),
        )
        self.guard = ValueGuard(
            plan.value_bounds,
            on_refusal=lambda s: reporter.progress(self._report(s.step, None, 0.0, suspects=(s,))),
        )
        if sync is not None:
            sync.guard = self.guard  # a replica's shares are checked the same way
        # What the coordinator's spot checks ask for afterwards (None: they are off).
        self.evidence = SpotEvidence(plan.spot_keep) if plan.spot_keep else None
        self.step = plan.start_step
        self.state = StageState.LOADED
        self.error = ""
        self._drain = False
        self._drain_target: int | None = None
        # Replica 0 speaks for its stage (reports the job's progress, checkpoints) until
        # the coordinator makes another the one replica it keeps (`go_alone`).
        self.speaks = plan.replica == 0
        self._step_task: asyncio.Task[None] | None = None
        self._forward_srcs = plan.forward_sources()
        self._backward_srcs = plan.backward_sources()
        # What each peer sends us, so a transfer naming anything else is refused.
        self._expected_forward: dict[int, set[str]] = {}
        for name, src in plan.receives.items():
            self._expected_forward.setdefault(src, set()).add(name)
        if not plan.loads_data and plan.data_inputs:
            self._expected_forward.setdefault(0, set()).update(plan.data_inputs)
        self._expected_backward: dict[int, set[str]] = {}
        for name, dsts in plan.sends.items():
            meta = plan.graph.node(name).meta
            if meta is not None and meta.carries_grad:
                for dst in dsts:
                    self._expected_backward.setdefault(dst, set()).add(name)
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._compute_s = 0.0
        metas = {
            name: meta
            for name in (*plan.sends, *plan.receives)
            if (meta := plan.graph.node(name).meta) is not None
        }
        # Only activations are compressed: not the data stage 0 passes on, nor a
        # parameter read in two stages (its value must arrive whole).
        activations = {n for n in plan.sends if plan.graph.node(n).op not in ("input", "param")}
        self.codecs = EdgeCodecs(plan.codecs, metas, activations)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        plan: StagePlan,
        tensors: Mapping[str, torch.Tensor],
        *,
        device: torch.device,
        compute: Executor,
        sender: Sender,
        reporter: Reporter,
        sync: ReplicaSync | None = None,
        dataset: StoredDataset | None = None,
    ) -> StageJob:
        """Build the stage (run this in the compute thread: it allocates and loads data)."""
        params = {k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)}
        # The outer optimizer's state (local SGD with `outer`) travels as optimizer state.
        outer = {
            k: v
            for k, v in tensors.items()
            if k.startswith(OPTIM_PREFIX) and k.rpartition("/")[2] in OUTER_KEYS
        }
        optim = {k: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX) and k not in outer}
        module = StageModule(plan.graph, params, device=device, copy=False)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, plan.optimizer) if named else None
        if optim:
            if optimizer is None:
                raise OpDagError("optimizer state sent for a stage with nothing to train")
            load_optimizer_state(optimizer, named, optim)
        data_inputs = tuple(n for n in plan.graph.inputs if n not in plan.receives)
        stage = Stage(
            index=plan.stage,
            graph=plan.graph,
            recv=tuple(plan.receives),
            data_inputs=data_inputs,
            send=tuple(plan.sends),
        )
        runner = StageRunner(
            stage, module, num_micro_batches=plan.local_micro_batches, optimizer=optimizer
        )
        if sync is not None:
            # A checkpoint's outer state is taken back where the plan has an outer optimizer
            # (a plan without one, or of one replica, has no use for it).
            sync.attach(named, loss=bool(stage.loss), outer=outer if plan.outer else None)
        source = None
        if plan.loads_data:
            source = build_source(plan.data, context=plan.context, dataset=dataset)
            if plan.fingerprint and source.fingerprint != plan.fingerprint:
                data = plan.data.corpus or plan.data.dataset
                raise OpDagError(
                    f"this worker's copy of {data!r} differs from the job's "
                    f"(fingerprint {source.fingerprint[:12]} != {plan.fingerprint[:12]}): "
                    "stage 0 must read the same data as the reference"
                )
        return cls(
            plan,
            runner,
            source=source,
            compute=compute,
            sender=sender,
            reporter=reporter,
            sync=sync,
        )

    # -- receiving --------------------------------------------------------------------------

    def expected_bytes(self, kind: TransferKind, src: int) -> int:
        """Tensor bytes a message of `kind` from stage `src` may carry (sizes declared by a
        sender are checked against this before any memory is set aside). A compressed
        value may take a little more than dense: at worst all its values and a bitmap."""
        names = self._expected(kind).get(src, ())
        total = 0
        for name in names:
            meta = self.plan.graph.node(name).meta
            total += meta.nbytes if meta is not None else 0
        return total + total // 8 + (64 << 10)

    def _expected(self, kind: TransferKind) -> dict[int, set[str]]:
        """Per sending stage, the value names a transfer of `kind` from it must hold."""
        if kind == TransferKind.FORWARD:
            return self._expected_forward
        return self._expected_backward

    async def deliver(
        self, kind: TransferKind, step: int, mb: int, src: int, values: dict[str, Value]
    ) -> None:
        """Accept one peer message after checking it is one we expect, shaped as expected."""
        plan = self.plan
        if not plan.start_step <= step < plan.total_steps or step < self.step:
            raise CodecError(f"step {step} is not one this stage will run (now at {self.step})")
        if mb >= plan.local_micro_batches:
            raise CodecError(f"micro-batch {mb} is out of range")
        expected = self._expected(kind).get(src)
        if expected is None:
            raise CodecError(f"stage {src} sends no {kind.carries} here")
        if set(values) != expected:
            raise CodecError(f"stage {src} sent {sorted(values)}, expected {sorted(expected)}")
        if any(isinstance(v, EncodedTensor) for v in values.values()):
            await asyncio.to_thread(self.codecs.decode, kind, step, mb, src, values)
        elif kind == TransferKind.BACKWARD:
            self.codecs.decode(kind, step, mb, src, values)  # forgets what was kept
        for name, value in values.items():
            meta = plan.graph.node(name).meta
            if meta is None:
                raise CodecError(f"value {name!r} has no description in the stage graph")
            backward = kind == TransferKind.BACKWARD
            check_value(
                value, meta, f"{'gradient' if backward else 'value'} {name!r}", grad=backward
            )
        kind_name = GRADIENT if kind == TransferKind.BACKWARD else ACTIVATION
        self.guard.check(kind_name, src, plan.replica, step, values)
        if self.evidence is not None and kind == TransferKind.BACKWARD:
            self.evidence.record_gradients(step, mb, src, values)
        await self.inbox.put(kind, step, mb, src, values)

    # -- running ----------------------------------------------------------------------------

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        def timed() -> T:
            began = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._compute_s += time.perf_counter() - began

        return await asyncio.get_running_loop().run_in_executor(self.compute, timed)

    def request_drain(self, steps_done: int = 0) -> None:
        """Stop at a step boundary, once a checkpoint of it is uploaded: the next boundary
        (stage 0, which starts every step first, chooses it), or after `steps_done` steps
        (every other stage, told the boundary stage 0 chose)."""
        if steps_done == 0:
            self._drain = True
            return
        self._drain_target = steps_done
        # Already waiting inside the following step: it cannot get its inputs (stage 0 has
        # stopped), and nothing of it is applied before its end, so it is dropped.
        if self.step >= steps_done and self._step_task is not None and not self._step_task.done():
            self._step_task.cancel()

    def go_alone(self) -> None:
        """The coordinator keeps only this stage's replica: finish rounds with the shares
        that arrived, average with nobody from now on, and speak for the stage."""
        self.speaks = True
        if self.sync is not None:
            self.sync.go_alone()

    def _draining(self) -> bool:
        return self._drain or (self._drain_target is not None and self.step >= self._drain_target)

    async def run(self) -> None:
        plan = self.plan
        self.state = StageState.RUNNING
        try:
            while self.step < plan.total_steps and not self._draining():
                self._step_task = asyncio.create_task(self._run_step(self.step))
                try:
                    await self._step_task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if (current is not None and current.cancelling()) or not self._draining():
                        raise
                    await self._compute(self.runner.discard)
                    self.codecs.forget(self.step)
                    break
                self.step += 1
                due = self.step % plan.checkpoint_every == 0 or self.step == plan.total_steps
                if due and not self._draining():
                    await self._checkpoint(wait=self.step == plan.total_steps)
            if self.step < plan.total_steps:  # drained at a step boundary
                await self._checkpoint(wait=True)
                self.state = StageState.DRAINED
                if self.speaks:  # one replica speaks for its stage (stage 0's drives)
                    self.reporter.progress(self._report(self.step - 1, None, 0.0, drained=True))
                return
            if self._checkpoint_task is not None:
                await self._checkpoint_task
            self.state = StageState.FINISHED
            if self.speaks:
                self.reporter.progress(self._report(plan.total_steps - 1, None, 0.0, finished=True))
        except asyncio.CancelledError:
            self.state = StageState.ABORTED
            raise
        except Exception as e:
            self.state = StageState.FAILED
            self.error = f"{type(e).__name__}: {e}"
            log.exception("job %s stage %d failed at step %d", plan.job_id, plan.stage, self.step)
            self.reporter.progress(self._report(self.step, None, 0.0, error=self.error))

    def _report(self, step: int, loss: float | None, seconds: float, **flags: Any) -> StepReport:
        return StepReport(
            job_id=self.plan.job_id,
            epoch=self.plan.epoch,
            stage=self.plan.stage,
            step=step,
            loss=loss,
            step_seconds=seconds,
            replica=self.plan.replica,
            speaker=self.speaks,
            **flags,
        )

    async def _run_step(self, step: int) -> None:
        plan = self.plan
        began = time.perf_counter()
        self._compute_s = 0.0
        micro: list[dict[str, torch.Tensor]] = []
        if plan.loads_data:
            micro = await self._compute(self._load_batch, step)
        if self.evidence is not None:
            state = await self._compute(copy_state, self.runner.module.state_dict())
            self.evidence.begin(step, state)
        sends: list[asyncio.Task[int]] = []
        sent: dict[int, int] = {}
        losses: list[float] = []
        try:
            for op in one_f_one_b(
                plan.stage, plan.num_stages, plan.local_micro_batches, plan.warmup_extra
            ):
                mb = op.micro_batch
                if op.kind == TransferKind.FORWARD:
                    inputs: dict[str, Value] = {}
                    if self._forward_srcs:
                        for values in (
                            await self.inbox.take(
                                TransferKind.FORWARD, step, mb, self._forward_srcs
                            )
                        ).values():
                            inputs.update(values)
                    outbox: dict[int, dict[str, Value]] = {}
                    if plan.loads_data:
                        inputs.update({n: micro[mb][n] for n in plan.data_inputs})
                        for name, dsts in plan.data_routes.items():
                            for dst in dsts:
                                outbox.setdefault(dst, {})[name] = micro[mb][name]
                    if self.evidence is not None:
                        self.evidence.record(step, mb, inputs)
                    outputs = await self._compute(self.runner.forward, mb, inputs)
                    for name, dsts in plan.sends.items():
                        for dst in dsts:
                            outbox.setdefault(dst, {})[name] = outputs[name]
                    for dst, values in outbox.items():
                        sends.append(self._send(TransferKind.FORWARD, dst, step, mb, values, sent))
                    if self.runner.stage.loss:
                        losses.append(float(outputs[self.runner.stage.loss]))
                else:
                    grads: dict[str, Value] = {}
                    if self._backward_srcs:
                        taken = await self.inbox.take(
                            TransferKind.BACKWARD, step, mb, self._backward_srcs
                        )
                        for values in taken.values():
                            for name, g in values.items():
                                grads[name] = add_grads(grads.get(name), g)
                    back = await self._compute(self.runner.backward, mb, grads)
                    by_src: dict[int, dict[str, Value]] = {}
                    for name, src in plan.receives.items():
                        meta = plan.graph.node(name).meta
                        if meta is not None and meta.carries_grad:
                            by_src.setdefault(src, {})[name] = back.get(name)
                    for src, values in by_src.items():
                        sends.append(self._send(TransferKind.BACKWARD, src, step, mb, values, sent))
            await asyncio.gather(*sends)
        except BaseException:
            for task in sends:
                task.cancel()
            raise
        loss = sum(losses) / len(losses) if losses else None
        named = [(n, p) for n, p in self.runner.module.named_parameters() if p.requires_grad]
        if self.sync is not None and not plan.local_sgd:
            loss = await self.sync.average(step, named, loss)
        await self._compute(self.runner.step)
        if self.sync is not None and plan.local_sgd:
            loss = await self.sync.average_parameters(step, named, loss)
        self.codecs.forget(step)
        # Every replica reports its step; the speaker's report (with the loss over the
        # group's shares) sets the job's progress.
        group: dict[str, Any] = {}
        if self.sync is not None:
            nbytes, secs, shares, stale = self.sync.take_figures(step)
            group = dict(sync_bytes=nbytes, sync_seconds=secs, shares=shares, staleness=stale)
        self.reporter.progress(
            self._report(
                step,
                loss,
                time.perf_counter() - began,
                sent=sent,
                compute_seconds=self._compute_s,
                **group,
            )
        )

    def _load_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        assert self.source is not None
        p = self.plan
        return replica_micro_batches(
            self.source.batch(step), p.data.micro_batches, p.replicas, p.replica
        )

    def _send(
        self,
        kind: TransferKind,
        dst: int,
        step: int,
        mb: int,
        values: dict[str, Value],
        sent: dict[int, int],
    ) -> asyncio.Task[int]:
        async def go() -> int:
            # Compression runs beside compute, never in the way of the next forward.
            forward = kind == TransferKind.FORWARD
            encode = self.codecs.encode_forward if forward else self.codecs.encode_backward
            wire = await asyncio.to_thread(encode, step, mb, dst, values)
            n = await self.sender(kind, dst, step, mb, wire)
            sent[dst] = sent.get(dst, 0) + n
            return n

        return asyncio.create_task(go(), name=f"send {kind} s{step} mb{mb} -> {dst}")

    # -- checkpoints ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of this stage's parameters, buffers and optimizer state, by name."""
        module = self.runner.module
        out = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        if self.runner.optimizer is not None:
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            out.update(
                {
                    k: v.cpu()
                    for k, v in optimizer_state_tensors(self.runner.optimizer, named).items()
                }
            )
        if self.sync is not None:
            out.update(self.sync.outer_state())
        return out

    async def _checkpoint(self, *, wait: bool) -> None:
        if not self.speaks:
            return  # replicas hold the same state: the speaker's copy is the checkpoint
        if self._checkpoint_task is not None:
            await self._checkpoint_task  # one upload at a time, in step order
        tensors = await self._compute(self.snapshot)
        task = asyncio.create_task(self.reporter.checkpoint(self.plan, self.step, tensors))
        self._checkpoint_task = task
        if wait:
            await task

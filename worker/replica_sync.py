"""Averaging a stage's gradients or parameters over its sync group: that stage in each replica.

With `sync: sync`, every replica of a stage ends each step with the same averaged gradient
before its optimizer steps, so R replicas of M/R micro-batches each train exactly as one
pipeline over all M. The exchange is all-to-all: every member sends its gradients (the
mean over its own micro-batches) to every other member over `ReplicaGradients`, and waits
for theirs; each then sums the R contributions in replica order and divides by R, so every
member applies bitwise the same average. That is R-1 sends per member and step, fine for
the small groups this is for (a ring would send less for large ones). The stage that
computes the loss adds its replica's loss, so each member knows the step's loss over the
global batch, and replica 0 reports it.

With `sync: local-sgd` (and `partial-local-sgd`), every replica steps its own optimizer on
its own gradients, and after each step that ends an averaging round
(`StagePlan.averages_parameters_after`) the members exchange their parameters the same way
and each takes the mean, again the same sum in the same order, so they leave the round
bitwise equal. Optimizer state stays local.
`partial-local-sgd` exchanges, after each step, only the layers its schedule averages then
(`StagePlan.layers_averaged_after`), each layer at its own iterations of the period. The
stage that computes the loss still exchanges the loss every step (a share of one number), so
replica 0 reports the global batch's loss; other steps send nothing.

With an outer optimizer (`outer`, DiLoCo), a round takes, instead of the mean, the
parameters of the last round stepped by outer SGD or Nesterov on the pseudo-gradient (the
last round's parameters minus the mean); every member holds the same outer state, so all
reach the same values. The speaker's checkpoint carries that state (`outer_state`: the last
round's parameters and the outer momentum, as `optim/<param>/outer_anchor` and
`optim/<param>/outer_velocity`), and a resumed run takes it back (`attach`).

A member that cannot be sent to after the peer retries is taken as probably gone: the
round waits, up to `timeout_s` in all, for the coordinator's word. When the coordinator
has seen a member's worker die, it tells the one replica it keeps that it is alone
(`go_alone`): a round then completes with the shares that did arrive, its own included,
divided by their count (every replica holds the same number of micro-batches, so that is
the mean over the micro-batches the round holds), and the round is announced: a warning
in the log, and `shares` (fewer than the group's size) in the step's report. Every later
round is its own share alone. Without that word nothing partial is ever applied: a member
averages only once every share is in, and after `timeout_s` it fails the step with
`ReplicaSyncError` (the stage reports the error and the coordinator re-plans).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch

from opdag.errors import CodecError, OpDagError
from opdag.optim import OPTIM_PREFIX
from proto.cluster_tls import ClientTls
from proto.retry import RetryPolicy, retry
from proto.rpc import token_metadata, worker_channel
from worker.peers import PEER_RETRY, RETRYABLE
from worker.robust_aggregate import Shares, robust_combine
from worker.serde import WorkerStub, gradient_share_parts, worker_stub
from worker.stage_plan import StagePlan
from worker.value_guard import SHARE, Suspicion, ValueGuard

log = logging.getLogger("archipelago.worker")

# The name the loss travels under: not a parameter's (those are graph identifiers).
LOSS = "#loss"
# The outer optimizer's state as checkpoint tensors `optim/<param>/<key>`.
OUTER_ANCHOR, OUTER_VELOCITY = "outer_anchor", "outer_velocity"
OUTER_KEYS = (OUTER_ANCHOR, OUTER_VELOCITY)
# How long a member waits for the rest of its group in one step: a peer replica may be up
# to about one step behind; one that is silent this long is taken as gone.
SYNC_TIMEOUT_S = 120.0

Named = Sequence[tuple[str, torch.nn.Parameter]]


class ReplicaSyncError(Exception):
    """A step's gradients could not be averaged with every replica of the stage."""


class ReplicaSync:
    """One stage's side of its sync group: sends its gradients, collects the others'."""

    def __init__(
        self,
        plan: StagePlan,
        *,
        token: str,
        tls: ClientTls | None,
        timeout_s: float = SYNC_TIMEOUT_S,
        retry_policy: RetryPolicy = PEER_RETRY,
    ) -> None:
        self.plan = plan
        self.token = token
        self.tls = tls
        self.timeout_s = timeout_s
        self.retry_policy = retry_policy
        self.sent_bytes = 0
        # What a member may send: every trainable parameter's dtype and shape (and the loss).
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._arrived: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self._changed = asyncio.Condition()
        self._step = plan.start_step  # the step being averaged (or the last one averaged)
        self._loss = False
        self._anchor: dict[str, torch.Tensor] = {}
        self._outer_velocity: dict[str, torch.Tensor] = {}
        self._stubs: dict[int, WorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        # Set once the coordinator says the other replicas are gone (`go_alone`).
        self._alone = asyncio.Event()
        # What this step's exchange did, for its report (`take_figures`).
        self._shares = 0
        self._seconds = 0.0
        self._bytes_reported = 0
        self._last_averaged = plan.start_step  # boundary of the last round that averaged
        self._waking: asyncio.Task[None] | None = None
        # The stage's checks of received values (set by the stage job); shares pass them.
        self.guard: ValueGuard | None = None

    def attach(
        self,
        named: Named,
        *,
        loss: bool,
        outer: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Set what the stage's gradients are: its trainable parameters (and the loss, for
        the stage that computes it); `outer`: the outer optimizer's state from a
        checkpoint (`outer_state`), checked against the parameters (none: start afresh)."""
        self._expected = {n: (self._wire_dtype(p.dtype), tuple(p.shape)) for n, p in named}
        self._loss = loss
        # DiLoCo: the parameters at the last round, and the outer optimizer's momentum.
        if self.plan.outer is not None and self.plan.local_sgd:
            self._anchor = {n: p.detach().cpu().float().clone() for n, p in named}
            self._outer_velocity = {n: torch.zeros_like(t) for n, t in self._anchor.items()}
            if outer:
                self._restore_outer(outer)
        if loss:
            self._expected[LOSS] = (torch.float64, (1,))

    def go_alone(self) -> None:
        """The other replicas are gone (the coordinator's word): rounds in progress complete
        with what arrived, later ones are this member's own share alone."""
        if not self._alone.is_set():
            log.warning(
                "job %s stage %d replica %d: the other replicas are gone; averaging alone",
                self.plan.job_id,
                self.plan.stage,
                self.plan.replica,
            )
        self._alone.set()
        # Wake a round waiting for shares that will not come (held: the loop keeps only a
        # weak reference to a task).
        self._waking = asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @property
    def alone(self) -> bool:
        return self._alone.is_set()

    def take_figures(self, step: int) -> tuple[int, float, int, int]:
        """This step's exchange for its report, then reset: (bytes sent to the group,
        seconds spent exchanging, shares averaged (0: no exchange), staleness: steps since
        the parameters were last averaged, 0 under sync)."""
        sent = self.sent_bytes - self._bytes_reported
        out = (sent, self._seconds, self._shares, 0)
        if self.plan.local_sgd:
            out = (sent, self._seconds, self._shares, step + 1 - self._last_averaged)
        self._bytes_reported = self.sent_bytes
        self._shares, self._seconds = 0, 0.0
        return out

    def outer_state(self) -> dict[str, torch.Tensor]:
        """The outer optimizer's state as checkpoint tensors (empty without one)."""
        out: dict[str, torch.Tensor] = {}
        for n, anchor in self._anchor.items():
            out[f"{OPTIM_PREFIX}{n}/{OUTER_ANCHOR}"] = anchor.clone()
            out[f"{OPTIM_PREFIX}{n}/{OUTER_VELOCITY}"] = self._outer_velocity[n].clone()
        return out

    def _restore_outer(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take back a checkpoint's outer state: every trainable parameter's anchor and
        momentum, each shaped like it, or nothing at all (OpDagError names what is off)."""
        want = set(self.outer_state())
        if set(tensors) != want:
            odd = sorted(set(tensors) ^ want)[:3]
            raise OpDagError(f"the outer optimizer state does not fit the stage: {odd}")
        for name, t in tensors.items():
            param, _, key = name[len(OPTIM_PREFIX) :].rpartition("/")
            held = self._anchor if key == OUTER_ANCHOR else self._outer_velocity
            if t.shape != held[param].shape or not t.dtype.is_floating_point:
                raise OpDagError(
                    f"outer state {name!r}: {t.dtype}{list(t.shape)}, not a float tensor "
                    f"shaped {list(held[param].shape)}"
                )
            if not torch.isfinite(t).all():
                raise OpDagError(f"outer state {name!r} holds values that are not finite")
            held[param] = t.detach().cpu().float().clone()

    def _wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """How a tensor of `dtype` travels: fp16 when the policy says so (`values: fp16`)."""
        return (
            torch.float16 if self.plan.sync_values == "fp16" and dtype.is_floating_point else dtype
        )

    @property
    def what(self) -> str:
        """What the group averages: gradients (sync) or parameters (local-sgd)."""
        return "parameters" if self.plan.local_sgd else "gradients"

    def _due(self, step: int) -> set[str]:
        """The names a member's share of `step` holds (empty: no exchange that step)."""
        if not self.plan.local_sgd:
            return set(self._expected)
        due = self.plan.averaged_after(step, (n for n in self._expected if n != LOSS))
        return due | {LOSS} if self._loss else due

    def _next_exchange(self, step: int) -> int:
        """The first step from `step` on with an exchange: a peer can be no further on, as
        it waits there for this member (the run's length when none is left)."""
        while step < self.plan.total_steps and not self._due(step):
            step += 1
        return step

    def max_bytes(self) -> int:
        """The most tensor bytes one member's share may declare."""
        total = sum(
            torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            for dtype, shape in self._expected.values()
        )
        return total + (64 << 10)

    # -- receiving --------------------------------------------------------------------------

    async def deliver(
        self, step: int, src: int, tensors: Sequence[tuple[str, torch.Tensor]]
    ) -> None:
        """Accept replica `src`'s share of `step` after checking it is one we expect."""
        if src not in self.plan.sync_peers:
            raise CodecError(f"replica {src} is not in this stage's sync group")
        if self.alone:
            raise CodecError(f"replica {self.plan.replica} of this stage now averages alone")
        due = self._due(step) if step < self.plan.total_steps else set()
        if not self._step <= step <= self._next_exchange(self._step + 1) or not due:
            raise CodecError(f"{self.what} of step {step} are not due (averaging {self._step})")
        shares: dict[str, torch.Tensor] = {}
        one = self.what[:-1]
        for name, t in tensors:
            want = self._expected.get(name)
            if want is None or name in shares or name not in due:
                raise CodecError(f"replica {src} sent {name!r}, not one {one} of this stage")
            if (t.dtype, tuple(t.shape)) != want:
                raise CodecError(
                    f"{one} {name!r} from replica {src}: expected {want[0]}{list(want[1])}, "
                    f"got {t.dtype}{list(t.shape)}"
                )
            shares[name] = t
        if self.guard is not None:
            self.guard.check(SHARE, self.plan.stage, src, step, shares)
        async with self._changed:
            slot = self._arrived.setdefault(step, {})
            if src in slot:
                raise CodecError(f"{self.what} of step {step} from replica {src} arrived twice")
            slot[src] = shares
            self._changed.notify_all()

    async def _others(self, step: int) -> dict[int, dict[str, torch.Tensor]]:
        """Every other member's share of `step`; once alone, whatever arrived."""
        want = set(self.plan.sync_peers)
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.alone or want <= set(self._arrived.get(step, {}))
            )
            return self._arrived.pop(step, {})

    # -- averaging --------------------------------------------------------------------------

    async def average(self, step: int, named: Named, loss: float | None) -> float | None:
        """Replace the stage's gradients of `step` by their mean over the group; returns
        the loss of the step over the global batch (None where the stage has none)."""
        # Copies: a member must not see its share change while the others still read it.
        if self.alone:
            self._shares = 1
            return loss  # no group left: the replica's own gradients are the mean
        own = [(n, p.grad.detach().cpu().clone()) for n, p in named if p.grad is not None]
        mean = await self._exchange(step, own, loss)
        for name, p in named:
            if p.grad is not None:
                p.grad.copy_(mean[name])
        return float(mean[LOSS]) if LOSS in mean else loss

    async def average_parameters(self, step: int, named: Named, loss: float | None) -> float | None:
        """Local SGD, after the optimizer step of `step`: where it ends an averaging round,
        replace the stage's parameters by their mean over the group; returns the loss of the
        step over the global batch (None where the stage has none)."""
        due = self._due(step)
        if not due:
            return loss
        if self.alone:
            self._shares, self._last_averaged = 1, step + 1
            return loss
        own = [(n, p.detach().cpu().clone()) for n, p in named if n in due]
        mean = await self._exchange(step, own, loss)
        if due - {LOSS}:
            self._last_averaged = step + 1
        if self._anchor:
            await asyncio.to_thread(self._outer_step, mean)
        with torch.no_grad():
            for name, p in named:
                if name in mean:
                    p.copy_(mean[name])
        if self.plan.sync_layers and due - {LOSS}:
            layers = self.plan.layers_averaged_after(step)
            at = step % self.plan.sync_period
            # One line per round, so what a run averaged can be counted from its logs: the
            # layers whose one scheduled iteration this is, then the extra syncs.
            log.info(
                "job %s stage %d replica %d: averaged layers %s | extra %s after step %d",
                self.plan.job_id,
                self.plan.stage,
                self.plan.replica,
                ",".join(la.name for la in layers if la.iterations[0] == at),
                ",".join(la.name for la in layers if la.iterations[0] != at),
                step,
            )
        return float(mean[LOSS]) if LOSS in mean else loss

    async def _exchange(
        self, step: int, own: list[tuple[str, torch.Tensor]], loss: float | None
    ) -> dict[str, torch.Tensor]:
        """Send this member's share of `step` to the group, wait for theirs, and return the
        mean of every share (nothing is returned unless every share arrived in time)."""
        self._step = step
        # Every member averages the values as they travel, its own included: the same mean.
        own = [(n, t.to(self._wire_dtype(t.dtype))) for n, t in own]
        if loss is not None:
            own.append((LOSS, torch.tensor([loss], dtype=torch.float64)))
        began = time.perf_counter()
        collect = asyncio.ensure_future(self._others(step))
        sends = {r: asyncio.ensure_future(self._send(r, step, own)) for r in self.plan.sync_peers}
        alone = asyncio.ensure_future(self._alone.wait())
        tasks = [collect, *sends.values()]
        failed: list[BaseException] = []
        try:
            # Until every share is in and taken, or the coordinator says we are alone; a
            # send that fails means a member is probably gone, and the coordinator's word
            # is awaited (up to the same timeout) before the step fails.
            pending: set[asyncio.Future[Any]] = set(tasks)
            deadline = began + self.timeout_s
            while pending and not self.alone:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                done, pending = await asyncio.wait(
                    pending | {alone}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(alone)
                for t in done - {alone}:
                    if not t.cancelled() and (e := t.exception()) is not None:
                        if not isinstance(e, ReplicaSyncError):
                            raise e
                        failed.append(e)
                        log.warning("%s; waiting for the coordinator's word", e)
        finally:
            for task in (*tasks, alone):  # what is left of the round is not needed
                task.cancel()
        self._seconds += time.perf_counter() - began
        if self.alone:
            others = collect.result() if collect.done() and not collect.cancelled() else {}
            others = others or self._arrived.pop(step, {})
        elif pending:  # out of time, without the coordinator's word
            if failed and collect not in pending:
                raise failed[0]
            if collect in pending:
                silent = sorted(set(self.plan.sync_peers) - set(self._arrived.get(step, {})))
                what = f"no {self.what} of step {step} from replica(s) {silent}"
            else:
                slow = sorted(r for r, t in sends.items() if t in pending)
                what = f"{self.what} of step {step} not taken by replica(s) {slow}"
            raise ReplicaSyncError(
                f"stage {self.plan.stage}: {what} within {self.timeout_s:.0f} s; "
                "nothing was averaged"
            )
        else:
            # Every share is in, though a send may have failed: the member it was for is
            # probably gone; the shares are the same as every other member's.
            others = collect.result()
        shares = {**others, self.plan.replica: dict(own)}
        self._shares = len(shares)
        if len(shares) < self.plan.replicas:
            log.warning(
                "job %s stage %d replica %d: step %d's %s averaged over replicas %s only, "
                "%d of %d (the others are gone)",
                self.plan.job_id,
                self.plan.stage,
                self.plan.replica,
                step,
                self.what,
                sorted(shares),
                len(shares),
                self.plan.replicas,
            )
        return await asyncio.to_thread(self._mean, step, shares)

    def _outer_step(self, mean: dict[str, torch.Tensor]) -> None:
        """DiLoCo's outer step, in place of `mean`: the pseudo-gradient (parameters at the
        last round minus the mean) stepped by heavy-ball SGD or Nesterov from the last
        round's parameters. Every member holds the same state, so all reach the same."""
        assert self.plan.outer is not None
        name, lr, momentum = self.plan.outer
        for n, anchor in self._anchor.items():
            if n not in mean:
                continue  # partial-local-sgd: not this layer's round
            grad = anchor - mean[n]
            velocity = self._outer_velocity[n]
            velocity.mul_(momentum).add_(grad)
            anchor.sub_(
                grad.add(velocity, alpha=momentum) if name == "nesterov" else velocity, alpha=lr
            )
            mean[n] = anchor.clone()

    def _mean(
        self, step: int, shares: Mapping[int, Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        names = set(shares[self.plan.replica])
        for r, share in shares.items():
            if set(share) != names:
                raise ReplicaSyncError(
                    f"stage {self.plan.stage}, step {step}: replica {r} sent {self.what} of "
                    f"{sorted(set(share) ^ names)[:3]} that the others do not (or lacks them)"
                )
        if self.plan.sync_aggregate != "mean":
            return self._robust(step, shares)
        order = sorted(shares)  # every replica normally; fewer once the others are gone
        # The same sum in the same order on every member: the same average, bit for bit.
        out: dict[str, torch.Tensor] = {}
        for name in names:
            first = shares[order[0]][name]  # fp16 on the wire is summed in fp32
            total = first.float() if first.dtype == torch.float16 else first.clone()
            for r in order[1:]:
                total += shares[r][name]
            out[name] = total / len(order)
        return out

    def _robust(self, step: int, shares: Mapping[int, Mapping[str, torch.Tensor]]) -> Shares:
        """`sync_aggregate` median or trimmed-mean: outliers left out and named."""
        out, outliers = robust_combine(shares, self.plan.sync_aggregate, LOSS)
        for r, why in outliers.items():
            what = f"{self.what[:-1]} share of step {step} from replica {r}: {why}"
            log.warning("job %s stage %d: left out the %s", self.plan.job_id, self.plan.stage, what)
            if self.guard is not None and r != self.plan.replica:
                self.guard.report(Suspicion(SHARE, self.plan.stage, r, step, what))
        return out

    async def _send(self, replica: int, step: int, own: Sequence[tuple[str, torch.Tensor]]) -> None:
        nbytes, parts = gradient_share_parts(plan=self.plan, step=step, tensors=own)
        stub = self._stub(replica)
        address = self.plan.sync_peers[replica]

        def log_retry(e: grpc.aio.AioRpcError, wait_s: float) -> None:
            log.warning("replica %d (%s) unreachable (%s); retrying", replica, address, e.code())

        try:
            await retry(
                lambda: stub.ReplicaGradients(parts(), metadata=token_metadata(self.token)),
                self.retry_policy,
                retry_on=RETRYABLE,
                on_retry=log_retry,
            )
        except grpc.aio.AioRpcError as e:
            raise ReplicaSyncError(
                f"sending {self.what} of step {step} to replica {replica} of stage "
                f"{self.plan.stage} ({address}) failed: {e.code().name}: {e.details()}"
            ) from None
        self.sent_bytes += nbytes

    def _stub(self, replica: int) -> WorkerStub:
        stub = self._stubs.get(replica)
        if stub is None:
            channel = worker_channel(
                self.plan.sync_peers[replica],
                self.tls,
                self.plan.sync_peer_ids.get(replica, ""),
            )
            self._channels.append(channel)
            stub = self._stubs[replica] = worker_stub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

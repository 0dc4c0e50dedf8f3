"""Spot checks: the coordinator recomputes one micro-batch of a stage, forward and backward,
and compares it with what the stages it sends to received.

A stage's value guard (`worker.value_guard`) sees only values far out of bounds; a sender
that computes right and then sends something a little off (a bias, another micro-batch's
output, gradients scaled by a few percent) passes it. So, about once in
`trust.spot_checks.every` steps of each stage, after the stage reported the step done:

1. the coordinator picks one of the step's micro-batches at random (`secrets`-grade
   randomness, chosen only now: while it sends, a stage cannot know which of its
   micro-batches will be checked, so it must send every one right);
2. it asks that stage for the micro-batch's inputs, the gradients it was sent for it, and
   its parameters and buffers at that step; each stage it sends activations to for that
   micro-batch's inputs as received; each stage it sends gradients back to for the
   gradients received (`SpotEvidence`; each stage keeps its last `keep` steps,
   `worker.spot_evidence`);
3. it checks every tensor against the stage graph's shapes and dtypes (sizes are bounded
   before a byte is read; nothing is unpickled), rebuilds the stage from the validated
   graph of the plan with those parameters and runs its forward and, given the gradients
   it was sent, its backward, as the worker's `StageRunner` does;
4. it compares each recomputed value with what its receiver reports it received: a
   difference above `tolerance` x the largest |x| of the recomputed value is a mismatch.
   (On one machine type the recomputation is bitwise the same: the tests see 0.)

The coordinator recomputes, not another worker: it holds the graph and already evaluates
whole checkpoints (`coordinator.validation`), and a recomputing volunteer would be one
more party whose word needs weighing. One check of a stage runs at a time (a stage's report
while one is in flight is not checked), in a thread.

A mismatch is the receiver's accusation of the sender (kind `spot-check`), weighed like a
refused value (`coordinator.quarantine`: a receiver lying about what it received accuses
with the same limited weight), with the evidence: step, stage, micro-batch, activation or
gradient, largest difference and its tolerance. Every check is an event of the job
(`spot_check`: passed, mismatch, withheld, or skipped and why; recomputed by the
coordinator).

A stage that does not produce its evidence (or evidence that does not fit the graph) while
every receiver produced theirs (a stage keeps as many steps as its receivers, and it is
asked right after it reported the step) has withheld it: `WITHHELD_LIMIT` (3) checks in a
row withheld back it off (`Quarantine.own_values`) and the job is planned again without
it. A passed check starts the count again. So a stage cannot escape checks by not
answering them.

Not checked: a link whose values travel compressed (the receiver holds the decoded sparse
values, which the coordinator would have to re-encode with the sender's state; the
gradients back follow the forward's kept entries), a stage whose graph draws random
numbers (dropout with p > 0), and the data stage 0 passes on. A check whose receiver's
evidence is missing too (the job moved on, ended or was planned again) is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from coordinator.events import EventKind, EventLog
from coordinator.job_record import Job, Progress, Suspect
from coordinator.planning.plan import Placement, stage_routes
from coordinator.worker_client import WorkerCallError, WorkerClient
from opdag.errors import OpDagError
from opdag.ir import CapturedModel, Graph, ValueMeta, itemsize
from opdag.partition import Partition, Stage, partition
from opdag.rad import StageRunner
from opdag.stage import StageModule
from opdag.values import Value, add_grads
from proto.errors import StreamError, WireError

log = logging.getLogger("archipelago.coordinator")

SPOT_CHECK = "spot-check"  # the Suspect kind of a mismatch
# Room above the graph's own bytes for a stream's headers.
SLACK_BYTES = 64 << 10
# Checks in a row whose stage withheld its evidence (while its receivers gave theirs)
# after which it is backed off.
WITHHELD_LIMIT = 3
# The tolerance is relative to the recomputed value's largest |x|, at least this.
MIN_SCALE = 1e-12


class EvidenceError(Exception):
    """Evidence that does not fit the stage graph."""


def random_ops(graph: Graph) -> list[str]:
    """The nodes of `graph` that draw random numbers in training (a recomputation differs)."""
    out = []
    for node in graph.nodes:
        p: Any = 0.0
        values = dict(node.kwargs)
        if node.target in ("aten.dropout.default", "aten.native_dropout.default"):
            p = values.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            if (values.get("train", node.args[2] if len(node.args) > 2 else True)) is False:
                p = 0.0
        elif node.target == "aten.scaled_dot_product_attention.default":
            p = values.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if not isinstance(p, int | float) or p != 0:
            out.append(node.name)
    return out


def fits(value: Value, meta: ValueMeta | None) -> bool:
    """Whether `value` has the structure, dtype and shape the graph gives it."""
    if meta is None:
        return False
    if meta.kind == "tensor":
        return (
            isinstance(value, torch.Tensor)
            and str(value.dtype).removeprefix("torch.") == meta.dtype
            and tuple(value.shape) == meta.shape
        )
    if meta.kind in ("tuple", "list"):
        return (
            isinstance(value, tuple | list)
            and len(value) == len(meta.items)
            and all(fits(v, m) for v, m in zip(value, meta.items, strict=True))
        )
    kinds: dict[str, Any] = {"int": int, "float": float, "bool": bool, "none": type(None)}
    kind = kinds.get(meta.kind)
    return (
        kind is not None
        and isinstance(value, kind)
        and not (meta.kind == "int" and isinstance(value, bool))
    )


def _leaves(value: Value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, tuple | list):
        return [t for v in value for t in _leaves(v)]
    return []


def largest_difference(recomputed: Value, received: Value) -> tuple[float, float]:
    """(largest |recomputed - received| over the float tensors, largest |recomputed|)."""
    diff, scale = 0.0, 0.0
    for a, b in zip(_leaves(recomputed), _leaves(received), strict=True):
        if a.numel() == 0:
            continue
        d = float((a.double() - b.double()).abs().amax())
        diff = d if not math.isfinite(d) else max(diff, d)
        scale = max(scale, float(a.abs().amax()))
        if not math.isfinite(diff):
            return math.inf, scale
    return diff, scale


def recompute(
    stage: Stage, params: Mapping[str, torch.Tensor], inputs: Mapping[str, Value]
) -> dict[str, Value]:
    """The stage's outputs for `inputs`, with `params` (checked against the graph's specs by
    `StageModule`), on the CPU without autograd."""
    module = StageModule(stage.graph, params, device="cpu")
    with torch.no_grad():
        return module(inputs)


def recompute_step(
    stage: Stage,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, Value],
    grads: Mapping[str, Value] | None,
    micro_batches: int,
) -> tuple[dict[str, Value], dict[str, Value]]:
    """The stage's outputs for `inputs` and, given the gradients of what it sent (`grads`;
    None: forward only), the gradients of what it received, as the worker's own
    `StageRunner` computes them for one of its `micro_batches`."""
    if grads is None:
        return recompute(stage, params, inputs), {}
    module = StageModule(stage.graph, params, device="cpu")
    runner = StageRunner(stage, module, num_micro_batches=micro_batches)
    outputs = runner.forward(0, inputs)
    return outputs, runner.backward(0, grads)


@dataclass(frozen=True)
class Outcome:
    """What one spot check found: `passed`, `mismatch` or `skipped`, and a line."""

    result: str
    text: str
    difference: float = math.nan
    bound: float = math.nan


class SpotChecks:
    """Picks and runs the spot checks of the jobs' running plans."""

    def __init__(
        self,
        workers: WorkerClient,
        events: EventLog,
        *,
        model_of: Callable[[Job], Awaitable[CapturedModel]],
        accuse: Callable[[Progress], Awaitable[None]],
        withheld: Callable[[Job, str, str], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], Any],
    ) -> None:
        self.workers = workers
        self.events = events
        self.model_of = model_of
        self.accuse = accuse
        self.withheld = withheld
        # (job id, worker id) -> checks in a row the worker withheld its evidence from.
        self._withheld: dict[tuple[str, str], int] = {}
        self.spawn = spawn
        self._random = secrets.SystemRandom()
        self._running: set[tuple[str, int]] = set()  # (job, stage) with a check in flight
        self._cuts: dict[str, tuple[int, Partition]] = {}  # job id -> (epoch, its cut)

    def observe(self, job: Job, p: Progress) -> None:
        """A stage reported step `p.step` done: check one of its micro-batches, by chance."""
        spot = job.spec.trust.spot_checks
        plan = job.plan
        if not spot.on or plan is None or plan.num_stages < 2:
            return  # one stage sends nothing to anyone
        if (job.job_id, p.stage) in self._running or self._random.random() * spot.every >= 1.0:
            return
        mb = self._random.randrange(max(1, job.spec.data.micro_batches // plan.replicas))
        self._running.add((job.job_id, p.stage))
        self.spawn(self._check(job, p.epoch, p.stage, p.replica, p.step, mb))

    async def _check(
        self,
        job: Job,
        epoch: int,
        stage: int,
        replica: int,
        step: int,
        mb: int,
    ) -> None:
        try:
            outcome = await self._run(job, epoch, stage, replica, step, mb)
        except Exception as e:  # a check must never take the coordinator down
            log.exception("job %s: spot check of stage %d step %d", job.job_id, stage, step)
            outcome = Outcome("skipped", f"{type(e).__name__}: {e}")
        finally:
            self._running.discard((job.job_id, stage))
        fields: dict[str, str | int | float | bool] = dict(
            epoch=epoch,
            stage=stage,
            replica=replica,
            step=step,
            micro_batch=mb,
            result=outcome.result,
            recomputed_by="coordinator",
        )
        if outcome.difference == outcome.difference:
            fields.update(difference=outcome.difference, bound=outcome.bound)
        await self.events.record(job.job_id, EventKind.SPOT_CHECK, outcome.text, **fields)

    async def _withholds(self, job: Job, sender: Placement, why: str) -> Outcome:
        """The checked stage gave no evidence while its receivers did: count it; at the limit,
        back the stage's worker off."""
        key = (job.job_id, sender.worker_id)
        count = self._withheld[key] = self._withheld.get(key, 0) + 1
        text = f"{why} (withheld by {sender.worker_name}: {count} in a row)"
        if count >= WITHHELD_LIMIT:
            self._withheld.pop(key, None)
            await self.withheld(
                job,
                sender.worker_id,
                f"withheld the evidence of {count} spot checks in a row while its receivers "
                f"gave theirs; the last: {why}",
            )
        return Outcome("withheld", text)

    def _cut(self, job: Job, epoch: int, model: CapturedModel) -> Partition:
        held = self._cuts.get(job.job_id)
        if held is not None and held[0] == epoch:
            return held[1]
        assert job.plan is not None
        cut = partition(model.graph, job.plan.assignment)
        self._cuts[job.job_id] = (epoch, cut)
        return cut

    async def _run(self, job: Job, epoch: int, k: int, replica: int, step: int, mb: int) -> Outcome:
        where = f"micro-batch {mb} of step {step}, stage {k} of replica {replica}"
        plan = job.plan
        if plan is None or job.epoch != epoch:
            return Outcome("skipped", f"spot check of {where}: the plan changed")
        model = await self.model_of(job)
        cut = await asyncio.to_thread(self._cut, job, epoch, model)
        stage = cut.stages[k]
        g = stage.graph
        if drawn := random_ops(g):
            return Outcome("skipped", f"spot check of {where}: {drawn[0]!r} draws random numbers")
        every_route = stage_routes(cut)
        routes = every_route[k]
        compressed = {(c.src_stage, c.dst_stage) for c in plan.codecs}
        # What each stage received from this one: activations (stage -> names) ...
        forward: dict[int, list[str]] = {}
        for name, dsts in routes["sends"].items():
            for dst in dsts:
                if (k, dst) not in compressed:
                    forward.setdefault(dst, []).append(name)
        # ... and the gradients of the values it sent this one (compressed links' gradients
        # follow the forward's kept entries: left out as well).
        backward: dict[int, list[str]] = {}
        for name, (src,) in routes["receives"].items():
            meta = g.node(name).meta
            if meta is not None and meta.carries_grad and (src, k) not in compressed:
                backward.setdefault(src, []).append(name)
        if not forward and not backward:
            return Outcome("skipped", f"spot check of {where}: nothing it sends can be checked")
        placed = {(p.stage, p.replica): p for p in plan.placements}
        sender = placed[(k, replica)]
        # The gradients this stage was sent: for the values it sends that carry one.
        sent_grads = [n for n in routes["sends"] if (m := g.node(n).meta) and m.carries_grad]

        def nbytes(graph: Graph, names: Iterable[str]) -> int:
            return sum(m.nbytes for n in names if (m := graph.node(n).meta)) + SLACK_BYTES

        def ask(
            p: Placement, max_bytes: int, *, params: bool = False, gradients: bool = False
        ) -> Awaitable[Any]:
            return self.workers.spot_evidence(
                p.worker_id,
                p.address,
                job_id=job.job_id,
                epoch=epoch,
                step=step,
                micro_batch=mb,
                params=params,
                gradients=gradients,
                max_bytes=max_bytes,
            )

        def grads_bytes(index: int) -> int:
            """Bytes of the gradients stage `index` may be sent: each value it sends, once
            from each stage it goes to."""
            graph = cut.stages[index].graph
            sends = every_route[index]["sends"].items()
            return sum(m.nbytes * len(d) for n, d in sends if (m := graph.node(n).meta)) + (
                SLACK_BYTES
            )

        param_bytes = sum(math.prod(p.shape) * itemsize(p.dtype) for p in g.params) + SLACK_BYTES
        mine = [
            ask(sender, param_bytes, params=True),
            ask(sender, nbytes(g, g.inputs)),
            # The last stage is sent no gradients: its loss starts the backward.
            ask(sender, grads_bytes(k), gradients=True)
            if backward and sent_grads
            else asyncio.sleep(0, {}),
        ]
        theirs_asked = [
            *(
                ask(placed[(d, replica)], nbytes(cut.stages[d].graph, cut.stages[d].graph.inputs))
                for d in forward
            ),
            *(ask(placed[(j, replica)], grads_bytes(j), gradients=True) for j in backward),
        ]
        answers = await asyncio.gather(*mine, *theirs_asked, return_exceptions=True)
        failed = [
            a
            for a in answers
            if isinstance(a, WorkerCallError | StreamError | WireError | OpDagError)
        ]
        if other := [a for a in answers if isinstance(a, BaseException) and a not in failed]:
            raise other[0]
        if failed:
            if any(isinstance(a, BaseException) for a in answers[len(mine) :]):
                return Outcome("skipped", f"spot check of {where}: no evidence: {failed[0]}")
            return await self._withholds(job, sender, f"spot check of {where}: {failed[0]}")
        given: list[Any] = list(answers)  # none is an exception past this point
        params, inputs, grads = given[: len(mine)]
        received = dict(zip([*forward, *backward], given[len(mine) :], strict=True))
        # (receiving stage, value name, what it received, its description)
        compared: list[tuple[int, str, str, Value, ValueMeta | None]] = []
        try:
            for d, names in forward.items():
                for n in names:
                    if n not in received[d]:
                        raise EvidenceError(f"stage {d}'s inputs lack {n!r}")
                    compared.append((d, n, "activation", received[d][n], g.node(n).meta))
            for j, names in backward.items():
                for n in names:
                    got = received[j].get(f"{k}/{n}")
                    if got is None:
                        raise EvidenceError(f"stage {j}'s gradients lack {n!r}")
                    compared.append((j, n, "gradient", got, g.node(n).meta))
            for d, n, what, value, meta in compared:
                if not fits(value, meta):
                    raise EvidenceError(f"the {what} {n!r} of stage {d} does not fit the graph")
        except EvidenceError as e:
            return Outcome("skipped", f"spot check of {where}: {e}")
        # Evidence that does not fit the graph is no evidence: withheld, as much as none.
        try:
            _check_inputs(g, inputs, f"stage {k}'s inputs")
            seeds = _summed_gradients(g, grads, sent_grads) if backward else {}
            outputs, input_grads = await asyncio.to_thread(
                recompute_step,
                stage,
                params,
                inputs,
                seeds if backward else None,
                max(1, job.spec.data.micro_batches // plan.replicas),
            )
        except (EvidenceError, OpDagError) as e:
            return await self._withholds(job, sender, f"spot check of {where}: {e}")
        tolerance = job.spec.trust.spot_checks.tolerance
        worst = (math.nan, math.nan)
        for d, n, what, value, _ in compared:
            ours = outputs[n] if what == "activation" else input_grads[n]
            diff, scale = largest_difference(ours, value)
            bound = tolerance * max(scale, MIN_SCALE)
            if not diff <= bound:
                evidence = (
                    f"spot check of {where}: the {what} {n!r} as stage {d} received it "
                    f"differs from the coordinator's recomputation by up to {diff:.3g} "
                    f"(tolerance {bound:.3g})"
                )
                await self.accuse(
                    Progress(
                        worker_id=placed[(d, replica)].worker_id,
                        job_id=job.job_id,
                        epoch=epoch,
                        stage=d,
                        step=step,
                        loss=None,
                        step_seconds=0.0,
                        sent={},
                        finished=False,
                        drained=False,
                        error="",
                        replica=replica,
                        suspects=(Suspect(SPOT_CHECK, k, replica, step, evidence, diff, bound),),
                    )
                )
                return Outcome("mismatch", evidence, diff, bound)
            if worst[0] != worst[0] or diff / bound > worst[0] / worst[1]:
                worst = (diff, bound)
        self._withheld.pop((job.job_id, sender.worker_id), None)
        kinds = " and ".join(
            w for w, present in (("activations", forward), ("gradients", backward)) if present
        )
        return Outcome(
            "passed",
            f"spot check of {where} passed ({kinds}): largest difference {worst[0]:.3g} "
            f"(tolerance {worst[1]:.3g})",
            *worst,
        )


def _summed_gradients(g: Graph, grads: Mapping[str, Value], names: list[str]) -> dict[str, Value]:
    """The gradients a stage was sent ("SRC/NAME"), summed per value over the stages that
    sent them, as the stage sums them before its backward."""
    out: dict[str, Value] = {}
    for key, grad in grads.items():
        _, _, name = key.partition("/")
        if name not in names:
            raise EvidenceError(f"a gradient of {name!r}, which the stage does not send")
        if grad is not None and not fits(grad, g.node(name).meta):
            raise EvidenceError(f"the gradient of {name!r} does not fit the graph")
        out[name] = add_grads(out.get(name), grad)
    return out


def _check_inputs(g: Graph, inputs: Mapping[str, Value], what: str) -> None:
    if set(inputs) != set(g.inputs):
        raise EvidenceError(
            f"{what} are {sorted(inputs)[:4]}, the graph takes {list(g.inputs)[:4]}"
        )
    for n in g.inputs:
        if not fits(inputs[n], g.node(n).meta):
            raise EvidenceError(f"{what}: {n!r} does not fit the graph")

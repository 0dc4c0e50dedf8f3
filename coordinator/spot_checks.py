"""Spot checks: the coordinator recomputes one micro-batch of a stage and compares it with
what the next stage received.

A stage's value guard (`worker.value_guard`) sees only values far out of bounds; a sender
that computes right and then sends something a little off (a bias, another micro-batch's
output) passes it. So, about once in `trust.spot_checks.every` steps of each stage that
sends activations, after the stage reported the step done:

1. the coordinator picks one of the step's micro-batches at random (`secrets`-grade
   randomness, chosen only now: while it sends, a stage cannot know which of its
   micro-batches will be checked, so it must send every one right);
2. it asks that stage for the micro-batch's inputs and its parameters and buffers at that
   step, and each stage it sends activations to for that micro-batch's inputs as they were
   received (`SpotEvidence`; each keeps its last `keep` steps, `worker.spot_evidence`);
3. it checks every tensor against the stage graph's shapes and dtypes (sizes are bounded
   before a byte is read; nothing is unpickled), rebuilds the stage from the validated
   graph of the plan with those parameters and runs its forward;
4. it compares each recomputed value with what the receiver reports it received: a
   difference above `tolerance` x max(1, largest |x| of the recomputed value) is a mismatch.

The coordinator recomputes, not another worker: it holds the graph and already evaluates
whole checkpoints (`coordinator.validation`), and a recomputing volunteer would be one
more party whose word needs weighing. One check of a stage runs at a time (a stage's report
while one is in flight is not checked), in a thread.

A mismatch is the receiver's accusation of the sender (kind `spot-check`), weighed like a
refused value (`coordinator.quarantine`: a receiver lying about what it received accuses
with the same limited weight), with the evidence: step, stage, micro-batch, largest
difference and its tolerance, who recomputed. Every check is an event of the job
(`spot_check`: passed, mismatch, or skipped and why).

A stage that does not produce its evidence while every receiver produced theirs (a stage
keeps as many steps as its receivers, and it is asked right after it reported the step)
has withheld it: `WITHHELD_LIMIT` (3) checks in a row withheld back it off
(`Quarantine.own_values`) and the job is planned again without it. A passed check
starts the count again. So a stage cannot escape checks by never answering them.

Not checked: a link whose activations travel compressed (the receiver holds the decoded
sparse values, which the coordinator would have to re-encode with the sender's state), a
stage whose graph draws random numbers (dropout with p > 0), gradients sent back, and the
data stage 0 passes on. A check whose receiver's evidence is missing too (the job moved
on, ended or was planned again) is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping
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
from opdag.stage import StageModule
from opdag.values import Value
from proto.errors import StreamError, WireError

log = logging.getLogger("archipelago.coordinator")

SPOT_CHECK = "spot-check"  # the Suspect kind of a mismatch
# Room above the graph's own bytes for a stream's headers.
SLACK_BYTES = 64 << 10
# Checks in a row whose stage withheld its evidence (while its receivers gave theirs)
# after which it is backed off.
WITHHELD_LIMIT = 3


class EvidenceError(Exception):
    """Evidence that does not fit the stage graph."""


def random_ops(graph: Graph) -> list[str]:
    """The nodes of `graph` that draw random numbers in training (a recomputation differs)."""
    out = []
    for node in graph.nodes:
        p: Any = 0.0
        if node.module is not None and "Dropout" in node.module.type:
            p = node.module.attr_dict().get("p", 0.5)
        elif node.target == "torch.nn.functional.dropout":
            p = dict(node.kwargs).get("p", node.args[1] if len(node.args) > 1 else 0.5)
        elif node.target == "torch.nn.functional.scaled_dot_product_attention":
            p = dict(node.kwargs).get("dropout_p", 0.0)
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
        if not spot.on or plan is None or plan.num_stages < 2 or p.stage >= plan.num_stages - 1:
            return  # the last stage sends no activations
        if (job.job_id, p.stage) in self._running or self._random.random() * spot.every >= 1.0:
            return
        compressed = {c.dst_stage for c in plan.codecs if c.src_stage == p.stage}
        mb = self._random.randrange(max(1, job.spec.data.micro_batches // plan.replicas))
        self._running.add((job.job_id, p.stage))
        self.spawn(self._check(job, p.epoch, p.stage, p.replica, p.step, mb, compressed))

    async def _check(
        self,
        job: Job,
        epoch: int,
        stage: int,
        replica: int,
        step: int,
        mb: int,
        compressed: set[int],
    ) -> None:
        try:
            outcome = await self._run(job, epoch, stage, replica, step, mb, compressed)
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

    async def _run(
        self,
        job: Job,
        epoch: int,
        k: int,
        replica: int,
        step: int,
        mb: int,
        compressed: set[int],
    ) -> Outcome:
        where = f"micro-batch {mb} of step {step}, stage {k} of replica {replica}"
        plan = job.plan
        if plan is None or job.epoch != epoch:
            return Outcome("skipped", f"spot check of {where}: the plan changed")
        model = await self.model_of(job)
        cut = await asyncio.to_thread(self._cut, job, epoch, model)
        stage = cut.stages[k]
        if drawn := random_ops(stage.graph):
            return Outcome("skipped", f"spot check of {where}: {drawn[0]!r} draws random numbers")
        sends = stage_routes(cut)[k]["sends"]
        by_dst: dict[int, list[str]] = {}
        for name, dsts in sends.items():
            for dst in dsts:
                by_dst.setdefault(dst, []).append(name)
        checked = {d: names for d, names in by_dst.items() if d not in compressed}
        if not checked:
            return Outcome(
                "skipped", f"spot check of {where}: every link it sends on is compressed"
            )
        placed = {(p.stage, p.replica): p for p in plan.placements}
        sender = placed[(k, replica)]
        receivers = {d: placed[(d, replica)] for d in checked}

        g = stage.graph
        input_bytes = sum(m.nbytes for n in g.inputs if (m := g.node(n).meta)) + SLACK_BYTES
        param_bytes = sum(math.prod(p.shape) * itemsize(p.dtype) for p in g.params) + SLACK_BYTES

        def ask(p: Placement, params: bool, max_bytes: int) -> Awaitable[Any]:
            return self.workers.spot_evidence(
                p.worker_id,
                p.address,
                job_id=job.job_id,
                epoch=epoch,
                step=step,
                micro_batch=mb,
                params=params,
                max_bytes=max_bytes,
            )

        received_bytes = {
            d: sum(
                m.nbytes
                for n in cut.stages[d].graph.inputs
                if (m := cut.stages[d].graph.node(n).meta)
            )
            + SLACK_BYTES
            for d in receivers
        }
        answers = await asyncio.gather(
            ask(sender, True, param_bytes),
            ask(sender, False, input_bytes),
            *(ask(receivers[d], False, received_bytes[d]) for d in receivers),
            return_exceptions=True,
        )
        failed = [
            a
            for a in answers
            if isinstance(a, WorkerCallError | StreamError | WireError | OpDagError)
        ]
        if other := [a for a in answers if isinstance(a, BaseException) and a not in failed]:
            raise other[0]
        if failed:
            if any(isinstance(a, BaseException) for a in answers[2:]):
                return Outcome("skipped", f"spot check of {where}: no evidence: {failed[0]}")
            return await self._withholds(job, sender, f"spot check of {where}: {failed[0]}")
        given: list[Any] = list(answers)  # none is an exception past this point
        params, inputs, *theirs = given
        try:
            for d, got in zip(receivers, theirs, strict=True):
                for n in checked[d]:
                    if n not in got or not fits(got[n], g.node(n).meta):
                        raise EvidenceError(f"stage {d}'s inputs lack {n!r} as the graph has it")
        except EvidenceError as e:
            return Outcome("skipped", f"spot check of {where}: {e}")
        # Evidence that does not fit the graph is no evidence: withheld, as much as none.
        try:
            _check_inputs(g, inputs, f"stage {k}'s inputs")
            outputs = await asyncio.to_thread(recompute, stage, params, inputs)
        except (EvidenceError, OpDagError) as e:
            return await self._withholds(job, sender, f"spot check of {where}: {e}")
        tolerance = job.spec.trust.spot_checks.tolerance
        worst = Outcome("passed", f"spot check of {where} passed")
        for d, got in zip(receivers, theirs, strict=True):
            for n in checked[d]:
                diff, scale = largest_difference(outputs[n], got[n])
                bound = tolerance * max(1.0, scale)
                if not diff <= bound:
                    evidence = (
                        f"spot check of {where}: {n!r} as stage {d} received it differs from "
                        f"the coordinator's recomputation by up to {diff:.3g} (tolerance "
                        f"{bound:.3g})"
                    )
                    await self.accuse(
                        Progress(
                            worker_id=receivers[d].worker_id,
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
                            suspects=(
                                Suspect(SPOT_CHECK, k, replica, step, evidence, diff, bound),
                            ),
                        )
                    )
                    return Outcome("mismatch", evidence, diff, bound)
                if worst.difference != worst.difference or diff > worst.difference:
                    worst = Outcome("passed", worst.text, diff, bound)
        self._withheld.pop((job.job_id, sender.worker_id), None)
        return Outcome(
            "passed",
            f"spot check of {where} passed: largest difference {worst.difference:.3g} "
            f"(tolerance {worst.bound:.3g})",
            worst.difference,
            worst.bound,
        )


def _check_inputs(g: Graph, inputs: Mapping[str, Value], what: str) -> None:
    if set(inputs) != set(g.inputs):
        raise EvidenceError(
            f"{what} are {sorted(inputs)[:4]}, the graph takes {list(g.inputs)[:4]}"
        )
    for n in g.inputs:
        if not fits(inputs[n], g.node(n).meta):
            raise EvidenceError(f"{what}: {n!r} does not fit the graph")

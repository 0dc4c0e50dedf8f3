"""The estimator: how long a plan's training step will take.

It prices a `PipelineLoad` placed on workers with three models, each small enough to
check by hand:

- compute: `ComputeModel` (FLOPs over a worker's speed, plus a per-node overhead);
- transfer: bytes over the link's bandwidth plus half its round trip, after an optional
  compression policy has chosen a codec for the link;
- step: the event simulation of the workers' 1F1B schedule (`simulate_1f1b`), forward
  and backward traffic on separate FIFO links, then each stage's optimizer step; the
  schedule's warm-up depth (`opdag.schedule`: micro-batches in flight, up to GPipe) is the
  one whose simulated step ends first, the shallowest of equals;
- averaging, when the plan has replicas: a stage's sync group exchanges all-to-all (as
  `worker/replica_sync.py` does: each member sends its whole share to each of the R-1
  others at once, so the R-1 copies share its uplink), by the job's sync policy
  (`SyncSpec`): `sync` sends gradients every step, before the optimizer step; the local
  kinds send parameters once per period, after it, priced amortised (a round's seconds
  over the period); `values: fp16` halves the bytes.

The planner calls `Estimator.step` many times, so it is memoised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.planning.compute import ComputeModel
from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.simulator import simulate_1f1b
from coordinator.planning.sync_spec import SyncSpec
from coordinator.planning.workload import Block, PipelineLoad, StageLoad
from opdag.schedule import in_flight


class WireCompression(Protocol):
    """A compression policy (`link_compression` builds one from the job spec): for a
    tensor of `dense_bytes` on a link of `bandwidth_Bps` that should take about
    `budget_s`, the codec to use, its compression ratio and the bytes it puts on the
    wire."""

    def __call__(
        self, dense_bytes: int, bandwidth_Bps: float, budget_s: float
    ) -> tuple[str, float, int]: ...


NO_CODEC = "none"


@dataclass(frozen=True)
class LinkLoad:
    """One directed worker pair's traffic in one step."""

    src_worker: str
    dst_worker: str
    src_stage: int
    dst_stage: int
    replica: int
    direction: str  # "fwd" (activations and data) or "bwd" (gradients)
    dense_bytes: int
    wire_bytes: int
    busy_s: float
    codec: str = NO_CODEC
    ratio: float = 1.0


@dataclass(frozen=True)
class StepEstimate:
    """The predicted training step: total seconds and where the time goes."""

    total_s: float
    micro_batches: int  # per replica
    replicas: int
    stage_compute_s: tuple[float, ...]  # busy seconds per stage (slowest replica), with step
    averaging_s: tuple[float, ...]  # per stage and step, amortised; zeros without replicas
    links: tuple[LinkLoad, ...]
    bottleneck: str
    # Bytes one member of each stage's sync group sends per step (amortised), all copies.
    averaging_bytes: tuple[int, ...] = ()
    # The schedule's extra warm-up: micro-batches in flight beyond 1F1B's (`opdag.schedule`).
    warmup_extra: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s,
            "micro_batches": self.micro_batches,
            "replicas": self.replicas,
            "stage_compute_s": list(self.stage_compute_s),
            "averaging_s": list(self.averaging_s),
            "links": [dict(x.__dict__) for x in self.links],
            "bottleneck": self.bottleneck,
            "averaging_bytes": list(self.averaging_bytes),
            "warmup_extra": self.warmup_extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepEstimate:
        return cls(
            total_s=float(d["total_s"]),
            micro_batches=int(d["micro_batches"]),
            replicas=int(d["replicas"]),
            stage_compute_s=tuple(float(x) for x in d["stage_compute_s"]),
            averaging_s=tuple(float(x) for x in d["averaging_s"]),
            links=tuple(LinkLoad(**x) for x in d["links"]),
            bottleneck=str(d["bottleneck"]),
            averaging_bytes=tuple(int(x) for x in d.get("averaging_bytes", ())),
            warmup_extra=int(d.get("warmup_extra", 0)),
        )


class Estimator:
    """Predicts compute, transfer and step times for one set of workers and links, under
    one sync policy for replicas (`sync`; by default `SyncSpec()`: gradients, fp32, every
    step)."""

    def __init__(
        self,
        speeds: Mapping[str, float],
        links: BandwidthMatrix,
        *,
        compute: ComputeModel | None = None,
        compression: WireCompression | None = None,
        sync: SyncSpec | None = None,
        warmup: int | None = None,
        memory: Mapping[str, int] | None = None,
    ) -> None:
        self.speeds = dict(speeds)
        # Each worker's memory (bytes; 0 or absent: unknown), which bounds how deep a
        # schedule the planner chooses for it.
        self.memory = dict(memory or {})
        # The schedule's extra warm-up: None, the depth whose simulated step ends first;
        # an int, that depth (as far as a step's micro-batches allow).
        self.warmup = warmup
        self.links = links
        self.compute = compute or ComputeModel()
        self.compression = compression
        self.sync = sync or SyncSpec()
        self._wire: dict[tuple[int, float, float], tuple[str, float, int]] = {}
        self._steps: dict[tuple[PipelineLoad, tuple[tuple[str, ...], ...], int], StepEstimate] = {}

    def rate(self, worker_id: str) -> float:
        return self.compute.rate(worker_id, self._speed(worker_id))

    def _speed(self, worker_id: str) -> float:
        try:
            return self.speeds[worker_id]
        except KeyError:
            raise KeyError(f"no measured speed for worker {worker_id}") from None

    def stage_seconds(self, stage: StageLoad | Block, worker_id: str) -> tuple[float, float]:
        """Forward and backward seconds per micro-batch of a stage (or block) on a worker."""
        rate, over = self.rate(worker_id), self.compute.node_overhead_s
        return (
            stage.fwd_flops / rate + stage.nodes * over,
            stage.bwd_flops / rate + stage.nodes * over,
        )

    def wire(
        self, dense_bytes: int, bandwidth_Bps: float, budget_s: float
    ) -> tuple[str, float, int]:
        """(codec, ratio, wire bytes) the compression policy picks; none without a policy."""
        if self.compression is None or dense_bytes <= 0 or math.isinf(bandwidth_Bps):
            return NO_CODEC, 1.0, dense_bytes
        key = (dense_bytes, bandwidth_Bps, budget_s)
        got = self._wire.get(key)
        if got is None:
            codec, ratio, wire = self.compression(dense_bytes, bandwidth_Bps, budget_s)
            got = self._wire[key] = (str(codec), float(ratio), int(wire))
        return got

    def transfer_seconds(
        self, dense_bytes: int, src: str, dst: str, *, budget_s: float = math.inf
    ) -> float:
        """Seconds for one message of `dense_bytes` from `src` to `dst`: wire bytes over the
        bandwidth plus half the round trip."""
        if src == dst or dense_bytes <= 0:
            return 0.0
        bw = self.links.bandwidth(src, dst)
        return self.wire(dense_bytes, bw, budget_s)[2] / bw + self.links.latency(src, dst)

    def averaging_bytes(self, param_bytes: int, replicas: int) -> float:
        """Bytes one member of a sync group of `replicas` sends per step, amortised: its
        share (`param_bytes` of fp32 gradients or parameters; half as fp16) to each of the
        R-1 others, every step for `sync`, once per period for the local kinds."""
        if replicas < 2 or param_bytes <= 0:
            return 0.0
        share = param_bytes / 2 if self.sync.values == "fp16" else param_bytes
        return (replicas - 1) * share / self._rounds_apart()

    def averaging_seconds(
        self, param_bytes: int, workers: Sequence[str], *, carries_loss: bool = False
    ) -> float:
        """Seconds per step the sync group `workers` spends averaging a stage of
        `param_bytes`, amortised over the sync period. A round is all-to-all: each member's
        R-1 copies of its share leave together over its uplink, taken at the slowest link
        of the group, then one round trip (the sends are acknowledged) on the slowest
        pair. Partial local SGD is priced like local SGD: the design overlaps it with the
        backward pass, but the workers average after the optimizer step, so it is not
        free. The stage that `carries_loss` exchanges the loss every step (one round
        trip), so that replica 0 can report the global batch's."""
        r = len(workers)
        if r < 2 or (param_bytes <= 0 and not carries_loss):
            return 0.0
        pairs = [(a, b) for a in workers for b in workers if a != b]
        bw = min(self.links.bandwidth(a, b) for a, b in pairs)
        lat = max(self.links.latency(a, b) for a, b in pairs)
        apart = self._rounds_apart()
        sent = self.averaging_bytes(param_bytes, r) * apart
        rounds = (sent / bw + 2 * lat) / apart if param_bytes > 0 else 0.0
        if carries_loss:
            rounds += 2 * lat * (1 - 1 / apart)  # the steps between rounds
        return rounds

    def _fits(
        self, load: PipelineLoad, plan: tuple[tuple[str, ...], ...], m: int, extra: int
    ) -> bool:
        """Whether every worker of `plan` holds its stage's state (parameters, gradients and
        two optimizer moments: 4x their bytes) and the activations of the micro-batches the
        schedule at depth `extra` has in flight there (workers of unknown memory: yes)."""
        n = len(load.stages)
        for row in plan:
            for s, (st, w) in enumerate(zip(load.stages, row, strict=True)):
                memory = self.memory.get(w, 0)
                need = in_flight(s, n, m, extra) * st.act_bytes + 4 * st.param_bytes
                if memory > 0 and need > memory:
                    return False
        return True

    def _rounds_apart(self) -> int:
        """Steps between averaging rounds: 1 for `sync`, the period for the local kinds."""
        return self.sync.period if self.sync.local else 1

    def step(
        self,
        load: PipelineLoad,
        placement: Sequence[Sequence[str]],
        *,
        micro_batches: int,
    ) -> StepEstimate:
        """The predicted step of `load` with `placement[replica][stage]` = worker id.

        The step's `micro_batches` are dealt out evenly, so each of R replicas runs
        `micro_batches / R` of them.
        """
        plan = tuple(tuple(r) for r in placement)
        key = (load, plan, micro_batches)
        cached = self._steps.get(key)
        if cached is None:
            cached = self._steps[key] = self._step(load, plan, micro_batches)
        return cached

    def _step(
        self, load: PipelineLoad, plan: tuple[tuple[str, ...], ...], micro_batches: int
    ) -> StepEstimate:
        num_stages, replicas = len(load.stages), len(plan)
        if replicas < 1 or any(len(r) != num_stages for r in plan):
            raise ValueError(f"the placement must give each of {num_stages} stages a worker")
        flat = [w for r in plan for w in r]
        if len(set(flat)) != len(flat):
            raise ValueError(f"a worker holds two stages in placement {plan}")
        if micro_batches < 1 or micro_batches % replicas:
            raise ValueError(f"{micro_batches} micro-batches do not split over {replicas} replicas")
        m = micro_batches // replicas

        links: list[LinkLoad] = []
        busy = [0.0] * num_stages
        sims: list[tuple[list[float], list[float], list[Any]]] = []
        for r, workers in enumerate(plan):
            fb = [self.stage_seconds(st, w) for st, w in zip(load.stages, workers, strict=True)]
            fwd = [x[0] for x in fb]
            bwd = [x[1] for x in fb]
            runs = []
            for t in load.transfers:
                a, d = workers[t.src], workers[t.dst]
                budget = max(fwd[t.src] + bwd[t.src], fwd[t.dst] + bwd[t.dst])
                up, down = self.links.bandwidth(a, d), self.links.bandwidth(d, a)
                c_f, ratio_f, wire_f = self.wire(t.fwd_bytes, up, budget)
                c_b, ratio_b, wire_b = self.wire(t.bwd_bytes, down, budget)
                occ_d = t.data_bytes / up if t.data_bytes > 0 else None
                occ_a = wire_f / up if t.fwd_bytes > 0 else None
                occ_g = wire_b / down if t.bwd_bytes > 0 else None
                lat_f, lat_b = self.links.latency(a, d), self.links.latency(d, a)
                runs.append((t.src, t.dst, occ_d, occ_a, lat_f, occ_g, lat_b))
                if occ_d is not None or occ_a is not None:
                    links.append(
                        LinkLoad(
                            src_worker=a,
                            dst_worker=d,
                            src_stage=t.src,
                            dst_stage=t.dst,
                            replica=r,
                            direction="fwd",
                            dense_bytes=m * (t.fwd_bytes + t.data_bytes),
                            wire_bytes=m * (wire_f + t.data_bytes),
                            busy_s=m * ((occ_a or 0.0) + (occ_d or 0.0)),
                            codec=c_f,
                            ratio=ratio_f,
                        )
                    )
                if occ_g is not None:
                    links.append(
                        LinkLoad(
                            src_worker=d,
                            dst_worker=a,
                            src_stage=t.dst,
                            dst_stage=t.src,
                            replica=r,
                            direction="bwd",
                            dense_bytes=m * t.bwd_bytes,
                            wire_bytes=m * wire_b,
                            busy_s=m * occ_g,
                            codec=c_b,
                            ratio=ratio_b,
                        )
                    )
            sims.append((fwd, bwd, runs))
            for s in range(num_stages):
                busy[s] = max(busy[s], m * (fwd[s] + bwd[s]))

        extra, ends = _deepest_worth_it(
            sims, m, self.warmup, lambda e: self._fits(load, plan, m, e)
        )
        averaging = tuple(
            self.averaging_seconds(
                st.param_bytes, [r[s] for r in plan], carries_loss=s == num_stages - 1
            )
            for s, st in enumerate(load.stages)
        )
        total = 0.0
        compute = []
        for s, st in enumerate(load.stages):
            steps = [self.compute.step_seconds(st.params, r[s], self._speed(r[s])) for r in plan]
            # `sync` averages before the optimizer step, the local kinds after it: either
            # way the group's members wait for the slowest of them, then the round.
            done = max(e[s] for e in ends) + averaging[s]
            total = max(total, max(done + x for x in steps))
            compute.append(busy[s] + max(steps))
        return StepEstimate(
            total_s=total,
            micro_batches=m,
            replicas=replicas,
            stage_compute_s=tuple(compute),
            averaging_s=averaging,
            links=tuple(links),
            bottleneck=_bottleneck(total, compute, averaging, links, plan),
            averaging_bytes=tuple(
                round(self.averaging_bytes(st.param_bytes, replicas)) for st in load.stages
            ),
            warmup_extra=extra,
        )


# The deepest extra warm-up the planner tries: each stage holds the activations of at most
# `S - s + MAX_EXTRA_WARMUP` micro-batches, and no more than its worker's memory allows.
MAX_EXTRA_WARMUP = 8


def warmup_candidates(micro_batches: int) -> tuple[int, ...]:
    """The extra warm-ups worth pricing: 0 to MAX_EXTRA_WARMUP, and none that the
    micro-batches cannot fill (past `micro_batches - 1` every stage is GPipe already)."""
    return tuple(range(min(MAX_EXTRA_WARMUP, max(micro_batches - 1, 0)) + 1))


def _deepest_worth_it(
    sims: Sequence[tuple[list[float], list[float], list[Any]]],
    micro_batches: int,
    forced: int | None = None,
    fits: Callable[[int], bool] = lambda extra: True,
) -> tuple[int, list[list[float]]]:
    """The extra warm-up whose simulated pipelines (every replica's) end first, and their
    stages' end times, among the depths whose activations `fits` the workers' memory (1F1B
    always); ties go to the shallower schedule (fewer activations held). A `forced` depth
    is taken as it is, up to GPipe's."""
    if forced is not None:
        candidates: tuple[int, ...] = (min(forced, max(micro_batches - 1, 0)),)
    else:
        candidates = tuple(e for e in warmup_candidates(micro_batches) if e == 0 or fits(e))
    best: tuple[float, int, list[list[float]]] | None = None
    for extra in candidates:
        ends = [simulate_1f1b(f, b, runs, micro_batches, extra) for f, b, runs in sims]
        last = max(max(e) for e in ends)
        if best is None or last < best[0] * (1 - 1e-9):
            best = (last, extra, ends)
    assert best is not None
    return best[1], best[2]


def _bottleneck(
    total: float,
    compute: Sequence[float],
    averaging: Sequence[float],
    links: Sequence[LinkLoad],
    plan: tuple[tuple[str, ...], ...],
) -> str:
    """Name the busiest resource of the step, and how much of the step it fills."""
    best, name = -1.0, "nothing"
    for s, secs in enumerate(compute):
        if secs > best:
            best, name = secs, f"stage {s} compute on {plan[0][s]}"
    for s, secs in enumerate(averaging):
        if secs > best:
            best, name = secs, f"stage {s} replica averaging"
    for x in links:
        if x.busy_s > best:
            best = x.busy_s
            name = (
                f"link {x.src_worker}->{x.dst_worker} "
                f"({x.direction}, stage {x.src_stage}->{x.dst_stage})"
            )
    share = best / total if total > 0 else 0.0
    return f"{name}: {best:.4g} s busy of {total:.4g} s ({share:.0%})"

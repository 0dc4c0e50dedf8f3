"""The compute model: how a node's FLOPs turn into seconds on a worker, and its refit.

A node costs its FLOPs over the worker's probed speed times a fitted efficiency, plus a
fixed overhead per node (`ComputeModel`); `fit_compute_model` refits both from the
per-stage seconds of profiled steps (`StageTiming`), so later plans are priced on what
the workers were seen to do.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from opdag.ir import Node


@dataclass(frozen=True)
class ComputeModel:
    """How FLOPs turn into seconds on a worker.

    `efficiency` is the fraction of the probed matmul speed a worker reaches on real
    operators (workers not listed get `default_efficiency`); every node also costs
    `node_overhead_s` in each direction (dispatch, small kernels). The optimizer step costs
    `step_flops_per_param` FLOPs per trainable parameter.
    """

    efficiency: Mapping[str, float] = field(default_factory=dict)
    default_efficiency: float = 1.0
    node_overhead_s: float = 0.0
    step_flops_per_param: float = 10.0

    def rate(self, worker_id: str, gflops: float) -> float:
        """FLOPs per second the worker reaches."""
        if gflops <= 0:
            raise ValueError(f"worker {worker_id}: speed {gflops!r} GFLOP/s must be > 0")
        return gflops * 1e9 * self.efficiency.get(worker_id, self.default_efficiency)

    def seconds(self, flops: float, nodes: int, worker_id: str, gflops: float) -> float:
        """Time of one direction (forward or backward) of `nodes` nodes doing `flops`."""
        return flops / self.rate(worker_id, gflops) + nodes * self.node_overhead_s

    def node_seconds(self, node: Node, worker_id: str, gflops: float) -> tuple[float, float]:
        """Forward and backward seconds of one node for one micro-batch."""
        return self.nodes_seconds((node,), worker_id, gflops)

    def nodes_seconds(
        self, nodes: Sequence[Node], worker_id: str, gflops: float
    ) -> tuple[float, float]:
        """Forward and backward seconds of a set of nodes for one micro-batch."""
        costs = [n.costs for n in nodes if n.op == "function"]
        fwd = sum(c.fwd_flops for c in costs if c is not None)
        bwd = sum(c.bwd_flops for c in costs if c is not None)
        return (
            self.seconds(fwd, len(costs), worker_id, gflops),
            self.seconds(bwd, len(costs), worker_id, gflops),
        )

    def step_seconds(self, params: int, worker_id: str, gflops: float) -> float:
        """Time of the optimizer step over `params` trainable parameters."""
        return self.step_flops_per_param * params / self.rate(worker_id, gflops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "efficiency": dict(self.efficiency),
            "default_efficiency": self.default_efficiency,
            "node_overhead_s": self.node_overhead_s,
            "step_flops_per_param": self.step_flops_per_param,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ComputeModel:
        return cls(
            efficiency={str(k): float(v) for k, v in d.get("efficiency", {}).items()},
            default_efficiency=float(d.get("default_efficiency", 1.0)),
            node_overhead_s=float(d.get("node_overhead_s", 0.0)),
            step_flops_per_param=float(d.get("step_flops_per_param", 10.0)),
        )


@dataclass(frozen=True)
class StageTiming:
    """Measured forward and backward seconds per micro-batch of one stage on one worker."""

    worker_id: str
    gflops: float
    fwd_flops: float
    bwd_flops: float
    nodes: int
    fwd_s: float
    bwd_s: float


def fit_compute_model(
    timings: Sequence[StageTiming],
    *,
    prior: ComputeModel | None = None,
    fit_overhead: bool = True,
) -> ComputeModel:
    """Refit per-worker efficiency and the per-node overhead from profiled stages.

    Each measured direction gives one equation `t = flops / (gflops * 1e9) * (1 / eff_w)
    + nodes * overhead`, linear in the unknowns `1 / eff_w` and `overhead`; they are solved
    by least squares on relative error (so short stages count as much as long ones). When
    the overhead cannot be told apart from the efficiencies (too few distinct stages) or
    comes out negative, it is kept at the prior's value and each efficiency is a ratio fit.
    Workers without timings keep the prior's efficiency; the default becomes the median of
    the fitted ones.
    """
    prior = prior or ComputeModel()
    rows = [
        (t.worker_id, flops / (t.gflops * 1e9), t.nodes, secs)
        for t in timings
        for flops, secs in ((t.fwd_flops, t.fwd_s), (t.bwd_flops, t.bwd_s))
        if secs > 0
    ]
    workers = sorted({w for w, x, _, _ in rows if x > 0})
    if not workers:
        return prior
    col = {w: i for i, w in enumerate(workers)}
    inverse: dict[str, float] | None = None
    overhead = prior.node_overhead_s
    if fit_overhead:
        a = np.zeros((len(rows), len(workers) + 1))
        y = np.ones(len(rows))
        for r, (w, x, n, secs) in enumerate(rows):
            if w in col:
                a[r, col[w]] = x / secs
            a[r, -1] = n / secs
        solution, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
        if rank == a.shape[1] and solution[-1] >= 0 and all(solution[:-1] > 0):
            inverse = {w: float(solution[col[w]]) for w in workers}
            overhead = float(solution[-1])
    if inverse is None:
        inverse = {}
        for w in workers:
            # Least squares through the origin on relative error, with the overhead fixed.
            num = den = 0.0
            for v, x, n, secs in rows:
                if v == w and x > 0:
                    num += (x / secs) * ((secs - n * overhead) / secs)
                    den += (x / secs) ** 2
            inverse[w] = max(num / den, 1e-9)
    fitted = {w: 1.0 / inverse[w] for w in workers}
    return ComputeModel(
        efficiency={**prior.efficiency, **fitted},
        default_efficiency=statistics.median(fitted.values()),
        node_overhead_s=overhead,
        step_flops_per_param=prior.step_flops_per_param,
    )

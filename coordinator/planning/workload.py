"""The workload model: what a cut model computes per stage and sends between stages.

`PipelineLoad` is what the step time depends on: each stage's FLOPs, nodes and parameters
(`StageLoad`) and the bytes each pair of stages exchanges per micro-batch (`EdgeLoad`).
The search works on a `BlockChain`: the model's compute nodes as blocks in topological
order and the values crossing between them, so that any list of stage starts is a convex
cut whose load follows by prefix sums. `load_from_partition` gives the load of a cut made
elsewhere (by `opdag.partition`).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from opdag.ir import Graph, Node, ValueMeta
from opdag.partition import Partition


@dataclass(frozen=True)
class StageLoad:
    """What one stage computes per micro-batch, and the parameters it steps."""

    fwd_flops: float
    bwd_flops: float
    nodes: int
    params: int = 0
    param_bytes: int = 0
    # Bytes of the values carrying gradient that one micro-batch's forward leaves for its
    # backward (about what the stage holds per micro-batch in flight).
    act_bytes: int = 0


@dataclass(frozen=True)
class EdgeLoad:
    """Bytes per micro-batch between two stages: activations and data forward (data are the
    inputs stage 0 loads and forwards; never compressed), gradients backward."""

    src: int
    dst: int
    fwd_bytes: int
    bwd_bytes: int
    data_bytes: int = 0


@dataclass(frozen=True)
class PipelineLoad:
    """A cut model, reduced to what the step time depends on."""

    stages: tuple[StageLoad, ...]
    transfers: tuple[EdgeLoad, ...]


def grad_bytes(meta: ValueMeta) -> int:
    """Bytes of the gradient that flows back through a value (0 when none does)."""
    if meta.kind == "tensor":
        return meta.nbytes if meta.requires_grad else 0
    return sum(grad_bytes(item) for item in meta.items)


@dataclass(frozen=True)
class Block:
    """A run of consecutive compute nodes that the planner keeps on one stage."""

    fwd_flops: float
    bwd_flops: float
    nodes: int
    params: int = 0
    param_bytes: int = 0
    act_bytes: int = 0  # as StageLoad's


@dataclass(frozen=True)
class ChainValue:
    """A value read outside the block that makes it (data inputs come from block 0)."""

    src: int
    dsts: tuple[int, ...]
    nbytes: int
    grad_bytes: int
    data: bool = False


@dataclass(frozen=True)
class BlockChain:
    """A model as blocks in topological order and the values crossing between them.

    Any contiguous runs of blocks are convex stages, so a plan is a list of stage starts.
    `members` names each block's compute nodes (empty for generated workloads).
    """

    blocks: tuple[Block, ...]
    values: tuple[ChainValue, ...]
    members: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_graph(cls, graph: Graph) -> BlockChain:
        """One block per compute node. Parameter reads sit with their first reader (as
        `opdag.partition` places them); data inputs are made by block 0."""
        nodes = graph.compute_nodes
        pos = {n.name: i for i, n in enumerate(nodes)}
        consumers = graph.consumers
        specs = graph.param_specs
        at: dict[str, int] = dict(pos)
        for n in graph.nodes:
            if n.op == "param":
                readers = [pos[c] for c in consumers[n.name] if c in pos]
                if readers:
                    at[n.name] = min(readers)
        params = [0] * len(nodes)
        pbytes = [0] * len(nodes)
        counted: set[str] = set()
        for n in graph.nodes:
            if n.name not in at:
                continue
            for p in graph.owned_params(n):
                spec = specs.get(p)
                if spec is None or p in counted or not spec.trainable:
                    continue
                counted.add(p)  # a module called twice owns its parameters once
                params[at[n.name]] += math.prod(spec.shape)
                pbytes[at[n.name]] += spec.nbytes
        blocks = tuple(
            Block(
                fwd_flops=n.costs.fwd_flops if n.costs else 0.0,
                bwd_flops=n.costs.bwd_flops if n.costs else 0.0,
                nodes=1,
                params=params[i],
                param_bytes=pbytes[i],
                act_bytes=_saved_bytes(n),
            )
            for i, n in enumerate(nodes)
        )
        values = []
        for n in graph.nodes:
            if n.meta is None:
                continue
            data = n.op == "input"
            src = 0 if data else at.get(n.name)
            if src is None:
                continue
            dsts = tuple(sorted({pos[c] for c in consumers[n.name] if c in pos} - {src}))
            if dsts:
                values.append(ChainValue(src, dsts, n.meta.nbytes, grad_bytes(n.meta), data))
        return cls(blocks, tuple(values), tuple((n.name,) for n in nodes))

    def merge(self, starts: Sequence[int]) -> BlockChain:
        """The coarser chain whose blocks begin at `starts` (sorted, starting with 0)."""
        starts = list(starts)
        if (
            not starts
            or starts[0] != 0
            or starts != sorted(set(starts))
            or starts[-1] >= len(self.blocks)
        ):
            raise ValueError(f"block starts {starts[:8]} must rise from 0 within the chain")
        ends = [*starts[1:], len(self.blocks)]
        blocks = tuple(_sum_blocks(self.blocks[a:b]) for a, b in zip(starts, ends, strict=True))
        members = (
            tuple(
                tuple(m for ms in self.members[a:b] for m in ms)
                for a, b in zip(starts, ends, strict=True)
            )
            if self.members
            else ()
        )
        return BlockChain(blocks, _regroup(self.values, starts), members)

    def load(self, starts: Sequence[int]) -> PipelineLoad:
        """The pipeline whose stages begin at blocks `starts` (sorted, starting with 0)."""
        starts = list(starts)
        n = len(self.blocks)
        if not starts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= n:
            raise ValueError(f"stage starts {starts[:8]} must rise from 0 within the chain")
        pre = self._prefix
        ends = [*starts[1:], n]
        stages = tuple(
            StageLoad(*(pre[b][f] - pre[a][f] for f in range(6)))  # type: ignore[arg-type]
            for a, b in zip(starts, ends, strict=True)
        )
        rows: dict[tuple[int, int], list[int]] = {}
        for v in _regroup(self.values, starts):
            for d in v.dsts:
                row = rows.setdefault((v.src, d), [0, 0, 0])
                if v.data:
                    row[2] += v.nbytes
                else:
                    row[0] += v.nbytes
                    row[1] += v.grad_bytes
        transfers = tuple(EdgeLoad(a, d, *rows[(a, d)]) for a, d in sorted(rows))
        return PipelineLoad(stages, transfers)

    @functools.cached_property
    def _prefix(self) -> list[tuple[float, float, int, int, int, int]]:
        out = [(0.0, 0.0, 0, 0, 0, 0)]
        for b in self.blocks:
            f, w, n, p, pb, ab = out[-1]
            out.append(
                (
                    f + b.fwd_flops,
                    w + b.bwd_flops,
                    n + b.nodes,
                    p + b.params,
                    pb + b.param_bytes,
                    ab + b.act_bytes,
                )
            )
        return out

    def crossing(self) -> tuple[list[int], list[int]]:
        """Forward and backward bytes crossing each cut position p (between blocks p-1 and
        p), for p in 0..len(blocks); each value counted once."""
        n = len(self.blocks)
        fwd = [0] * (n + 2)
        bwd = [0] * (n + 2)
        for v in self.values:
            fwd[v.src + 1] += v.nbytes
            fwd[v.dsts[-1] + 1] -= v.nbytes
            bwd[v.src + 1] += v.grad_bytes
            bwd[v.dsts[-1] + 1] -= v.grad_bytes
        out_f, out_b, rf, rb = [], [], 0, 0
        for p in range(n + 1):
            rf += fwd[p]
            rb += bwd[p]
            out_f.append(rf)
            out_b.append(rb)
        return out_f, out_b

    def assignment(self, starts: Sequence[int]) -> dict[str, int]:
        """Node name -> stage for the stages beginning at blocks `starts`."""
        return {
            name: bisect.bisect_right(starts, b) - 1
            for b, names in enumerate(self.members)
            for name in names
        }


def _sum_blocks(blocks: Sequence[Block]) -> Block:
    return Block(
        fwd_flops=sum(b.fwd_flops for b in blocks),
        bwd_flops=sum(b.bwd_flops for b in blocks),
        nodes=sum(b.nodes for b in blocks),
        params=sum(b.params for b in blocks),
        param_bytes=sum(b.param_bytes for b in blocks),
        act_bytes=sum(b.act_bytes for b in blocks),
    )


def _saved_bytes(node: Node) -> int:
    """What a node's forward leaves for its backward, about: its output, when a gradient
    flows back through it."""
    meta = node.meta
    return node.costs.out_bytes if node.costs and meta is not None and meta.carries_grad else 0


def _regroup(values: Sequence[ChainValue], starts: Sequence[int]) -> tuple[ChainValue, ...]:
    out = []
    for v in values:
        src = bisect.bisect_right(starts, v.src) - 1
        dsts = tuple(sorted({bisect.bisect_right(starts, d) - 1 for d in v.dsts} - {src}))
        if dsts:
            out.append(ChainValue(src, dsts, v.nbytes, v.grad_bytes, v.data))
    return tuple(out)


def load_from_partition(cut: Partition) -> PipelineLoad:
    """The load of a partition built by `opdag.partition.partition`."""
    stages = []
    for stage in cut.stages:
        g = stage.graph
        stages.append(
            StageLoad(
                fwd_flops=g.total("fwd_flops"),
                bwd_flops=g.total("bwd_flops"),
                nodes=len(g.compute_nodes),
                params=g.num_params(),
                param_bytes=sum(p.nbytes for p in g.params if p.trainable),
                act_bytes=sum(_saved_bytes(n) for n in g.compute_nodes),
            )
        )
    rows: dict[tuple[int, int], list[int]] = {}
    for e in cut.edges:
        for d in e.dsts:
            row = rows.setdefault((e.src, d), [0, 0, 0])
            row[0] += e.nbytes
            row[1] += grad_bytes(e.meta)
    for stage in cut.stages:
        for name in stage.data_inputs if stage.index else ():
            meta = cut.graph.node(name).meta
            rows.setdefault((0, stage.index), [0, 0, 0])[2] += meta.nbytes if meta else 0
    transfers = tuple(EdgeLoad(a, d, *rows[(a, d)]) for a, d in sorted(rows))
    return PipelineLoad(tuple(stages), transfers)

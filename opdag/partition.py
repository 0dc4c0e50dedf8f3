"""Cut a graph into pipeline stages.

An assignment maps each compute node to a stage. It is valid when every stage is convex (no
path leaves it and comes back) and values only flow from lower to higher stage numbers, so
the stages form a pipeline. Parameter reads follow the stage of their first reader: a
parameter read in two stages is sent as a value (its gradient comes back the same way).
Graph inputs are data: every stage that reads one loads it itself.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from opdag.errors import PartitionError
from opdag.ir import Graph, Node, ValueMeta


@dataclass(frozen=True)
class Edge:
    """A value one stage sends to others."""

    node: str
    src: int
    dsts: tuple[int, ...]
    meta: ValueMeta

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


@dataclass(frozen=True)
class Stage:
    """One stage: a graph of its own whose inputs are the values it receives and the data it
    loads, and whose outputs are the values it sends (and the loss, on the last stage)."""

    index: int
    graph: Graph
    recv: tuple[str, ...]
    data_inputs: tuple[str, ...]
    send: tuple[str, ...]

    @property
    def loss(self) -> str:
        return self.graph.loss


@dataclass(frozen=True)
class Partition:
    """A graph cut into stages, with every value that crosses between them."""

    graph: Graph
    assignment: Mapping[str, int]
    stages: tuple[Stage, ...]
    edges: tuple[Edge, ...]

    def stage_of(self, node: str) -> int:
        return self.assignment[node]

    def summary(self) -> list[dict[str, object]]:
        """Per stage: nodes, parameters, FLOPs, and bytes sent and received per step."""
        rows = []
        for stage in self.stages:
            g = stage.graph
            rows.append(
                {
                    "stage": stage.index,
                    "nodes": len(g.compute_nodes),
                    "params": g.num_params(),
                    "fwd_flops": g.total("fwd_flops"),
                    "bwd_flops": g.total("bwd_flops"),
                    "send_bytes": sum(
                        e.nbytes * len(e.dsts) for e in self.edges if e.src == stage.index
                    ),
                    "recv_bytes": sum(e.nbytes for e in self.edges if stage.index in e.dsts),
                    "first": g.compute_nodes[0].name if g.compute_nodes else "",
                    "last": g.compute_nodes[-1].name if g.compute_nodes else "",
                }
            )
        return rows


def partition(graph: Graph, assignment: Mapping[str, int]) -> Partition:
    """Validate `assignment` (node name to stage number) and build every stage's graph."""
    stage_of = _complete_assignment(graph, assignment)
    num_stages = max(stage_of.values(), default=-1) + 1
    used = set(stage_of.values())
    empty = [s for s in range(num_stages) if s not in used]
    if empty:
        raise PartitionError(f"stages {empty} have no nodes; number stages 0..{len(used) - 1}")
    _check_convex(graph, stage_of, num_stages)
    _check_order(graph, stage_of)

    edges: list[Edge] = []
    for node in graph.nodes:
        if node.op == "input":
            continue
        src = stage_of[node.name]
        dsts = sorted({stage_of[c] for c in graph.consumers[node.name]} - {src})
        if dsts:
            assert node.meta is not None, "partitioning needs an annotated graph"
            edges.append(Edge(node.name, src, tuple(dsts), node.meta))
    stages = tuple(_build_stage(graph, s, stage_of, edges) for s in range(num_stages))
    return Partition(graph=graph, assignment=dict(stage_of), stages=stages, edges=tuple(edges))


def _complete_assignment(graph: Graph, assignment: Mapping[str, int]) -> dict[str, int]:
    unknown = [n for n in assignment if n not in graph]
    if unknown:
        raise PartitionError(f"the assignment names nodes the graph does not have: {unknown[:5]}")
    for name, stage in assignment.items():
        if type(stage) is not int or stage < 0:
            raise PartitionError(f"node {name!r}: stage {stage!r} is not a non-negative integer")
    inputs = [n for n in assignment if graph.node(n).op == "input"]
    if inputs:
        raise PartitionError(
            f"inputs {inputs} are data, loaded by each stage that reads them; do not assign them"
        )
    missing = [n.name for n in graph.compute_nodes if n.name not in assignment]
    if missing:
        raise PartitionError(f"{len(missing)} compute nodes have no stage, e.g. {missing[:5]}")
    stage_of = dict(assignment)
    for node in graph.nodes:
        if node.op == "param" and node.name not in stage_of:
            readers = graph.consumers[node.name]
            if not readers:
                raise PartitionError(f"parameter node {node.name!r} is read by no node")
            stage_of[node.name] = min(stage_of[r] for r in readers)
    return stage_of


def _check_convex(graph: Graph, stage_of: Mapping[str, int], num_stages: int) -> None:
    """Every stage convex: no path from the stage through other stages back into it."""
    for s in range(num_stages):
        # Breadth-first search from the stage's outside successors, staying outside it.
        parent: dict[str, str] = {}
        queue: deque[str] = deque()
        for node in graph.nodes:
            if stage_of.get(node.name) != s:
                continue
            for c in graph.consumers[node.name]:
                if stage_of[c] != s and c not in parent:
                    parent[c] = node.name
                    queue.append(c)
        while queue:
            cur = queue.popleft()
            for c in graph.consumers[cur]:
                if stage_of[c] == s:
                    path = [c, cur]
                    while path[-1] in parent:
                        path.append(parent[path[-1]])
                        if stage_of[path[-1]] == s:
                            break
                    shown = " -> ".join(f"{n} (stage {stage_of[n]})" for n in reversed(path))
                    raise PartitionError(
                        f"stage {s} is not convex: {shown} leaves it and comes back; a stage "
                        "must not depend on itself through another stage"
                    )
                if c not in parent:
                    parent[c] = cur
                    queue.append(c)


def _check_order(graph: Graph, stage_of: Mapping[str, int]) -> None:
    for node in graph.nodes:
        if node.op == "input":
            continue
        for c in graph.consumers[node.name]:
            if stage_of[c] < stage_of[node.name]:
                raise PartitionError(
                    f"{node.name} (stage {stage_of[node.name]}) feeds {c} (stage {stage_of[c]}); "
                    "values must flow from lower to higher stage numbers"
                )


def _build_stage(graph: Graph, s: int, stage_of: Mapping[str, int], edges: list[Edge]) -> Stage:
    own = [n for n in graph.nodes if n.op != "input" and stage_of[n.name] == s]
    own_names = {n.name for n in own}
    read = {ref for n in own for ref in n.refs()}
    data_inputs = tuple(n.name for n in graph.nodes if n.op == "input" and n.name in read)
    recv = tuple(
        n.name
        for n in graph.nodes
        if n.op != "input" and n.name in read and n.name not in own_names
    )
    send = tuple(e.node for e in edges if e.src == s)
    placeholders = [
        Node(
            name=name,
            op="input",
            target=name,
            meta=graph.node(name).meta,
            source=graph.node(name).source,
        )
        for name in sorted((*data_inputs, *recv), key=graph.position)
    ]
    outputs = list(send)
    for out in graph.outputs:
        if out in own_names and out not in outputs:
            outputs.append(out)
    params = {p for n in own for p in graph.owned_params(n)}
    stage_graph = Graph(
        name=f"{graph.name}/stage{s}",
        nodes=(*placeholders, *own),
        inputs=tuple(p.name for p in placeholders),
        outputs=tuple(outputs),
        loss=graph.loss if graph.loss in own_names else "",
        params=tuple(p for p in graph.params if p.name in params),
        example_batch=graph.example_batch,
        state_keys=tuple((k, p) for k, p in graph.state_keys if p in params),
        dynamic_batch=graph.dynamic_batch,
    )
    stage_graph.check_structure()
    return Stage(index=s, graph=stage_graph, recv=recv, data_inputs=data_inputs, send=send)


# -- the default partitioner ---------------------------------------------------------------


def balanced_assignment(graph: Graph, num_stages: int, *, slack: float = 0.1) -> dict[str, int]:
    """Cut the graph's compute nodes, in topological order, into `num_stages` contiguous
    runs of about equal forward+backward FLOPs.

    Contiguous runs of a topological order are always convex. Within `slack` (a fraction of
    one stage's share) of each ideal cut, the cut that sends the fewest bytes wins.
    """
    nodes = graph.compute_nodes
    if num_stages < 1:
        raise PartitionError(f"the number of stages must be at least 1, not {num_stages}")
    if num_stages > len(nodes):
        raise PartitionError(f"{num_stages} stages asked for a graph of {len(nodes)} operators")
    weights = [_work(n) for n in nodes]
    if sum(weights) == 0:
        weights = [1.0] * len(nodes)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    total = prefix[-1]
    crossing = _crossing_bytes(graph, nodes)

    cuts: list[int] = []  # cut p: nodes [.., p) before, [p, ..) after
    for k in range(1, num_stages):
        target = total * k / num_stages
        window = slack * total / num_stages
        lo_bound = cuts[-1] + 1 if cuts else 1
        hi_bound = len(nodes) - (num_stages - k)
        lo = max(lo_bound, bisect.bisect_left(prefix, target - window))
        hi = min(hi_bound, bisect.bisect_right(prefix, target + window) - 1)
        if lo > hi:  # no cut within the window: take the nearest legal one
            nearest = min(range(lo_bound, hi_bound + 1), key=lambda p: abs(prefix[p] - target))
            lo = hi = nearest
        best = min(range(lo, hi + 1), key=lambda p: (crossing[p], abs(prefix[p] - target)))
        cuts.append(best)

    assignment: dict[str, int] = {}
    stage = 0
    for i, node in enumerate(nodes):
        while stage < len(cuts) and i >= cuts[stage]:
            stage += 1
        assignment[node.name] = stage
    return assignment


def _work(node: Node) -> float:
    return node.costs.fwd_flops + node.costs.bwd_flops if node.costs else 0.0


def _crossing_bytes(graph: Graph, nodes: tuple[Node, ...]) -> list[int]:
    """For each cut position p over `nodes`, the bytes of values made before p and read
    at or after p (parameter reads follow their reader, inputs are loaded locally)."""
    pos = {n.name: i for i, n in enumerate(nodes)}
    diff = [0] * (len(nodes) + 2)
    for node in nodes:
        readers = [pos[c] for c in graph.consumers[node.name] if c in pos]
        if not readers or node.meta is None:
            continue
        # The value crosses every cut between its producer and its last reader.
        diff[pos[node.name] + 1] += node.meta.nbytes
        diff[max(readers) + 1] -= node.meta.nbytes
    out, running = [], 0
    for p in range(len(nodes) + 1):
        running += diff[p]
        out.append(running)
    return out

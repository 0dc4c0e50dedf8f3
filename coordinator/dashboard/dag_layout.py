"""The plan drawn as a DAG: the captured graph's operators laid out in layers, coloured by
the stage that runs them, with the edges that cross between stages marked with their codec.

The layout is worked out here, once per job and plan (the caller caches it), so the browser
only draws boxes where it is told. Layers are longest paths from the inputs, so every edge
points forward. A straight chain of operators of one stage (each the only reader of the
one before) is drawn as one box; a graph still too big to read is drawn in blocks of
consecutive operators of one stage, and the layout says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opdag.ir import Graph

# More boxes than this would not be read: the graph is drawn in blocks instead.
MAX_DRAWN = 240


@dataclass
class _Box:
    """Operators drawn as one box: their names in graph order, and their stage."""

    names: list[str]
    stage: int | None
    op: str


def layout_dag(
    graph: Graph,
    assignment: Mapping[str, int],
    *,
    codecs: Iterable[Any] = (),
    workers: Mapping[int, str] | None = None,
    max_drawn: int = MAX_DRAWN,
    collapse_chains: bool = True,
) -> dict[str, Any]:
    """The layout of `graph` cut by `assignment` (node name -> stage): boxes with their
    layer and their place in it, edges between boxes, and what was collapsed.

    `codecs` are the plan's `LinkCodec`s (a cut edge from stage a to stage b is labelled
    with the codec of the link a -> b); `workers` names each stage's worker.
    """
    preds = _predecessors(graph)
    boxes = [
        _Box([n.name], assignment.get(n.name), n.op) for n in graph.nodes
    ]  # in graph (topological) order
    box_of = {n.name: i for i, n in enumerate(graph.nodes)}
    if collapse_chains:
        boxes, box_of = _collapse_chains(graph, preds, boxes, box_of)
    blocked = len(boxes) > max_drawn
    if blocked:
        boxes, box_of = _blocks(boxes, box_of, math.ceil(len(boxes) / max_drawn), max_drawn)
    edges: dict[tuple[int, int], None] = {}
    for n in graph.nodes:
        dst = box_of[n.name]
        for p in preds[n.name]:
            src = box_of[p]
            if src != dst:
                edges[(src, dst)] = None
    layers = _layers(len(boxes), edges)
    order = _order_in_layers(layers, edges)
    codec_of = {(c.src_stage, c.dst_stage): c for c in codecs}
    drawn_edges = []
    for src, dst in edges:
        a, b = boxes[src].stage, boxes[dst].stage
        cut = a is not None and b is not None and a != b
        edge: dict[str, Any] = {"src": src, "dst": dst, "cut": cut}
        if cut:
            codec = codec_of.get((a, b))
            edge["codec"] = (
                f"{codec.codec} x{codec.ratio:g} {codec.values}" if codec is not None else "dense"
            )
        drawn_edges.append(edge)
    stages = sorted({b.stage for b in boxes if b.stage is not None})
    note = ""
    if blocked:
        note = (
            f"{len(graph.nodes)} operators are too many to read: drawn as {len(boxes)} "
            "blocks, each a run of consecutive operators of one stage"
        )
    return {
        "nodes": [
            {
                "id": i,
                "label": _label(b),
                "title": ", ".join(b.names[:12]) + (" ..." if len(b.names) > 12 else ""),
                "op": b.op,
                "count": len(b.names),
                "stage": b.stage,
                "layer": layers[i],
                "order": order[i],
            }
            for i, b in enumerate(boxes)
        ],
        "edges": drawn_edges,
        "layers": max(layers, default=-1) + 1,
        "stages": [{"stage": s, "worker": (workers or {}).get(s, "")} for s in stages],
        "operators": len(graph.nodes),
        "note": note,
    }


def _predecessors(graph: Graph) -> dict[str, list[str]]:
    """For each node, the nodes it reads (each once, in the order it names them)."""
    return {n.name: [r for r in dict.fromkeys(n.refs()) if r in graph] for n in graph.nodes}


def _collapse_chains(
    graph: Graph, preds: Mapping[str, list[str]], boxes: list[_Box], box_of: dict[str, int]
) -> tuple[list[_Box], dict[str, int]]:
    """Merge each node into its predecessor's box when it is that predecessor's only reader,
    reads nothing else, and runs on the same stage. Contracting such an edge never makes a
    cycle, and a box's first node stays its earliest in graph order."""
    consumers = graph.consumers
    head = {n.name: n.name for n in graph.nodes}
    for n in graph.nodes:
        (p, *more) = preds[n.name] or [""]
        if (
            p
            and not more
            and consumers[p] == (n.name,)
            and boxes[box_of[p]].stage == boxes[box_of[n.name]].stage
        ):
            head[n.name] = head[p]
    merged: dict[str, _Box] = {}
    for n in graph.nodes:
        h = head[n.name]
        if h == n.name:
            merged[h] = _Box([n.name], boxes[box_of[n.name]].stage, n.op)
        else:
            merged[h].names.append(n.name)
    out = list(merged.values())
    index = {h: i for i, h in enumerate(merged)}
    return out, {n.name: index[head[n.name]] for n in graph.nodes}


def _blocks(
    boxes: list[_Box], box_of: dict[str, int], size: int, max_drawn: int
) -> tuple[list[_Box], dict[str, int]]:
    """Boxes (in order of their first node) joined into blocks of up to `size` consecutive
    boxes of one stage. An edge always runs from a box to a later one, so from a block to the
    same or a later block: blocks stay acyclic."""
    while True:
        out: list[_Box] = []
        new_index: list[int] = []
        run = 0
        for b in boxes:
            last = out[-1] if out else None
            if last is not None and last.stage == b.stage and run < size:
                last.names.extend(b.names)
                run += 1
            else:
                out.append(_Box(list(b.names), b.stage, "block"))
                run = 1
            new_index.append(len(out) - 1)
        if len(out) <= max_drawn or size >= len(boxes):
            break
        size *= 2  # many short runs of alternating stages: wider blocks
    return out, {name: new_index[i] for name, i in box_of.items()}


def _layers(count: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    """Each box's layer: the longest path to it from a box with no inputs (boxes are
    numbered in topological order, so one pass in that order settles it)."""
    into: list[list[int]] = [[] for _ in range(count)]
    for src, dst in edges:
        into[dst].append(src)
    layer = [0] * count
    for i in range(count):
        if into[i]:
            layer[i] = 1 + max(layer[s] for s in into[i])
    return layer


def _order_in_layers(layers: list[int], edges: Iterable[tuple[int, int]]) -> list[int]:
    """Each box's place within its layer: sorted by the mean place of what it reads (one
    sweep from the inputs), which keeps most edges short and uncrossed."""
    into: dict[int, list[int]] = {}
    for src, dst in edges:
        into.setdefault(dst, []).append(src)
    by_layer: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        by_layer.setdefault(layer, []).append(i)
    order = [0] * len(layers)
    for layer in sorted(by_layer):
        members = by_layer[layer]

        def centre(i: int) -> float:
            srcs = into.get(i, [])
            return sum(order[s] for s in srcs) / len(srcs) if srcs else float(i)

        for place, i in enumerate(sorted(members, key=lambda i: (centre(i), i))):
            order[i] = place
    return order


def _label(box: _Box) -> str:
    """The box's text: its first operator, and how many more it stands for."""
    first = box.names[0]
    short = first if len(first) <= 18 else first[:16] + ".."
    return short if len(box.names) == 1 else f"{short} +{len(box.names) - 1}"

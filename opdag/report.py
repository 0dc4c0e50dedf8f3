"""Readable summaries of graphs and partitions, as plain data (for `--json`) and as text."""

from __future__ import annotations

from collections import Counter
from typing import Any

from opdag.ir import Graph
from opdag.partition import Partition


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or unit == "P":
            return f"{n:.1f} {unit}FLOP" if unit else f"{n:.0f} FLOP"
        n /= 1000
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if not unit else f"{n:.2f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def heaviest_edges(graph: Graph, top: int) -> list[dict[str, Any]]:
    """The `top` values with the most bytes that some other node reads."""
    rows: list[dict[str, Any]] = []
    for node in graph.nodes:
        readers = graph.consumers[node.name]
        if node.op == "input" or not readers or node.meta is None:
            continue
        rows.append(
            {
                "node": node.name,
                "value": node.meta.describe(),
                "bytes": node.meta.nbytes,
                "readers": list(readers),
            }
        )
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def dag_summary(graph: Graph, *, top: int = 10) -> dict[str, Any]:
    """Counts, parameters, FLOPs (for the example batch) and the heaviest edges of a graph."""
    by_op = Counter(n.op for n in graph.nodes)
    by_target = Counter(n.target for n in graph.compute_nodes)
    flops_by_kind: dict[str, float] = {}
    for n in graph.compute_nodes:
        if n.costs:
            kind = n.target
            flops_by_kind[kind] = (
                flops_by_kind.get(kind, 0.0) + n.costs.fwd_flops + n.costs.bwd_flops
            )
    return {
        "name": graph.name,
        "ir_version": graph.ir_version,
        "inputs": {
            name: graph.node(name).meta.describe() if graph.node(name).meta else "?"  # type: ignore[union-attr]
            for name in graph.inputs
        },
        "loss": graph.loss,
        "example_batch": graph.example_batch,
        "nodes": len(graph.nodes),
        "nodes_by_kind": dict(by_op),
        "operators": dict(by_target.most_common()),
        "params": graph.num_params(),
        "param_bytes": sum(p.nbytes for p in graph.params),
        "buffers": graph.num_params(trainable_only=False) - graph.num_params(),
        "fwd_flops": graph.total("fwd_flops"),
        "bwd_flops": graph.total("bwd_flops"),
        "flops_by_operator": dict(sorted(flops_by_kind.items(), key=lambda kv: -kv[1])[:10]),
        "heaviest_edges": heaviest_edges(graph, top),
    }


def format_dag_summary(s: dict[str, Any]) -> str:
    lines = [
        f"graph {s['name']}  (IR v{s['ir_version']})",
        f"  inputs      {', '.join(f'{k}: {v}' for k, v in s['inputs'].items())}",
        f"  loss        {s['loss'] or '(none)'}",
        f"  nodes       {s['nodes']}  ("
        + ", ".join(f"{v} {k}" for k, v in s["nodes_by_kind"].items())
        + ")",
        f"  parameters  {human_count(s['params'])}  ({human_bytes(s['param_bytes'])}"
        + (f", plus {human_count(s['buffers'])} buffer values)" if s["buffers"] else ")"),
        f"  FLOPs       forward {human_flops(s['fwd_flops'])}, backward "
        f"{human_flops(s['bwd_flops'])}  (batch of {s['example_batch']})",
        "",
        "  FLOPs by operator (forward + backward):",
    ]
    total = (s["fwd_flops"] + s["bwd_flops"]) or 1.0
    for op, f in s["flops_by_operator"].items():
        lines.append(f"    {op:<45} {human_flops(f):>14}  {100 * f / total:5.1f}%")
    lines += ["", "  heaviest edges:"]
    for e in s["heaviest_edges"]:
        readers = ", ".join(e["readers"][:3]) + (" ..." if len(e["readers"]) > 3 else "")
        lines.append(
            f"    {e['node']:<32} {e['value']:<24} {human_bytes(e['bytes']):>10}  -> {readers}"
        )
    return "\n".join(lines)


def partition_summary(p: Partition) -> dict[str, Any]:
    return {
        "graph": p.graph.name,
        "stages": p.summary(),
        "edges": [
            {
                "node": e.node,
                "from": e.src,
                "to": list(e.dsts),
                "value": e.meta.describe(),
                "bytes": e.nbytes,
            }
            for e in p.edges
        ],
        "assignment": dict(p.assignment),
    }


def format_partition_summary(s: dict[str, Any]) -> str:
    lines = [f"graph {s['graph']} in {len(s['stages'])} stages", ""]
    lines.append(
        f"  {'stage':>5} {'nodes':>6} {'params':>9} {'fwd+bwd':>14} {'sends':>10} "
        f"{'receives':>10}  nodes"
    )
    for r in s["stages"]:
        lines.append(
            f"  {r['stage']:>5} {r['nodes']:>6} {human_count(r['params']):>9} "
            f"{human_flops(r['fwd_flops'] + r['bwd_flops']):>14} "
            f"{human_bytes(r['send_bytes']):>10} {human_bytes(r['recv_bytes']):>10}  "
            f"{r['first']} .. {r['last']}"
        )
    lines += ["", "  values crossing stages (per step, forward; gradients flow back the same way):"]
    for e in s["edges"]:
        to = ",".join(map(str, e["to"]))
        size = human_bytes(e["bytes"])
        lines.append(f"    {e['from']} -> {to:<5} {e['node']:<32} {e['value']:<24} {size:>10}")
    return "\n".join(lines)

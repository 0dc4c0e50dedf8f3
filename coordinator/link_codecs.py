"""Which cut links of a plan travel compressed, and how much each keeps.

A link carries, per micro-batch, the float activations one stage sends another (and their
gradients back, the same size, in the other direction). With `compression: {topk: R}`
every cut link keeps the fraction R. With `adatopk` each link keeps the largest fraction
whose transfer still fits the plan's target - the pipeline's bottleneck compute time per
micro-batch, so the link stops being the bottleneck - never less than the spec's floor;
links that fit uncompressed stay uncompressed, and so do links never measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from compressors import AdaTopKConfig, choose_link_compression, compressed_wire_bytes
from coordinator.jobspec import CompressionSpec
from coordinator.planner import LinkCodec
from opdag.partition import Partition

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
# The spec says fp32 for "as computed"; the compressors call that value format raw.
VALUE_FORMATS = {"fp32": "raw", "fp16": "fp16"}
CODEC = "sampled_topk"


def activation_bytes(cut: Partition) -> dict[tuple[int, int], int]:
    """Float activation bytes per micro-batch on each (src stage, dst stage) link: the
    values compressors may touch (not data inputs, not a parameter read in two stages)."""
    out: dict[tuple[int, int], int] = {}
    for edge in cut.edges:
        node = cut.graph.node(edge.node)
        if node.op in ("input", "param") or edge.meta.kind != "tensor":
            continue
        if edge.meta.dtype not in FLOAT_DTYPES:
            continue
        for dst in edge.dsts:
            out[(edge.src, dst)] = out.get((edge.src, dst), 0) + edge.nbytes
    return out


def plan_link_codecs(
    cut: Partition,
    stage_workers: Sequence[str],
    spec: CompressionSpec,
    figures: Mapping[tuple[str, str], tuple[float, float]],
    *,
    target_s: float,
) -> tuple[LinkCodec, ...]:
    """The codecs of a plan's cut links. `figures` holds (bytes/s, rtt s) per directed
    worker pair; `target_s` is the bottleneck stage's compute time per micro-batch."""
    if spec.kind == "none":
        return ()
    values = VALUE_FORMATS[spec.values]
    out = []
    for (src, dst), dense in sorted(activation_bytes(cut).items()):
        fig = figures.get((stage_workers[src], stage_workers[dst]))
        if spec.kind == "topk":
            wire = compressed_wire_bytes(dense, spec.ratio, values=values)
            seconds = wire / fig[0] + fig[1] / 2 if fig else 0.0
            out.append(LinkCodec(src, dst, CODEC, spec.ratio, values, dense, wire, seconds))
            continue
        if fig is None or target_s <= 0:
            continue  # nothing known to size it by: the link stays exact
        bandwidth, rtt = fig
        choice = choose_link_compression(
            dense_bytes=dense,
            bandwidth=bandwidth,
            target_s=target_s,
            latency_s=rtt / 2,
            config=AdaTopKConfig(floor=spec.floor, codec=CODEC, values=values),
        )
        if choice.codec == "none":
            continue
        out.append(
            LinkCodec(
                src,
                dst,
                choice.codec,
                choice.ratio,
                choice.values,
                dense,
                choice.wire_bytes,
                choice.seconds,
            )
        )
    return tuple(out)

"""Compression of a plan's cut links, chosen together with the plan.

The estimator asks a compression policy, for each cut link it prices, what the link's
activations would cost on the wire; the planner thus weighs placements with their
compression, and the plan's links carry the codec and ratio chosen for them. With
`compression: {topk: R}` every cut link keeps the fraction R. With `adatopk` a link keeps
the largest fraction whose transfer still fits its budget - the compute time of a
micro-batch at its busier end, so the link stops being the bottleneck - never less than
the spec's floor; links that fit uncompressed stay uncompressed.
"""

from __future__ import annotations

from compressors import AdaTopKConfig, choose_link_compression, compressed_wire_bytes
from coordinator.planning.compression_spec import CompressionSpec
from coordinator.planning.estimator import NO_CODEC, WireCompression
from coordinator.planning.opfence_plan import OpFencePlan
from coordinator.planning.plan import LinkCodec

# The spec says fp32 for "as computed"; the compressors call that value format raw.
VALUE_FORMATS = {"fp32": "raw", "fp16": "fp16"}
CODEC = "sampled_topk"


def wire_compression(spec: CompressionSpec) -> WireCompression | None:
    """The policy the estimator prices links with (None: everything travels exact)."""
    if spec.kind == "none":
        return None
    values = VALUE_FORMATS[spec.values]
    if spec.kind == "topk":

        def fixed(
            dense_bytes: int, bandwidth_Bps: float, budget_s: float
        ) -> tuple[str, float, int]:
            del bandwidth_Bps, budget_s  # one ratio everywhere
            return CODEC, spec.ratio, compressed_wire_bytes(dense_bytes, spec.ratio, values=values)

        return fixed
    config = AdaTopKConfig(floor=spec.floor, codec=CODEC, values=values)

    def adaptive(dense_bytes: int, bandwidth_Bps: float, budget_s: float) -> tuple[str, float, int]:
        if budget_s <= 0 or bandwidth_Bps <= 0:
            return NO_CODEC, 1.0, dense_bytes
        choice = choose_link_compression(
            dense_bytes=dense_bytes, bandwidth=bandwidth_Bps, target_s=budget_s, config=config
        )
        return choice.codec, choice.ratio, choice.wire_bytes

    return adaptive


def plan_codecs(plan: OpFencePlan, spec: CompressionSpec) -> tuple[LinkCodec, ...]:
    """The codec of every compressed cut link of `plan`, as the estimator chose it."""
    policy = wire_compression(spec)
    if policy is None:
        return ()
    values = VALUE_FORMATS[spec.values]
    out = []
    for x in plan.links:
        if x.replica != 0 or x.fwd_codec == NO_CODEC:
            continue
        dense = x.fwd_bytes - x.data_bytes  # data inputs always travel exact
        wire = compressed_wire_bytes(dense, x.fwd_ratio, values=values)
        out.append(
            LinkCodec(
                x.src_stage, x.dst_stage, x.fwd_codec, x.fwd_ratio, values, dense, wire, x.fwd_s
            )
        )
    return tuple(out)

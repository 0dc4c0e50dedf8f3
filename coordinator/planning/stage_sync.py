"""A stage's partial local SGD schedule from its parameters, before anything is profiled.

`sync: partial-local-sgd` averages each layer of a stage at its own iteration of the period
(`sync_schedule`). Its profile is estimated here: a layer is the stage's trainable
parameters under one layer prefix (`blocks.3.attn.qkv.weight` is in layer `blocks.3`,
`tok_emb.weight` in `tok_emb`), its backward time is taken proportional to its parameter
count (a layer's backward FLOPs grow with its weights), and its averaging time is its bytes
sent to each other member over a link of `link_bytes_per_s` (the group's slowest measured
link, `group_link_rate`), at two bytes a value when the policy sends fp16. `SyncLayer` is
what the worker is told: per layer, its parameters and the iterations of the period that
average it.

Extra syncs in idle link time (`schedule_partial_sync(fill_idle=True)`) are not asked for:
the scheduler's idle time is link time beside the backward pass, and the worker averages
after the optimizer step, so an extra sync would stall the step, not fill idle time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.planning.sync_schedule import (
    LayerProfile,
    StageProfile,
    SyncSchedule,
    schedule_partial_sync,
)
from opdag.ir import Graph, ParamSpec

# Until a link is measured: 100 Mbit/s between the members of a sync group.
DEFAULT_LINK_BYTES_PER_S = 12.5e6
# Backward seconds per parameter of a layer, for one step of one replica: about 4 FLOPs per
# weight and token over ~1e3 tokens on a 10 GFLOP/s worker. Only its ratio to the
# averaging time shapes the schedule.
BACKWARD_S_PER_PARAM = 4e-7


@dataclass(frozen=True)
class SyncLayer:
    """One layer of a stage: its parameters, and the iterations of the period at which
    they are averaged (the scheduled one first, then extra syncs in idle link time)."""

    name: str
    params: tuple[str, ...]
    iterations: tuple[int, ...]


def group_link_rate(
    figures: Mapping[tuple[str, str], tuple[float, float]], members: Sequence[str]
) -> float:
    """The slowest measured link among a sync group's workers, in bytes/s (the default
    when none is measured): every member sends to every other."""
    rates = [figures[(a, b)][0] for a in members for b in members if a != b and (a, b) in figures]
    rates = [r for r in rates if r > 0]
    return min(rates) if rates else DEFAULT_LINK_BYTES_PER_S


def layer_of(param: str) -> str:
    """A parameter's layer: its name up to the first numbered part, else its first part."""
    parts = param.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else param


def _layers(params: Sequence[ParamSpec]) -> dict[str, list[ParamSpec]]:
    layers: dict[str, list[ParamSpec]] = {}
    for p in params:
        if p.trainable:
            layers.setdefault(layer_of(p.name), []).append(p)
    return layers


def stage_profile(
    graph: Graph,
    replicas: int,
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S,
    values: str = "fp32",
) -> StageProfile | None:
    """The estimated profile of a stage's layers in forward order (None: nothing trains);
    `values`: how averaged values travel (fp32 or fp16)."""
    layers = _layers(graph.params)
    if not layers:
        return None
    profiles = []
    for name, params in layers.items():
        count = sum(math.prod(p.shape) for p in params)
        nbytes = sum(p.nbytes for p in params) * (replicas - 1)  # a copy to each other member
        if values == "fp16":
            nbytes //= 2
        profiles.append(LayerProfile(name, BACKWARD_S_PER_PARAM * count, nbytes / link_bytes_per_s))
    backward = sum(p.backward_s for p in profiles)
    return StageProfile(tuple(profiles), forward_s=backward / 2)


def stage_sync_layers(
    graph: Graph,
    replicas: int,
    period: int,
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S,
    values: str = "fp32",
) -> tuple[tuple[SyncLayer, ...], SyncSchedule | None]:
    """The layers of a stage with the iterations that average them, and the schedule."""
    profile = stage_profile(graph, replicas, link_bytes_per_s, values)
    if profile is None:
        return (), None
    schedule = schedule_partial_sync(profile, period, fill_idle=False)
    layers = _layers(graph.params)
    out = []
    for layer in profile.layers:
        scheduled = schedule.iteration_of(layer.name)
        extra = [it.iteration for it in schedule.iterations if layer.name in it.extra]
        params = tuple(p.name for p in layers[layer.name])
        out.append(SyncLayer(layer.name, params, (scheduled, *extra)))
    return tuple(out), schedule


__all__ = [
    "BACKWARD_S_PER_PARAM",
    "DEFAULT_LINK_BYTES_PER_S",
    "SyncLayer",
    "group_link_rate",
    "layer_of",
    "stage_profile",
    "stage_sync_layers",
]

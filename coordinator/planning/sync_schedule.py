"""The layer-wise partial local SGD schedule of one stage's replicas (DreamDDP), as plain data.

With `sync: partial-local-sgd` the replicas of a stage train locally, and every layer is
averaged once per period of H steps, each at its own iteration of the period, so that the
averaging hides behind the backward pass instead of stalling the step (DreamDDP, arXiv
2502.11058; ../shared/DESIGN.md). `schedule_partial_sync` picks those iterations from a
profile of the stage: per layer, in forward order, its backward time and the time to average
it, and the forward time of a step. `SyncSchedule.format()` prints it; `refit` recomputes it
from new profiles. Nothing here touches a network.

The timing model. The backward runs from the last layer to the first, so a layer is ready to
average once its own backward is done, and the backward of the layers before it is still to
come: its averaging can hide behind that. One link carries the stage's averaging, a layer at
a time, in the order layers become ready. Averaging still running when the backward ends is
the step's wait, since the next forward needs the averaged values. So the first layer (ready
last, needed first) can never hide its averaging: the schedule reports that wait as it is.

The scheduler minimises the period's total wait. A depth-first search gives each layer its
iteration (largest averaging first, cheapest iteration first), pruned by a lower bound: a set
of layers never waits less than the sum of its layers' waits alone (the work one link has
left when the backward ends only grows by sharing it). The result is minimal when the search
ends within its node budget, else the best found. Then idle link time is filled with extra
syncs that add no wait, by gain: the layer's averaging time (its bytes on the link) times the
iterations since it was last averaged (its staleness), so big layers that drifted longest are
refreshed first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from coordinator.planning.sync_spec import MAX_PERIOD

# Nodes the search may visit before it settles for the best assignment found so far; a
# stage of a few dozen layers over a period of 8 is scheduled in well under a second.
SEARCH_NODES = 20_000
# The search recurses once per layer; a stage with more layers keeps the greedy assignment.
_SEARCH_DEPTH = 400


def _check_time(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite time >= 0 s, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LayerProfile:
    """One layer of a stage as profiled: its backward compute time and the time to average
    its parameters among the stage's replicas, in seconds."""

    name: str
    backward_s: float
    averaging_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a layer's name must be a non-empty string, got {self.name!r}")
        object.__setattr__(
            self, "backward_s", _check_time(f"{self.name}: backward", self.backward_s)
        )
        object.__setattr__(
            self, "averaging_s", _check_time(f"{self.name}: averaging", self.averaging_s)
        )


@dataclass(frozen=True)
class StageProfile:
    """A stage's profile: its layers in forward order and the forward time of one step."""

    layers: tuple[LayerProfile, ...]
    forward_s: float

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("a stage profile needs at least one layer, got none")
        if not all(isinstance(layer, LayerProfile) for layer in layers):
            raise ValueError("a stage profile's layers must be LayerProfiles")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"layer names must be unique, got {', '.join(twice)} twice")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "forward_s", _check_time("forward", self.forward_s))

    @property
    def backward_s(self) -> float:
        """The backward time of one step: every layer's, one after the other."""
        return sum(layer.backward_s for layer in self.layers)

    def ready_s(self) -> tuple[float, ...]:
        """When each layer is ready to average, in seconds after the backward starts."""
        ready, done = [0.0] * len(self.layers), 0.0
        for i in reversed(range(len(self.layers))):
            done += self.layers[i].backward_s
            ready[i] = done
        return tuple(ready)


@dataclass(frozen=True)
class IterationPlan:
    """One iteration of the period: the layers averaged there (`averaged`: each layer once
    per period; `extra`: extra syncs in idle link time), in the order the link sends them,
    and the predicted times of the step, in seconds."""

    iteration: int
    averaged: tuple[str, ...]
    extra: tuple[str, ...]
    communication_s: float
    forward_s: float
    backward_s: float
    wait_s: float

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.wait_s


@dataclass(frozen=True)
class SyncSchedule:
    """Which layers each iteration of a period averages, with the step times it predicts.

    `minimal` says the search proved no assignment of layers to iterations waits less.
    """

    profile: StageProfile = field(repr=False)
    period: int
    iterations: tuple[IterationPlan, ...]
    minimal: bool
    fills_idle: bool = True

    @property
    def wait_s(self) -> float:
        """The period's total wait for averaging, in seconds."""
        return sum(it.wait_s for it in self.iterations)

    def iteration_of(self, layer: str) -> int:
        """The iteration of the period at which `layer` has its one scheduled average."""
        for it in self.iterations:
            if layer in it.averaged:
                return it.iteration
        raise KeyError(f"no layer {layer!r} in this schedule")

    def syncs_at(self, iteration: int) -> tuple[str, ...]:
        """Every layer averaged at step `iteration` (of the whole run), in sending order."""
        it = self.iterations[iteration % self.period]
        return _sending_order(self.profile, (*it.averaged, *it.extra))

    def refit(self, profile: StageProfile) -> SyncSchedule:
        """The schedule for new profiles of the stage, with the same period and settings."""
        return schedule_partial_sync(profile, self.period, fill_idle=self.fills_idle)

    def format(self) -> str:
        """The schedule as a table: one line per iteration of the period."""
        proof = "minimal" if self.minimal else "best found"
        lines = [
            f"partial local SGD, {len(self.profile.layers)} layers, period {self.period}: "
            f"wait {self.wait_s:.3f} s per period ({proof})",
            f"{'iter':>4}  {'comm s':>8}  {'bwd s':>8}  {'wait s':>8}  {'step s':>8}  "
            "averaged | extra",
        ]
        for it in self.iterations:
            extra = f" | {', '.join(it.extra)}" if it.extra else ""
            lines.append(
                f"{it.iteration:>4}  {it.communication_s:>8.3f}  {it.backward_s:>8.3f}  "
                f"{it.wait_s:>8.3f}  {it.step_s:>8.3f}  {', '.join(it.averaged) or '-'}{extra}"
            )
        return "\n".join(lines)


def _sending_order(profile: StageProfile, names: Iterable[str]) -> tuple[str, ...]:
    index = {layer.name: i for i, layer in enumerate(profile.layers)}
    return tuple(sorted(names, key=lambda name: -index[name]))  # last layer is ready first


class _Link:
    """The averaging link of one step: when the layers of a set finish averaging."""

    def __init__(self, profile: StageProfile) -> None:
        self.ready = profile.ready_s()
        self.averaging = tuple(layer.averaging_s for layer in profile.layers)
        self.backward = profile.backward_s
        # Float sums of the same times in another order differ in the last bits.
        self.tolerance = 1e-9 * max(self.backward, sum(self.averaging), 1e-9)

    def wait(self, layers: Iterable[int]) -> float:
        """How long the step waits after its backward for the averaging of `layers`."""
        end = 0.0
        for i in sorted(layers, reverse=True):  # in the order they become ready
            end = max(end, self.ready[i]) + self.averaging[i]
        spill = end - self.backward
        return spill if spill > self.tolerance else 0.0


def _assign(link: _Link, n: int, period: int, budget: int) -> tuple[list[list[int]], bool]:
    """Each layer's iteration, as the layers of each iteration; and whether it is minimal."""
    if period >= n:
        # Alone a layer waits least, and waits only add up when layers share an iteration:
        # one layer per iteration is minimal. Spread them over the period, last layer first.
        alone: list[list[int]] = [[] for _ in range(period)]
        for k, i in enumerate(reversed(range(n))):
            alone[k * period // n].append(i)
        return alone, True
    order = sorted(range(n), key=lambda i: (-link.averaging[i], -i))
    alone_wait = [link.wait([i]) for i in range(n)]
    bound_after = [0.0] * (n + 1)  # the least wait the layers order[k:] add, whatever we do
    for k in reversed(range(n)):
        bound_after[k] = bound_after[k + 1] + alone_wait[order[k]]
    sets: list[list[int]] = [[] for _ in range(period)]
    waits = [0.0] * period

    def options(i: int) -> list[tuple[float, float, int]]:
        """Where layer i may go: (wait it adds, averaging load then, iteration), best first."""
        found = []
        for t in range(period):
            if not sets[t] and t > 0 and not sets[t - 1]:
                continue  # empty iterations are alike: try the first one only
            load = sum(link.averaging[j] for j in sets[t]) + link.averaging[i]
            found.append((link.wait([*sets[t], i]) - waits[t], load, t))
        return sorted(found)

    # Greedy first: each layer where it adds least wait, then least load.
    for i in order:
        added, _, t = options(i)[0]
        sets[t].append(i)
        waits[t] += added
    best, best_wait = [list(x) for x in sets], sum(waits)
    if best_wait <= bound_after[0] + link.tolerance or n > _SEARCH_DEPTH:
        return best, best_wait <= bound_after[0] + link.tolerance
    sets, waits = [[] for _ in range(period)], [0.0] * period
    nodes, finished = 0, True

    def visit(k: int, total: float) -> None:
        nonlocal best, best_wait, nodes, finished
        if k == n:
            if total < best_wait - link.tolerance:
                best, best_wait = [list(x) for x in sets], total
            return
        for added, _, t in options(order[k]):
            if total + added + bound_after[k + 1] >= best_wait - link.tolerance:
                break  # sorted by added wait: no later option can beat the best either
            if nodes >= budget:
                finished = False
                return
            nodes += 1
            before = waits[t]
            sets[t].append(order[k])
            waits[t] = before + added
            visit(k + 1, total + added)
            sets[t].pop()
            waits[t] = before
            if best_wait <= bound_after[0] + link.tolerance:
                return  # as low as the bound: nothing can beat it

    visit(0, 0.0)
    return best, finished or best_wait <= bound_after[0] + link.tolerance


def _fill_idle(link: _Link, sets: Sequence[Sequence[int]], period: int) -> list[list[int]]:
    """Extra syncs per iteration that add no wait, the layers that gain most first."""
    n = len(link.averaging)
    synced_at: list[set[int]] = [set() for _ in range(n)]  # iterations each layer is averaged
    for t, layers in enumerate(sets):
        for i in layers:
            synced_at[i].add(t)
    extras: list[list[int]] = [[] for _ in range(period)]
    for t in range(period):
        members = set(sets[t])
        # Iterations since each layer's last average, counting round the repeating period.
        gain = {
            i: link.averaging[i] * min((t - s) % period or period for s in synced_at[i])
            for i in range(n)
            if i not in members
        }
        for i in sorted(gain, key=lambda i: (-gain[i], i)):
            if gain[i] <= 0:
                break  # a layer with nothing to average gains nothing
            if link.wait([*members, i]) <= link.wait(members):
                members.add(i)
                extras[t].append(i)
                synced_at[i].add(t)
    return extras


def schedule_partial_sync(
    profile: StageProfile, period: int, *, fill_idle: bool = True, search_nodes: int = SEARCH_NODES
) -> SyncSchedule:
    """The partial local SGD schedule of a stage over a period of `period` steps: each layer
    averaged once per period, at the iterations that make the steps wait least for it, then
    (with `fill_idle`) extra syncs in idle link time. A pure function of its arguments."""
    if not isinstance(profile, StageProfile):
        raise ValueError(f"profile must be a StageProfile, got {type(profile).__name__}")
    if isinstance(period, bool) or not isinstance(period, int) or not 1 <= period <= MAX_PERIOD:
        raise ValueError(f"period must be an int in [1, {MAX_PERIOD}] steps, got {period!r}")
    if isinstance(search_nodes, bool) or not isinstance(search_nodes, int) or search_nodes < 1:
        raise ValueError(f"search_nodes must be an int >= 1, got {search_nodes!r}")
    link = _Link(profile)
    n = len(profile.layers)
    sets, minimal = _assign(link, n, period, search_nodes)
    extras = _fill_idle(link, sets, period) if fill_idle else [[] for _ in range(period)]
    names = [layer.name for layer in profile.layers]
    iterations = tuple(
        IterationPlan(
            iteration=t,
            averaged=_sending_order(profile, (names[i] for i in sets[t])),
            extra=_sending_order(profile, (names[i] for i in extras[t])),
            communication_s=sum(link.averaging[i] for i in (*sets[t], *extras[t])),
            forward_s=profile.forward_s,
            backward_s=link.backward,
            wait_s=link.wait((*sets[t], *extras[t])),
        )
        for t in range(period)
    )
    return SyncSchedule(profile, period, iterations, minimal, fill_idle)


__all__ = [
    "SEARCH_NODES",
    "IterationPlan",
    "LayerProfile",
    "StageProfile",
    "SyncSchedule",
    "schedule_partial_sync",
]

"""The partial local SGD schedule: every layer once per period, averaging hidden behind the
backward where it fits, the least wait where it cannot, refit from new profiles."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter

import pytest

from coordinator.planning.sync_schedule import (
    LayerProfile,
    StageProfile,
    SyncSchedule,
    schedule_partial_sync,
)

pytestmark = pytest.mark.unit


def stage(*layers: tuple[float, float], forward: float = 0.5) -> StageProfile:
    """A stage of layers l0, l1, ... in forward order, each (backward s, averaging s)."""
    return StageProfile(
        tuple(LayerProfile(f"l{i}", b, c) for i, (b, c) in enumerate(layers)), forward
    )


# A gpt-like stage: the averaging of every block fits behind the backward of the blocks
# before it; the embedding, first in the forward and last in the backward, cannot hide.
GPT = StageProfile(
    (
        LayerProfile("embed", 0.10, 0.05),
        LayerProfile("block.0", 0.30, 0.20),
        LayerProfile("block.1", 0.30, 0.20),
        LayerProfile("block.2", 0.30, 0.25),
        LayerProfile("head", 0.20, 0.30),
    ),
    forward_s=0.6,
)


def simulated_wait(profile: StageProfile, names: set[str]) -> float:
    """The test's own account of a step: the backward walks from the last layer to the
    first; each layer to average joins the link's queue when its backward is done."""
    clock, ready = 0.0, {}
    for layer in reversed(profile.layers):
        clock += layer.backward_s
        ready[layer.name] = clock
    link_free = 0.0
    by_name = {layer.name: layer for layer in profile.layers}
    for name in sorted(names, key=lambda n: ready[n]):
        link_free = max(link_free, ready[name]) + by_name[name].averaging_s
    return max(0.0, link_free - clock)


def least_wait_by_exhaustive_search(profile: StageProfile, period: int) -> float:
    names = [layer.name for layer in profile.layers]
    best = math.inf
    for choice in itertools.product(range(period), repeat=len(names)):
        groups = [
            {n for n, t in zip(names, choice, strict=True) if t == it} for it in range(period)
        ]
        best = min(best, sum(simulated_wait(profile, g) for g in groups))
    return best


def table_rows(schedule: SyncSchedule) -> list[list[str]]:
    """The printed schedule's iteration rows, split into columns."""
    return [line.split() for line in schedule.format().splitlines()[2:]]


def assert_every_layer_once(schedule: SyncSchedule) -> None:
    counts = Counter(name for it in schedule.iterations for name in it.averaged)
    assert counts == Counter(layer.name for layer in schedule.profile.layers)
    for it in schedule.iterations:
        assert not set(it.averaged) & set(it.extra)
        assert len(set(it.extra)) == len(it.extra)


# -- each layer once per period ----------------------------------------------------------


@pytest.mark.parametrize("period", [1, 2, 3, 4, 5, 8, 64])
@pytest.mark.parametrize("fill_idle", [True, False])
def test_each_layer_is_averaged_exactly_once_per_period(period: int, fill_idle: bool) -> None:
    schedule = schedule_partial_sync(GPT, period, fill_idle=fill_idle)
    assert len(schedule.iterations) == period
    assert [it.iteration for it in schedule.iterations] == list(range(period))
    assert_every_layer_once(schedule)
    if not fill_idle:
        assert all(it.extra == () for it in schedule.iterations)


def test_each_layer_is_averaged_once_in_larger_random_stages() -> None:
    rng = random.Random(7)
    for n, period in ((40, 8), (25, 3), (12, 16), (600, 8)):  # 600: deeper than the search
        profile = stage(*((rng.uniform(0.01, 0.05), rng.uniform(0.0, 0.1)) for _ in range(n)))
        schedule = schedule_partial_sync(profile, period)
        assert_every_layer_once(schedule)
        assert schedule.wait_s == pytest.approx(sum(it.wait_s for it in schedule.iterations))


def test_layers_are_sent_in_the_order_the_backward_readies_them() -> None:
    schedule = schedule_partial_sync(GPT, 1, fill_idle=False)
    assert schedule.iterations[0].averaged == ("head", "block.2", "block.1", "block.0", "embed")


# -- averaging hidden behind the backward -------------------------------------------------


def test_no_step_waits_when_the_averaging_fits_inside_the_backward_pass() -> None:
    # The stage starts with a layer that holds no parameters (nothing to average); every
    # other layer's averaging fits behind the backward of the layers before it, if spread.
    profile = stage((0.4, 0.0), (0.3, 0.35), (0.3, 0.35), (0.3, 0.35), (0.3, 0.35))
    for period in (2, 3, 4, 8):
        schedule = schedule_partial_sync(profile, period)
        text = schedule.format()
        assert "wait 0.000 s per period (minimal)" in text.splitlines()[0], text
        rows = table_rows(schedule)
        assert len(rows) == period
        for row in rows:
            backward, wait, step = row[2:5]
            assert wait == "0.000", text
            assert float(step) == pytest.approx(0.5 + 1.6, abs=1e-3), text
            assert float(backward) == pytest.approx(1.6, abs=1e-3), text
        assert_every_layer_once(schedule)


def test_all_at_once_it_would_wait_which_the_spread_schedule_avoids() -> None:
    profile = stage((0.4, 0.0), (0.3, 0.35), (0.3, 0.35), (0.3, 0.35), (0.3, 0.35))
    once = schedule_partial_sync(profile, 1)
    assert once.wait_s == pytest.approx(0.1)  # a period of one averages everything each step
    assert schedule_partial_sync(profile, 2).wait_s == 0.0


def test_the_first_layer_is_the_only_wait_when_the_rest_fits() -> None:
    # Ready last and needed first by the next forward, the first layer's averaging cannot
    # hide: the printed schedule shows it once per period, in its own iteration.
    profile = stage((0.25, 0.05), (0.3, 0.2), (0.3, 0.2), (0.3, 0.2))
    schedule = schedule_partial_sync(profile, 4)
    waits = [float(row[3]) for row in table_rows(schedule)]
    assert sorted(waits) == pytest.approx([0.0, 0.0, 0.0, 0.05])
    waiting = schedule.iterations[waits.index(max(waits))]
    assert "l0" in waiting.averaged
    assert schedule.wait_s == pytest.approx(0.05) and schedule.minimal


# -- the least wait when averaging cannot fit ---------------------------------------------


def test_unavoidable_wait_is_minimal_against_exhaustive_search() -> None:
    rng = random.Random(2026)
    harder_than_the_bound = 0
    for case in range(120):
        n, period = rng.randint(1, 5), rng.randint(1, 3)
        profile = stage(*((rng.uniform(0.05, 0.4), rng.uniform(0.0, 0.6)) for _ in range(n)))
        least = least_wait_by_exhaustive_search(profile, period)
        for fill_idle in (False, True):
            schedule = schedule_partial_sync(profile, period, fill_idle=fill_idle)
            assert schedule.minimal, (case, schedule.format())
            assert schedule.wait_s == pytest.approx(least, abs=1e-9), (case, schedule.format())
            for it in schedule.iterations:  # the reported wait is the step's wait
                names = {*it.averaged, *it.extra}
                assert it.wait_s == pytest.approx(simulated_wait(profile, names), abs=1e-9)
            assert_every_layer_once(schedule)
        alone = sum(simulated_wait(profile, {layer.name}) for layer in profile.layers)
        harder_than_the_bound += least > alone + 1e-9
    # Layers had to share iterations at a cost in some cases, so the search did real work.
    assert harder_than_the_bound >= 10


def test_a_search_cut_short_says_so_and_still_averages_each_layer_once() -> None:
    rng = random.Random(3)
    profile = stage(*((rng.uniform(0.01, 0.05), rng.uniform(0.0, 0.3)) for _ in range(20)))
    schedule = schedule_partial_sync(profile, 4, search_nodes=1)
    assert not schedule.minimal and "(best found)" in schedule.format()
    assert_every_layer_once(schedule)
    assert schedule_partial_sync(profile, 4).wait_s <= schedule.wait_s + 1e-12


# -- idle link time, per-iteration figures ------------------------------------------------


def test_extra_syncs_fill_idle_link_time_without_adding_wait() -> None:
    for period in (2, 3, 8):
        bare = schedule_partial_sync(GPT, period, fill_idle=False)
        filled = schedule_partial_sync(GPT, period)
        assert [it.averaged for it in filled.iterations] == [it.averaged for it in bare.iterations]
        for b, f in zip(bare.iterations, filled.iterations, strict=True):
            assert f.wait_s <= b.wait_s + 1e-12
            assert f.communication_s >= b.communication_s
        assert any(it.extra for it in filled.iterations)


def test_extra_sync_goes_to_the_layer_that_gains_most() -> None:
    # l1 and l2 are ready early; either one's extra sync fits in an iteration's idle link
    # time, both together do not. Gain = averaging time x iterations since the last average.
    profile = stage((0.6, 0.0), (0.1, 0.3), (0.1, 0.5), forward=0.0)
    schedule = schedule_partial_sync(profile, 4)
    assert [it.averaged for it in schedule.iterations] == [("l2",), ("l1",), ("l0",), ()]
    # At 2: l2 (0.5 s, last averaged 2 iterations ago: 1.0) beats l1 (0.3 s x 1 = 0.3).
    # At 3: l2 was just refreshed (0.5 x 1 = 0.5), l1 has drifted 2 iterations (0.6).
    assert [it.extra for it in schedule.iterations] == [(), (), ("l2",), ("l1",)]
    assert schedule.wait_s == 0.0


def test_each_iteration_reports_communication_backward_and_wait() -> None:
    schedule = schedule_partial_sync(GPT, 3)
    averaging = {layer.name: layer.averaging_s for layer in GPT.layers}
    for it in schedule.iterations:
        assert it.communication_s == pytest.approx(
            sum(averaging[n] for n in (*it.averaged, *it.extra))
        )
        assert it.backward_s == pytest.approx(1.2)
        assert it.step_s == pytest.approx(0.6 + 1.2 + it.wait_s)
    rows = table_rows(schedule)
    assert [float(r[1]) for r in rows] == pytest.approx(
        [it.communication_s for it in schedule.iterations], abs=5e-4
    )


def test_syncs_repeat_with_the_period() -> None:
    schedule = schedule_partial_sync(GPT, 3)
    for layer in GPT.layers:
        t = schedule.iteration_of(layer.name)
        assert layer.name in schedule.syncs_at(t) and layer.name in schedule.syncs_at(t + 3)
    assert schedule.syncs_at(4) == schedule.syncs_at(1)
    with pytest.raises(KeyError, match="no layer 'ffn'"):
        schedule.iteration_of("ffn")


# -- refit from new profiles --------------------------------------------------------------


def test_the_schedule_changes_when_profiles_change() -> None:
    before = stage((0.1, 0.0), (0.3, 0.1), (0.3, 0.1), (0.3, 0.5))
    after = stage((0.1, 0.0), (0.3, 0.5), (0.3, 0.1), (0.3, 0.1))  # the big layer moved
    old = schedule_partial_sync(before, 2)
    new = old.refit(after)
    assert new == schedule_partial_sync(after, 2)
    assert [it.averaged for it in new.iterations] != [it.averaged for it in old.iterations]
    assert new.period == old.period and new.profile == after
    assert old.profile == before  # refit is pure: the old schedule is untouched
    assert old.refit(before) == old


def test_a_schedule_is_a_pure_function_of_its_inputs_and_frozen() -> None:
    assert schedule_partial_sync(GPT, 4) == schedule_partial_sync(GPT, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule_partial_sync(GPT, 4).period = 5  # type: ignore[misc]


def test_format_prints_one_row_per_iteration_under_a_header() -> None:
    text = schedule_partial_sync(GPT, 3).format()
    lines = text.splitlines()
    assert lines[0].startswith("partial local SGD, 5 layers, period 3: wait ")
    assert lines[1].split()[:5] == ["iter", "comm", "s", "bwd", "s"]
    assert len(lines) == 2 + 3


# -- refused input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: LayerProfile("a", -0.1, 0.1), "a: backward must be a finite time >= 0 s"),
        (lambda: LayerProfile("a", 0.1, -1), "a: averaging must be a finite time >= 0 s"),
        (lambda: LayerProfile("a", math.nan, 0.1), "a: backward must be a finite time"),
        (lambda: LayerProfile("a", 0.1, math.inf), "a: averaging must be a finite time"),
        (lambda: LayerProfile("a", "1", 0.1), "a: backward must be a number of seconds"),
        (lambda: LayerProfile("a", True, 0.1), "a: backward must be a number of seconds"),
        (lambda: LayerProfile("", 0.1, 0.1), "name must be a non-empty string"),
        (lambda: StageProfile((), 0.5), "needs at least one layer, got none"),
        (lambda: stage((0.1, 0.1), forward=-1), "forward must be a finite time >= 0 s"),
        (lambda: StageProfile((LayerProfile("a", 1, 1),) * 2, 0.5), "unique, got a twice"),
        (lambda: StageProfile(((1, 1),), 0.5), "layers must be LayerProfiles"),  # type: ignore[arg-type]
        (lambda: schedule_partial_sync(GPT, 0), "period must be an int in [1, 10000]"),
        (lambda: schedule_partial_sync(GPT, -3), "period must be an int in [1, 10000]"),
        (lambda: schedule_partial_sync(GPT, 10_001), "period must be an int in [1, 10000]"),
        (lambda: schedule_partial_sync(GPT, True), "period must be an int"),
        (lambda: schedule_partial_sync(GPT, 2.0), "period must be an int"),  # type: ignore[arg-type]
        (lambda: schedule_partial_sync(GPT.layers, 2), "must be a StageProfile"),  # type: ignore[arg-type]
        (lambda: schedule_partial_sync(GPT, 2, search_nodes=0), "search_nodes must be"),
    ],
)
def test_invalid_input_is_refused_with_a_clear_error(build: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        build()  # type: ignore[operator]
    assert fragment in str(info.value), str(info.value)

"""The checks of received values (`worker.value_guard`) and the robust combination of a
sync group's shares (`worker.robust_aggregate`), with PyTorch as the oracle for the
figures: norms, medians and trimmed means."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from opdag.errors import CodecError
from worker.robust_aggregate import combine, find_outliers, robust_combine
from worker.value_guard import (
    ACTIVATION,
    GRADIENT,
    RunningNorms,
    SuspectValue,
    Suspicion,
    ValueBounds,
    ValueGuard,
    tensor_figures,
)

pytestmark = pytest.mark.unit


def guard_with_reports(bounds: ValueBounds | None = None) -> tuple[ValueGuard, list[Suspicion]]:
    reports: list[Suspicion] = []
    return ValueGuard(bounds, on_refusal=reports.append), reports


def test_the_running_median_is_the_median_of_the_last_window_norms() -> None:
    norms = RunningNorms(window=4)
    assert math.isnan(norms.median())
    for x in (1.0, 100.0, 3.0, 2.0, 5.0):  # 1.0 falls out of the window
        norms.add(x)
    assert len(norms) == 4
    assert norms.median() == 4.0  # of 100, 3, 2, 5: the mean of the middle two


def test_tensor_figures_match_torch_and_do_not_overflow() -> None:
    t = torch.randn(50, 7)
    top, norm = tensor_figures(t)
    assert top == pytest.approx(float(t.abs().max()))
    assert norm == pytest.approx(float(torch.linalg.vector_norm(t)), rel=1e-5)
    big = torch.full((4,), 1e20)  # its squares overflow float32
    assert tensor_figures(big)[1] == pytest.approx(2e20, rel=1e-5)
    assert math.isnan(tensor_figures(torch.tensor([1.0, math.nan]))[0])
    assert tensor_figures(torch.tensor([1.0, -math.inf]))[0] == math.inf
    assert tensor_figures(torch.zeros(3)) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_not_finite_is_refused_from_the_first_step(bad: float) -> None:
    guard, reports = guard_with_reports()
    x = torch.ones(3, 4)
    x[1, 2] = bad
    with pytest.raises(SuspectValue, match="not finite") as caught:
        guard.check(ACTIVATION, 1, 0, 0, {"h": x})
    assert isinstance(caught.value, CodecError)  # a refused transfer, as any bad message
    (s,) = reports
    assert (s.kind, s.stage, s.replica, s.step) == (ACTIVATION, 1, 0, 0)
    assert s.evidence == caught.value.suspicion.evidence


def test_values_at_the_ceiling_are_refused_even_during_warm_up() -> None:
    guard, reports = guard_with_reports()
    with pytest.raises(SuspectValue, match=r"\|x\| 1e\+30"):
        guard.check(GRADIENT, 2, 0, 0, {"g": torch.tensor([1.0, 1e30])})
    guard.check(GRADIENT, 2, 0, 0, {"g": torch.tensor([1.0, 1e29])})  # below: taken
    assert len(reports) == 1


def test_a_norm_far_above_the_edges_median_is_refused_after_warm_up() -> None:
    guard, reports = guard_with_reports(ValueBounds(factor=100.0, warmup=4, window=16))
    torch.manual_seed(0)
    norms = []
    for step in range(6):
        g = torch.randn(64)
        norms.append(float(torch.linalg.vector_norm(g)))
        guard.check(GRADIENT, 1, 0, step, {"g": g})
    median = statistics.median(norms)
    below = torch.ones(64) * (99 * median / 8)  # a norm of 99 x the median: taken
    guard.check(GRADIENT, 1, 0, 6, {"g": below})
    norms.append(99 * median)
    scaled = torch.randn(64) * 1e4
    with pytest.raises(SuspectValue, match=r"norm .* > 100 x median") as caught:
        guard.check(GRADIENT, 1, 0, 7, {"g": scaled})
    s = caught.value.suspicion
    assert s.norm == pytest.approx(float(torch.linalg.vector_norm(scaled)), rel=1e-5)
    assert s.bound == pytest.approx(100 * statistics.median(norms), rel=1e-6)
    assert len(reports) == 1 and reports[0].step == 7


def test_a_refused_value_does_not_move_the_edges_statistics() -> None:
    guard, _ = guard_with_reports(ValueBounds(factor=10.0, warmup=2, window=8))
    for step in range(2):
        guard.check(ACTIVATION, 0, 0, step, {"h": torch.ones(4)})  # norm 2
    for step in range(2, 12):  # creeping far up: each refused, so the bound never rises
        with pytest.raises(SuspectValue):
            guard.check(ACTIVATION, 0, 0, step, {"h": torch.full((4,), 100.0)})
    # Nor does a message whose other value passes: nothing of it is counted.
    with pytest.raises(SuspectValue):
        guard.check(ACTIVATION, 0, 0, 12, {"a": torch.ones(4), "h": torch.full((4,), 100.0)})
    guard.check(ACTIVATION, 0, 0, 13, {"h": torch.full((4,), 9.0)})  # 18 < 10 x 2


def test_each_edge_and_sender_has_its_own_statistics_and_one_report() -> None:
    guard, reports = guard_with_reports(ValueBounds(factor=10.0, warmup=1, window=8))
    guard.check(GRADIENT, 1, 0, 0, {"g": torch.ones(4)})
    guard.check(GRADIENT, 2, 0, 0, {"g": torch.full((4,), 1000.0)})  # another sender
    guard.check(ACTIVATION, 1, 0, 0, {"g": torch.full((4,), 1000.0)})  # another kind
    for step in (1, 2):
        with pytest.raises(SuspectValue):
            guard.check(GRADIENT, 1, 0, step, {"g": torch.full((4,), 1000.0)})
    assert [(s.stage, s.step) for s in reports] == [(1, 1)]  # one report per sender


def test_integer_values_and_missing_gradients_are_not_bounded() -> None:
    guard, _ = guard_with_reports(ValueBounds(factor=2.0, warmup=1, window=2))
    guard.check(ACTIVATION, 0, 0, 0, {"ids": torch.tensor([1, 2]), "x": (torch.ones(2), None)})
    guard.check(ACTIVATION, 0, 0, 1, {"ids": torch.tensor([10**9]), "x": (torch.ones(2), None)})
    with pytest.raises(SuspectValue, match=r"'x\[0\]'"):
        guard.check(ACTIVATION, 0, 0, 2, {"ids": torch.tensor([1]), "x": (torch.ones(2) * 9, 0)})


def test_bounds_refuse_settings_that_bound_nothing() -> None:
    for bad in (dict(factor=1.0), dict(warmup=0), dict(window=2, warmup=4), dict(ceiling=0.0)):
        with pytest.raises(ValueError):
            ValueBounds(**bad)


# -- robust aggregates ---------------------------------------------------------------------


def honest_shares(n: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """n shares of one gradient seen on different data: a common direction and noise."""
    g = torch.Generator().manual_seed(seed)
    common = {"w": torch.randn(30, 4, generator=g), "b": torch.randn(4, generator=g)}
    return {
        r: {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in common.items()}
        for r in range(n)
    }


def test_combine_equals_torch_median_and_trimmed_mean() -> None:
    values = [torch.randn(5, 3) for _ in range(5)]
    stacked = torch.stack(values)
    assert torch.equal(combine(values, "median"), stacked.median(dim=0).values)
    trimmed = stacked.sort(dim=0).values[1:4].mean(dim=0)
    assert torch.allclose(combine(values, "trimmed-mean"), trimmed)
    four = values[:4]
    middle = torch.stack(four).sort(dim=0).values[1:3].mean(dim=0)
    assert torch.allclose(combine(four, "median"), middle)
    assert torch.allclose(combine(values[:2], "median"), torch.stack(values[:2]).mean(dim=0))
    assert torch.allclose(combine(values, "mean"), stacked.mean(dim=0))
    halves = [v.half() for v in values[:3]]  # fp16 on the wire is combined in fp32
    assert combine(halves, "median").dtype == torch.float32


@pytest.mark.parametrize("seed", range(5))
def test_honest_shares_have_no_outlier(seed: int) -> None:
    assert find_outliers(honest_shares(3, seed)) == {}
    assert find_outliers(honest_shares(5, seed)) == {}


@pytest.mark.parametrize("seed", range(5))
def test_a_flipped_or_scaled_share_is_the_outlier(seed: int) -> None:
    shares = honest_shares(3, seed)
    shares[2] = {k: -v for k, v in shares[2].items()}
    assert list(find_outliers(shares)) == [2] and "cosine" in find_outliers(shares)[2]
    shares = honest_shares(3, seed)
    shares[1] = {k: v * 1e4 for k, v in shares[1].items()}
    assert "norm" in find_outliers(shares)[1]


def test_two_shares_or_half_the_group_found_out_tell_nothing_apart() -> None:
    shares = honest_shares(2)
    shares[1] = {k: -v for k, v in shares[1].items()}
    assert find_outliers(shares) == {}
    four = honest_shares(4)
    for r in (2, 3):
        four[r] = {k: -v for k, v in four[r].items()}
    assert find_outliers(four) == {}


def test_robust_combine_leaves_the_outlier_out_and_means_the_loss() -> None:
    shares = honest_shares(3)
    for r, share in shares.items():
        share["#loss"] = torch.tensor([1.0 + r], dtype=torch.float64)
    shares[0] = {k: (v * 1e4 if k != "#loss" else v) for k, v in shares[0].items()}
    out, outliers = robust_combine(shares, "median", "#loss")
    assert list(outliers) == [0]
    kept = [shares[1], shares[2]]
    assert torch.allclose(out["w"], (kept[0]["w"] + kept[1]["w"]) / 2)
    assert float(out["#loss"]) == pytest.approx(2.5)

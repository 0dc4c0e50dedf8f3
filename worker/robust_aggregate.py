"""Combining a sync group's shares so that one bad share cannot steer the result.

With `sync: {aggregate: median}` or `{aggregate: trimmed-mean}`, a group of three replicas
or more first looks for outliers among its shares, then combines the others coordinate-wise:

- an outlier is a share pointing away from the group: its cosine with the coordinate-wise
  median of all shares below `MIN_COSINE` (0), or its norm above `NORM_SPREAD` (10) times
  the median of the shares' norms. Measured on a small GPT's gradients of different
  micro-batches: honest shares have cosines of 0.2 to 1 with that median, a share with its
  sign flipped -0.8 to 0.1 (it is found at most steps, not always at the first). Shares of
  independent noise have cosines of about +0.5 with their median (each is the median in a
  third of the coordinates), so an honest share falls below 0 only by pointing against
  the others;
- `median`: per coordinate, the median of the kept shares (the mean of the middle two for
  an even count); `trimmed-mean`: per coordinate, the mean of the kept shares without the
  largest and the smallest (`trim` = a quarter of them, at least one, when three or more
  are kept; a plain mean of two).

The loss travels beside the shares: the step's loss is the mean over the kept shares. Every
member computes the same from the same shares (they travel in one format, the member's own
included), so all hold bitwise the same result and find the same outliers.

What this cannot catch: a share that leans away from the group less than its honest spread
(a small bias, a share of other data), and with two replicas there is no majority to tell
which of them is wrong. Even when no share is found out, the median and the trimmed mean
bound how far one share moves any coordinate.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import torch

AGGREGATES = ("mean", "median", "trimmed-mean")
MIN_COSINE = 0.0
NORM_SPREAD = 10.0

Share = Mapping[str, torch.Tensor]
Shares = dict[str, torch.Tensor]


def _flat(share: Share, names: list[str]) -> torch.Tensor:
    return torch.cat([share[n].detach().reshape(-1).double() for n in names])


def find_outliers(
    shares: Mapping[int, Share], skip: frozenset[str] = frozenset()
) -> dict[int, str]:
    """The replicas whose shares point away from the group, each with why (empty for fewer
    than three shares: no majority to compare with). `skip`: names left out (the loss)."""
    if len(shares) < 3:
        return {}
    order = sorted(shares)
    names = sorted(n for n in shares[order[0]] if n not in skip)
    if not names:
        return {}
    flat = {r: _flat(shares[r], names) for r in order}
    median = torch.stack([flat[r] for r in order]).median(dim=0).values
    norms = {r: float(flat[r].norm()) for r in order}
    typical = statistics.median(norms.values())
    out: dict[int, str] = {}
    for r in order:
        denominator = norms[r] * float(median.norm())
        cosine = float(flat[r] @ median) / denominator if denominator > 0 else 1.0
        if norms[r] > NORM_SPREAD * typical:
            out[r] = f"norm {norms[r]:.3g} > {NORM_SPREAD:g} x the group's median {typical:.3g}"
        elif cosine < MIN_COSINE:
            out[r] = f"cosine {cosine:.2f} with the group's coordinate-wise median"
    # A majority must remain: with half the group or more found out, nothing is told apart.
    return out if len(out) < len(order) / 2 else {}


def combine(values: list[torch.Tensor], how: str) -> torch.Tensor:
    """The kept shares of one tensor combined by `how` (shares in replica order)."""
    first = values[0]
    dtype = torch.float32 if first.dtype == torch.float16 else first.dtype
    stacked = torch.stack([v.to(dtype) for v in values])
    n = len(values)
    if how == "mean" or n < 3:
        return stacked.sum(dim=0) / n
    ordered = stacked.sort(dim=0).values
    if how == "median":
        mid = n // 2
        return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    trim = max(1, n // 4)
    return ordered[trim : n - trim].sum(dim=0) / (n - 2 * trim)


def robust_combine(
    shares: Mapping[int, Share], how: str, loss: str
) -> tuple[Shares, dict[int, str]]:
    """The group's shares combined by `how` once outliers are left out, the `loss` entry
    as a plain mean; and the outliers, each with why."""
    outliers = find_outliers(shares, skip=frozenset({loss}))
    kept = [r for r in sorted(shares) if r not in outliers]
    names = shares[kept[0]]
    out = {n: combine([shares[r][n] for r in kept], "mean" if n == loss else how) for n in names}
    return out, outliers

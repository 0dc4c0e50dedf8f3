"""Which entries of a flat tensor a sparsifier keeps: the exact k largest in magnitude, an
estimate of them from a sampled threshold, or k chosen at random.

Each function returns sorted, distinct int64 flat indices as a numpy array, which is the
form the index coders take.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Sampling pays off only when the sample is much smaller than the tensor; below this the
# sampled top-k selects exactly, in one O(n) partition.
SAMPLE_HITS = 1024  # expected sampled entries above the threshold: ~3% spread in the count
MIN_SAMPLE = 4096
SAMPLE_FRACTION_LIMIT = 0.25
PASSES = 3
# Work through the tensor in blocks that stay in cache, reusing two scratch buffers.
BLOCK = 1 << 18


def kept_count(ratio: float, numel: int) -> int:
    """How many of `numel` entries a sparsifier keeps at `ratio`: at least one, at most all."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.floor(ratio * numel + 0.5)))


def exact_topk_indices(flat: torch.Tensor, k: int) -> np.ndarray:
    """The indices of the `k` largest |x| (torch.topk), sorted."""
    if k >= flat.numel():
        return np.arange(flat.numel(), dtype=np.int64)
    chosen = torch.topk(flat.abs(), k, sorted=False).indices.numpy()
    return np.sort(chosen).astype(np.int64, copy=False)


def random_indices(numel: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` distinct indices of `numel`, uniformly at random from `rng`, sorted."""
    chosen = rng.choice(numel, size=k, replace=False, shuffle=False)
    return np.sort(chosen).astype(np.int64, copy=False)


def sampled_topk_indices(
    flat: torch.Tensor, k: int, rng: np.random.Generator, tolerance: float
) -> np.ndarray:
    """About the `k` largest |x|, found through a threshold estimated from a random sample.

    Keeps every entry with |x| >= t, where t is the matching quantile of a sample of |x|;
    the count lands within `tolerance` × k of k (exactly k with tolerance 0):

    - too many (a low estimate): the k largest of those candidates are kept, a partition
      over little more than k values; entries tied at t fill up to k in index order;
    - too few: t is lowered from the sample, rescaled by how far the count missed, and the
      tensor is scanned again (at most `PASSES` scans, then an exact selection).
    NaN entries are never kept.
    """
    numel = flat.numel()
    if k >= numel:
        return np.arange(numel, dtype=np.int64)
    values = _numpy_magnitude_source(flat)
    low = max(1, math.floor(k * (1 - tolerance)))
    high = max(low, math.ceil(k * (1 + tolerance)))
    size = max(MIN_SAMPLE, math.ceil(SAMPLE_HITS * numel / k))
    if size > SAMPLE_FRACTION_LIMIT * numel:
        return _largest_of(values, np.arange(numel, dtype=np.int64), k)

    sample = np.abs(values[rng.integers(0, numel, size=size)])
    rank = max(1, round(size * k / numel))
    for _ in range(PASSES):
        # The rank-th largest of the sample; a partition, O(size), rather than a sort.
        sample.partition(size - rank)
        threshold = float(sample[size - rank])
        candidates = _indices_at_least(values, threshold)
        found = candidates.size
        if found > high:
            return _trim(values, candidates, threshold, k, low, high)
        if found >= low:
            return candidates
        if rank == size:
            break  # the sample's smallest value is already too high a threshold
        # Too few: rescale the rank by the miss and aim a little past k (a little over is
        # cheap to trim; under costs another scan).
        aim = k * (1 + max(tolerance / 2, 0.02))
        rank = min(size, max(rank + 1, math.ceil(rank * aim / max(found, 1))))
    return _largest_of(values, np.arange(numel, dtype=np.int64), k)


def _numpy_magnitude_source(flat: torch.Tensor) -> np.ndarray:
    # numpy's abs/compare/nonzero passes run several times faster than torch's on one
    # core here; bfloat16 has no numpy dtype, so it is widened first.
    if flat.dtype not in (torch.float32, torch.float64, torch.float16):
        flat = flat.to(torch.float32)
    return flat.numpy()


def _indices_at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    """Sorted indices of the entries with |x| >= threshold, scanned block by block."""
    block = min(BLOCK, values.size)
    magnitude = np.empty(block, dtype=values.dtype)
    hit = np.empty(block, dtype=np.bool_)
    found = []
    for start in range(0, values.size, block):
        part = values[start : start + block]
        n = part.size
        np.abs(part, out=magnitude[:n])
        np.greater_equal(magnitude[:n], threshold, out=hit[:n])
        where = np.flatnonzero(hit[:n])
        where += start
        found.append(where)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _trim(
    values: np.ndarray, candidates: np.ndarray, threshold: float, k: int, low: int, high: int
) -> np.ndarray:
    """From candidates with |x| >= threshold, about k of the largest (sorted by index)."""
    magnitude = np.abs(values[candidates])
    above = magnitude > threshold
    n_above = int(np.count_nonzero(above))
    if n_above > high:
        return _largest_of(values, candidates[above], k)
    if n_above >= low:
        return candidates[above]
    # The rest tie at the threshold (zeros after a ReLU, quantised levels): any of them
    # will do, so take the first ones instead of partitioning them all.
    keep = above
    keep[np.flatnonzero(~above)[: k - n_above]] = True
    return candidates[keep]


def _largest_of(values: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The `k` sorted candidates of largest |x|, still sorted (ties broken arbitrarily)."""
    if candidates.size <= k:
        return candidates
    magnitude = np.abs(values[candidates])
    # NaN sorts last in numpy, i.e. as the largest; make it the smallest so it is dropped.
    np.nan_to_num(magnitude, copy=False, nan=-1.0, posinf=np.inf)
    chosen = np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k :]
    keep = np.zeros(candidates.size, dtype=np.bool_)
    keep[chosen] = True  # a mask keeps the candidates' index order without a sort
    return candidates[keep]

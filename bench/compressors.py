"""Compressor speed on one CPU thread.

(a) Sampled top-k against torch.topk, selecting 1% of 10 M fp32 values, both measured in
    this run: the speed-up ratio, and the kept count against the requested one.
(b) Compress + decompress throughput of every compressor on 4 M fp32 values (GB/s of
    dense input), with the wire size each produces.

Figures are medians of a few repeats; nothing here fails on a timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from compressors import build_compressor, kept_count
from compressors.selection import exact_topk_indices, sampled_topk_indices

SELECT_NUMEL = 10_000_000
SELECT_RATIO = 0.01
THROUGHPUT_NUMEL = 4_000_000
REPEATS = 5
TARGET_SPEEDUP = 10.0
SPECS: list[dict[str, object]] = [
    {"name": "none"},
    {"name": "fp16"},
    {"name": "int8"},
    {"name": "topk", "ratio": 0.01},
    {"name": "topk", "ratio": 0.01, "values": "fp16"},
    {"name": "sampled_topk", "ratio": 0.01},
    {"name": "sampled_topk", "ratio": 0.01, "values": "fp16"},
    {"name": "sampled_topk", "ratio": 0.01, "values": "int8"},
    {"name": "sampled_topk", "ratio": 0.1, "values": "fp16"},
    {"name": "randk", "ratio": 0.01},
]


def median_seconds(run: Callable[[], object], repeats: int = REPEATS) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def alternating_seconds(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[list[float], list[float]]:
    """Times of two runs taken in turn, so load from other users of the machine falls on
    both alike."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, out in ((first, times[0]), (second, times[1])):
            began = time.perf_counter()
            run()
            out.append(time.perf_counter() - began)
    return times


def selection() -> None:
    x = torch.randn(SELECT_NUMEL, generator=torch.Generator().manual_seed(0))
    k = kept_count(SELECT_RATIO, SELECT_NUMEL)
    rng = np.random.default_rng(0)
    counts: list[int] = []

    def sampled() -> None:
        counts.append(sampled_topk_indices(x, k, rng, tolerance=0.1).size)

    exact, fast = alternating_seconds(lambda: exact_topk_indices(x, k), sampled, REPEATS)
    worst = max(counts, key=lambda c: abs(c - k))
    print(f"(a) top-k of {SELECT_NUMEL:,} fp32 at {SELECT_RATIO:.0%}, k = {k:,}; median (best)")
    for label, times in (("baseline torch.topk(|x|)", exact), ("sampled top-k", fast)):
        print(f"  {label:<26} {statistics.median(times) * 1e3:7.1f} ms ({min(times) * 1e3:.1f})")
    speedup = statistics.median(exact) / statistics.median(fast)
    print(
        f"  speed-up, torch.topk / sampled: {speedup:.1f}x ({min(exact) / min(fast):.1f}x)"
        f"   target >= {TARGET_SPEEDUP:.0f}x"
    )
    print(
        f"  kept count over {len(counts)} runs: {min(counts):,} to {max(counts):,} of {k:,} "
        f"requested (worst {100 * (worst - k) / k:+.1f}%, limit ±10%)"
    )


def throughput() -> None:
    x = torch.randn(THROUGHPUT_NUMEL, generator=torch.Generator().manual_seed(1))
    dense = x.numel() * x.element_size()
    print(f"(b) compress + decompress of {THROUGHPUT_NUMEL:,} fp32 ({dense / 1e6:.0f} MB)")
    print(f"  {'compressor':<26} {'GB/s':>6} {'compress':>9} {'decompress':>11} {'wire/dense':>11}")
    for spec in SPECS:
        compressor = build_compressor(spec)
        payload = compressor.compress(x)
        compress_s = median_seconds(partial(compressor.compress, x))
        decompress_s = median_seconds(partial(compressor.decompress, payload))
        label = " ".join(str(v) for v in spec.values())
        print(
            f"  {label:<26} {dense / (compress_s + decompress_s) / 1e9:6.2f} "
            f"{compress_s * 1e3:7.1f}ms {decompress_s * 1e3:9.1f}ms "
            f"{payload.nbytes / dense:10.4f}  {payload.encoding}"
        )


def main() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        selection()
        throughput()
    finally:
        torch.set_num_threads(threads)

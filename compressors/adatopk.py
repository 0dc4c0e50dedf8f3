"""AdaTopK: how much to keep on each cut link so that slow links stop dominating the step.

Pure functions of the plan's numbers. Given what a link carries per transfer, its
measured bandwidth and latency, and the plan's target time for those transfers (the
pipeline's bottleneck compute time), keep the largest fraction whose transfers still fit
the target; links that fit uncompressed stay uncompressed. Sizes are the real wire sizes
of the encoding (kept values, their scales and their indices), not ratio × dense bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressors.compressor import check_ratio, check_values
from compressors.dtypes import DTYPES, itemsize
from compressors.encoding import dense_wire_bytes, sparse_wire_bytes
from compressors.selection import kept_count
from compressors.sparsifiers import INDEX_CHOICES
from compressors.value_coding import DEFAULT_INT8_CHUNK

SPARSIFIERS: tuple[str, ...] = ("topk", "sampled_topk", "randk")


@dataclass(frozen=True)
class AdaTopKConfig:
    """The policy's settings: the smallest fraction it keeps and how kept entries are sent."""

    floor: float = 0.001
    codec: str = "sampled_topk"
    values: str = "fp16"
    indices: str = "auto"

    def __post_init__(self) -> None:
        check_ratio(self.floor)
        if self.codec not in SPARSIFIERS:
            raise ValueError(
                f"codec: {self.codec!r} is not a sparsifier ({', '.join(SPARSIFIERS)})"
            )
        check_values(self.values)
        if self.indices not in INDEX_CHOICES:
            raise ValueError(
                f"indices: unknown format {self.indices!r} ({', '.join(INDEX_CHOICES)})"
            )


@dataclass(frozen=True)
class LinkCompression:
    """What one link sends: codec and kept ratio, and the predicted cost of that choice."""

    codec: str  # "none", or the sparsifier's name
    ratio: float
    values: str  # value format of the kept entries ("raw" when uncompressed)
    wire_bytes: int  # per transfer
    seconds: float  # all transfers of the target window, latency included
    fits: bool  # seconds <= the target

    def spec(self) -> dict[str, object]:
        """The `build_compressor` spec of this choice."""
        if self.codec == "none":
            return {"name": "none"}
        return {"name": self.codec, "ratio": self.ratio, "values": self.values}


def compressed_wire_bytes(
    dense_bytes: int,
    ratio: float,
    *,
    dtype: str = "float32",
    values: str = "fp16",
    indices: str = "auto",
) -> int:
    """Predicted payload bytes of a tensor of `dense_bytes` sparsified at `ratio`.

    The planner's estimate of a compressed edge. Keeping everything (ratio 1.0) sends the
    tensor dense in `values` format, as the sparsifiers do.
    """
    check_ratio(ratio)
    check_values(values)
    numel = _numel(dense_bytes, dtype)
    return _wire_bytes_keeping(kept_count(ratio, numel), numel, dtype, values, indices)


def _wire_bytes_keeping(k: int, numel: int, dtype: str, values: str, indices: str) -> int:
    if k == numel:
        return dense_wire_bytes(numel, dtype=dtype, values=values, chunk=DEFAULT_INT8_CHUNK)
    return sparse_wire_bytes(
        k, numel, dtype=dtype, values=values, indices=indices, chunk=DEFAULT_INT8_CHUNK
    )


def choose_link_compression(
    *,
    dense_bytes: int,
    bandwidth: float,
    target_s: float,
    latency_s: float = 0.0,
    transfers: int = 1,
    dtype: str = "float32",
    config: AdaTopKConfig | None = None,
) -> LinkCompression:
    """The compression of one cut link.

    `dense_bytes` is what one transfer carries uncompressed, `transfers` how many cross
    the link within `target_s` (1 for a per-transfer target; the micro-batch count for a
    per-step one), `bandwidth` in bytes/s and `latency_s` per transfer. The kept ratio is
    the largest in [floor, 1] whose predicted time fits; when even the floor does not fit,
    the floor is returned with `fits` False.
    """
    config = config or AdaTopKConfig()
    _check_link(dense_bytes, bandwidth, target_s, latency_s, transfers, dtype)

    def seconds(wire: int) -> float:
        return transfers * (latency_s + wire / bandwidth)

    dense_s = seconds(dense_bytes)
    numel = _numel(dense_bytes, dtype)
    if dense_s <= target_s or numel == 0:
        return LinkCompression("none", 1.0, "raw", dense_bytes, dense_s, dense_s <= target_s)

    def wire(k: int) -> int:
        return _wire_bytes_keeping(k, numel, dtype, config.values, config.indices)

    def choice(k: int) -> LinkCompression:
        size = wire(k)
        return LinkCompression(
            config.codec, k / numel, config.values, size, seconds(size), seconds(size) <= target_s
        )

    # Keeping all of them in a smaller value format (fp16, int8) may already fit.
    if seconds(wire(numel)) <= target_s:
        return choice(numel)
    k_low = kept_count(config.floor, numel)
    if seconds(wire(k_low)) > target_s:
        return choice(k_low)
    # Sparse sizes grow with k, so the largest k that fits is found by bisection.
    k_high = numel - 1
    while k_low < k_high:
        middle = (k_low + k_high + 1) // 2
        if seconds(wire(middle)) <= target_s:
            k_low = middle
        else:
            k_high = middle - 1
    return choice(k_low)


def _numel(dense_bytes: int, dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r} (supported: {', '.join(DTYPES)})")
    if isinstance(dense_bytes, bool) or not isinstance(dense_bytes, int) or dense_bytes < 0:
        raise ValueError(f"dense_bytes: must be a non-negative int, not {dense_bytes!r}")
    return dense_bytes // itemsize(dtype)


def _check_link(
    dense_bytes: int,
    bandwidth: float,
    target_s: float,
    latency_s: float,
    transfers: int,
    dtype: str,
) -> None:
    _numel(dense_bytes, dtype)
    for name, value in (("bandwidth", bandwidth), ("target_s", target_s)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: must be a positive finite number, not {value!r}")
    if not isinstance(latency_s, int | float) or not math.isfinite(latency_s) or latency_s < 0:
        raise ValueError(f"latency_s: must be a non-negative finite number, not {latency_s!r}")
    if isinstance(transfers, bool) or not isinstance(transfers, int) or transfers < 1:
        raise ValueError(f"transfers: must be a positive int, not {transfers!r}")

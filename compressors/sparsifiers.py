"""Sparse compressors: keep a fraction of the entries, send their values and positions.

`TopK` keeps exactly the largest |x| (torch.topk); `SampledTopK` keeps about as many of
the largest through a threshold estimated from a sample, an order of magnitude faster on
large tensors; `RandomK` keeps a seeded random choice. Kept values may be sent as they are
or in fp32, fp16 or int8; the index format is picked per tensor ("auto") unless fixed.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import torch

from compressors.compressor import Compressor, check_chunk, check_ratio, check_seed, check_values
from compressors.dtypes import FLOATING, dtype_name
from compressors.encoding import encode_dense, encode_sparse, flat_cpu
from compressors.index_coding import SPARSE_INDEX_FORMATS
from compressors.payload import Payload
from compressors.selection import (
    exact_topk_indices,
    kept_count,
    random_indices,
    sampled_topk_indices,
)
from compressors.value_coding import DEFAULT_INT8_CHUNK

INDEX_CHOICES: tuple[str, ...] = ("auto", *SPARSE_INDEX_FORMATS)


class Sparsifier(Compressor):
    """What every sparsifier shares: the kept ratio, value and index formats, and the rule
    that keeping everything sends a dense payload (at ratio 1.0 with raw values, the
    tensor's own bytes)."""

    def __init__(
        self,
        *,
        ratio: float,
        values: str = "raw",
        indices: str = "auto",
        chunk: int | None = DEFAULT_INT8_CHUNK,
    ) -> None:
        self.ratio = check_ratio(ratio)
        self.values = check_values(values)
        if indices not in INDEX_CHOICES:
            raise ValueError(
                f"indices: unknown format {indices!r} (formats: {', '.join(INDEX_CHOICES)})"
            )
        self.indices = indices
        self.chunk = check_chunk(chunk)

    @abc.abstractmethod
    def select(self, flat: torch.Tensor, k: int) -> np.ndarray:
        """Sorted flat indices of the (about) `k` entries of `flat` to keep."""

    def compress(self, x: torch.Tensor) -> Payload:
        if dtype_name(x.dtype) not in FLOATING:
            return encode_dense(x)
        flat = flat_cpu(x)  # once: for a GPU tensor this is the copy to the host
        shaped = flat.view(x.shape)
        k = kept_count(self.ratio, flat.numel())
        if k == flat.numel():
            return encode_dense(shaped, self.values, self.chunk)
        return encode_sparse(shaped, self.select(flat, k), self.values, self.indices, self.chunk)

    def spec(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ratio": self.ratio,
            "values": self.values,
            "indices": self.indices,
            "chunk": self.chunk,
        }


class TopK(Sparsifier):
    """Keeps exactly the `ratio` × n entries of largest magnitude."""

    name: ClassVar[str] = "topk"

    def select(self, flat: torch.Tensor, k: int) -> np.ndarray:
        return exact_topk_indices(flat, k)


class SampledTopK(Sparsifier):
    """Keeps about the `ratio` × n largest entries, within ± `tolerance` of that count.

    The threshold comes from a sample drawn with a generator seeded by `seed`, so a run
    is reproducible call for call.
    """

    name: ClassVar[str] = "sampled_topk"

    def __init__(
        self,
        *,
        ratio: float,
        values: str = "raw",
        indices: str = "auto",
        chunk: int | None = DEFAULT_INT8_CHUNK,
        tolerance: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(ratio=ratio, values=values, indices=indices, chunk=chunk)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
            raise ValueError(f"tolerance: must be a number in [0, 0.5], not {tolerance!r}")
        if not 0.0 <= tolerance <= 0.5:
            raise ValueError(f"tolerance: {tolerance} is out of range [0, 0.5]")
        self.tolerance = float(tolerance)
        self.seed = check_seed(seed)
        self._rng = np.random.default_rng(self.seed)

    def select(self, flat: torch.Tensor, k: int) -> np.ndarray:
        return sampled_topk_indices(flat, k, self._rng, self.tolerance)

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "tolerance": self.tolerance, "seed": self.seed}


class RandomK(Sparsifier):
    """Keeps `ratio` × n entries chosen uniformly at random by a generator seeded by `seed`:
    two instances with one seed choose the same entries, call for call."""

    name: ClassVar[str] = "randk"

    def __init__(
        self,
        *,
        ratio: float,
        values: str = "raw",
        indices: str = "auto",
        chunk: int | None = DEFAULT_INT8_CHUNK,
        seed: int = 0,
    ) -> None:
        super().__init__(ratio=ratio, values=values, indices=indices, chunk=chunk)
        self.seed = check_seed(seed)
        self._rng = np.random.default_rng(self.seed)

    def select(self, flat: torch.Tensor, k: int) -> np.ndarray:
        return random_indices(flat.numel(), k, self._rng)

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "seed": self.seed}

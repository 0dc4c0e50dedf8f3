"""Compressors, their specs, error feedback and the backward mask: what each keeps, how
far each lossy one may be off, and PyTorch as the oracle for every numeric claim."""

from __future__ import annotations

import math

import pytest
import torch

from compressors import (
    COMPRESSORS,
    ErrorFeedback,
    Int8Quantizer,
    KeptMask,
    RandomK,
    SampledTopK,
    TopK,
    build_compressor,
    decode_payload,
    kept_count,
    kept_indices,
    selection,
)

pytestmark = pytest.mark.unit

ALL_SPECS: list[dict[str, object]] = [
    {"name": "none"},
    {"name": "fp16"},
    {"name": "int8"},
    {"name": "int8", "chunk": None},
    {"name": "topk", "ratio": 0.05},
    {"name": "topk", "ratio": 0.05, "values": "fp16"},
    {"name": "topk", "ratio": 0.05, "values": "int8"},
    {"name": "sampled_topk", "ratio": 0.05},
    {"name": "randk", "ratio": 0.05, "seed": 3},
]


def special_floats(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40])
    return x


# --- exact round trips -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_none_codec_round_trips_floats_bit_exactly(dtype: torch.dtype) -> None:
    x = special_floats(257).to(dtype).reshape(1, 257)
    y = build_compressor("none").decompress(build_compressor("none").compress(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))  # NaN and -0.0 bits too


@pytest.mark.parametrize("name", ["topk", "sampled_topk", "randk"])
def test_sparsifier_at_ratio_one_round_trips_bit_exactly(name: str) -> None:
    x = special_floats(1000).reshape(10, 100)
    compressor = build_compressor(name, ratio=1.0)
    payload = compressor.compress(x)
    assert payload.encoding == "raw/dense"
    assert torch.equal(compressor.decompress(payload).view(torch.int32), x.view(torch.int32))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize(
    "x",
    [
        torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
        torch.tensor([True, False, True]),
        torch.tensor([-3, 7], dtype=torch.int8),
    ],
    ids=["int64", "bool", "int8"],
)
def test_integer_and_bool_tensors_pass_every_compressor_unchanged(
    spec: dict[str, object], x: torch.Tensor
) -> None:
    compressor = build_compressor(spec)
    payload = compressor.compress(x)
    assert payload.encoding == "raw/dense"
    y = compressor.decompress(payload)
    assert y.dtype == x.dtype and torch.equal(y, x)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_every_compressor_keeps_shape_and_dtype_and_accepts_awkward_inputs(
    spec: dict[str, object],
) -> None:
    base = torch.randn(30, 40, requires_grad=True)
    x = base.t()  # non-contiguous, part of an autograd graph
    compressor = build_compressor(spec)
    y = compressor.decompress(compressor.compress(x))
    assert y.shape == x.shape and y.dtype == x.dtype and not y.requires_grad
    empty = torch.empty(0, 5)
    assert compressor.decompress(compressor.compress(empty)).shape == (0, 5)
    scalar = torch.tensor(2.5)
    assert compressor.decompress(compressor.compress(scalar)).shape == ()


# --- top-k -------------------------------------------------------------------------------


def test_topk_keeps_largest_entries_exactly() -> None:
    x = torch.randn(50, 200, generator=torch.Generator().manual_seed(1))
    compressor = TopK(ratio=0.03)
    payload = compressor.compress(x)
    y = compressor.decompress(payload)
    k = kept_count(0.03, x.numel())
    assert payload.count == k == 300
    kept = y != 0
    assert int(kept.sum()) == k
    assert torch.equal(y[kept], x[kept])  # kept values are exact
    # The kept set is torch.topk's (no ties in continuous random data).
    oracle = torch.topk(x.abs().reshape(-1), k).indices.sort().values
    assert torch.equal(kept_indices(payload), oracle)
    assert float(x[~kept].abs().max()) <= float(x[kept].abs().min())


def test_topk_keeps_at_least_one_entry_of_a_tiny_tensor() -> None:
    x = torch.tensor([0.1, -5.0, 2.0])
    y = TopK(ratio=0.001).compress(x)
    assert y.count == 1
    assert torch.equal(decode_payload(y), torch.tensor([0.0, -5.0, 0.0]))


def test_topk_with_fp16_and_int8_values_keeps_the_same_entries_approximately() -> None:
    x = torch.randn(4000, generator=torch.Generator().manual_seed(2)) * 3
    exact = decode_payload(TopK(ratio=0.05).compress(x))
    half = TopK(ratio=0.05, values="fp16").compress(x)
    eight = TopK(ratio=0.05, values="int8", chunk=64).compress(x)
    assert half.encoding.startswith("fp16/") and eight.encoding.startswith("int8/")
    assert torch.equal(kept_indices(half), kept_indices(eight))
    kept = exact != 0
    torch.testing.assert_close(decode_payload(half)[kept], exact[kept], rtol=2**-11, atol=0)
    scale = float(exact.abs().max()) / 127
    assert float((decode_payload(eight) - exact).abs().max()) <= scale / 2 * (1 + 1e-4)
    assert half.nbytes < TopK(ratio=0.05).compress(x).nbytes


# --- sampled top-k -------------------------------------------------------------------------


def _distribution(name: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if name == "normal":
        return torch.randn(n, generator=g)
    if name == "heavy-tailed":  # Cauchy: ratio of normals
        return torch.randn(n, generator=g) / torch.randn(n, generator=g)
    if name == "mostly-zeros":  # 80% exact zeros, as after a ReLU
        x = torch.randn(n, generator=g)
        return x * (torch.rand(n, generator=g) < 0.2)
    if name == "ties":  # few distinct levels: the threshold lands on a tied value
        levels = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0, 2.0])
        return levels[torch.randint(0, 6, (n,), generator=g)]
    if name == "sparser-than-k":  # fewer non-zeros than k: ties at zero fill the count
        x = torch.zeros(n)
        x[torch.randint(0, n, (n // 400,), generator=g)] = 1.0 + torch.rand(n // 400, generator=g)
        return x
    raise AssertionError(name)


@pytest.mark.parametrize(
    "distribution", ["normal", "heavy-tailed", "mostly-zeros", "ties", "sparser-than-k"]
)
def test_sampled_topk_count_stays_within_ten_percent(distribution: str) -> None:
    n, ratio = 500_000, 0.01  # large enough that the sampled path (not the exact one) runs
    x = _distribution(distribution, n)
    k = kept_count(ratio, n)
    for seed in range(3):
        payload = SampledTopK(ratio=ratio, seed=seed, tolerance=0.1).compress(x)
        assert abs(payload.count - k) <= 0.1 * k, (distribution, seed, payload.count)
        indices = kept_indices(payload)
        assert indices is not None
        kept_magnitude = x[indices].abs()
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[indices] = False
        # Nothing dropped is larger than anything kept: the kept set is a true top set.
        assert float(x[dropped].abs().max()) <= float(kept_magnitude.min())


def test_sampled_topk_refines_a_threshold_that_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny sample makes the first threshold miss often, both ways; each miss is refined
    # (trimmed, or the tensor scanned again) until the count is within tolerance.
    monkeypatch.setattr(selection, "SAMPLE_HITS", 3)
    monkeypatch.setattr(selection, "MIN_SAMPLE", 16)
    scans: list[float] = []
    scan = selection._indices_at_least
    monkeypatch.setattr(
        selection, "_indices_at_least", lambda v, t: (scans.append(t), scan(v, t))[1]
    )
    x = _distribution("normal", 200_000)
    misses = 0
    for seed in range(20):
        scans.clear()
        payload = SampledTopK(ratio=0.01, seed=seed, tolerance=0.1).compress(x)
        assert abs(payload.count - 2000) <= 200
        misses += len(scans) > 1
    assert misses >= 2  # the rescan path ran


def test_sampled_topk_with_zero_tolerance_keeps_exactly_k_largest() -> None:
    x = _distribution("normal", 500_000)
    payload = SampledTopK(ratio=0.01, tolerance=0.0).compress(x)
    oracle = torch.topk(x.abs(), 5000).indices.sort().values
    assert torch.equal(kept_indices(payload), oracle)


def test_sampled_topk_never_keeps_nan() -> None:
    x = _distribution("normal", 500_000)
    x[::1000] = float("nan")
    payload = SampledTopK(ratio=0.01).compress(x)
    assert not bool(decode_payload(payload).isnan().any())
    assert abs(payload.count - 5000) <= 500


def test_sampled_topk_is_reproducible_for_a_seed() -> None:
    x = _distribution("heavy-tailed", 500_000)
    a, b = SampledTopK(ratio=0.01, seed=5), SampledTopK(ratio=0.01, seed=5)
    for _ in range(2):
        assert a.compress(x) == b.compress(x)


# --- random-k ------------------------------------------------------------------------------


def test_randomk_is_reproducible_per_seed_and_keeps_exact_count() -> None:
    x = torch.randn(10_000)
    a, b, other = RandomK(ratio=0.02, seed=1), RandomK(ratio=0.02, seed=1), RandomK(ratio=0.02)
    first = [kept_indices(a.compress(x)) for _ in range(3)]
    again = [kept_indices(b.compress(x)) for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # a fresh choice each call
    assert not torch.equal(first[0], kept_indices(other.compress(x)))
    assert all(len(p) == 200 for p in first)
    y = decode_payload(a.compress(x))
    kept = y != 0
    assert torch.equal(y[kept], x[kept])


def test_randomk_covers_the_tensor_uniformly() -> None:
    compressor = RandomK(ratio=0.1, seed=0)
    hits = torch.zeros(1000)
    for _ in range(200):
        hits[kept_indices(compressor.compress(torch.ones(1000)))] += 1
    # Each entry is kept with probability 0.1: 20 expected hits in 200 draws.
    assert float(hits.min()) >= 5 and float(hits.max()) <= 40
    assert abs(float(hits.mean()) - 20) < 1e-9


# --- quantisers ---------------------------------------------------------------------------


def test_fp16_error_is_relative_and_large_values_saturate() -> None:
    x = torch.randn(10_000, dtype=torch.float64) * torch.logspace(
        -3, 4, 10_000, dtype=torch.float64
    )
    compressor = build_compressor("fp16")
    payload = compressor.compress(x)
    assert payload.encoding == "fp16/dense" and payload.nbytes == 2 * x.numel()
    y = compressor.decompress(payload)
    assert y.dtype == torch.float64
    bound = torch.maximum(x.abs() * 2**-11, torch.full_like(x, 2**-25))  # subnormal step
    assert bool(((y - x).abs() <= bound).all())
    big = compressor.decompress(compressor.compress(torch.tensor([1e6, -1e6, 7.0])))
    assert big.tolist() == [65504.0, -65504.0, 7.0]


@pytest.mark.parametrize("chunk", [None, 1, 100, 2048])
def test_int8_error_at_most_half_a_scale_per_element(chunk: int | None) -> None:
    g = torch.Generator().manual_seed(3)
    # Magnitudes that vary along the tensor, so per-chunk scales differ.
    x = torch.randn(5000, generator=g) * torch.linspace(0.01, 50, 5000)
    x[1000:1200] = 0.0  # a whole zero chunk for chunk=100
    compressor = Int8Quantizer(chunk=chunk)
    payload = compressor.compress(x)
    size = x.numel() if chunk is None else chunk
    scales = torch.stack([c.abs().max() for c in x.split(size)]) / 127
    per_element = scales.repeat_interleave(size)[: x.numel()]
    assert payload.nbytes == x.numel() + 4 * len(scales)
    error = (compressor.decompress(payload) - x).abs()
    assert bool((error <= per_element / 2 * (1 + 1e-4)).all())
    assert bool((compressor.decompress(payload)[1000:1200] == 0).all())


def test_int8_per_chunk_is_more_accurate_than_per_tensor_on_uneven_magnitudes() -> None:
    x = torch.randn(8192, generator=torch.Generator().manual_seed(8))
    x *= torch.logspace(-3, 2, 8192)  # magnitudes over five decades
    per_tensor = Int8Quantizer(chunk=None)
    per_chunk = Int8Quantizer(chunk=256)
    e_tensor = (per_tensor.decompress(per_tensor.compress(x)) - x).abs().mean()
    e_chunk = (per_chunk.decompress(per_chunk.compress(x)) - x).abs().mean()
    assert float(e_chunk) < float(e_tensor) / 3


# --- specs -------------------------------------------------------------------------------


def test_build_compressor_accepts_name_keywords_dict_and_job_spec_shorthand() -> None:
    a = build_compressor("topk", ratio=0.01, values="fp16")
    b = build_compressor({"name": "topk", "ratio": 0.01, "values": "fp16"})
    c = build_compressor({"topk": 0.01}, values="fp16")
    assert a.spec() == b.spec() == c.spec()
    assert isinstance(a, TopK) and a.ratio == 0.01 and a.values == "fp16"
    assert type(build_compressor()).__name__ == "NoCompression"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_a_compressors_spec_rebuilds_it(spec: dict[str, object]) -> None:
    compressor = build_compressor(spec)
    assert build_compressor(compressor.spec()).spec() == compressor.spec()
    assert compressor.name in COMPRESSORS


@pytest.mark.parametrize(
    ("spec", "options", "field"),
    [
        ("gzip", {}, "name"),
        ({"ratio": 0.1, "values": "fp16"}, {}, "name"),
        (42, {}, "name"),
        ("topk", {}, "ratio"),
        ("topk", {"ratio": 0.0}, "ratio"),
        ("topk", {"ratio": 1.5}, "ratio"),
        ("topk", {"ratio": -0.1}, "ratio"),
        ("topk", {"ratio": "0.1"}, "ratio"),
        ({"topk": 2}, {}, "ratio"),
        ("topk", {"ratio": 0.1, "values": "fp8"}, "values"),
        ("topk", {"ratio": 0.1, "indices": "gzip"}, "indices"),
        ("topk", {"ratio": 0.1, "colour": "red"}, "colour"),
        ("fp16", {"ratio": 0.1}, "ratio"),
        ("int8", {"chunk": 0}, "chunk"),
        ("randk", {"ratio": 0.1, "seed": -1}, "seed"),
        ("sampled_topk", {"ratio": 0.1, "tolerance": 0.9}, "tolerance"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_field(
    spec: object, options: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        build_compressor(spec, **options)  # type: ignore[arg-type]


# --- error feedback ------------------------------------------------------------------------


def test_error_feedback_residual_is_exactly_what_was_dropped() -> None:
    g = torch.Generator().manual_seed(4)
    feedback = ErrorFeedback()
    compressor = TopK(ratio=0.1)
    x1 = torch.randn(20, 50, generator=g)
    sent1 = decode_payload(feedback.compress("stage0->stage1:grad", x1, compressor))
    residual1 = feedback.residual("stage0->stage1:grad")
    assert residual1 is not None
    kept = sent1 != 0
    assert torch.equal(residual1[kept], torch.zeros(int(kept.sum())))
    assert torch.equal(residual1[~kept], x1[~kept])
    assert torch.equal(sent1 + residual1, x1)

    x2 = torch.randn(20, 50, generator=g)
    corrected = x2 + residual1
    sent2 = decode_payload(feedback.compress("stage0->stage1:grad", x2, compressor))
    assert torch.equal(sent2, decode_payload(compressor.compress(corrected)))
    assert torch.equal(feedback.residual("stage0->stage1:grad"), corrected - sent2)
    # Over the steps nothing is lost: what was sent plus what is left is all the input.
    torch.testing.assert_close(sent1 + sent2 + corrected - sent2, x1 + x2)


def test_error_feedback_with_a_quantiser_keeps_the_rounding_error() -> None:
    feedback = ErrorFeedback()
    compressor = build_compressor("topk", ratio=0.2, values="int8")
    total_in, total_sent = torch.zeros(1000), torch.zeros(1000)
    for step in range(20):
        x = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        total_in += x
        total_sent += decode_payload(feedback.compress("edge", x, compressor))
    residual = feedback.residual("edge")
    assert residual is not None
    torch.testing.assert_close(total_sent + residual, total_in, atol=1e-4, rtol=0)


def test_error_feedback_keeps_edges_apart_and_refuses_a_changed_shape() -> None:
    feedback = ErrorFeedback()
    compressor = TopK(ratio=0.5)
    feedback.compress("a", torch.randn(10), compressor)
    feedback.compress("b", torch.randn(4, 4), compressor)
    assert sorted(feedback.keys()) == ["a", "b"]
    with pytest.raises(ValueError, match=r"edge 'a'.*reset\('a'\)"):
        feedback.compress("a", torch.randn(11), compressor)
    feedback.reset("a")
    feedback.compress("a", torch.randn(11), compressor)
    feedback.reset()
    assert feedback.keys() == []
    feedback.compress("ids", torch.arange(5), compressor)
    assert feedback.residual("ids") is None  # integers are sent exactly


# --- backward mask -------------------------------------------------------------------------


def test_kept_mask_gives_the_gradient_autograd_gives_through_the_sparsified_edge() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 32, generator=g, requires_grad=True)
    payload = TopK(ratio=0.1).compress(x)
    mask = KeptMask.from_payload(payload)
    assert mask is not None and mask.shape == (8, 32) and len(mask.indices) == payload.count
    # Oracle: the forward pass as autograd sees it, y = x * mask.
    y = x * mask.to_bool()
    upstream = torch.randn(8, 32, generator=g)
    y.backward(upstream)
    assert x.grad is not None
    assert torch.equal(mask.apply(upstream), x.grad)
    assert torch.equal(mask.gather(upstream), upstream.reshape(-1)[mask.indices])
    with pytest.raises(ValueError, match="shape"):
        mask.apply(torch.randn(8, 31))


def test_kept_mask_of_a_dense_payload_is_none() -> None:
    assert KeptMask.from_payload(build_compressor("fp16").compress(torch.randn(5))) is None
    assert kept_indices(build_compressor("none").compress(torch.randn(5))) is None


def test_kept_count_rounds_and_clamps() -> None:
    assert kept_count(0.01, 1000) == 10
    assert kept_count(0.0001, 1000) == 1
    assert kept_count(1.0, 7) == 7
    assert kept_count(0.5, 0) == 0
    assert kept_count(0.015, 100) == math.floor(1.5 + 0.5)

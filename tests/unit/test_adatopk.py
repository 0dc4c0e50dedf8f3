"""The AdaTopK per-link policy: links that fit stay dense; the rest keep the largest
fraction whose real wire size (values, scales and indices) fits the target."""

from __future__ import annotations

import math

import pytest
import torch

from compressors import (
    AdaTopKConfig,
    LinkCompression,
    build_compressor,
    choose_link_compression,
    compressed_wire_bytes,
    kept_count,
)

pytestmark = pytest.mark.unit

MB = 1_000_000
MBIT = 125_000  # bytes/s in one Mbit/s


def test_a_link_that_already_fits_stays_uncompressed() -> None:
    choice = choose_link_compression(dense_bytes=4 * MB, bandwidth=1000 * MBIT, target_s=0.1)
    assert choice == LinkCompression("none", 1.0, "raw", 4 * MB, pytest.approx(0.032), True)
    assert choice.spec() == {"name": "none"}


def test_a_slow_link_keeps_the_largest_fraction_that_fits() -> None:
    dense, bandwidth, target = 4_200_000, 10 * MBIT, 0.25  # the gpt pipeline at 10 Mbit/s
    choice = choose_link_compression(dense_bytes=dense, bandwidth=bandwidth, target_s=target)
    assert choice.codec == "sampled_topk" and choice.values == "fp16" and choice.fits
    assert 0.001 <= choice.ratio < 1.0
    assert choice.seconds <= target
    assert choice.wire_bytes == compressed_wire_bytes(dense, choice.ratio)
    assert math.isclose(choice.seconds, choice.wire_bytes / bandwidth)
    # One more kept entry would no longer fit.
    numel = dense // 4
    k = kept_count(choice.ratio, numel)
    assert compressed_wire_bytes(dense, (k + 1) / numel) / bandwidth > target


def test_slower_links_keep_less() -> None:
    ratios = [
        choose_link_compression(dense_bytes=4 * MB, bandwidth=mbit * MBIT, target_s=0.2).ratio
        for mbit in (50, 20, 10, 8, 2)
    ]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)


def test_wire_bytes_count_indices_and_value_format_not_just_the_ratio() -> None:
    dense, ratio = 4 * MB, 0.01
    numel = dense // 4
    fp16 = compressed_wire_bytes(dense, ratio, values="fp16")
    raw = compressed_wire_bytes(dense, ratio, values="raw")
    int8 = compressed_wire_bytes(dense, ratio, values="int8")
    assert fp16 > ratio * dense / 2  # more than the fp16 values alone: the indices count
    assert raw - fp16 == kept_count(ratio, numel) * 2
    assert int8 < fp16
    int32 = compressed_wire_bytes(dense, ratio, indices="int32")
    assert int32 == kept_count(ratio, numel) * (2 + 4)
    assert compressed_wire_bytes(dense, 1.0, values="fp16") == dense // 2  # dense fp16
    assert compressed_wire_bytes(dense, 1.0, values="raw") == dense


@pytest.mark.parametrize("values", ["raw", "fp16", "int8"])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_predicted_wire_bytes_match_real_payloads(values: str, ratio: float) -> None:
    x = torch.randn(250_000, generator=torch.Generator().manual_seed(0))
    predicted = compressed_wire_bytes(x.numel() * 4, ratio, values=values)
    real = build_compressor("topk", ratio=ratio, values=values).compress(x).nbytes
    assert abs(predicted - real) <= 0.03 * real, (predicted, real)


def test_the_floor_is_kept_when_nothing_fits() -> None:
    slow = {"dense_bytes": 4 * MB, "bandwidth": 0.1 * MBIT, "target_s": 0.1}
    choice = choose_link_compression(**slow)
    assert choice.ratio == 0.001 and not choice.fits and choice.seconds > 0.1
    custom = choose_link_compression(**slow, config=AdaTopKConfig(floor=0.01))
    assert custom.ratio == 0.01 and custom.wire_bytes > choice.wire_bytes


def test_latency_and_transfers_per_target_are_counted() -> None:
    base = {"dense_bytes": 1 * MB, "bandwidth": 10 * MBIT, "target_s": 0.4}
    one = choose_link_compression(**base)
    latent = choose_link_compression(**base, latency_s=0.05)
    four = choose_link_compression(**base, transfers=4)
    assert latent.ratio < one.ratio
    assert four.ratio < one.ratio
    assert math.isclose(four.seconds, 4 * four.wire_bytes / (10 * MBIT))
    assert math.isclose(latent.seconds, 0.05 + latent.wire_bytes / (10 * MBIT))
    too_latent = choose_link_compression(**base, latency_s=2.0)
    assert too_latent.ratio == 0.001 and not too_latent.fits


def test_keeping_everything_in_fp16_is_chosen_when_that_alone_fits() -> None:
    choice = choose_link_compression(dense_bytes=4 * MB, bandwidth=40 * MBIT, target_s=0.45)
    assert choice.ratio == 1.0 and choice.codec == "sampled_topk" and choice.fits
    assert choice.wire_bytes == 2 * MB
    payload = build_compressor(choice.spec()).compress(torch.randn(MB))
    assert payload.encoding == "fp16/dense" and payload.nbytes == choice.wire_bytes


def test_the_choice_builds_a_compressor_that_sends_what_was_predicted() -> None:
    x = torch.randn(500_000, generator=torch.Generator().manual_seed(1))
    choice = choose_link_compression(dense_bytes=x.numel() * 4, bandwidth=MBIT, target_s=0.1)
    compressor = build_compressor(choice.spec())
    assert compressor.spec()["ratio"] == choice.ratio
    payload = compressor.compress(x)
    assert abs(payload.count - kept_count(choice.ratio, x.numel())) <= 0.05 * payload.count
    assert payload.nbytes <= 1.1 * choice.wire_bytes


def test_a_config_chooses_codec_and_value_format() -> None:
    config = AdaTopKConfig(codec="topk", values="int8", floor=0.002)
    choice = choose_link_compression(
        dense_bytes=4 * MB, bandwidth=10 * MBIT, target_s=0.1, config=config
    )
    assert (choice.codec, choice.values) == ("topk", "int8")
    assert choice.spec() == {"name": "topk", "ratio": choice.ratio, "values": "int8"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dense_bytes": -1}, "dense_bytes"),
        ({"dense_bytes": 1.5}, "dense_bytes"),
        ({"bandwidth": 0}, "bandwidth"),
        ({"bandwidth": float("inf")}, "bandwidth"),
        ({"target_s": -1.0}, "target_s"),
        ({"latency_s": -0.1}, "latency_s"),
        ({"transfers": 0}, "transfers"),
        ({"dtype": "complex64"}, "dtype"),
    ],
)
def test_bad_link_numbers_raise_value_error_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    link: dict[str, object] = {"dense_bytes": MB, "bandwidth": MBIT, "target_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        choose_link_compression(**link)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"floor": 0.0}, "ratio"),
        ({"floor": 2.0}, "ratio"),
        ({"codec": "fp16"}, "codec"),
        ({"values": "fp8"}, "values"),
        ({"indices": "zip"}, "indices"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_field(
    config: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        AdaTopKConfig(**config)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^ratio:"):
        compressed_wire_bytes(MB, 0.0)


def test_an_empty_link_needs_no_compression() -> None:
    choice = choose_link_compression(dense_bytes=0, bandwidth=MBIT, target_s=1.0)
    assert choice.codec == "none" and choice.wire_bytes == 0 and choice.fits

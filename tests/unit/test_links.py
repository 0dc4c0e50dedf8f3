"""The bandwidth matrix: directed lookups, the fallback for unmeasured pairs, storage and
the table `archipelago status --links` prints."""

from __future__ import annotations

import json
import math

import pytest

from coordinator.planning.links import BandwidthMatrix, Link, format_rate

pytestmark = pytest.mark.unit

MBIT = 1e6 / 8


def _two_way() -> BandwidthMatrix:
    return BandwidthMatrix.of(
        {
            ("a", "b"): (100 * MBIT, 0.010),
            ("b", "a"): (20 * MBIT, 0.012),
            ("a", "c"): (1000 * MBIT, 0.001),
        }
    )


def test_each_direction_of_a_pair_has_its_own_measurement() -> None:
    m = _two_way()
    assert m.bandwidth("a", "b") == 100 * MBIT
    assert m.bandwidth("b", "a") == 20 * MBIT
    assert m.rtt("a", "b") == 0.010
    assert m.latency("b", "a") == pytest.approx(0.006)
    assert m.measured("a", "b") and not m.measured("c", "a")


def test_unmeasured_pair_falls_back_to_the_stated_default() -> None:
    m = BandwidthMatrix(_two_way().links, default_bandwidth_Bps=5 * MBIT, default_rtt_s=0.05)
    assert m.bandwidth("c", "a") == 5 * MBIT
    assert m.rtt("c", "b") == 0.05


def test_unmeasured_pair_without_default_gets_the_slowest_measured_link() -> None:
    m = _two_way()
    assert m.bandwidth("c", "a") == 20 * MBIT
    assert m.rtt("c", "a") == 0.012  # the longest measured round trip


def test_nothing_measured_and_no_default_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="nothing was measured"):
        BandwidthMatrix().bandwidth("a", "b")


def test_a_worker_to_itself_is_free() -> None:
    m = _two_way()
    assert math.isinf(m.bandwidth("a", "a"))
    assert m.rtt("a", "a") == 0.0


@pytest.mark.parametrize(
    ("link", "why"),
    [
        (Link("a", "a", 1e6, 0.0), "no link to itself"),
        (Link("a", "b", 0.0, 0.0), "must be > 0"),
        (Link("a", "b", math.inf, 0.0), "must be > 0"),
        (Link("a", "b", 1e6, -1.0), "must be >= 0"),
    ],
)
def test_bad_measurements_are_refused(link: Link, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        BandwidthMatrix((link,))


def test_a_pair_measured_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="measured twice"):
        BandwidthMatrix((Link("a", "b", 1e6, 0.0), Link("a", "b", 2e6, 0.0)))


def test_matrix_round_trips_through_json() -> None:
    m = BandwidthMatrix(_two_way().links, default_bandwidth_Bps=3e5)
    back = BandwidthMatrix.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m
    assert back.bandwidth("c", "b") == 3e5


def test_uniform_matrix_links_every_ordered_pair() -> None:
    m = BandwidthMatrix.uniform(["x", "y", "z"], 1e8, 0.002)
    assert len(m.links) == 6
    assert m.worker_ids == ("x", "y", "z")


def test_table_shows_bit_rates_round_trips_and_marks_fallbacks() -> None:
    table = _two_way().format_table(["a", "b", "c"], names={"c": "gpu-box"})
    print(table)
    lines = table.splitlines()
    assert "gpu-box" in lines[0]
    assert "100M 10ms" in lines[1] and "1G 1ms" in lines[1]
    assert "20M 12ms" in lines[2]
    assert "*" in lines[3]  # c -> a was never measured
    assert "slowest measured link" in lines[-1]


def test_rates_are_printed_in_bits_per_second() -> None:
    assert format_rate(20 * MBIT) == "20M"
    assert format_rate(1.25e9) == "10G"
    assert format_rate(125.0) == "1k"

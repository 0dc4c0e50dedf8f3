"""The start-up probe: a finite, steady speed figure, real memory, clear device errors."""

from __future__ import annotations

import math
import time

import pytest
import torch

from worker.resources import Resources, host_memory_bytes, measure_resources

pytestmark = pytest.mark.unit

GIB = 2**30


def test_cpu_measurement_is_positive_and_finite() -> None:
    res = measure_resources(seconds=0.05)
    assert isinstance(res, Resources)
    assert math.isfinite(res.gflops) and res.gflops > 0
    assert res.device == "cpu"
    assert res.threads == torch.get_num_threads() >= 1


def test_memory_is_this_machines_and_more_than_a_gib() -> None:
    res = measure_resources(seconds=0.02)
    assert res.memory_bytes == host_memory_bytes() > GIB
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert res.memory_bytes <= total_kib * 1024


def test_longer_window_gives_a_figure_of_the_same_order() -> None:
    short = measure_resources(seconds=0.05).gflops
    long = measure_resources(seconds=0.4).gflops
    # Machines are noisy (other tests, other tenants); a 5x band still catches a figure
    # that is off by the window length or a missing factor of two.
    assert 1 / 5 < long / short < 5


def test_measurement_takes_about_the_window() -> None:
    start = time.perf_counter()
    measure_resources(seconds=0.2)
    took = time.perf_counter() - start
    assert 0.2 <= took < 1.0


def test_probe_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    measure_resources(seconds=0.02)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("device", ["tpu", "banana", "meta", "cpux"])
def test_unknown_device_is_a_value_error_naming_it(device: str) -> None:
    with pytest.raises(ValueError, match=device):
        measure_resources(seconds=0.01, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        measure_resources(seconds=0.01, device="cuda")


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf")])
def test_window_must_be_positive_and_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        measure_resources(seconds=seconds)


def test_cpu_with_an_index_is_reported_as_cpu() -> None:
    assert measure_resources(seconds=0.01, device="cpu:0").device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measurement_reports_the_gpu() -> None:
    res = measure_resources(seconds=0.1, device="cuda")
    index = torch.cuda.current_device()
    assert res.device == f"cuda:{index}"
    assert res.memory_bytes == torch.cuda.get_device_properties(index).total_memory
    assert math.isfinite(res.gflops) and res.gflops > measure_resources(seconds=0.05).gflops
    with pytest.raises(ValueError, match="cuda:99"):
        measure_resources(seconds=0.01, device="cuda:99")

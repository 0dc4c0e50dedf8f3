"""What a volunteer's machine can give a job, measured when the worker starts.

The coordinator balances stages by these figures, so they are measured, not declared:
float32 matrix-multiply throughput on the device the worker will compute on, the memory
it may use, and its thread count.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# A 512 matmul takes milliseconds on a CPU core; on a GPU it is over in microseconds and
# the probe would time kernel launches, so GPUs get a size that keeps them busy.
CPU_MATMUL_SIZE = 512
CUDA_MATMUL_SIZE = 4096


@dataclass(frozen=True)
class Resources:
    """A machine's measured capacity, as the worker reports it on registering."""

    gflops: float  # float32 matmul throughput, GFLOP/s
    memory_bytes: int  # memory the worker may use (host RAM, or the GPU's own memory)
    device: str  # "cpu" or "cuda:N"
    threads: int  # torch's intra-op threads


def measure_resources(*, seconds: float = 0.3, device: str = "cpu") -> Resources:
    """Measure this machine on `device` ("cpu", "cuda" or "cuda:N") for about `seconds`."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not (math.isfinite(seconds) and seconds > 0)
    ):
        raise ValueError(f"seconds={seconds!r} must be a positive, finite number")
    target = _resolve_device(device)
    if target.type == "cuda":
        size, memory = CUDA_MATMUL_SIZE, torch.cuda.get_device_properties(target).total_memory
    else:
        size, memory = CPU_MATMUL_SIZE, host_memory_bytes()
    return Resources(
        gflops=matmul_gflops(target, size=size, seconds=seconds),
        memory_bytes=int(memory),
        device=str(target),
        threads=torch.get_num_threads(),
    )


def _resolve_device(device: str) -> torch.device:
    """`device` as a concrete torch.device ("cuda" gets its index); ValueError if unusable."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if target.type == "cpu":
        return torch.device("cpu")
    if target.type != "cuda":
        raise ValueError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    index = torch.cuda.current_device() if target.index is None else target.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def matmul_gflops(device: torch.device, *, size: int, seconds: float) -> float:
    """float32 `size`x`size` matmul throughput on `device` over about `seconds`, in GFLOP/s."""
    # A private generator: probing must not move the global RNG a job may rely on.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.rand(size, size, device=device, generator=generator)
    b = torch.rand(size, size, device=device, generator=generator)
    out = torch.empty(size, size, device=device)

    def sync() -> None:
        # CUDA calls return before the work is done; time only finished work.
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b, out=out)  # warm-up: first calls allocate workspaces and pick kernels
    sync()
    # Rounds double in length until the window is spent, each timed to its end, so the
    # figure is accurate whether one matmul takes a microsecond or a second.
    done, elapsed, reps = 0, 0.0, 1
    while elapsed < seconds:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync()
        elapsed += time.perf_counter() - start
        done += reps
        rate = done / max(elapsed, 1e-9)
        reps = max(1, min(2 * reps, math.ceil((seconds - elapsed) * rate)))
    return 2 * size**3 * done / elapsed / 1e9


def host_memory_bytes() -> int:
    """Physical memory, or this process's cgroup memory limit where that is lower.

    A worker in a container sees the host's total in /proc/meminfo but is killed at its
    cgroup's limit, so the limit is what it can really use.
    """
    total = _meminfo_total()
    if total is None:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_memory_limit()
    return min(total, limit) if limit is not None else total


def _meminfo_total() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                kib = 1024 if len(parts) < 3 or parts[2].lower() == "kb" else 1
                return int(parts[1]) * kib
    return None


def _cgroup_memory_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or None if it has none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        # Lines read "id:controllers:path"; v2 has one with empty controllers.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            candidates += [Path("/sys/fs/cgroup", rel, "memory.max")]
        elif "memory" in controllers.split(","):
            candidates += [Path("/sys/fs/cgroup/memory", rel, "memory.limit_in_bytes")]
    # Inside a container the path names the host's hierarchy; its root is the container's.
    candidates += [
        Path("/sys/fs/cgroup/memory.max"),
        Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    ]
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a page-rounded 2**63 (v1) mean no limit.
        if text.isdigit() and int(text) < 2**62:
            return int(text)
        if text == "max" or text.isdigit():
            return None
    return None


__all__ = ["Resources", "host_memory_bytes", "matmul_gflops", "measure_resources"]

"""How long capturing and partitioning a 12-layer gpt takes, against one plain PyTorch
training step of the same model measured in the same run.

"cold" is the first capture in this process (it pays torch's one-time warm-up of the meta
device and FLOP counter); "warm" is the median of later ones.
"""

from __future__ import annotations

import statistics
import time

import torch

from opdag.capture import capture
from opdag.partition import balanced_assignment, partition
from opdag.zoo import build_model, example_batch

ARGS = {"layers": 12, "d_model": 256, "heads": 8, "context": 128}
BATCH = 16
STAGES = 4
TARGET_S = 2.0


def capture_and_partition() -> tuple[float, int]:
    began = time.perf_counter()
    model = build_model("gpt", ARGS, seed=0)
    captured = capture(model, example_batch("gpt", ARGS, BATCH, device="meta"), name="gpt")
    partition(captured.graph, balanced_assignment(captured.graph, STAGES))
    return time.perf_counter() - began, len(captured.graph.nodes)


def plain_training_step() -> float:
    model = build_model("gpt", ARGS, seed=0)
    batch = {
        k: torch.randint(0, 256, v.shape) for k, v in example_batch("gpt", ARGS, BATCH).items()
    }
    model(**batch).backward()  # warm-up
    times = []
    for _ in range(3):
        began = time.perf_counter()
        model(**batch).backward()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    cold, nodes = capture_and_partition()
    warm = statistics.median(capture_and_partition()[0] for _ in range(5))
    step = plain_training_step()
    print(f"gpt {ARGS}, batch {BATCH}: {nodes} nodes, cut into {STAGES} stages")
    print(f"  capture + partition, cold: {cold:6.2f} s   (target < {TARGET_S:.0f} s)")
    print(f"  capture + partition, warm: {warm:6.2f} s")
    print(f"  baseline, one plain PyTorch forward+backward of the same model: {step:6.2f} s")
    print(f"  ratio, cold capture / training step: {cold / step:5.2f}")
    print(f"  ratio, warm capture / training step: {warm / step:5.2f}")

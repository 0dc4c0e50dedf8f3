"""`archipelago demo`: the main job on an embedded default.

Captures the `gpt` model, cuts it into stages, trains it by remote autodiff in this process
on real text, then trains the same model with plain PyTorch, and prints the two side by
side: the losses must agree step for step, and the throughput ratio is the runtime's cost.
"""

from __future__ import annotations

import argparse
import time

import torch

from archipelago.errors import UsageError
from opdag import report
from opdag.data import DataConfig, TextSource
from opdag.local import LocalTrainer
from opdag.optim import OptimizerConfig
from opdag.reference import ReferenceTrainer

DEMO_MODEL = "gpt"
DEMO_ARGS = {"layers": 6, "d_model": 256, "heads": 8, "context": 128}
DEMO_DATA = DataConfig(corpus="stdlib-text", batch_size=16, micro_batches=4, seed=0)
DEMO_OPTIMIZER = OptimizerConfig(name="adamw", lr=1e-3)
EVAL_BATCHES = 4


def cmd_demo(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, not {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    shape = ", ".join(f"{k} {v}" for k, v in DEMO_ARGS.items())
    print(f"Archipelago demo: {DEMO_MODEL} ({shape}) on stdlib-text, {args.steps} steps")
    staged = LocalTrainer(
        model=DEMO_MODEL,
        model_args=DEMO_ARGS,
        data=DEMO_DATA,
        optimizer=DEMO_OPTIMIZER,
        stages=args.stages,
    )
    graph = staged.captured.graph
    source = staged.source
    text = report.human_bytes(source.train_bytes) if isinstance(source, TextSource) else "?"
    print(
        f"captured {len(graph.nodes)} operators, {report.human_count(graph.num_params())} "
        f"parameters; batch {DEMO_DATA.batch_size} in {DEMO_DATA.micro_batches} micro-batches, "
        f"{text} of text (fingerprint {source.fingerprint[:12]})"
    )
    print()
    print(report.format_partition_summary(report.partition_summary(staged.partition)))
    print()
    ours = staged.run(args.steps, progress=True, eval_batches=EVAL_BATCHES)
    reference = ReferenceTrainer(
        model=DEMO_MODEL, model_args=DEMO_ARGS, data=DEMO_DATA, optimizer=DEMO_OPTIMIZER
    ).run(args.steps, progress=True, eval_batches=EVAL_BATCHES)

    tail = min(10, args.steps)
    diff = max(abs(a - b) for a, b in zip(ours.losses, reference.losses, strict=True))
    rows = [
        ("", f"{args.stages} stages (OP-DAG)", "plain PyTorch"),
        ("first loss", f"{ours.losses[0]:.4f}", f"{reference.losses[0]:.4f}"),
        (
            f"loss, mean of last {tail}",
            f"{sum(ours.losses[-tail:]) / tail:.4f}",
            f"{sum(reference.losses[-tail:]) / tail:.4f}",
        ),
        ("validation loss", f"{ours.val_loss:.4f}", f"{reference.val_loss:.4f}"),
        ("samples/s", f"{ours.samples_per_s:.1f}", f"{reference.samples_per_s:.1f}"),
    ]
    print()
    for name, a, b in rows:
        print(f"  {name:<24} {a:>20} {b:>16}")
    print()
    print(f"  largest difference between the two runs' step losses: {diff:.2e}")
    print(
        f"  throughput ratio (staged / plain): {ours.samples_per_s / reference.samples_per_s:.2f}"
    )
    print(
        f"  bytes between stages per step: {report.human_bytes(ours.bytes_per_step)} "
        "(activations forward, gradients back)"
    )
    print(f"  demo took {time.perf_counter() - began:.0f} s")
    return 0

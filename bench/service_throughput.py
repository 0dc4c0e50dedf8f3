"""Throughput of the service on loopback against the plain PyTorch reference, same run,
same machine, same model, data and optimizer.

(a) runtime overhead: one worker holding the whole model, against the reference trainer;
(b) a three-stage pipeline on three worker processes, against the same reference.

The service's samples/s come from the step times the loss-computing stage reports, after
the first few (start-up) steps; the reference's from timing its own steps the same way.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from archipelago.demo import DEMO_ARGS, DEMO_DATA, DEMO_MODEL, DEMO_OPTIMIZER, demo_spec
from archipelago.localcluster import Cluster
from opdag.reference import ReferenceTrainer

STEPS = 40
SKIP = 5  # start-up steps left out of both measurements


def reference_samples_per_s(threads: int) -> float:
    torch.set_num_threads(threads)
    trainer = ReferenceTrainer(
        model=DEMO_MODEL, model_args=DEMO_ARGS, data=DEMO_DATA, optimizer=DEMO_OPTIMIZER
    )
    times = []
    for step in range(STEPS):
        began = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - began)
    return DEMO_DATA.batch_size / statistics.mean(times[SKIP:])


def service_samples_per_s(workers: int, threads: int) -> tuple[float, int]:
    with Cluster(
        Path(tempfile.mkdtemp(prefix="bench-service-")),
        extra_worker_args=["--threads", str(threads)],
    ) as cluster:
        cluster.start_coordinator()
        for i in range(workers):
            cluster.start_worker(f"w{i}")
        job_id = cluster.submit(demo_spec(STEPS, workers).replace("every: 50", "every: 1000"))
        cluster.wait_job(job_id, lambda j: j.state == "completed", "the job", timeout=900)
        job = cluster.job(job_id, with_metrics=True)
    times = [m.step_seconds for m in job.metrics if m.step >= SKIP]
    return DEMO_DATA.batch_size / statistics.mean(times), job.bytes_per_step


def main() -> None:
    cores = os.cpu_count() or 1
    print(
        f"gpt {DEMO_ARGS}, batch {DEMO_DATA.batch_size} in {DEMO_DATA.micro_batches} "
        f"micro-batches, {STEPS} steps (first {SKIP} not timed), {cores} cores"
    )
    ref = reference_samples_per_s(cores)
    print(f"  baseline: plain PyTorch, one process, {cores} threads: {ref:7.1f} samples/s")
    one, _ = service_samples_per_s(1, cores)
    print(
        f"  (a) 1 worker on loopback, {cores} threads:        {one:7.1f} samples/s   "
        f"ratio {one / ref:.2f}  (target >= 0.85)"
    )
    # Three processes on this machine's cores: one thread each.
    three, moved = service_samples_per_s(3, 1)
    print(
        f"  (b) 3 workers, 3-stage pipeline, 1 thread each: {three:7.1f} samples/s   "
        f"ratio {three / ref:.2f}  ({moved / 1e6:.1f} MB between workers per step)"
    )

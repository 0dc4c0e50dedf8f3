"""`archipelago demo`: the main job on an embedded default.

Starts a coordinator and three workers (`--workers`) as processes on loopback, submits the
`gpt` job with the plan left to OP-Fence (stages, replicas and placement; `--stages` fixes
the stage count), follows it with a progress bar, then trains the same model with plain
PyTorch in this process and prints the two side by side: under the default `sync` policy
the losses must agree step for step whatever the plan, and the throughput ratio is what
the distributed runtime costs on one machine. Every process it starts is stopped when it
ends, also on Ctrl-C or an error.

`--in-process` runs the stages in this one process instead (remote autodiff without a
network), the fastest way to see the OP-DAG at work.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from archipelago.client import ClientError, JobView
from archipelago.errors import UsageError
from archipelago.job_lines import replica_lines
from archipelago.localcluster import Cluster
from opdag import report
from opdag.data import DataConfig, TextSource
from opdag.local import LocalTrainer
from opdag.optim import OptimizerConfig
from opdag.reference import ReferenceResult, ReferenceTrainer

DEMO_MODEL = "gpt"
DEMO_ARGS = {"layers": 6, "d_model": 256, "heads": 8, "context": 128}
DEMO_DATA = DataConfig(corpus="stdlib-text", batch_size=16, micro_batches=4, seed=0)
DEMO_OPTIMIZER = OptimizerConfig(name="adamw", lr=1e-3)
EVAL_BATCHES = 4
IN_PROCESS_STAGES = 3  # `--in-process` without `--stages`


def demo_spec(steps: int, stages: int | None = None) -> str:
    """The demo job as a user would write it: OP-Fence picks the stages (unless given),
    the replicas and the placement."""
    parallel: dict[str, object] = {"planner": "opfence", "replicas": "auto"}
    if stages is not None:
        parallel["stages"] = stages
    spec = {
        "name": "demo-gpt",
        "model": {"zoo": DEMO_MODEL, "args": DEMO_ARGS},
        "data": {
            "corpus": DEMO_DATA.corpus,
            "batch_size": DEMO_DATA.batch_size,
            "micro_batches": DEMO_DATA.micro_batches,
            "seed": DEMO_DATA.seed,
        },
        "optimizer": {"name": DEMO_OPTIMIZER.name, "lr": DEMO_OPTIMIZER.lr},
        "steps": steps,
        "parallel": parallel,
        "checkpoint": {"every": 50},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def _reference(steps: int) -> ReferenceResult:
    return ReferenceTrainer(
        model=DEMO_MODEL, model_args=DEMO_ARGS, data=DEMO_DATA, optimizer=DEMO_OPTIMIZER
    ).run(steps, progress=True)


def _print_rows(rows: list[tuple[str, str, str]]) -> None:
    print()
    for name, a, b in rows:
        print(f"  {name:<28} {a:>22} {b:>16}")
    print()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, not {args.steps}")
    if args.stages is not None and args.stages < 1:
        raise UsageError(f"--stages must be at least 1, not {args.stages}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    if args.in_process:
        return _in_process(args)
    return _distributed(args)


def _distributed(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    shape = ", ".join(f"{k} {v}" for k, v in DEMO_ARGS.items())
    print(
        f"Archipelago demo: {DEMO_MODEL} ({shape}), {args.steps} steps on a coordinator and "
        f"{args.workers} workers on loopback, planned by OP-Fence"
    )
    workdir = Path(tempfile.mkdtemp(prefix="archipelago-demo-"))
    # The dashboard's login is the operator token: the cluster keeps it in a file only its
    # owner reads, so it is never printed. The workers' join token opens nothing there.
    with Cluster(
        workdir,
        token=secrets.token_hex(16),
        operator_token=secrets.token_hex(16),
        heartbeat_s=0.5,
        worker_timeout_s=5.0,
        dashboard=True,
    ) as cluster:
        cluster.start_coordinator()
        token_file = workdir / "operator-token"
        print(f"  coordinator on {cluster.address} (logs in {workdir})")
        print(
            "  mutual TLS between every process: the workers join by the fingerprint of the "
            f"coordinator's own authority, {cluster.ca_fingerprint}"
        )
        print(
            f"  dashboard on {cluster.dashboard_url} while the demo runs "
            f"(log in with the operator token in {token_file})"
        )
        for i in range(args.workers):
            cluster.start_worker(f"worker-{i}")
        print(
            f"  {args.workers} workers joined; submitting the job (the coordinator captures "
            "the model first)"
        )
        job_id = cluster.submit(demo_spec(args.steps, args.stages))
        final = _follow(cluster, job_id, args.steps)
        if final.state != "completed":
            print(f"job {job_id} {final.state}: {final.error}")
            print(cluster.logs())
            return 1
        job = cluster.job(job_id, with_metrics=True)
    stages = len({s.stage for s in job.stages})
    shape_of_plan = f"{stages} stage{'s' * (stages > 1)} x {job.replicas} replica" + (
        "s" * (job.replicas > 1)
    )
    print(f"  OP-Fence's plan: {shape_of_plan}")
    for s in sorted(job.stages, key=lambda s: (s.replica, s.stage)):
        where = f"replica {s.replica} " if job.replicas > 1 else ""
        print(
            f"  {where}stage {s.stage}: {s.worker_name} ({s.nodes} operators, "
            f"{report.human_count(s.params)} parameters)"
        )
    for line in replica_lines(job):
        print(f"  {line}")
    print("\nthe same model, data and optimizer in one plain PyTorch process:")
    reference = _reference(args.steps)
    losses = {m.step: m.loss for m in job.metrics}
    ours = [losses[s] for s in range(args.steps)]
    tail = min(10, args.steps)
    # Throughput of the distributed run: steps timed by the stage that computes the loss,
    # skipping the first (start-up) steps.
    timed = [m.step_seconds for m in job.metrics if m.step >= min(5, args.steps - 1)]
    samples_per_s = DEMO_DATA.batch_size * len(timed) / sum(timed) if timed else 0.0
    diff = max(abs(a - b) for a, b in zip(ours, reference.losses, strict=True))
    _print_rows(
        [
            ("", f"{shape_of_plan} (gRPC)", "plain PyTorch"),
            ("first loss", f"{ours[0]:.4f}", f"{reference.losses[0]:.4f}"),
            (
                f"loss, mean of last {tail}",
                f"{sum(ours[-tail:]) / tail:.4f}",
                f"{sum(reference.losses[-tail:]) / tail:.4f}",
            ),
            ("samples/s", f"{samples_per_s:.1f}", f"{reference.samples_per_s:.1f}"),
        ]
    )
    print(f"  largest difference between the two runs' step losses: {diff:.2e}")
    print(
        f"  throughput ratio (distributed / plain): {samples_per_s / reference.samples_per_s:.2f}"
        f" - {len({s.worker_id for s in job.stages})} worker processes share this machine's cores"
    )
    print(
        f"  bytes between workers per step: {report.human_bytes(job.bytes_per_step)} "
        "(activations forward, gradients back)"
    )
    print(f"  demo took {time.perf_counter() - began:.0f} s; every process it started is stopped")
    return 0


def _follow(cluster: Cluster, job_id: str, steps: int) -> JobView:
    client = cluster.client()
    bar = tqdm(total=steps, desc="distributed gpt", unit="step")
    last: JobView | None = None
    try:
        for job in client.watch(job_id):
            last = job
            bar.n = job.steps_done
            loss = f"{job.loss:.4f}" if job.loss is not None else "-"
            replicas = f", {job.replicas} replicas" if job.replicas > 1 else ""
            bar.set_postfix_str(
                f"{job.state}, loss {loss}, {job.samples_per_s:.1f} samples/s{replicas}",
                refresh=True,
            )
    except ClientError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
        client.close()
    if last is None:
        raise UsageError(f"job {job_id} vanished")
    return last


def _in_process(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    shape = ", ".join(f"{k} {v}" for k, v in DEMO_ARGS.items())
    print(
        f"Archipelago demo (in process): {DEMO_MODEL} ({shape}) on stdlib-text, {args.steps} steps"
    )
    staged = LocalTrainer(
        model=DEMO_MODEL,
        model_args=DEMO_ARGS,
        data=DEMO_DATA,
        optimizer=DEMO_OPTIMIZER,
        stages=args.stages or IN_PROCESS_STAGES,
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
    _print_rows(
        [
            ("", f"{args.stages or IN_PROCESS_STAGES} stages (OP-DAG)", "plain PyTorch"),
            ("first loss", f"{ours.losses[0]:.4f}", f"{reference.losses[0]:.4f}"),
            (
                f"loss, mean of last {tail}",
                f"{sum(ours.losses[-tail:]) / tail:.4f}",
                f"{sum(reference.losses[-tail:]) / tail:.4f}",
            ),
            ("validation loss", f"{ours.val_loss:.4f}", f"{reference.val_loss:.4f}"),
            ("samples/s", f"{ours.samples_per_s:.1f}", f"{reference.samples_per_s:.1f}"),
        ]
    )
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

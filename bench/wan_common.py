"""What the WAN-testbed benchmarks share: the root check, a gpt job spec, waiting for the
coordinator's link measurements, running one job to completion and reading back what it
measured (per-step losses with the coordinator's arrival times, the plan with its
predicted, measured and calibrated step times), and the validation loss of a job's final
checkpoint, computed in this process from the coordinator's store.

Samples/s are taken from wall-clock: the time between the loss reports of the first
step after the warm-up and of the last step, as the coordinator received them.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from archipelago.client import JobView, LinkView, PlanView
from archipelago.localcluster import TestbedCluster, wait_for
from coordinator.store import open_store
from opdag import model_file
from opdag.data import DataConfig
from opdag.optim import OptimizerConfig, optimizer_param_name
from opdag.reference import ReferenceTrainer

JOB_TIMEOUT_S = 900.0
LINKS_TIMEOUT_S = 180.0


def testbed_unavailable() -> str | None:
    """Why a testbed cannot be built here (None when it can)."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} (iproute2) not on PATH"
    if os.geteuid() != 0:
        return "the WAN testbed needs root (network namespaces, tc); run as root"
    return None


@dataclass(frozen=True)
class GptJob:
    """The model, data and optimizer every run of a benchmark shares."""

    model_args: Mapping[str, int]
    batch_size: int
    micro_batches: int
    steps: int
    lr: float
    seed: int = 0
    max_bytes: int = 2_000_000

    @property
    def data(self) -> DataConfig:
        return DataConfig(
            corpus="stdlib-text",
            batch_size=self.batch_size,
            micro_batches=self.micro_batches,
            max_bytes=self.max_bytes,
        )

    @property
    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(name="adamw", lr=self.lr)

    def describe(self) -> str:
        args = ", ".join(f"{k} {v}" for k, v in self.model_args.items())
        return (
            f"gpt ({args}), batch {self.batch_size} in {self.micro_batches} micro-batches, "
            f"adamw lr {self.lr:g}, {self.steps} steps, seed {self.seed}"
        )

    def spec(
        self, name: str, *, parallel: str, compression: str = "none", sync: str | None = None
    ) -> str:
        """The job spec YAML; `parallel`, `compression` and `sync` (the spec's default when
        None) are YAML flow values."""
        args = ", ".join(f"{k}: {v}" for k, v in self.model_args.items())
        sync_line = "" if sync is None else f"sync: {sync}\n"
        return f"""
name: {name}
model: {{zoo: gpt, args: {{{args}}}}}
data: {{corpus: stdlib-text, batch_size: {self.batch_size}, \
micro_batches: {self.micro_batches}, max_bytes: {self.max_bytes}}}
optimizer: {{name: adamw, lr: {self.lr!r}}}
steps: {self.steps}
seed: {self.seed}
parallel: {parallel}
compression: {compression}
checkpoint: {{every: 1000}}
{sync_line}"""


# -- the cluster ---------------------------------------------------------------------------


def wait_for_links(cluster: TestbedCluster, hosts: Sequence[str]) -> list[LinkView]:
    """Every directed pair of `hosts` measured by the coordinator (bandwidth > 0)."""
    want = {(a, b) for a in hosts for b in hosts if a != b}

    def measured() -> list[LinkView] | None:
        client = cluster.client()
        try:
            links = [x for x in client.links() if x.bandwidth > 0]
        finally:
            client.close()
        return links if want <= {(x.src_name, x.dst_name) for x in links} else None

    try:
        return wait_for(
            f"all {len(want)} directed links to be measured", measured, LINKS_TIMEOUT_S, 0.5
        )
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{cluster.logs()}") from None


def link_table(cluster: TestbedCluster, links: Sequence[LinkView]) -> str:
    tb = cluster.testbed
    rows = [["src", "dst", "path", "shaped", "measured", "RTT"]]
    for x in sorted(links, key=lambda x: (x.src_name, x.dst_name)):
        if x.src_name not in tb.hosts or x.dst_name not in tb.hosts:
            continue
        inside = tb.region_of(x.src_name) == tb.region_of(x.dst_name)
        shaped = tb.spec.path(x.src_name, x.dst_name).bandwidth_bps
        rows.append(
            [
                x.src_name,
                x.dst_name,
                "intra" if inside else "inter",
                f"{shaped / 1e6:.0f} Mbit/s",
                f"{x.bandwidth * 8 / 1e6:.1f} Mbit/s",
                f"{x.rtt_s * 1e3:.2f} ms",
            ]
        )
    return format_table(rows)


def wait_all_idle(cluster: TestbedCluster, names: Sequence[str]) -> None:
    """Every worker in `names` idle again (so a job with `stages: auto` sees them all)."""

    def idle() -> bool:
        states = {w.name: w.state for w in cluster.workers_safe()}
        return all(states.get(n) == "idle" for n in names)

    wait_for("every worker to be idle", idle, 60, 0.2)


# -- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One job run to completion and what it measured."""

    label: str
    job: JobView  # with metrics
    plan: PlanView
    losses: list[tuple[int, float, float]]  # (step, loss, seconds since submission)
    skip: int  # warm-up steps left out of the timing

    @property
    def batch_size(self) -> int:
        return self.job.batch_size

    @property
    def samples_per_s(self) -> float:
        """Wall-clock: loss reports from step `skip` to the last, as the coordinator got them."""
        timed = [(s, at) for s, _, at in self.losses if s >= self.skip]
        if len(timed) < 2:
            return 0.0
        (s0, t0), (s1, t1) = timed[0], timed[-1]
        return self.batch_size * (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def reported_samples_per_s(self) -> float:
        """From the step times the loss stage reports (the coordinator's own figure)."""
        loss_steps = {s for s, _, _ in self.losses}
        times = [
            m.step_seconds
            for m in self.job.metrics
            if m.step >= self.skip and m.step in loss_steps and m.step_seconds > 0
        ]
        return self.batch_size / statistics.mean(times) if times else 0.0

    @property
    def wall_s(self) -> float:
        """Submission to the last step's loss report."""
        return self.losses[-1][2] if self.losses else 0.0

    @property
    def startup_s(self) -> float:
        """Submission to the first step's loss report (planning, hand-out, first step)."""
        return self.losses[0][2] if self.losses else 0.0

    @property
    def placement(self) -> str:
        """Workers by stage (`|` between stages), replicas of a stage joined by `,`."""
        by_stage: dict[int, list[str]] = {}
        for s in sorted(self.job.stages, key=lambda s: (s.stage, s.replica)):
            by_stage.setdefault(s.stage, []).append(s.worker_name)
        return " | ".join(",".join(names) for _, names in sorted(by_stage.items()))


def run_job(cluster: TestbedCluster, label: str, spec_yaml: str, *, skip: int) -> Run:
    """Submit, wait for completion, and read back the metrics and the plan."""
    job_id = cluster.submit(spec_yaml)
    return finished_run(cluster, label, job_id, skip=skip)


def finished_run(cluster: TestbedCluster, label: str, job_id: str, *, skip: int) -> Run:
    """Wait for a submitted job to complete, and read back its metrics and plan."""
    cluster.wait_job(
        job_id, lambda j: j.state == "completed", f"job {label} to complete", JOB_TIMEOUT_S
    )
    job = cluster.job(job_id, with_metrics=True)
    client = cluster.client()
    try:
        plan = client.plan(job_id)
    finally:
        client.close()
    store = open_store(cluster.store)
    try:
        records = store.metrics(job_id)
    finally:
        store.close()
    by_step: dict[int, tuple[float, float]] = {}
    for r in records:
        if r.get("epoch") == plan.epoch and "loss" in r and "at" in r:
            by_step[int(r["step"])] = (float(r["loss"]), float(r["at"]) - job.created_at)
    losses = [(s, loss, at) for s, (loss, at) in sorted(by_step.items())]
    return Run(label, job, plan, losses, skip)


def plan_show(plan: PlanView) -> str:
    """What `archipelago plan show` prints for a plan."""
    lines = [f"job {plan.job_id}, plan epoch {plan.epoch} (planner {plan.planner})"]
    lines.append(plan.text.rstrip() or "  (no explanation recorded for this plan)")
    measured = f"{plan.measured_step_s:.3f} s" if plan.measured_step_s else "not yet"
    line = f"step time: predicted {plan.predicted_step_s:.3f} s, measured {measured}"
    if plan.calibrated_step_s:
        line += f"; re-predicted with measured compute {plan.calibrated_step_s:.3f} s"
    lines.append(line)
    return "\n".join(lines)


def describe_run(run: Run) -> str:
    return (
        f"{run.label}: planner {run.plan.planner}, "
        f"{len({s.stage for s in run.job.stages})} stage(s) x {run.job.replicas} replica(s) "
        f"[{run.placement}], {run.job.bytes_per_step / 1e6:.2f} MB between workers per step, "
        f"first step reported {run.startup_s:.1f} s after submission, the last after "
        f"{run.wall_s:.1f} s; final loss {run.job.loss:.4f}\n"
        f"  {run.samples_per_s:.1f} samples/s wall-clock (steps {run.skip}..), "
        f"{run.reported_samples_per_s:.1f} from the reported step times"
    )


# -- the final model -----------------------------------------------------------------------


def final_state(store_url: str, job_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    """The job's latest complete checkpoint (step, parameters and buffers), optimizer
    state left out."""
    store = open_store(store_url)
    try:
        step = store.latest_checkpoint(job_id)
        if step is None:
            raise RuntimeError(f"job {job_id} has no complete checkpoint in {store_url}")
        parts = store.checkpoint_parts(job_id, step)
    finally:
        store.close()
    state: dict[str, torch.Tensor] = {}
    for i, part in enumerate(parts):
        state.update(model_file.decode_state(part, f"checkpoint {step} part {i}"))
    return step, {k: v for k, v in state.items() if optimizer_param_name(k) is None}


def validation_loss(job: GptJob, state: Mapping[str, torch.Tensor], n_batches: int) -> float:
    """Mean loss of the model with `state` over `n_batches` held-out batches (the reference
    trainer's evaluation: fixed batches of the corpus's validation split, eval mode)."""
    trainer = ReferenceTrainer(
        model="gpt",
        model_args=dict(job.model_args),
        data=job.data,
        optimizer=job.optimizer,
        seed=job.seed,
    )
    expected = dict(trainer.model.state_dict())
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise RuntimeError(
            f"the checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    trainer.model.load_state_dict(dict(state), strict=True)
    return trainer.evaluate(n_batches)


def reference_val_loss(job: GptJob, n_batches: int) -> tuple[float, float]:
    """Plain PyTorch in this process: (validation loss after `job.steps` steps, seconds)."""
    trainer = ReferenceTrainer(
        model="gpt",
        model_args=dict(job.model_args),
        data=job.data,
        optimizer=job.optimizer,
        seed=job.seed,
    )
    # One thread: on a shared, busy machine OpenMP threads that spin-wait for each other
    # are many times slower than one thread alone.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        began = time.perf_counter()
        for step in range(job.steps):
            trainer.train_step(step)
        seconds = time.perf_counter() - began
        return trainer.evaluate(n_batches), seconds
    finally:
        torch.set_num_threads(threads)


# -- printing ------------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells
    )


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")

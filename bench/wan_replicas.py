"""Replicas and local SGD on a WAN testbed: the plan OP-Fence picks against `sync`, a
single pipeline and the compute bound, each measured in the same run.

Three scenarios, each on its own testbed, one after the other (`--only a,b,c`):

a. Two hosts joined by 10 Mbit/s. The compute bound first: both hosts train alone at once
   (two single-worker jobs of half the batch, no communication), their samples/s summed.
   Then the plan OP-Fence picks under local SGD with a long period and fp16 values, and
   `sync` (OP-Fence, replicas auto: what is fastest when gradients are averaged every
   step). Targets: >= 0.75 of the compute bound; validation loss within 3% of
   the `sync` run.
b. Two hosts joined by 50 Mbit/s: `partial-local-sgd`, `local-sgd` (the same period,
   fp16) and `sync`. Target: partial-local-sgd >= 1.5x sync samples/s at validation loss
   within 3%.
c. Two regions of two hosts, 200 Mbit/s inside and 20 Mbit/s between: the plan OP-Fence
   picks under local SGD, one pipeline (`replicas: 1`) and `sync`.

In each scenario the runs with replicas go first: the coordinator calibrates each
worker's speed from the steps it runs, and a baseline on one host first would calibrate
that host alone (on a busy machine, faster than both hosts computing at once), so the
plans after it would be priced on uneven figures.

Every compared run trains the same gpt (6 layers, d_model 256, 8 heads, context 128) on
the same data and seed for the same number of samples. Printed: each run's plan as `plan
show` explains it, its samples/s (wall-clock between the coordinator's loss reports,
warm-up steps left out), the averaging bytes per step (computed from the plan's parameter
counts and the sync policy: each member sends its share to each other member once per
round; and as the workers reported them, step by step), the validation loss of its final
checkpoint (held-out batches, computed here from the coordinator's store), and the ratios
against their targets. Every worker runs with 1 thread. `--quick` runs a few steps (one
averaging round, at the end), to check that it all works (its figures mean nothing).

Needs root (network namespaces, tc); skips with a message otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from archipelago.localcluster import TestbedCluster
from bench.wan_common import (
    GptJob,
    Run,
    describe_run,
    final_state,
    finished_run,
    format_table,
    indent,
    link_table,
    plan_show,
    ratio,
    run_job,
    testbed_unavailable,
    validation_loss,
    wait_all_idle,
    wait_for_links,
)
from coordinator.planning.stage_sync import layer_of
from coordinator.store import open_store
from deploy.wan import Testbed, parse_spec
from opdag.zoo import build_model

MODEL = {"layers": 6, "d_model": 256, "heads": 8, "context": 128}
BATCH = 32
LR = 1e-3
AUTO = "{planner: opfence, replicas: auto}"
SINGLE = "{planner: opfence, replicas: 1}"
ALONE = "{planner: even, stages: 1, replicas: 1}"
BOUND_TARGET = 0.75
PARTIAL_TARGET = 1.5
LOSS_TARGET = 0.03
SUBNETS = {"a": "10.77.233.0/24", "b": "10.77.234.0/24", "c": "10.77.235.0/24"}


@dataclass(frozen=True)
class Settings:
    """How long each scenario runs: steps of every compared run (equal samples), the local
    kinds' periods, warm-up steps left out of the timing, held-out batches scored."""

    steps: dict[str, int]
    period_a: int  # local SGD on 10 Mbit/s: long, so one round's 8 s is spread thin
    period_b: int  # both local kinds on 50 Mbit/s
    period_c: int
    skip: int
    val_batches: int


# On this 2-core machine: about 8 + 6 + 8 minutes of training, plus each testbed's set-up
# and each job's start.
FULL = Settings(
    steps={"a": 96, "b": 64, "c": 48},
    period_a=32,
    period_b=16,
    period_c=32,
    skip=4,
    val_batches=8,
)
# Periods longer than the run: a single round, after the last step, so that the planner
# still finds replicas worth it and the averaging path runs.
QUICK = Settings(
    steps={"a": 8, "b": 8, "c": 8}, period_a=16, period_b=8, period_c=16, skip=2, val_batches=2
)


@dataclass(frozen=True)
class Policy:
    """A job's sync policy, as the bench sets it."""

    kind: str
    period: int = 1
    values: str = "fp32"

    @property
    def flow(self) -> str:
        """The spec's `sync` as a YAML flow value."""
        if self.kind == "sync":
            return f"{{kind: sync, values: {self.values}}}"
        return f"{{kind: {self.kind}, period: {self.period}, values: {self.values}}}"

    @property
    def rounds_apart(self) -> int:
        return 1 if self.kind == "sync" else self.period


SYNC = Policy("sync")


def local(kind: str, period: int) -> Policy:
    """A local kind with fp16 values: what the slow links are for."""
    return Policy(kind, period, "fp16")


def job_of(settings: Settings, scenario: str, *, micro_batches: int) -> GptJob:
    return GptJob(
        model_args=MODEL,
        batch_size=BATCH,
        micro_batches=micro_batches,
        steps=settings.steps[scenario],
        lr=LR,
    )


def two_hosts(subnet: str, between: str) -> dict[str, object]:
    return {
        "name": f"bench-replicas-{between}",
        "subnet": subnet,
        "regions": {"eu": {"hosts": ["eu1"]}, "us": {"hosts": ["us1"]}},
        "links": [{"between": ["eu", "us"], "bandwidth": between}],
    }


def two_regions(subnet: str) -> dict[str, object]:
    return {
        "name": "bench-replicas-regions",
        "subnet": subnet,
        "regions": {
            "eu": {"hosts": ["eu1", "eu2"], "bandwidth": "200mbit"},
            "us": {"hosts": ["us1", "us2"], "bandwidth": "200mbit"},
        },
        "links": [{"between": ["eu", "us"], "bandwidth": "20mbit"}],
    }


# -- runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One compared run: what it measured, its sync policy and its final model's loss."""

    run: Run
    sync: Policy
    val_loss: float

    @property
    def samples_per_s(self) -> float:
        return self.run.samples_per_s


@contextmanager
def testbed_cluster(
    raw_spec: dict[str, object], workdir: Path, hosts: Sequence[str]
) -> Iterator[TestbedCluster]:
    """A testbed, a coordinator and a worker per host, every link measured."""
    spec = parse_spec(raw_spec)
    workdir.mkdir(parents=True, exist_ok=True)
    with Testbed(spec) as tb, TestbedCluster(workdir, testbed=tb) as cluster:
        cluster.start_coordinator()
        for host in hosts:
            cluster.start_worker(host)
        links = wait_for_links(cluster, hosts)
        print("links measured by the coordinator:")
        print(link_table(cluster, links), flush=True)
        yield cluster


def measure(
    cluster: TestbedCluster,
    hosts: Sequence[str],
    job: GptJob,
    label: str,
    *,
    parallel: str,
    sync: Policy,
    settings: Settings,
) -> Measured:
    """Run `job` with `parallel` and `sync`, print its plan, score its final model."""
    wait_all_idle(cluster, hosts)
    spec = job.spec(f"replicas-{label}", parallel=parallel, sync=sync.flow)
    run = run_job(cluster, label, spec, skip=settings.skip)
    step, state = final_state(cluster.store, run.job.job_id)
    loss = validation_loss(job, state, settings.val_batches)
    print(f"\n-- {describe_run(run)}")
    print(f"  sync {sync.flow}; {replica_summary(run, sync)}")
    reported = reported_averaging_bytes_per_step(cluster, run)
    if reported:
        print(f"  reported by the workers: {reported / 1e6:.2f} MB averaged per step")
    if sync.kind == "partial-local-sgd":
        logged = logged_partial_bytes_per_step(cluster, run, sync)
        print(
            f"  from the workers' logged rounds (extra syncs included): {logged / 1e6:.2f} MB "
            "averaged per step"
        )
    print(f"  validation loss {loss:.4f} (checkpoint at step {step})")
    if run.plan.epoch > 1:
        print(f"  note: re-planned during the run (plan epoch {run.plan.epoch}); timed on it")
    print(indent(plan_show(run.plan)), flush=True)
    return Measured(run, sync, loss)


def compute_bound(
    cluster: TestbedCluster, hosts: Sequence[str], job: GptJob, settings: Settings
) -> tuple[float, list[Run]]:
    """Every host training alone at once, no communication: one single-worker job per host
    of an equal share of the batch (the same samples in all), samples/s summed."""
    wait_all_idle(cluster, hosts)
    share = dataclasses.replace(
        job,
        batch_size=job.batch_size // len(hosts),
        micro_batches=max(1, job.micro_batches // len(hosts)),
    )
    ids = [
        cluster.submit(share.spec(f"replicas-alone-{i}", parallel=ALONE)) for i in range(len(hosts))
    ]
    runs = [
        finished_run(cluster, f"alone {i}", job_id, skip=settings.skip)
        for i, job_id in enumerate(ids)
    ]
    where = {r.placement for r in runs}
    print(
        f"\n-- compute bound: {len(runs)} single-worker jobs of batch {share.batch_size} at "
        f"once, on {', '.join(sorted(where))}"
    )
    for r in runs:
        print(f"  {r.placement}: {r.samples_per_s:.1f} samples/s wall-clock (steps {r.skip}..)")
    if len(where) < len(runs):
        print("  note: two jobs ran on one worker; the bound is not the hosts' sum")
    return sum(r.samples_per_s for r in runs), runs


def replica_summary(run: Run, sync: Policy) -> str:
    """Replicas and stages of the run's plan, and the averaging bytes per step."""
    replicas = 1 + max((s.replica for s in run.job.stages), default=0)
    stages = len({s.stage for s in run.job.stages})
    text = f"{stages} stage(s) x {replicas} replica(s)"
    if replicas < 2:
        return f"{text}, no averaging"
    return f"{text}, {averaging_bytes_per_step(run, sync) / 1e6:.2f} MB averaged per step"


def averaging_bytes_per_step(run: Run, sync: Policy) -> float:
    """Bytes all members send per step averaging, computed (not measured) from the plan's
    parameter counts: each member sends its stage's values (fp16 or fp32) to each other
    member once per round; a round every step for `sync`, once per period for the local
    kinds (partial-local-sgd's extra syncs in idle link time not counted)."""
    replicas = 1 + max((s.replica for s in run.job.stages), default=0)
    params = sum(s.params for s in run.job.stages if s.replica == 0)
    width = 2 if sync.values == "fp16" else 4
    return params * width * (replicas - 1) * replicas / sync.rounds_apart


def reported_averaging_bytes_per_step(cluster: TestbedCluster, run: Run) -> float:
    """Bytes all members sent their sync groups per step, as every replica's stages reported
    them (`sync_bytes` of each step's record; the loss travelling every step included)."""
    store = open_store(cluster.store)
    try:
        records = store.metrics(run.job.job_id)
    finally:
        store.close()
    mine = [r for r in records if r.get("epoch") == run.plan.epoch]
    steps = {int(r["step"]) for r in mine}
    total = sum(int(r.get("sync_bytes", 0)) for r in mine)
    return total / len(steps) if steps else 0.0


ROUND_LINE = re.compile(
    r"job (?P<job>\S+) stage \d+ replica \d+: averaged layers (?P<once>\S*) \| extra "
    r"(?P<extra>\S*) after step"
)


def logged_partial_bytes_per_step(cluster: TestbedCluster, run: Run, sync: Policy) -> float:
    """Partial local SGD's averaging bytes per step as the workers did it: every round each
    member logs the layers it averaged (scheduled and extra); each went to the R-1 others."""
    sizes: dict[str, int] = {}
    for name, p in build_model("gpt", MODEL, seed=0).named_parameters():
        sizes[layer_of(name)] = sizes.get(layer_of(name), 0) + p.numel()
    width = 2 if sync.values == "fp16" else 4
    replicas = 1 + max((s.replica for s in run.job.stages), default=0)
    sent = 0
    for log in cluster.workdir.glob("*.log"):
        for m in ROUND_LINE.finditer(log.read_text(errors="replace")):
            if m["job"] != run.job.job_id:
                continue
            layers = [x for x in f"{m['once']},{m['extra']}".split(",") if x]
            sent += sum(sizes.get(x, 0) for x in layers) * width * (replicas - 1)
    return sent / max(1, run.job.steps)


# -- scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One ratio against its target, for the summary."""

    scenario: str
    what: str
    value: float
    target: str
    met: bool


def loss_verdict(scenario: str, label: str, run: Measured, base: Measured) -> Verdict:
    rel = (run.val_loss - base.val_loss) / base.val_loss
    return Verdict(
        scenario,
        f"val loss {label} vs sync ({run.val_loss:.4f} vs {base.val_loss:.4f})",
        rel,
        f"within {LOSS_TARGET:.0%}",
        abs(rel) <= LOSS_TARGET,
    )


def scenario_a(workdir: Path, settings: Settings) -> list[Verdict]:
    hosts = ("eu1", "us1")
    job = job_of(settings, "a", micro_batches=4)
    picked_sync = local("local-sgd", settings.period_a)
    print(f"\n==== a: 2 hosts, 10 Mbit/s; {job.describe()}; first {settings.skip} not timed")
    with testbed_cluster(two_hosts(SUBNETS["a"], "10mbit"), workdir / "a", hosts) as cluster:
        bound, _ = compute_bound(cluster, hosts, job, settings)
        picked = measure(
            cluster, hosts, job, "a-picked", parallel=AUTO, sync=picked_sync, settings=settings
        )
        exact = measure(cluster, hosts, job, "a-sync", parallel=AUTO, sync=SYNC, settings=settings)
    print(
        f"\na: samples/s: compute bound {bound:.1f}, sync {exact.samples_per_s:.1f}, "
        f"picked ({picked_sync.flow}) {picked.samples_per_s:.1f}"
    )
    return [
        Verdict(
            "a",
            "picked / compute bound",
            ratio(picked.samples_per_s, bound),
            f">= {BOUND_TARGET}",
            ratio(picked.samples_per_s, bound) >= BOUND_TARGET,
        ),
        Verdict("a", "picked / sync", ratio(picked.samples_per_s, exact.samples_per_s), "", True),
        loss_verdict("a", "picked", picked, exact),
    ]


def scenario_b(workdir: Path, settings: Settings) -> list[Verdict]:
    hosts = ("eu1", "us1")
    job = job_of(settings, "b", micro_batches=4)
    print(f"\n==== b: 2 hosts, 50 Mbit/s; {job.describe()}; first {settings.skip} not timed")
    with testbed_cluster(two_hosts(SUBNETS["b"], "50mbit"), workdir / "b", hosts) as cluster:
        partial = measure(
            cluster,
            hosts,
            job,
            "b-partial",
            parallel=AUTO,
            sync=local("partial-local-sgd", settings.period_b),
            settings=settings,
        )
        plain = measure(
            cluster,
            hosts,
            job,
            "b-local",
            parallel=AUTO,
            sync=local("local-sgd", settings.period_b),
            settings=settings,
        )
        exact = measure(cluster, hosts, job, "b-sync", parallel=AUTO, sync=SYNC, settings=settings)
    r_partial = ratio(partial.samples_per_s, exact.samples_per_s)
    return [
        Verdict(
            "b",
            "partial-local-sgd / sync",
            r_partial,
            f">= {PARTIAL_TARGET}x",
            r_partial >= PARTIAL_TARGET,
        ),
        Verdict("b", "local-sgd / sync", ratio(plain.samples_per_s, exact.samples_per_s), "", True),
        loss_verdict("b", "partial-local-sgd", partial, exact),
        loss_verdict("b", "local-sgd", plain, exact),
    ]


def scenario_c(workdir: Path, settings: Settings) -> list[Verdict]:
    hosts = ("eu1", "us1", "eu2", "us2")  # interleaved: registration order says nothing
    job = job_of(settings, "c", micro_batches=8)
    picked_sync = local("local-sgd", settings.period_c)
    print(
        f"\n==== c: 2 regions x 2 hosts, 200 Mbit/s inside, 20 Mbit/s between; "
        f"{job.describe()}; first {settings.skip} not timed"
    )
    with testbed_cluster(two_regions(SUBNETS["c"]), workdir / "c", hosts) as cluster:
        picked = measure(
            cluster, hosts, job, "c-picked", parallel=AUTO, sync=picked_sync, settings=settings
        )
        single = measure(
            cluster, hosts, job, "c-single", parallel=SINGLE, sync=SYNC, settings=settings
        )
        exact = measure(cluster, hosts, job, "c-sync", parallel=AUTO, sync=SYNC, settings=settings)
    return [
        Verdict("c", "picked / sync", ratio(picked.samples_per_s, exact.samples_per_s), "", True),
        Verdict(
            "c",
            "picked / single pipeline",
            ratio(picked.samples_per_s, single.samples_per_s),
            "",
            True,
        ),
        loss_verdict("c", "picked", picked, exact),
    ]


SCENARIOS = {"a": scenario_a, "b": scenario_b, "c": scenario_c}


def summary(verdicts: Sequence[Verdict]) -> str:
    rows: list[list[str]] = [["", "ratio", "target", ""]]
    for v in verdicts:
        shown = f"{v.value:+.2%}" if v.what.startswith("val loss") else f"{v.value:.2f}"
        mark = ("met" if v.met else "MISSED") if v.target else ""
        rows.append([f"{v.scenario}: {v.what}", shown, v.target, mark])
    return format_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wan_replicas", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    parser.add_argument("--only", default="a,b,c", help="scenarios to run, e.g. a,c")
    parser.add_argument("--workdir", type=Path, help="logs and stores (default: a temp dir)")
    args = parser.parse_args([] if argv is None else argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)} (scenarios: a, b, c)")
    why = testbed_unavailable()
    if why is not None:
        print(f"  skipped: {why}")
        return
    settings = QUICK if args.quick else FULL
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-wan-replicas-"))
    print(f"logs and stores: {workdir}; 1 thread per worker, no added latency")
    if args.quick:
        print("--quick: a few steps and short periods; the figures say nothing")
    # The validation losses are computed here, beside the workers: one thread, as theirs.
    torch.set_num_threads(1)
    verdicts: list[Verdict] = []
    failed: list[str] = []
    for name in chosen:
        try:
            verdicts += SCENARIOS[name](workdir, settings)
        except (AssertionError, RuntimeError, TimeoutError) as e:
            # A job that fails says something about the system: shown, and the next
            # scenario still runs.
            head = "\n".join(str(e).splitlines()[:3])
            print(f"\nscenario {name} FAILED: {head}\n  (logs under {workdir / name})")
            failed.append(name)
    print("\nsummary (samples/s ratios from wall-clock; val loss: relative difference):")
    print(summary(verdicts))
    if failed:
        print(f"scenarios that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""AdaTopK against no compression on a slow cut, same run, same testbed.

Two regions of one host each joined by a slow link; the same gpt job (same steps, same
seed, same data) runs twice as a two-stage OP-Fence pipeline, so the one cut crosses the
slow link: once with `compression: none`, once with `compression: adatopk`.

Printed: the samples/s of each run (wall-clock between the coordinator's loss reports,
warm-up steps left out) and their ratio (target >= 2x); the validation loss of each final
model after the same number of samples, computed here from the final checkpoint in the
coordinator's store on fixed batches of the held-out split, with their relative difference
(target within 3%), next to a plain PyTorch run of the same job as the oracle. A PNG of
training loss against wall-clock time for both runs is written to --out.

Needs root (network namespaces, tc); skips with a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from archipelago.localcluster import SOURCE_ROOT, TestbedCluster
from bench.wan_common import (
    GptJob,
    Run,
    describe_run,
    final_state,
    indent,
    link_table,
    plan_show,
    ratio,
    reference_val_loss,
    run_job,
    testbed_unavailable,
    validation_loss,
    wait_all_idle,
    wait_for_links,
)
from deploy.wan import Testbed, parse_spec

INTER = "20mbit"
HOSTS = ("eu1", "us1")
JOB = GptJob(
    model_args={"layers": 4, "d_model": 128, "heads": 4, "context": 64},
    batch_size=16,
    micro_batches=4,
    steps=100,
    lr=1e-3,
)
PARALLEL = "{planner: opfence, stages: 2}"
RUNS = (("none", "none"), ("adatopk", "adatopk"))
SKIP = 4  # warm-up steps left out of the timing
VAL_BATCHES = 16
SPEED_TARGET = 2.0
LOSS_TARGET = 0.03
DEFAULT_OUT = SOURCE_ROOT / "runs" / "wan-compression-loss.png"


def testbed_spec(subnet: str) -> dict[str, object]:
    return {
        "name": "bench-compress",
        "subnet": subnet,
        "regions": {"eu": {"hosts": ["eu1"]}, "us": {"hosts": ["us1"]}},
        "links": [{"between": ["eu", "us"], "bandwidth": INTER}],
    }


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        # From the first step's report: a cluster's first job also pays the workers' cold
        # start, which says nothing about compression.
        ax.plot(
            [at - run.startup_s for _, _, at in run.losses],
            [loss for _, loss, _ in run.losses],
            label=f"compression: {run.label} ({run.samples_per_s:.1f} samples/s)",
        )
    ax.set_xlabel("wall-clock seconds since the first step's loss report")
    ax.set_ylabel("training loss")
    ax.set_title(
        f"gpt on 2 stages across a {INTER} link: {JOB.steps} steps x {JOB.batch_size} samples"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wan_compression", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the PNG goes")
    parser.add_argument("--subnet", default="10.77.232.0/24", help="the testbed's private /24")
    parser.add_argument("--workdir", type=Path, help="logs and store (default: a temp dir)")
    args = parser.parse_args([] if argv is None else argv)
    why = testbed_unavailable()
    if why is not None:
        print(f"  skipped: {why}")
        return
    spec = parse_spec(testbed_spec(args.subnet))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-wan-compression-"))
    print(
        f"testbed {spec.name} ({spec.subnet}): regions eu {{eu1}} and us {{us1}}, {INTER} "
        f"between, no added latency; 1 worker per host, 1 thread each"
    )
    print(f"job: {JOB.describe()}; parallel {PARALLEL}; first {SKIP} steps not timed")
    print(f"logs and store: {workdir}", flush=True)
    runs: list[Run] = []
    val: dict[str, tuple[int, float]] = {}
    with Testbed(spec) as tb, TestbedCluster(workdir, testbed=tb) as cluster:
        cluster.start_coordinator()
        for host in HOSTS:
            cluster.start_worker(host)
        links = wait_for_links(cluster, HOSTS)
        print("links measured by the coordinator:")
        print(link_table(cluster, links), flush=True)
        for label, compression in RUNS:
            wait_all_idle(cluster, HOSTS)
            run = run_job(
                cluster,
                label,
                JOB.spec(f"wan-compression-{label}", parallel=PARALLEL, compression=compression),
                skip=SKIP,
            )
            runs.append(run)
            step, state = final_state(cluster.store, run.job.job_id)
            val[label] = (step, validation_loss(JOB, state, VAL_BATCHES))
            print(f"\n-- compression {describe_run(run)}")
            print(indent(plan_show(run.plan)), flush=True)

    ref_loss, ref_s = reference_val_loss(JOB, VAL_BATCHES)
    none, ada = runs
    samples = JOB.steps * JOB.batch_size
    print(f"\nthroughput ({INTER} cut, 2 stages):")
    print(f"  compression none:    {none.samples_per_s:7.1f} samples/s")
    print(f"  compression adatopk: {ada.samples_per_s:7.1f} samples/s")
    print(
        f"  ratio {ratio(ada.samples_per_s, none.samples_per_s):.2f}x "
        f"(target >= {SPEED_TARGET:g}x); from reported step times "
        f"{none.reported_samples_per_s:.1f} vs {ada.reported_samples_per_s:.1f}, ratio "
        f"{ratio(ada.reported_samples_per_s, none.reported_samples_per_s):.2f}x"
    )
    print(
        f"\nvalidation loss after {samples} samples ({VAL_BATCHES} held-out batches of "
        f"{JOB.batch_size}, final checkpoint from the store):"
    )
    for label, (step, loss) in val.items():
        print(f"  compression {label + ':':9s} {loss:.4f}  (checkpoint at step {step})")
    print(f"  plain PyTorch, one process (oracle): {ref_loss:.4f}  ({ref_s:.0f} s to train here)")
    rel = (val["adatopk"][1] - val["none"][1]) / val["none"][1]
    print(f"  adatopk vs none: {rel * 100:+.2f}% (target within {LOSS_TARGET * 100:g}%)")
    plot(runs, args.out)
    print(f"\nloss against wall-clock time: {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""OP-Fence against the even planner on a WAN testbed, same run, same cluster.

Two regions of two hosts each (fast links inside a region, a slow one between), workers
registered interleaved (eu1, us1, eu2, us2) so registration order says nothing about
where a worker is. The coordinator measures the links itself; then the same gpt job runs
with `planner: even, stages: auto`, with `planner: opfence`, and with `planner: even,
stages: 2` (a third plan for the estimator check), one after the other.

Printed: the measured links; each plan as `plan show` explains it; the samples/s of each
run (wall-clock between the coordinator's loss reports, warm-up steps left out); a table
of predicted, calibrated and measured step time per plan with the prediction's error; and
OP-Fence's samples/s against the even plan's, with their ratio (target >= 1.5x).

Needs root (network namespaces, tc); skips with a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from archipelago.localcluster import TestbedCluster
from bench.wan_common import (
    GptJob,
    Run,
    describe_run,
    format_table,
    indent,
    link_table,
    plan_show,
    ratio,
    run_job,
    testbed_unavailable,
    wait_all_idle,
    wait_for_links,
)
from deploy.wan import Testbed, parse_spec

INTRA = "200mbit"
INTER = "20mbit"
JOIN_ORDER = ("eu1", "us1", "eu2", "us2")
JOB = GptJob(
    model_args={"layers": 4, "d_model": 128, "heads": 4, "context": 64},
    batch_size=16,
    micro_batches=4,
    steps=40,
    lr=1e-3,
)
SKIP = 4  # warm-up steps left out of the timing
TARGET = 1.5


def testbed_spec(subnet: str) -> dict[str, object]:
    return {
        "name": "bench-planners",
        "subnet": subnet,
        "regions": {
            "eu": {"hosts": ["eu1", "eu2"], "bandwidth": INTRA},
            "us": {"hosts": ["us1", "us2"], "bandwidth": INTRA},
        },
        "links": [{"between": ["eu", "us"], "bandwidth": INTER}],
    }


RUNS = (
    ("even/auto", "{planner: even, stages: auto}"),
    ("opfence", "{planner: opfence}"),
    ("even/2", "{planner: even, stages: 2}"),
)


def error_pct(predicted: float, measured: float) -> str:
    if predicted <= 0 or measured <= 0:
        return "n/a"
    return f"{(predicted - measured) / measured * 100:+.1f}%"


def estimator_table(runs: list[Run]) -> str:
    rows: list[list[str]] = [
        ["plan", "stages", "predicted", "calibrated", "measured", "error", "calibrated error"]
    ]
    for run in runs:
        p = run.plan
        rows.append(
            [
                f"{run.label} ({p.planner})",
                str(len(run.job.stages)),
                f"{p.predicted_step_s:.3f} s",
                f"{p.calibrated_step_s:.3f} s" if p.calibrated_step_s else "n/a",
                f"{p.measured_step_s:.3f} s" if p.measured_step_s else "n/a",
                error_pct(p.predicted_step_s, p.measured_step_s),
                error_pct(p.calibrated_step_s, p.measured_step_s),
            ]
        )
    return format_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wan_planners", description=__doc__)
    parser.add_argument("--subnet", default="10.77.231.0/24", help="the testbed's private /24")
    parser.add_argument("--workdir", type=Path, help="logs and store (default: a temp dir)")
    args = parser.parse_args([] if argv is None else argv)
    why = testbed_unavailable()
    if why is not None:
        print(f"  skipped: {why}")
        return
    spec = parse_spec(testbed_spec(args.subnet))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-wan-planners-"))
    print(
        f"testbed {spec.name} ({spec.subnet}): regions eu {{eu1, eu2}} and us {{us1, us2}}, "
        f"{INTRA} inside a region, {INTER} between, no added latency; workers joined "
        f"{', '.join(JOIN_ORDER)}, 1 thread each"
    )
    print(f"job: {JOB.describe()}; first {SKIP} steps not timed")
    print(f"logs and store: {workdir}", flush=True)
    runs: list[Run] = []
    with Testbed(spec) as tb, TestbedCluster(workdir, testbed=tb) as cluster:
        cluster.start_coordinator()
        for host in JOIN_ORDER:
            cluster.start_worker(host)
        links = wait_for_links(cluster, JOIN_ORDER)
        print("links measured by the coordinator:")
        print(link_table(cluster, links), flush=True)
        for label, parallel in RUNS:
            wait_all_idle(cluster, JOIN_ORDER)
            run = run_job(
                cluster,
                label,
                JOB.spec(f"wan-{label.replace('/', '-')}", parallel=parallel),
                skip=SKIP,
            )
            runs.append(run)
            print(f"\n-- {describe_run(run)}")
            print(indent(plan_show(run.plan)), flush=True)

    print("\nestimator check: step time predicted by the plan, re-predicted with measured")
    print("compute (calibrated), and measured (mean interval between loss reports):")
    print(estimator_table(runs))
    even, opfence = runs[0], runs[1]
    r = ratio(opfence.samples_per_s, even.samples_per_s)
    print(
        f"\nsamples/s, wall-clock: even (stages auto) {even.samples_per_s:.1f}, "
        f"OP-Fence {opfence.samples_per_s:.1f}; ratio {r:.2f}x (target >= {TARGET}x)"
    )
    rr = ratio(opfence.reported_samples_per_s, even.reported_samples_per_s)
    print(
        f"samples/s, from reported step times: even {even.reported_samples_per_s:.1f}, "
        f"OP-Fence {opfence.reported_samples_per_s:.1f}; ratio {rr:.2f}x"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""A worker behind NAT, reached through the coordinator's relay, against the same worker
reached directly: one testbed, the same two hosts, model, data and steps, runs alternated
(direct, relayed, direct, relayed) so the machine's load falls on both alike.

`open1` takes inbound connections; `nat1` is the volunteer. In a direct run `nat1`'s
worker serves on its own address; in a relayed run `nat1` drops every inbound connection
(`deploy.wan.nat`) and its worker runs `--outbound-only`: the coordinator carries its
traffic over the worker's one outbound stream. Each run is a fresh cluster; a two-stage
pipeline puts one stage on each host.

The testbed shapes each host's traffic per destination host (an htb class per pair);
traffic to or from the bridge, where the coordinator and so the relay live, is not shaped.
So that neither run is held back by shaping the other escapes, the hosts' links are left
at 10 Gbit/s, far above what the job moves: what is compared is the relay's own cost (an
extra hop through the coordinator's process, its per-connection flow control) on fast
links, where that cost shows most. The two paths still differ in more than the relay (the
direct one crosses the pair's htb class, the relayed one the bridge's default path), so a
relayed run can come out ahead; the raw throughput of each path is printed beside it. On a
slow home uplink the link, not the relay, would bound both.

Printed: each run's samples/s (wall-clock between the coordinator's loss reports, warm-up
steps left out) and relayed / direct, the mean of each kind; and the links the
coordinator's survey measured before each job, relayed / direct: open1 -> nat1 passes
through the relay in a relayed run (the relay's raw throughput), nat1 -> open1 does not
(nat1 dials out itself). Needs root and iptables;
skips with a message otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from archipelago.localcluster import TestbedCluster, wait_for
from bench.wan_common import (
    GptJob,
    Run,
    describe_run,
    ratio,
    run_job,
    testbed_unavailable,
    wait_for_links,
)
from deploy.wan import Testbed, parse_spec
from deploy.wan.nat import allow_inbound, drop_inbound, nat_unavailable

SPEC = {
    "name": "archbench-relay",
    "subnet": "10.77.242.0/24",
    "regions": {"home": {"hosts": ["open1", "nat1"], "bandwidth": "10gbit"}},
}
JOB = GptJob(
    model_args={"layers": 2, "d_model": 256, "heads": 8, "context": 128},
    batch_size=16,
    micro_batches=4,
    steps=24,
    lr=3e-4,
)
SKIP = 4
HOSTS = ("open1", "nat1")
PAIRS = 2


@dataclass(frozen=True)
class Measured:
    run: Run
    # What the coordinator's link survey measured, bytes/s: into nat1 (through the relay
    # in a relayed run) and out of it (nat1 dials open1 itself: direct in both).
    into_nat: float
    out_of_nat: float


def one_run(tb: Testbed, workdir: Path, job: GptJob, *, relayed: bool, skip: int) -> Measured:
    label = "relayed" if relayed else "direct"
    ns = tb.namespace("nat1")
    if relayed:
        drop_inbound(ns)
    try:
        with TestbedCluster(workdir, testbed=tb) as cluster:
            cluster.start_coordinator()
            cluster.start_worker("open1")
            if relayed:
                cluster.hosts_of["nat1"] = "nat1"
                args = [*cluster._worker_args("nat1", None), "--outbound-only"]
                proc = cluster._spawn("nat1", args, "nat1")
                cluster._wait_joined(proc, "nat1")
            else:
                cluster.start_worker("nat1")
            wait_for(
                "both workers reachable",
                lambda: sum(w.reachable for w in cluster.workers_safe()) == 2,
                60,
            )
            links = {(x.src_name, x.dst_name): x.bandwidth for x in wait_for_links(cluster, HOSTS)}
            spec = job.spec(f"relay-{label}", parallel="{planner: even, stages: 2}")
            run = run_job(cluster, label, spec, skip=skip)
            relayed_now = {w.name: w.relayed for w in cluster.workers_safe()}
            assert relayed_now["nat1"] == relayed, relayed_now
    finally:
        if relayed:
            allow_inbound(ns)
    into, out = links[("open1", "nat1")], links[("nat1", "open1")]
    print(f"-- {describe_run(run)}", flush=True)
    print(f"  links measured: open1 -> nat1 {mbit(into)}, nat1 -> open1 {mbit(out)}", flush=True)
    return Measured(run, into, out)


def mbit(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.0f} Mbit/s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wan_relay", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps, to check it works")
    args, _ = parser.parse_known_args(argv)  # `python -m bench wan-relay` passes its name
    why = testbed_unavailable() or nat_unavailable()
    if why:
        print(f"skipped: {why}")
        return
    job = JOB if not args.quick else GptJob(**{**JOB.__dict__, "steps": 6})
    skip = SKIP if not args.quick else 2
    print(f"{job.describe()}; 2 stages (open1 | nat1), 1 thread per worker, steps {skip}.. timed")
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    direct: list[Measured] = []
    relayed: list[Measured] = []
    with Testbed(parse_spec(SPEC)) as tb:
        for i in range(PAIRS if not args.quick else 1):
            direct.append(one_run(tb, workdir / f"direct{i}", job, relayed=False, skip=skip))
            relayed.append(one_run(tb, workdir / f"relayed{i}", job, relayed=True, skip=skip))
    d = statistics.mean(m.run.samples_per_s for m in direct)
    r = statistics.mean(m.run.samples_per_s for m in relayed)
    print(
        f"\nbaseline: nat1 reached directly        {d:6.2f} samples/s  "
        f"({', '.join(f'{m.run.samples_per_s:.2f}' for m in direct)})\n"
        f"nat1 behind NAT, through the relay    {r:6.2f} samples/s  "
        f"({', '.join(f'{m.run.samples_per_s:.2f}' for m in relayed)})\n"
        f"ratio relayed / direct: {ratio(r, d):.2f} samples/s"
    )
    for name, pick in (("open1 -> nat1", "into_nat"), ("nat1 -> open1", "out_of_nat")):
        dl = statistics.mean(getattr(m, pick) for m in direct)
        rl = statistics.mean(getattr(m, pick) for m in relayed)
        print(
            f"link {name} as measured: direct {mbit(dl)}, relayed run {mbit(rl)}, "
            f"ratio {ratio(rl, dl):.2f}"
        )


if __name__ == "__main__":
    main()

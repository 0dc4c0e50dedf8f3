"""The dashboard's views, built in-process from real coordinator objects (a JobManager on an
in-memory SQLite store, a Registry, a LinkProber) and the DAG layout of zoo models.

`small_cluster` is shared with the server's tests (test_dashboard_server.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

import pytest

import coordinator.dashboard.feeds as feeds_module
from coordinator.dashboard.dag_layout import layout_dag
from coordinator.dashboard.snapshots import Snapshots
from coordinator.events import CLUSTER, EventKind
from coordinator.job_record import Job
from coordinator.jobs import JobManager
from coordinator.link_survey import LinkProber, LinkRecord
from coordinator.planning.plan import LinkCodec, plan_even
from coordinator.registry import Registry, WorkerState
from coordinator.states import JobState
from coordinator.store import StateStore, open_store
from coordinator.worker_client import WorkerClient
from opdag.capture import capture
from opdag.partition import balanced_assignment
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

TOKEN = "join-token-for-the-dashboard-tests"
SPEC = """
name: tiny
model: {zoo: gpt, args: {layers: 2, d_model: 32, heads: 2, context: 16}}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2}
optimizer: {name: adamw, lr: 0.003}
steps: 100
"""
FAST, SLOW = 1e9 / 8, 1e6 / 8  # bytes/s: 1 Gbit/s within an island, 1 Mbit/s between


@dataclass
class SmallCluster:
    """Four workers in two islands, one job of three stages on the first three, with
    `steps` steps of metrics stored."""

    store: StateStore
    registry: Registry
    links: LinkProber
    manager: JobManager
    workers: list[WorkerState]
    job: Job

    def record_steps(self, first: int, last: int) -> None:
        """Store the metrics of steps first..last-1 of every stage, as workers report."""
        now = time.time()
        for step in range(first, last):
            for stage in range(3):
                record = {
                    "epoch": 1,
                    "step_seconds": 0.1,
                    "compute_seconds": 0.05,
                    "bytes": 1000 * (stage + 1) if stage < 2 else 0,
                    "at": now - (last - step) * 0.1,
                    "samples": 4.0,
                    "speaker": True,
                }
                if stage == 2:
                    record["loss"] = 3.0 - 0.01 * step
                self.store.put_metric(self.job.job_id, step, stage, record)
        self.job.steps_done = last
        self.job.loss = 3.0 - 0.01 * (last - 1)
        self.job.step_seconds = 0.1


async def small_cluster(steps: int = 10) -> SmallCluster:
    store = open_store("sqlite:///:memory:")
    registry = Registry(timeout_s=5.0)
    client = WorkerClient(token=TOKEN, tls=None)
    links = LinkProber(registry, client, store)
    manager = JobManager(store, registry, client, links=links)
    workers = [
        registry.register(
            name=f"w{i}",
            address=f"127.0.0.1:{9100 + i}",
            gflops=10.0 + i,
            memory_bytes=8 << 30,
            device="cpu",
            threads=1,
        )
        for i in range(4)
    ]
    for w in workers:
        await manager.events.record(
            CLUSTER, EventKind.JOINED, f"worker {w.name} joined", worker_id=w.worker_id
        )
    for a in workers:
        for b in workers:
            if a is b:
                continue
            same = (a.name in ("w0", "w1")) == (b.name in ("w0", "w1"))
            links.links[(a.worker_id, b.worker_id)] = LinkRecord(
                a.worker_id, b.worker_id, a.address, b.address,
                FAST if same else SLOW, 0.002 if same else 0.08, time.time() - 30,
            )  # fmt: skip
    job = await manager.submit(SPEC)
    model = await manager.model_of(job)
    plan, _ = plan_even(
        model.graph, registry.free()[:3], job_id=job.job_id, epoch=1, stages=3, start_step=0
    )
    codecs = (
        LinkCodec(0, 1, "topk", 0.1, "fp16", 4096, 512, 0.01),
        LinkCodec(1, 2, "none", 1.0, "fp32", 4096, 4096, 0.02),
    )
    job.plan = dataclasses.replace(plan, codecs=codecs, predicted_step_s=0.09)
    job.epoch, job.state = 1, JobState.RUNNING
    registry.assign(job.plan.worker_ids, job.job_id, 1)
    await manager.events.record(job.job_id, EventKind.PLANNED, "planned: 3 stages", epoch=1)
    await manager.events.record(
        job.job_id, EventKind.VALIDATION, "validation loss 2.95 at step 5", step=5, loss=2.95
    )
    cluster = SmallCluster(store, registry, links, manager, workers, job)
    cluster.record_steps(0, steps)
    return cluster


def test_workers_view_shows_state_island_place_in_the_plan_and_bytes_sent() -> None:
    async def run() -> None:
        c = await small_cluster()
        view = await Snapshots(manager=c.manager, registry=c.registry, links=c.links).workers()
        rows = {r["name"]: r for r in view["workers"]}
        assert {r["state"] for n, r in rows.items() if n != "w3"} == {"busy"}
        assert rows["w3"]["state"] == "idle" and "job_id" not in rows["w3"]
        # Two islands: w0 and w1 fast between them, w2 and w3 likewise, slow across.
        assert rows["w0"]["island"] == rows["w1"]["island"] != rows["w2"]["island"]
        assert rows["w2"]["island"] == rows["w3"]["island"]
        stage_of = {p.worker_name: p.stage for p in c.job.plan.placements}  # type: ignore[union-attr]
        for name, stage in stage_of.items():
            assert rows[name]["job_id"] == c.job.job_id and rows[name]["stage"] == stage
            assert rows[name]["replica"] == 0
            assert rows[name]["bytes_sent"] == (1000 * (stage + 1) if stage < 2 else 0)
        assert rows["w1"]["gflops"] == 11.0 and rows["w1"]["memory_bytes"] == 8 << 30
        assert abs(rows["w0"]["last_seen_at"] - time.time()) < 5
        assert [e["kind"] for e in view["events"]] == ["joined"] * 4

    asyncio.run(run())


def test_jobs_view_gives_progress_and_samples_per_second() -> None:
    async def run() -> None:
        c = await small_cluster(steps=10)
        (row,) = Snapshots(manager=c.manager, registry=c.registry, links=c.links).jobs()["jobs"]
        assert row["id"] == c.job.job_id and row["state"] == "running"
        assert row["steps_done"] == 10 and row["steps"] == 100 and row["progress"] == 0.1
        assert row["samples_per_s"] == pytest.approx(4 / 0.1)
        assert (row["stages"], row["replicas"], row["epoch"]) == (3, 1, 1)

    asyncio.run(run())


def test_job_view_has_curves_links_report_and_timeline_and_the_loss_curve_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feeds_module, "REFRESH_S", 0.0)

    async def run() -> None:
        c = await small_cluster(steps=10)
        views = Snapshots(manager=c.manager, registry=c.registry, links=c.links)
        view = await views.job(c.job.job_id)
        steps, losses = view["curves"]["loss"]
        assert steps == list(range(10)) and losses[0] == pytest.approx(3.0)
        assert view["curves"]["validation"] == [[5.0], [2.95]]
        assert len(view["curves"]["samples_per_s"][0]) == 10
        assert view["curves"]["samples_per_s"][1][0] == pytest.approx(40.0)
        links = {(link["src_stage"], link["dst_stage"]): link for link in view["plan"]["links"]}
        assert links[(0, 1)]["compression"] == pytest.approx(8.0)
        assert links[(0, 1)]["measured_bytes_per_step"] == 1000
        assert links[(1, 2)]["measured_bytes_per_step"] == 2000
        # The plan report is worked out in the background: none at first, then there.
        for _ in range(100):
            if (report := (await views.job(c.job.job_id))["plan"]["report"]) is not None:
                break
            await asyncio.sleep(0.02)
        assert report["predicted_step_s"] == 0.09 and report["steps_measured"] > 0
        assert report["measured_step_s"] == pytest.approx(0.1, rel=1e-3)
        assert [e["kind"] for e in view["events"]] == ["submitted", "planned", "validation"]
        c.record_steps(10, 25)
        again = await views.job(c.job.job_id)
        assert again["curves"]["loss"][0] == list(range(25))

    asyncio.run(run())


def test_a_replanned_job_reads_its_metrics_again() -> None:
    async def run() -> None:
        c = await small_cluster(steps=10)
        views = Snapshots(manager=c.manager, registry=c.registry, links=c.links)
        await views.job(c.job.job_id)
        c.job.epoch = 2
        c.store.put_metric(c.job.job_id, 3, 2, {"epoch": 2, "loss": 1.5, "at": time.time()})
        view = await views.job(c.job.job_id)
        steps, losses = view["curves"]["loss"]
        assert steps == list(range(10)) and losses[3] == 1.5

    asyncio.run(run())


def test_link_matrix_groups_workers_by_island_with_every_measured_pair() -> None:
    async def run() -> None:
        c = await small_cluster()
        matrix = Snapshots(manager=c.manager, registry=c.registry, links=c.links).link_matrix()
        names = [w["name"] for w in matrix["workers"]]
        islands = [w["island"] for w in matrix["workers"]]
        assert sorted(names) == ["w0", "w1", "w2", "w3"]
        assert islands == sorted(islands) and len(set(islands)) == 2
        assert len(matrix["cells"]) == 12
        index = {n: i for i, n in enumerate(names)}
        cell = {(src, dst): (bw, rtt) for src, dst, bw, rtt, _at, _err in matrix["cells"]}
        assert cell[(index["w0"], index["w1"])][0] == pytest.approx(FAST)
        assert cell[(index["w0"], index["w2"])] == (pytest.approx(SLOW), 0.08)

    asyncio.run(run())


def test_dag_of_the_plan_is_cached_per_epoch_and_names_the_stage_workers() -> None:
    async def run() -> None:
        c = await small_cluster()
        views = Snapshots(manager=c.manager, registry=c.registry, links=c.links)
        dag = await views.dag(c.job.job_id)
        assert dag is await views.dag(c.job.job_id)
        assert dag["epoch"] == 1
        workers = {p.stage: p.worker_name for p in c.job.plan.placements}  # type: ignore[union-attr]
        assert {s["stage"]: s["worker"] for s in dag["stages"]} == workers
        cut = [e for e in dag["edges"] if e["cut"]]
        assert cut and {e["codec"] for e in cut} <= {"topk x0.1 fp16", "none x1 fp32"}

    asyncio.run(run())


ZOO = {
    "gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16},
    "moe-gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16},
    "resnet": {},
}


@pytest.mark.parametrize("zoo", sorted(ZOO))
@pytest.mark.parametrize("max_drawn", [240, 12])
@pytest.mark.parametrize("chains", [True, False])
def test_dag_layout_points_every_edge_forward_and_cut_edges_join_two_stages(
    zoo: str, max_drawn: int, chains: bool
) -> None:
    args = ZOO[zoo]
    model = build_model(zoo, args, seed=0)
    graph = capture(model, example_batch(zoo, args, 2, device="meta"), name=zoo).graph
    assignment = balanced_assignment(graph, 3)
    layout = layout_dag(graph, assignment, max_drawn=max_drawn, collapse_chains=chains)
    nodes = {n["id"]: n for n in layout["nodes"]}
    assert sum(n["count"] for n in nodes.values()) == len(graph.nodes)
    assert len(nodes) <= max(max_drawn, 1) or not chains
    assert layout["edges"], "a graph of several operators has edges"
    for e in layout["edges"]:
        src, dst = nodes[e["src"]], nodes[e["dst"]]
        assert dst["layer"] > src["layer"]
        if e["cut"]:
            assert None not in (src["stage"], dst["stage"]) and src["stage"] != dst["stage"]
            assert e["codec"] == "dense"  # no codecs were given
        elif src["stage"] is not None and dst["stage"] is not None:
            assert src["stage"] == dst["stage"]
    # No two boxes share a place.
    assert len({(n["layer"], n["order"]) for n in nodes.values()}) == len(nodes)
    assert {n["stage"] for n in nodes.values()} >= {0, 1, 2}
    assert (layout["note"] != "") == (len(nodes) < len(graph.nodes) and max_drawn == 12)


def test_dag_layout_without_chain_collapse_draws_one_box_per_operator() -> None:
    args = ZOO["gpt"]
    graph = capture(
        build_model("gpt", args, seed=0), example_batch("gpt", args, 2, device="meta"), name="g"
    ).graph
    layout = layout_dag(graph, balanced_assignment(graph, 2), collapse_chains=False)
    assert len(layout["nodes"]) == len(graph.nodes) and layout["note"] == ""
    by_name = {n["title"]: n for n in layout["nodes"]}
    for node in graph.nodes:
        for ref in set(node.refs()):
            assert by_name[node.name]["layer"] > by_name[ref]["layer"]

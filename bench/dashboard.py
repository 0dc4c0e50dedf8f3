"""The dashboard under a big cluster: the answer time of each page and JSON route with 500
registered workers (64 of them with measured links, in four islands) and 20 jobs with
plans, step metrics and timelines, against the login page's answer (the baseline: a
static page through the same server, client and middleware) measured in the same run.

Everything runs in this process on one event loop, as in the coordinator: the real
`JobManager` on an in-memory SQLite store, the `Registry`, the `LinkProber` and the
dashboard's app, asked over loopback HTTP by an aiohttp client. Each route is asked once
before timing (the first look at a job's page reads all its metrics; that cold answer is
printed apart), then `--requests` times. The live feed's per-second cost, a snapshot built
and serialised, is timed for each view too. Target: p99 < 100 ms.

`python -m bench.dashboard [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import ClientSession

from coordinator.dashboard.prometheus import CoordinatorMetrics
from coordinator.dashboard.server import COOKIE, Dashboard, DashboardConfig
from coordinator.events import CLUSTER, EventKind
from coordinator.jobs import JobManager
from coordinator.link_survey import LinkProber, LinkRecord
from coordinator.planning.plan import LinkCodec, plan_even
from coordinator.registry import Registry
from coordinator.states import JobState
from coordinator.store import open_store
from coordinator.worker_client import WorkerClient

WORKERS = 500
MEASURED = 64  # the prober measures among at most this many idle workers
ISLANDS = 4
JOBS = 20
STEPS = 300
STAGES, REPLICAS = 3, 2
TARGET_P99_MS = 100.0
TOKEN = "bench-dashboard-token"
SPEC = """
name: bench-{i}
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 2}}
optimizer: {{name: adamw, lr: 0.001}}
steps: 1000
checkpoint: {{every: 50}}
"""


async def _cluster() -> tuple[JobManager, Registry, LinkProber]:
    """500 workers, links among 64 of them, 20 running jobs of 3 stages x 2 replicas with
    300 steps of metrics and a timeline each."""
    rng = random.Random(0)
    store = open_store("sqlite:///:memory:")
    registry = Registry(timeout_s=3600.0)
    client = WorkerClient(token=TOKEN, tls=None)
    links = LinkProber(registry, client, store)
    manager = JobManager(store, registry, client, links=links)
    workers = [
        registry.register(
            name=f"sim-{i}",
            address=f"127.0.{i // 250 + 1}.{i % 250 + 1}:9",
            gflops=rng.uniform(20, 200),
            memory_bytes=16 << 30,
            device="cpu",
            threads=4,
        )
        for i in range(WORKERS)
    ]
    for w in workers:
        store.put_event(
            CLUSTER, {"at": time.time(), "kind": "joined", "text": f"worker {w.name} joined"}
        )
    now = time.time()
    for i, a in enumerate(workers[:MEASURED]):
        for j, b in enumerate(workers[:MEASURED]):
            if i != j:
                same = i % ISLANDS == j % ISLANDS
                bandwidth = rng.uniform(80e6, 120e6) if same else rng.uniform(1e6, 3e6)
                links.links[(a.worker_id, b.worker_id)] = LinkRecord(
                    a.worker_id, b.worker_id, a.address, b.address, bandwidth,
                    0.002 if same else 0.05, now - rng.uniform(0, 600),
                )  # fmt: skip
    for i in range(JOBS):
        job = await manager.submit(SPEC.format(i=i))
        model = await manager.model_of(job)
        free = registry.free()
        plan, _ = plan_even(
            model.graph,
            free[: STAGES * REPLICAS],
            job_id=job.job_id,
            epoch=1,
            stages=STAGES,
            start_step=0,
            replicas=REPLICAS,
        )
        codecs = tuple(
            LinkCodec(s, s + 1, "topk", 0.1, "fp16", 16384, 2048, 0.01) for s in range(STAGES - 1)
        )
        job.plan = dataclasses.replace(plan, codecs=codecs, predicted_step_s=0.2)
        job.epoch, job.state, job.step_seconds, job.steps_done = 1, JobState.RUNNING, 0.2, STEPS
        registry.assign(job.plan.worker_ids, job.job_id, 1)
        for step in range(STEPS):
            for replica in range(REPLICAS):
                for stage in range(STAGES):
                    record = {
                        "epoch": 1,
                        "step_seconds": 0.2,
                        "compute_seconds": 0.1,
                        "bytes": 2048 * 2 if stage < STAGES - 1 else 0,
                        "at": now - (STEPS - step) * 0.2,
                        "samples": 4.0,
                        "speaker": replica == 0,
                    }
                    if stage == STAGES - 1:
                        record["loss" if replica == 0 else "replica_loss"] = 4.0 - step * 0.005
                    store.put_metric(job.job_id, step, stage, record, replica=replica)
        for step in range(50, STEPS, 50):
            await manager.events.record(job.job_id, EventKind.CHECKPOINT, f"checkpoint {step}")
            await manager.events.record(
                job.job_id, EventKind.VALIDATION, "validation", step=step, loss=4.0 - step * 0.004
            )
    return manager, registry, links


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


async def _time(ask: Callable[[], Awaitable[None]], requests: int) -> list[float]:
    out = []
    for _ in range(requests):
        began = time.perf_counter()
        await ask()
        out.append(time.perf_counter() - began)
    return out


async def _run(requests: int) -> None:
    began = time.perf_counter()
    manager, registry, links = await _cluster()
    print(
        f"in-process coordinator: {WORKERS} workers ({MEASURED} with measured links, "
        f"{ISLANDS} islands), {JOBS} jobs of {STAGES} stages x {REPLICAS} replicas, "
        f"{STEPS} steps of metrics each (built in {time.perf_counter() - began:.1f} s)"
    )
    gc.freeze()  # as the coordinator does once it has started (coordinator/main.py)
    metrics = CoordinatorMetrics(manager, registry, links)
    dashboard = Dashboard(
        manager=manager,
        registry=registry,
        links=links,
        config=DashboardConfig(token=TOKEN, host="127.0.0.1", port=0),
        metrics=metrics.exposition,
    )
    await dashboard.start()
    base = f"http://127.0.0.1:{dashboard.port}"
    job_ids = list(manager.jobs)
    async with ClientSession() as http:
        async with http.post(f"{base}/login", data={"token": TOKEN}, allow_redirects=False) as r:
            cookie = {COOKIE: r.cookies[COOKIE].value}

        def get(path: Callable[[], str]) -> Callable[[], Awaitable[None]]:
            async def ask() -> None:
                async with http.get(base + path(), cookies=cookie) as answer:
                    assert answer.status == 200, (path(), answer.status)
                    await answer.read()

            return ask

        turn = iter(range(1 << 30))

        def a_job(suffix: str = "") -> Callable[[], str]:
            return lambda: f"/jobs/{job_ids[next(turn) % len(job_ids)]}{suffix}"

        routes: dict[str, Callable[[], Awaitable[None]]] = {
            "/login (baseline)": get(lambda: "/login"),
            "/workers": get(lambda: "/workers"),
            "/links": get(lambda: "/links"),
            "/jobs": get(lambda: "/jobs"),
            "/jobs/ID": get(a_job()),
            "/api/workers": get(lambda: "/api/workers"),
            "/api/links": get(lambda: "/api/links"),
            "/api/jobs": get(lambda: "/api/jobs"),
            "/api/jobs/ID": get(lambda: "/api" + a_job()()),
            "/api/jobs/ID/dag": get(lambda: "/api" + a_job("/dag")()),
            "/metrics": get(lambda: "/metrics"),
        }
        cold = await _time(routes["/api/jobs/ID"], len(job_ids))  # each job's first look
        await _time(routes["/api/jobs/ID/dag"], len(job_ids))
        for ask in routes.values():
            await ask()
        timings = {name: await _time(ask, requests) for name, ask in routes.items()}

        async def feed(view: str) -> Callable[[], Awaitable[None]]:
            async def build() -> None:
                job = job_ids[next(turn) % len(job_ids)]
                json.dumps(await dashboard.snapshot(view, job), separators=(",", ":"))

            return build

        for view in ("workers", "links", "jobs", "job"):
            timings[f"live feed: {view} snapshot"] = await _time(await feed(view), requests)
    await dashboard.stop()
    await links.close()
    await manager.close()

    base99 = _percentile(timings["/login (baseline)"], 0.99)
    print(f"{requests} requests per route, one at a time; target p99 < {TARGET_P99_MS:.0f} ms")
    print(f"  {'route':34} {'p50 ms':>8} {'p99 ms':>8} {'p99 / login':>12}")
    failed = []
    for name, values in timings.items():
        p50, p99 = _percentile(values, 0.5), _percentile(values, 0.99)
        verdict = "PASS" if p99 * 1e3 < TARGET_P99_MS else "FAIL"
        if verdict == "FAIL":
            failed.append(name)
        print(f"  {name:34} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {p99 / base99:12.1f}  {verdict}")
    print(
        f"  first look at each job's page (reads all its {STEPS * STAGES * REPLICAS} records): "
        f"p50 {_percentile(cold, 0.5) * 1e3:.1f} ms, max {max(cold) * 1e3:.1f} ms"
    )
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--requests", type=int, default=300, help="requests per route")
    parser.add_argument("--quick", action="store_true", help="100 requests per route")
    args = parser.parse_args([] if argv is None else argv)
    asyncio.run(_run(100 if args.quick else args.requests))


if __name__ == "__main__":
    main(sys.argv[1:])

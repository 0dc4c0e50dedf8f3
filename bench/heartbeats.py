"""The coordinator under many volunteers: heartbeat latency with 500 simulated workers
each beating once a second, against one worker beating alone (the baseline), measured in
the same run against the same coordinator process.

The simulated workers register and heart-beat over real gRPC from this process (asyncio,
one channel); latency is measured at the client, so it includes both sides' overhead.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from archipelago.localcluster import Cluster
from proto.rpc import open_channel, token_metadata
from worker.coordinator_serde import (
    coordinator_stub,
    heartbeat_request_pb,
    register_request_pb,
    registration_from_pb,
)
from worker.resources import Resources

WORKERS = 500
INTERVAL_S = 1.0
SECONDS = 20.0
TARGET_P99_MS = 50.0


async def _beat(
    address: str, token: str, workers: int, seconds: float, interval_s: float
) -> list[float]:
    channel = open_channel(address)
    stub = coordinator_stub(channel)
    metadata = token_metadata(token)
    ids = []
    for i in range(workers):
        reply = await stub.Register(
            register_request_pb(
                name=f"sim-{i}",
                # Loopback addresses where nothing listens: the coordinator never calls
                # these workers (link probes are off below), and if it did, the call
                # would be refused on this machine.
                address=f"127.0.{i // 250 + 1}.{i % 250 + 1}:9",
                worker_id="",
                resources=Resources(gflops=50.0, memory_bytes=8 << 30, device="cpu", threads=1),
            ),
            metadata=metadata,
        )
        ids.append(registration_from_pb(reply).worker_id)
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def worker(worker_id: str) -> None:
        await asyncio.sleep(random.random() * interval_s)  # spread the beats over the second
        next_beat = time.monotonic()
        while time.monotonic() < end:
            began = time.perf_counter()
            await stub.Heartbeat(
                heartbeat_request_pb(worker_id=worker_id, job_id="", epoch=0, step=0, state="idle"),
                metadata=metadata,
                timeout=10,
            )
            latencies.append(time.perf_counter() - began)
            next_beat += interval_s
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))

    await asyncio.gather(*(worker(w) for w in ids))
    await channel.close()
    return latencies


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


def main() -> None:
    with Cluster(
        Path(tempfile.mkdtemp(prefix="bench-heartbeats-")),
        heartbeat_s=INTERVAL_S,
        worker_timeout_s=600,
        # Simulated workers answer no calls: measuring links between them is not part of
        # what this benchmark times.
        extra_coordinator_args=["--link-probes", "0"],
    ) as cluster:
        cluster.start_coordinator()
        # The lone worker beats 20 times a second so its percentiles rest on enough samples.
        alone = asyncio.run(_beat(cluster.address, cluster.token, 1, SECONDS / 2, 0.05))
        crowd = asyncio.run(_beat(cluster.address, cluster.token, WORKERS, SECONDS, INTERVAL_S))
    rate = len(crowd) / SECONDS
    base99 = _percentile(alone, 0.99) * 1e3
    p50, p99 = _percentile(crowd, 0.50) * 1e3, _percentile(crowd, 0.99) * 1e3
    print(f"coordinator process, heartbeats from this process over gRPC, every {INTERVAL_S:.0f} s")
    print(
        f"  baseline, 1 worker:    p50 {_percentile(alone, 0.5) * 1e3:6.2f} ms   "
        f"p99 {base99:6.2f} ms   ({len(alone)} beats)"
    )
    print(
        f"  {WORKERS} workers:         p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   "
        f"({len(crowd)} beats, {rate:.0f}/s)   target p99 < {TARGET_P99_MS:.0f} ms"
    )
    print(f"  ratio, p99 with {WORKERS} workers / p99 with 1: {p99 / base99:.2f}")

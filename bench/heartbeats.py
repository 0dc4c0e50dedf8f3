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
from proto.certificates import new_key, signing_request
from proto.rpc import open_channel, token_metadata, worker_metadata
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


async def _beat(cluster: Cluster, workers: int, seconds: float, interval_s: float) -> list[float]:
    # Over the cluster's TLS, as volunteers: one key's signing request serves them all.
    channel = open_channel(cluster.address, cluster.client_tls())
    stub = coordinator_stub(channel)
    join = token_metadata(cluster.token)
    csr = signing_request(new_key()[0])
    ids, credentials = [], {}
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
                csr=csr,
            ),
            metadata=join,
        )
        joined = registration_from_pb(reply)
        ids.append(joined.worker_id)
        credentials[joined.worker_id] = worker_metadata(joined.worker_id, joined.credential)
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def worker(worker_id: str) -> None:
        await asyncio.sleep(random.random() * interval_s)  # spread the beats over the second
        next_beat = time.monotonic()
        while time.monotonic() < end:
            began = time.perf_counter()
            await stub.Heartbeat(
                heartbeat_request_pb(worker_id=worker_id, job_id="", epoch=0, step=0, state="idle"),
                metadata=credentials[worker_id],
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
        # All of them register from this one address, past what one address may by default.
        extra_coordinator_args=[
            "--link-probes",
            "0",
            "--registrations-per-minute",
            str(2 * WORKERS),
        ],
    ) as cluster:
        cluster.start_coordinator()
        # The lone worker beats 20 times a second so its percentiles rest on enough samples.
        alone = asyncio.run(_beat(cluster, 1, SECONDS / 2, 0.05))
        crowd = asyncio.run(_beat(cluster, WORKERS, SECONDS, INTERVAL_S))
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

"""The coordinator's metrics in the Prometheus exposition format (`/metrics`).

`CoordinatorMetrics` holds a registry of its own (several coordinators may live in one
process, as in the tests), with two kinds of series: the cluster's state, read from memory
when scraped (workers, jobs and plans: `ClusterCollector`; the measured links:
`LinkCollector`), and histograms observed as things happen (the gaps between heart-beats,
the state store's calls). A scrape reads nothing from the store: it stays cheap with
hundreds of workers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from coordinator.job_record import Job
from coordinator.jobs import JobManager
from coordinator.link_survey import LinkProber, LinkRecord
from coordinator.registry import Registry
from coordinator.states import JobState, WorkerStatus

# Heart-beats come every second or so by default; a gap near the worker timeout (5 s by
# default) is a worker about to be declared lost.
HEARTBEAT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# A store call takes from well under a millisecond (SQLite in memory) to seconds (a
# checkpoint part to a distant Redis).
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

WORKER_LABELS = ("worker_id", "worker_name")
JOB_LABELS = ("job_id", "job_name")
LINK_LABELS = ("src", "dst", "src_name", "dst_name")
CODEC_LABELS = (*JOB_LABELS, "src_stage", "dst_stage", "codec", "values")

NAN = float("nan")


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"archipelago_{name}", doc, labels=list(labels))


class CapturedFamilies:
    """Metric families gathered already, for formatting away from the event loop."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class ClusterCollector:
    """The workers, jobs and plans as the coordinator holds them now (memory only)."""

    def __init__(self, manager: JobManager, registry: Registry) -> None:
        self.manager = manager
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._workers()
        yield from self._jobs()
        yield from self._codecs()

    def _workers(self) -> Iterator[Metric]:
        by_state = _gauge(
            "workers",
            "Workers the coordinator knows, by state (idle, busy, lost, left).",
            ["state"],
        )
        info = _gauge(
            "worker_info",
            "One per worker known: its state, the job it holds and its device, as labels.",
            [*WORKER_LABELS, "state", "job_id", "device"],
        )
        age = _gauge(
            "worker_heartbeat_age_seconds",
            "Seconds since the worker's last heart-beat (a live worker is lost past the "
            "coordinator's --worker-timeout).",
            WORKER_LABELS,
        )
        speed = _gauge(
            "worker_flops_per_second",
            "The worker's compute speed as the planner prices it (measured or declared at "
            "registration, refit from the steps it runs).",
            WORKER_LABELS,
        )
        memory = _gauge("worker_memory_bytes", "Memory the worker offered.", WORKER_LABELS)
        counts = dict.fromkeys(WorkerStatus, 0)
        now = time.monotonic()
        for w in self.registry.workers.values():
            counts[w.state] += 1
            labels = [w.worker_id, w.name]
            info.add_metric([*labels, w.state.value, w.job_id, w.device], 1.0)
            # After a take-over a worker's last_seen is set ahead, as grace: not negative.
            age.add_metric(labels, max(0.0, now - w.last_seen))
            speed.add_metric(labels, w.gflops * 1e9)
            memory.add_metric(labels, float(w.memory_bytes))
        for state, n in counts.items():
            by_state.add_metric([state.value], float(n))
        yield from (by_state, info, age, speed, memory)

    def _jobs(self) -> Iterator[Metric]:
        jobs = list(self.manager.jobs.values())
        by_state = _gauge("jobs", "Jobs the coordinator holds, by state.", ["state"])
        counts = dict.fromkeys(JobState, 0)
        for job in jobs:
            counts[job.state] += 1
        for state, n in counts.items():
            by_state.add_metric([state.value], float(n))
        yield by_state
        info = _gauge(
            "job_info",
            "One per job: its state and the planner of its current plan, as labels.",
            [*JOB_LABELS, "state", "planner"],
        )
        series: list[tuple[GaugeMetricFamily, Callable[[Job], float]]] = [
            (
                _gauge("job_steps_done", "Steps the job has completed.", JOB_LABELS),
                lambda j: float(j.steps_done),
            ),
            (
                _gauge("job_spec_steps", "Steps the job's spec asks for.", JOB_LABELS),
                lambda j: float(j.spec.steps),
            ),
            (
                _gauge(
                    "job_loss",
                    "The training loss of the job's latest step (NaN before the first).",
                    JOB_LABELS,
                ),
                lambda j: NAN if j.loss is None else float(j.loss),
            ),
            (
                _gauge(
                    "job_step_seconds",
                    "Measured seconds per step of the speaking pipeline, smoothed "
                    "(NaN before the first step).",
                    JOB_LABELS,
                ),
                lambda j: j.step_seconds if j.step_seconds > 0 else NAN,
            ),
            (
                _gauge(
                    "job_predicted_step_seconds",
                    "Seconds per step the planner predicted for the job's current plan "
                    "(NaN without a plan or a prediction).",
                    JOB_LABELS,
                ),
                _predicted_step_s,
            ),
            (
                _gauge(
                    "job_samples_per_second",
                    "Training samples per second while the job runs (its batch over its "
                    "smoothed step time; 0 when it is not running).",
                    JOB_LABELS,
                ),
                _samples_per_s,
            ),
            (
                _gauge(
                    "job_bytes_per_step",
                    "Bytes the stages of the speaking pipeline sent each other in the latest "
                    "step (activations and gradients between stages).",
                    JOB_LABELS,
                ),
                lambda j: float(j.bytes_per_step),
            ),
            (
                _gauge(
                    "job_plan_epoch",
                    "How many plans the job has had (its current plan's epoch).",
                    JOB_LABELS,
                ),
                lambda j: float(j.epoch),
            ),
            (
                _gauge(
                    "job_recoveries",
                    "Times the job's plan broke and it was planned again.",
                    JOB_LABELS,
                ),
                lambda j: float(j.recoveries),
            ),
            (
                _gauge(
                    "job_last_checkpoint_step",
                    "The step of the job's latest complete checkpoint (0: none).",
                    JOB_LABELS,
                ),
                lambda j: float(j.last_checkpoint),
            ),
            (
                _gauge(
                    "job_validation_loss",
                    "The held-out loss of the job's newest checkpoint evaluated (NaN: none "
                    "yet).",
                    JOB_LABELS,
                ),
                lambda j: NAN if j.val_loss is None else float(j.val_loss),
            ),
        ]
        for job in jobs:
            labels = [job.job_id, job.name]
            planner = job.plan.planner if job.plan is not None else ""
            info.add_metric([*labels, job.state.value, planner], 1.0)
            for family, value in series:
                family.add_metric(labels, value(job))
        yield info
        for family, _ in series:
            yield family

    def _codecs(self) -> Iterator[Metric]:
        dense = _gauge(
            "job_link_dense_bytes",
            "Activation bytes of one micro-batch on a compressed cut link of the job's plan, "
            "before compression (the planner's figure).",
            CODEC_LABELS,
        )
        wire = _gauge(
            "job_link_wire_bytes",
            "Bytes one micro-batch's activations take on the wire on that link, compressed "
            "(the planner's figure).",
            CODEC_LABELS,
        )
        ratio = _gauge(
            "job_link_compression_ratio",
            "Dense over wire bytes on that link: how many times smaller the codec makes it.",
            CODEC_LABELS,
        )
        seconds = _gauge(
            "job_link_predicted_seconds",
            "Seconds the planner expects one micro-batch's activations to take on that link.",
            CODEC_LABELS,
        )
        for job in self.manager.jobs.values():
            if job.plan is None or job.terminal:
                continue
            for c in job.plan.codecs:
                labels = [
                    job.job_id,
                    job.name,
                    str(c.src_stage),
                    str(c.dst_stage),
                    c.codec,
                    c.values,
                ]
                dense.add_metric(labels, float(c.dense_bytes))
                wire.add_metric(labels, float(c.wire_bytes))
                ratio.add_metric(labels, c.dense_bytes / c.wire_bytes if c.wire_bytes else NAN)
                seconds.add_metric(labels, c.seconds)
        yield from (dense, wire, ratio, seconds)


class LinkCollector:
    """The measured links between workers (memory only). There may be thousands (links are
    measured among up to 64 idle workers, and each joiner against the busy ones) and they
    change only when a measurement lands or a worker moves, so their text is made again
    only then: the figures carry the time they were measured, not an age."""

    def __init__(self, registry: Registry, links: LinkProber | None) -> None:
        self.registry = registry
        self.links = links
        self._key: tuple[tuple[LinkRecord, str, str], ...] = ()
        self._families: list[Metric] = self._families_of(())
        self._text = b""

    def _current(self) -> tuple[tuple[LinkRecord, str, str], ...]:
        """Each current, successful figure with the two workers' names."""
        if self.links is None:
            return ()
        out = []
        for (src, dst), rec in self.links.links.items():
            if rec.error or self.links.current(src, dst) is None:
                continue
            out.append((rec, self.registry.workers[src].name, self.registry.workers[dst].name))
        return tuple(out)

    @staticmethod
    def _families_of(figures: tuple[tuple[LinkRecord, str, str], ...]) -> list[Metric]:
        bandwidth = _gauge(
            "link_bandwidth_bytes_per_second",
            "Measured bandwidth of a directed link between two workers (at their present "
            "addresses).",
            LINK_LABELS,
        )
        rtt = _gauge("link_rtt_seconds", "Measured round-trip time of that link.", LINK_LABELS)
        measured = _gauge(
            "link_measured_timestamp_seconds",
            "When that link was measured (Unix time; its age is time() minus this).",
            LINK_LABELS,
        )
        for rec, src_name, dst_name in figures:
            labels = [rec.src, rec.dst, src_name, dst_name]
            bandwidth.add_metric(labels, rec.bandwidth)
            rtt.add_metric(labels, rec.rtt_s)
            measured.add_metric(labels, rec.measured_at)
        return [bandwidth, rtt, measured]

    def _refresh(self) -> None:
        """Rebuild the families (and forget their text) if the figures changed."""
        key = self._current()
        if key != self._key:
            self._key, self._families, self._text = key, self._families_of(key), b""

    def collect(self) -> Iterator[Metric]:
        self._refresh()
        yield from self._families

    async def text(self) -> bytes:
        """The links' exposition text, made again (in a thread) only when they changed."""
        self._refresh()
        if self._text:
            return self._text
        families = self._families
        text = await asyncio.to_thread(generate_latest, CapturedFamilies(families))
        if families is self._families:  # else a measurement landed meanwhile: not cached
            self._text = text
        return text


def _predicted_step_s(job: Job) -> float:
    if job.plan is None or job.plan.predicted_step_s <= 0:
        return NAN
    return job.plan.predicted_step_s


def _samples_per_s(job: Job) -> float:
    if job.state != JobState.RUNNING or job.step_seconds <= 0:
        return 0.0
    return job.spec.data.batch_size / job.step_seconds


class CoordinatorMetrics:
    """The coordinator's Prometheus series: its registry, the histograms it observes, and
    the exposition `/metrics` serves."""

    def __init__(self, manager: JobManager, registry: Registry, links: LinkProber | None) -> None:
        self.registry = CollectorRegistry()
        self.cluster = ClusterCollector(manager, registry)
        self.links = LinkCollector(registry, links)
        self.registry.register(self.cluster)
        self.registry.register(self.links)
        self.heartbeat_interval = Histogram(
            "archipelago_heartbeat_interval_seconds",
            "Seconds between a worker's successive heart-beats as the coordinator received "
            "them: the interval it asked for plus any delay on the way (a worker whose gap "
            "reaches --worker-timeout is declared lost).",
            buckets=HEARTBEAT_BUCKETS,
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "archipelago_store_operation_seconds",
            "Seconds each call of the state store took, by operation (failed calls included).",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )

    def observe_store(self, op: str, seconds: float) -> None:
        """One call of the state store (called from the threads the store runs in too)."""
        self.store_seconds.labels(op).observe(seconds)

    def observe_heartbeat(self, seconds: float) -> None:
        """The gap between a worker's heart-beat and its previous one."""
        if math.isfinite(seconds) and seconds >= 0:
            self.heartbeat_interval.observe(seconds)

    async def exposition(self) -> tuple[bytes, str]:
        """The exposition body and its content type. The state is read here, on the event
        loop that changes it; the text is made in a thread, so a large cluster's scrape
        does not hold up heart-beats."""
        families = [
            *self.cluster.collect(),
            *self.heartbeat_interval.collect(),
            *self.store_seconds.collect(),
        ]
        body = await asyncio.to_thread(generate_latest, CapturedFamilies(families))
        return body + await self.links.text(), CONTENT_TYPE_LATEST

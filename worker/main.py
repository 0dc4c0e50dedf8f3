"""`archipelago worker`: a volunteer worker process.

It measures its machine, starts its own service, registers with the coordinator and
heart-beats until stopped. The first Ctrl-C (or SIGTERM) drains: the coordinator has the
job checkpoint at the next step boundary and moves this worker's stage elsewhere, then the
worker exits. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from proto.certificates import CertificateError, check_fingerprint, fingerprint
from proto.cluster_tls import CoordinatorUnreachable, MemberTls, fetch_coordinator_certificate
from proto.concurrency import WORKER_RPC_LIMITS, RpcLimits, bounded_server
from proto.rpc import SERVER_OPTIONS, check_plain_text_host, parse_networks, serves_loopback
from worker.coordinator_link import CoordinatorLink
from worker.credentials import NodeCredentials
from worker.dataset_cache import DatasetCache, default_cache_dir
from worker.dataset_serde import DatasetFetcher
from worker.node import WorkerNode
from worker.relay_client import RelayClient, check_outbound_only, reach_through_relay
from worker.resources import measure_resources
from worker.serde import add_worker_servicer
from worker.service import WorkerService

log = logging.getLogger("archipelago.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """How to run one worker (built from the command line)."""

    coordinator: str
    token: str
    name: str = ""
    listen: str = "127.0.0.1:0"
    # The address peers and the coordinator use to reach this worker (default: listen).
    advertise: str = ""
    # How this worker knows the coordinator's TLS authority: the fingerprint the
    # coordinator prints at start (its certificate is read from the coordinator and
    # checked), or the certificate's file. `insecure`: plain text (loopback development).
    ca_fingerprint: str = ""
    ca_file: Path | None = None
    insecure: bool = False
    threads: int = 0
    device: str = "cpu"
    # A declared speed (GFLOP/s) in place of the one measured at start; 0: measure.
    gflops: float = 0.0
    drain_timeout_s: float = 300.0
    # CIDR blocks this worker may send link probes to when the coordinator asks (empty:
    # any address the coordinator names).
    probe_networks: tuple[str, ...] = ()
    # The calls this worker serves at once, in all and per peer address.
    rpc_limits: RpcLimits = WORKER_RPC_LIMITS
    # -- relay (worker/relay_client.py): serve on loopback only and be reached through
    # one outbound stream to `relay` (default: the coordinator).
    outbound_only: bool = False
    relay: str = ""
    # Where users' dataset chunks are cached (None: `worker.dataset_cache.default_cache_dir`).
    data_cache: Path | None = None


async def coordinator_authority(cfg: WorkerConfig) -> bytes:
    """The PEM certificate of the coordinator's authority, from `--ca` or read from the
    coordinator and checked against `--ca-fingerprint` (waiting for a coordinator not up
    yet); ValueError when neither is given or they do not agree."""
    if cfg.ca_file is not None:
        try:
            pem = cfg.ca_file.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read --ca {cfg.ca_file}: {e.strerror}") from None
        if cfg.ca_fingerprint and fingerprint(pem) != check_fingerprint(cfg.ca_fingerprint):
            raise ValueError(f"--ca {cfg.ca_file} is not the authority --ca-fingerprint names")
        return pem
    if not cfg.ca_fingerprint:
        raise ValueError(
            "the coordinator's TLS authority is unknown: pass --ca-fingerprint (the "
            "coordinator prints it at start) or --ca FILE (--insecure: plain text, loopback only)"
        )
    expected = check_fingerprint(cfg.ca_fingerprint)
    wait_s, logged = 0.5, False
    while True:
        try:
            return await asyncio.to_thread(fetch_coordinator_certificate, cfg.coordinator, expected)
        except CoordinatorUnreachable as e:
            if not logged:
                log.warning("%s; retrying", e)
                logged = True
        except CertificateError as e:
            raise ValueError(str(e)) from None
        await asyncio.sleep(wait_s)
        wait_s = min(2 * wait_s, 10.0)


def _advertised(listen: str, port: int, advertise: str) -> str:
    if advertise:
        return advertise
    host = listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


async def serve(cfg: WorkerConfig, *, ready: asyncio.Event | None = None) -> int:
    if cfg.outbound_only:  # -- relay
        check_outbound_only(cfg.listen, cfg.advertise)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    resources = measure_resources(device=cfg.device)
    if cfg.gflops:
        if not 0 < cfg.gflops < 1e7:
            raise ValueError(f"--gflops {cfg.gflops} is not a speed in GFLOP/s")
        resources = replace(resources, gflops=cfg.gflops)
    name = cfg.name or f"{socket.gethostname()}-{id(cfg) % 10000:04d}"
    # Mutual TLS by default: this worker's key, certified by the coordinator's authority
    # at registration; its server accepts only callers the same authority certified.
    tls: MemberTls | None = None
    if cfg.insecure:
        check_plain_text_host(cfg.listen.rpartition(":")[0], "--listen")
        check_plain_text_host(cfg.coordinator.rpartition(":")[0], "--coordinator")
    else:
        try:
            tls = MemberTls(await coordinator_authority(cfg))
        except CertificateError as e:  # a malformed fingerprint
            raise ValueError(str(e)) from None
    # What registration gives this worker: the link proves itself with it, the node checks
    # the coordinator's calls with it.
    identity = NodeCredentials()
    link = CoordinatorLink(
        cfg.coordinator,
        token=cfg.token,
        tls=tls,
        name=name,
        resources=resources,
        credentials=identity,
    )
    # Users' own data: the chunks stage 0 reads, fetched with this worker's credential.
    datasets = DatasetCache(
        cfg.data_cache or default_cache_dir(),
        DatasetFetcher(cfg.coordinator, tls, identity.metadata),
    )
    node = WorkerNode(
        token=cfg.token,
        tls=tls,
        reporter=link,
        device=torch.device(resources.device),
        credentials=identity,
        datasets=datasets,
    )
    server = bounded_server(cfg.rpc_limits, options=SERVER_OPTIONS)
    add_worker_servicer(
        server,
        WorkerService(
            node,
            worker_id=lambda: link.worker_id,
            name=name,
            probe_networks=parse_networks(cfg.probe_networks, "--probe-networks"),
            probe_loopback=serves_loopback(cfg.listen.rpartition(":")[0]),
        ),
    )
    if tls is not None:
        port = server.add_secure_port(cfg.listen, tls.server_credentials())
    else:
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen}")
    link.advertise = _advertised(cfg.listen, port, cfg.advertise)
    await server.start()
    # -- relay: the address peers dial is one the relay holds for this worker.
    relay = None
    if cfg.outbound_only:
        relay = RelayClient(
            cfg.relay or cfg.coordinator,
            token=cfg.token,
            tls=tls,
            local=("127.0.0.1", port),
            credentials=identity,
        )
        link.advertise = await relay.open_first()
    # -- end relay
    log.info(
        "worker %s serving on %s (%.1f GFLOP/s, %d threads)",
        name,
        link.advertise,
        resources.gflops,
        resources.threads,
    )

    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info(
                "draining: finishing the current step, then leaving (Ctrl-C again to quit now)"
            )
            node.leaving = True
            stop.set()
        else:
            log.info("leaving now")
            raise SystemExit(130)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)

    tasks: list[asyncio.Task[None]] = []
    try:
        await link.register()
        if relay is not None:  # -- relay
            tasks.append(asyncio.create_task(reach_through_relay(relay, link)))
        tasks.append(asyncio.create_task(link.report_loop()))

        def status() -> tuple[str, int, int, str]:
            s = node.status()
            return s.job_id, s.epoch, s.step, s.state

        async def stop_job(job_id: str) -> None:
            held = node.job
            if held is not None and held.plan.job_id == job_id:
                await node.stop(job_id, held.plan.epoch, drain=False)

        tasks.append(asyncio.create_task(link.heartbeat_loop(status, stop_job)))
        if ready is not None:
            ready.set()
        await stop.wait()
        # Leaving: the coordinator drains our job (checkpoint, re-plan without us).
        await link.leave()
        if not await node.wait_idle(cfg.drain_timeout_s):
            log.warning("the job did not drain within %.0f s; leaving anyway", cfg.drain_timeout_s)
        await link.flush(timeout=10)
        return 0
    finally:
        for task in tasks:
            task.cancel()
        await node.close()
        await server.stop(grace=1)
        if relay is not None:  # -- relay
            await relay.close()
        await link.close()

"""`archipelago coordinator`: the coordinator process.

Opens the state store, takes over whatever a previous coordinator left there, serves the
API and runs the scheduler until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.authority import CERTIFICATE_FILE, load_authority, write_certificate
from coordinator.capacity import Capacity
from coordinator.dashboard.prometheus import CoordinatorMetrics
from coordinator.dashboard.server import (
    DEFAULT_ADDRESS,
    DashboardConfig,
    open_dashboard,
    parse_address,
)
from coordinator.exclusions import DEFAULT_BACKOFF_S, DEFAULT_MAX_BACKOFF_S, Exclusions
from coordinator.jobs import JobManager
from coordinator.limits import CoordinatorLimits
from coordinator.link_survey import LinkProber, ProbeConfig
from coordinator.progress_watch import DEFAULT_PROGRESS_TIMEOUT_S
from coordinator.registry import Registry
from coordinator.relay import RelayConfig, add_relay_servicer, relay_hub
from coordinator.roles import Gatekeeper, load_coordinator_key, operator_token
from coordinator.serde import add_coordinator_servicer
from coordinator.service import CoordinatorService
from coordinator.store import open_store
from coordinator.store.timed import TimedStore
from coordinator.worker_client import WorkerClient
from proto.certificates import COORDINATOR_CLIENT_NAME
from proto.cluster_tls import MemberTls, coordinator_server_credentials
from proto.concurrency import bounded_server
from proto.rpc import SERVER_OPTIONS, check_plain_text_host, parse_networks, serves_loopback

log = logging.getLogger("archipelago.coordinator")

DEFAULT_STATE_DIR = Path.home() / ".archipelago"
DEFAULT_STORE = f"sqlite:///{DEFAULT_STATE_DIR / 'coordinator.db'}"


@dataclass(frozen=True)
class CoordinatorConfig:
    """How to run the coordinator (built from the command line)."""

    token: str
    port: int = 7070
    host: str = "127.0.0.1"
    store: str = DEFAULT_STORE
    # Plain text instead of the coordinator's own TLS (loopback development only).
    insecure: bool = False
    # Where the TLS authority's certificate is written for local clients (None: `ca.pem`
    # in the state directory).
    ca_file: Path | None = None
    heartbeat_s: float = 1.0
    # A worker silent for this long is lost and its job re-planned.
    worker_timeout_s: float = 5.0
    tick_s: float = 0.2
    drain_timeout_s: float = 120.0
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    # CIDR blocks worker addresses must lie in (empty: any): the coordinator calls every
    # worker that registers, so this bounds where it may ever send anything.
    worker_networks: tuple[str, ...] = ()
    # The web dashboard's HOST:PORT ("" for none); one given on the command line must be
    # bound, the default one is given up with a warning when another process holds it.
    dashboard: str = DEFAULT_ADDRESS
    dashboard_required: bool = False
    dashboard_token: str = ""  # a read-only token for the dashboard only
    # The operator's credential (submit, cancel, read), or a file holding it; neither: the
    # one in the state directory (beside a sqlite store, else ~/.archipelago), made there
    # readable by its owner only on a first start.
    operator_token: str = ""
    operator_token_file: Path | None = None
    # A worker that cannot be reached or makes no progress is left out of planning this
    # long, doubled for each repeat offence up to the cap.
    exclusion_backoff_s: float = DEFAULT_BACKOFF_S
    exclusion_max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    # A running job whose steps do not move for this long is re-planned.
    progress_timeout_s: float = DEFAULT_PROGRESS_TIMEOUT_S
    # Every bound against cheap denial of service (coordinator.limits lists them).
    limits: CoordinatorLimits = field(default_factory=CoordinatorLimits)
    # -- relay: workers behind NAT reached through this process (coordinator/relay.py).
    relay: RelayConfig = field(default_factory=RelayConfig)


def state_dir(store: str) -> Path:
    """Where the coordinator keeps its own files: beside a sqlite store, else ~/.archipelago."""
    if store.startswith("sqlite:///") and store != "sqlite:///:memory:":
        return Path(store.removeprefix("sqlite:///")).parent
    return DEFAULT_STATE_DIR


async def serve(cfg: CoordinatorConfig) -> int:
    networks = parse_networks(cfg.worker_networks, "--worker-networks")
    if cfg.insecure:
        check_plain_text_host(cfg.host, "--host")
    if cfg.probes.concurrency < 0:
        raise ValueError("--link-probes must be 0 or more")
    if cfg.store.startswith("sqlite:///") and cfg.store != "sqlite:///:memory:":
        Path(cfg.store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Every call of the store is timed for the metrics (told where once they exist, below).
    store = TimedStore(await asyncio.to_thread(open_store, cfg.store))
    registry = Registry(timeout_s=cfg.worker_timeout_s)
    operator, generated = operator_token(
        cfg.operator_token, cfg.operator_token_file, state_dir(cfg.store)
    )
    gate = Gatekeeper(
        registry,
        token=cfg.token,
        operator_token=operator,
        coordinator_key=await load_coordinator_key(store),
    )
    if generated is not None:
        log.info("the operator token is in %s (readable by its owner only)", generated)
    # TLS by default: the authority certifies every worker at registration; the
    # coordinator's own calls to workers present its control identity.
    authority = None if cfg.insecure else await load_authority(store)
    control = (
        None if authority is None else MemberTls.for_coordinator(authority, COORDINATOR_CLIENT_NAME)
    )
    workers = WorkerClient(token=cfg.token, tls=control, gate=gate)
    links = LinkProber(registry, workers, store, cfg.probes)
    manager = JobManager(store, registry, workers, drain_timeout_s=cfg.drain_timeout_s, links=links)
    manager.limits = cfg.limits  # before the service, whose registrations it bounds too
    metrics = CoordinatorMetrics(manager, registry, links)
    store.observe = metrics.observe_store
    registry.on_heartbeat_gap = metrics.observe_heartbeat
    # Loaded before the jobs are restored: a restored job's re-plan must already leave the
    # excluded workers out.
    exclusions = Exclusions(
        store,
        manager.events,
        backoff_s=cfg.exclusion_backoff_s,
        max_backoff_s=cfg.exclusion_max_backoff_s,
    )
    await exclusions.load()
    registry.exclusions = exclusions
    capacity = Capacity(store, manager.events)
    await capacity.load()
    registry.capacity = capacity
    # With the link survey on, a worker is planned only once the coordinator reached it.
    capacity.require_reached = cfg.probes.concurrency > 0
    manager.lifecycle.progress.timeout_s = cfg.progress_timeout_s
    await manager.restore()
    await links.load()

    server = bounded_server(cfg.limits.rpc, options=SERVER_OPTIONS)
    # -- relay
    relay = relay_hub(cfg.relay, cfg.host, registry, gate)
    registry.relayed = relay.relayed
    add_relay_servicer(server, relay)
    # -- end relay
    add_coordinator_servicer(
        server,
        CoordinatorService(
            manager,
            registry,
            gate=gate,
            heartbeat_s=cfg.heartbeat_s,
            worker_networks=networks,
            authority=authority,
            loopback_workers=serves_loopback(cfg.host),
        ),
    )
    address = f"{cfg.host}:{cfg.port}"
    port = (
        server.add_secure_port(address, coordinator_server_credentials(authority))
        if authority is not None
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    if authority is not None:
        ca_file = cfg.ca_file or state_dir(cfg.store) / CERTIFICATE_FILE
        await asyncio.to_thread(write_certificate, authority, ca_file)
    await server.start()
    if authority is not None:
        # Before the line below, so whoever waits for that one finds this one too.
        print(
            f"tls authority {authority.fingerprint} (its certificate: {ca_file}; workers "
            f"join with --ca-fingerprint {authority.fingerprint})",
            flush=True,
        )
    else:
        log.warning("serving plain text (--insecure): no TLS between this cluster's processes")
    # The one line scripts and tests wait for (the port matters when --port 0 was asked).
    print(f"coordinator listening on {cfg.host}:{port} (store {store.url})", flush=True)
    log.info(
        "%d jobs and %d workers taken over from the store", len(manager.jobs), len(registry.workers)
    )
    dashboard = None
    if cfg.dashboard:
        host, dashboard_port = parse_address(cfg.dashboard)
        try:
            dashboard = await open_dashboard(
                manager=manager,
                registry=registry,
                links=links,
                config=DashboardConfig(
                    token=operator,
                    read_only_token=cfg.dashboard_token,
                    host=host,
                    port=dashboard_port,
                ),
                required=cfg.dashboard_required,
                metrics=metrics.exposition,
            )
        except OSError:
            await server.stop(grace=0)
            raise
    if dashboard is not None:
        print(f"dashboard on {dashboard.url}", flush=True)
    # What exists now (the imports, the state taken over) lives as long as the process:
    # frozen, the collector's full passes skip it and stay short (a full pass over torch's
    # objects took ~150 ms, past what a dashboard answer may take: bench/dashboard.py).
    gc.freeze()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    async def scheduler() -> None:
        while True:
            try:
                await manager.tick()
                links.step()
            except Exception:  # one bad pass must not stop the scheduler
                log.exception("scheduler pass failed")
            await asyncio.sleep(cfg.tick_s)

    ticker = asyncio.create_task(scheduler())
    try:
        await stop.wait()
        log.info("coordinator stopping; jobs stay in the store")
    finally:
        ticker.cancel()
        if dashboard is not None:
            await dashboard.stop()
        await links.close()
        await manager.close()
        await server.stop(grace=2)
        await workers.close()
        store.close()
    sys.stdout.flush()
    return 0

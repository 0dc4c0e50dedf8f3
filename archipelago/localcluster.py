"""A real cluster on one machine: a coordinator process and worker processes, each started
with the `archipelago` command exactly as a user would, each logging to its own file.
`archipelago demo` runs its job on one; the multi-process tests use it too.

`Cluster` runs everything on loopback; `TestbedCluster` runs the same processes on a WAN
testbed (`deploy.wan.Testbed`): the coordinator in the root namespace on the testbed's
bridge, each worker inside its host's namespace, so the links between workers are the
testbed's shaped ones.

The coordinator is given the cluster's join token (`token`, which its workers present) and
its operator token (`operator_token`, in a file only its owner reads); `client()` and the
helpers built on it present the operator token."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

from archipelago.client import ClientError, CoordinatorClient, JobView, WorkerView
from proto.cluster_tls import ClientTls

if TYPE_CHECKING:
    from deploy.wan import Testbed

T = TypeVar("T")
TOKEN = "local-cluster-token"
OPERATOR_TOKEN = "local-cluster-operator-token"
# The directory that holds the `archipelago` package (and `coordinator`, `worker`...).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Cluster:
    """Processes started together, all stopped by `close()` (also usable as a context
    manager, so an exception or Ctrl-C stops them too)."""

    workdir: Path
    store: str = ""
    token: str = TOKEN
    operator_token: str = OPERATOR_TOKEN
    heartbeat_s: float = 0.3
    worker_timeout_s: float = 2.0
    extra_coordinator_args: list[str] = field(default_factory=list)
    extra_worker_args: list[str] = field(default_factory=list)
    # The cluster's networks: workers measure links only inside them, and the coordinator
    # accepts only workers there. Every address here is local.
    probe_networks: str = "127.0.0.0/8"
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    coordinator: Proc | None = None
    # Serve the coordinator's web dashboard on a free loopback port (`dashboard_url`); off
    # by default, so clusters started side by side do not contend for one address.
    dashboard: bool = False
    # Plain text between the processes (`--insecure`) instead of the default mutual TLS
    # with the coordinator's authority.
    insecure: bool = False
    # The authority's fingerprint, as the coordinator printed it at start.
    ca_fingerprint: str = ""

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.store = self.store or f"sqlite:///{self.workdir / 'state.db'}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- what a subclass changes: where a process runs and how it is reached --------------

    def _command(self, args: list[str], host: str | None) -> list[str]:
        """The argv that runs `archipelago ARGS` (`host`: where; loopback knows one place)."""
        return [sys.executable, "-m", "archipelago.cli", *args]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def _cwd(self) -> Path | None:
        return None  # this process's own

    def _coordinator_args(self) -> list[str]:
        return [
            "coordinator",
            "--port",
            str(self.port),
            "--token",
            self.token,
            "--operator-token-file",
            str(self._operator_token_file()),
            "--store",
            self.store,
            "--heartbeat-interval",
            str(self.heartbeat_s),
            "--worker-timeout",
            str(self.worker_timeout_s),
            # Every address of this cluster is local: the coordinator accepts no worker
            # elsewhere, so nothing it calls can be off this machine.
            "--worker-networks",
            self.probe_networks,
            "--dashboard",
            "127.0.0.1:0" if self.dashboard else "off",
            *(["--insecure"] if self.insecure else ["--ca-file", str(self.ca_file)]),
            *self.extra_coordinator_args,
        ]

    @property
    def ca_file(self) -> Path:
        """Where the coordinator writes its TLS authority's certificate."""
        return self.workdir / "ca.pem"

    def _printed_fingerprint(self, proc: Proc) -> str:
        """The authority's fingerprint as coordinator `proc` printed it ("" before it did)."""
        found = re.findall(r"tls authority (sha256:[0-9a-f]{64})", proc.tail(400))
        return found[-1] if found else ""

    def client_tls(self) -> ClientTls | None:
        """How a client of this cluster's coordinator trusts it (None: plain text)."""
        return None if self.insecure else ClientTls(self.ca_file.read_bytes())

    def _operator_token_file(self) -> Path:
        """The operator token in a file of the work directory only its owner reads."""
        path = self.workdir / "operator-token"
        path.touch(mode=0o600)
        path.write_text(self.operator_token + "\n")
        return path

    def _worker_args(self, name: str, token: str | None) -> list[str]:
        return [
            "worker",
            "--coordinator",
            self.address,
            "--token",
            token or self.token,
            "--name",
            name,
            "--threads",
            "1",
            "--probe-networks",
            self.probe_networks,
            # A volunteer's way in: the fingerprint the coordinator printed.
            *(["--insecure"] if self.insecure else ["--ca-fingerprint", self.ca_fingerprint]),
            *self.extra_worker_args,
        ]

    # -- processes ----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], host: str | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                self._command(args, host),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                cwd=self._cwd(),
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _wait_joined(self, proc: Proc, name: str) -> None:
        """Until the worker is idle and the planner may use it (the coordinator reached its
        address), or it was left out (a worker at a dead address is backed off)."""
        wait_for(
            f"worker {name} to join",
            lambda: (
                not proc.alive
                or any(
                    w.name == name and w.state == "idle" and (w.reachable or w.excluded)
                    for w in self.workers_safe()
                )
            ),
            60,
        )
        if not proc.alive:
            raise RuntimeError(f"worker {name} exited:\n{proc.tail()}")

    def start_coordinator(self, name: str = "coordinator") -> Proc:
        proc = self._spawn(name, self._coordinator_args())
        self.coordinator = proc
        wait_for(f"{name} to listen", lambda: not proc.alive or "listening on" in proc.tail(), 60)
        if proc.alive and not self.insecure:
            self.ca_fingerprint = self._printed_fingerprint(proc)
            if not self.ca_fingerprint:
                raise RuntimeError(f"{name} printed no TLS authority:\n{proc.tail()}")
        if self.dashboard:
            wait_for(f"{name}'s dashboard", lambda: not proc.alive or self.dashboard_url, 30)
        if not proc.alive:
            raise RuntimeError(f"{name} exited:\n{proc.tail()}")
        return proc

    @property
    def dashboard_url(self) -> str:
        """The coordinator's dashboard, http://127.0.0.1:PORT/ ("" until it is up)."""
        if self.coordinator is None:
            return ""
        found = re.findall(r"dashboard on (http://\S+)", self.coordinator.tail(400))
        return found[-1] if found else ""

    def start_worker(self, name: str, *, wait: bool = True, token: str | None = None) -> Proc:
        proc = self._spawn(name, self._worker_args(name, token))
        if wait:
            self._wait_joined(proc, name)
        return proc

    def client(self, token: str | None = None) -> CoordinatorClient:
        """A client presenting the operator token (`token`: presenting that token instead, as
        a join token)."""
        tls = self.client_tls()
        if token is not None:
            return CoordinatorClient(self.address, token=token, tls=tls, timeout_s=30)
        return CoordinatorClient(
            self.address, operator_token=self.operator_token, tls=tls, timeout_s=30
        )

    def workers_safe(self) -> list[WorkerView]:
        try:
            with_client = self.client()
            try:
                return with_client.workers()
            finally:
                with_client.close()
        except ClientError:
            return []

    def job(self, job_id: str, *, with_metrics: bool = False) -> JobView:
        client = self.client()
        try:
            return client.job(job_id, with_metrics=with_metrics)
        finally:
            client.close()

    def job_safe(self, job_id: str) -> JobView | None:
        try:
            return self.job(job_id)
        except ClientError:
            return None

    def submit(self, spec_yaml: str) -> str:
        client = self.client()
        try:
            return client.submit(spec_yaml).job_id
        finally:
            client.close()

    def wait_job(
        self, job_id: str, check: Callable[[JobView], bool], what: str, timeout: float = 180
    ) -> JobView:
        def probe() -> JobView | None:
            job = self.job_safe(job_id)
            if job is not None and job.state in ("failed", "cancelled") and not check(job):
                raise AssertionError(f"job {job_id} {job.state}: {job.error}\n{self.logs()}")
            return job if job is not None and check(job) else None

        try:
            return wait_for(what, probe, timeout, interval=0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.logs()}") from None

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        proc.popen.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.popen.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ({'alive' if p.alive else f'exit {p.popen.returncode}'})\n{p.tail()}"
            for p in self.procs
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_jobs(self) -> None:
        """Cancel the jobs still training and let the workers drop their stages: a worker
        terminated while it holds one waits to drain, and `close` would wait it out."""
        if self.coordinator is None or not self.coordinator.alive:
            return
        try:
            client = self.client()
        except (ClientError, OSError):
            return
        try:
            for job in client.jobs():
                if not job.terminal:
                    client.cancel(job.job_id)
            wait_for(
                "the workers to drop their stages",
                lambda: all(w.state != "busy" for w in self.workers_safe()),
                10,
            )
        except (ClientError, TimeoutError, OSError):
            pass  # the processes are stopped below either way
        finally:
            client.close()

    def close(self) -> None:
        self._stop_jobs()
        for proc in self.procs:
            if proc.alive:
                proc.popen.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()


# Every worker in a namespace of its own has that namespace's ports to itself; a second
# worker on the same host takes the next.
TESTBED_WORKER_PORT = 7100


@dataclass
class TestbedCluster(Cluster):
    """A `Cluster` on a WAN testbed that is up: the coordinator in the root namespace,
    listening on the testbed's bridge address, and each worker inside its host's
    namespace, listening on and advertising the host's address, measuring links only
    inside the testbed's subnet. Stopping the testbed stops its processes too."""

    __test__ = False  # not a pytest test class, despite the name

    testbed: Testbed = field(kw_only=True)
    hosts_of: dict[str, str] = field(default_factory=dict)  # worker name -> its host

    def __post_init__(self) -> None:
        self.port = self.port or free_port(str(self.testbed.bridge_address))
        self.probe_networks = str(self.testbed.spec.subnet)
        super().__post_init__()

    @property
    def address(self) -> str:
        return f"{self.testbed.bridge_address}:{self.port}"

    def _command(self, args: list[str], host: str | None) -> list[str]:
        argv = super()._command(args, host)
        return argv if host is None else self.testbed.exec_args(host, argv)

    def _env(self) -> dict[str, str]:
        # Inside a namespace as outside: this checkout's packages, whatever is installed.
        env = super()._env()
        paths = [str(SOURCE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    def _cwd(self) -> Path | None:
        return SOURCE_ROOT

    def _coordinator_args(self) -> list[str]:
        return [*super()._coordinator_args(), "--host", str(self.testbed.bridge_address)]

    # A worker here is placed first, then named: `host` comes where `Cluster` has `name`.
    def start_worker(  # type: ignore[override]
        self, host: str, name: str | None = None, *, wait: bool = True, token: str | None = None
    ) -> Proc:
        """Start a worker inside `host`'s namespace (named after the host by default)."""
        name = name or host
        if name in self.hosts_of:
            raise ValueError(f"a worker named {name!r} was already started")
        port = TESTBED_WORKER_PORT + sum(h == host for h in self.hosts_of.values())
        endpoint = f"{self.testbed.address(host)}:{port}"
        self.hosts_of[name] = host
        args = [*self._worker_args(name, token), "--listen", endpoint, "--advertise", endpoint]
        proc = self._spawn(name, args, host)
        if wait:
            self._wait_joined(proc, name)
        return proc

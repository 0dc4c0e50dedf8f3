"""A real cluster on one machine: a coordinator process and worker processes, each started
with the `archipelago` command exactly as a user would, each logging to its own file.
`archipelago demo` runs its job on one; the multi-process tests use it too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from archipelago.client import ClientError, CoordinatorClient, JobView, WorkerView

T = TypeVar("T")
TOKEN = "local-cluster-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
    heartbeat_s: float = 0.3
    worker_timeout_s: float = 2.0
    extra_coordinator_args: list[str] = field(default_factory=list)
    extra_worker_args: list[str] = field(default_factory=list)
    # Workers measure links only inside these networks: every address here is local.
    probe_networks: str = "127.0.0.0/8"
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    coordinator: Proc | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.store = self.store or f"sqlite:///{self.workdir / 'state.db'}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "archipelago.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def start_coordinator(self, name: str = "coordinator") -> Proc:
        proc = self._spawn(
            name,
            [
                "coordinator",
                "--port",
                str(self.port),
                "--token",
                self.token,
                "--store",
                self.store,
                "--heartbeat-interval",
                str(self.heartbeat_s),
                "--worker-timeout",
                str(self.worker_timeout_s),
                *self.extra_coordinator_args,
            ],
        )
        self.coordinator = proc
        wait_for(f"{name} to listen", lambda: not proc.alive or "listening on" in proc.tail(), 60)
        if not proc.alive:
            raise RuntimeError(f"{name} exited:\n{proc.tail()}")
        return proc

    def start_worker(self, name: str, *, wait: bool = True, token: str | None = None) -> Proc:
        proc = self._spawn(
            name,
            [
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
                *self.extra_worker_args,
            ],
        )
        if wait:
            wait_for(
                f"worker {name} to join",
                lambda: (
                    not proc.alive
                    or any(w.name == name and w.state == "idle" for w in self.workers_safe())
                ),
                60,
            )
            if not proc.alive:
                raise RuntimeError(f"worker {name} exited:\n{proc.tail()}")
        return proc

    def client(self, token: str | None = None) -> CoordinatorClient:
        return CoordinatorClient(self.address, token=token or self.token, timeout_s=30)

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

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
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

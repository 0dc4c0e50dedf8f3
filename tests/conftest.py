"""Fixtures shared by every test tier.

`redis_url` (session): a real `redis-server` started once on a free loopback port, with no
persistence, in a temporary directory; yields its URL, database 0, and stops the server at
the end of the session. Tests of the Redis state store run against it; a missing server
fails them (CI must exercise Redis) - `make test` installs it with
`apt-get install redis-server`.

`clean_redis_url` (function): the same URL with the server emptied (FLUSHALL) first, so a
test never sees another's keys.

Both talk to the server through the `redis` client, as the Redis state store does.

The tests' own PyTorch work (the one-process references and simulations the clusters are
checked against, stages run in the test process) runs on one thread, as every worker of a
test cluster does (`--threads 1`): on two cores shared with those workers, two OpenMP
threads that wait for each other run several times slower than one.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

START_TIMEOUT_S = 10.0

torch.set_num_threads(1)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_ping(server: subprocess.Popen[bytes], client: redis.Redis, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"redis-server exited with {server.returncode}: {log.read_text()}")
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            pass  # not listening yet
        time.sleep(0.02)
    pytest.fail(f"redis-server did not answer PING in {START_TIMEOUT_S} s: {log.read_text()}")


def _stop(server: subprocess.Popen[bytes], client: redis.Redis) -> None:
    # Not up, or already gone: the process is stopped below either way.
    with contextlib.suppress(redis.RedisError):
        client.shutdown(nosave=True)
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a throw-away redis-server on loopback, shared by the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH; the Redis state store tests need a real server. "
            "`make test` installs it (apt-get install redis-server)."
        )
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    port = _free_loopback_port()
    # No RDB snapshots or AOF: the server dies with the session and must not write files.
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", str(workdir), "--logfile", str(log)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2.0)
    try:
        _wait_for_ping(server, client, log)
        yield url
    finally:
        _stop(server, client)
        client.close()


@pytest.fixture
def clean_redis_url(redis_url: str) -> str:
    """`redis_url` with the server emptied first."""
    with redis.Redis.from_url(redis_url, socket_timeout=2.0) as client:
        assert client.flushall()
    return redis_url

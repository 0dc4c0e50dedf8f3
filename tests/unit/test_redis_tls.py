"""The Redis state store over TLS (rediss://), against a real redis-server that speaks only
TLS and asks for a client certificate: the server is verified, the client proves itself, and
every wrong setting is refused with an error that names it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.store import StoreError, open_store
from proto.certificates import CertificateAuthority


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; `make test` installs it")
    d = tmp_path_factory.mktemp("redis-tls")
    ca = CertificateAuthority.create()
    server, client = ca.issue("localhost"), ca.issue("store-client")
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server.cert_pem,
        "server.key": server.key_pem,
        "client.pem": client.cert_pem,
        "client.key": client.key_pem,
        "other-ca.pem": CertificateAuthority.create().cert_pem,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    port = _free_port()
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key")]
    args += ["--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "yes"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(d), "--logfile", str(d / "log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"TLS redis-server did not start: {(d / 'log').read_text()}")
                time.sleep(0.05)
        yield TlsRedis(port, d / "ca.pem", d / "client.pem", d / "client.key", d / "other-ca.pem")
    finally:
        proc.kill()
        proc.wait()


def test_a_store_over_tls_verifies_the_server_and_shows_its_certificate(
    tls_redis: TlsRedis,
) -> None:
    t = tls_redis
    url = f"rediss://localhost:{t.port}/3?ca={t.ca}&cert={t.cert}&key={t.key}"
    store = open_store(url)
    try:
        assert store.url == f"rediss://localhost:{t.port}/3"  # no file paths, no secrets
        store.put_job({"job_id": "j1", "created_at": 1.0, "state": "queued"})
        assert store.get_job("j1") == {"job_id": "j1", "created_at": 1.0, "state": "queued"}
    finally:
        store.close()
    again = open_store(url)
    try:
        assert again.get_job("j1") is not None  # the same database, read back over TLS
    finally:
        again.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        # Redis asks for a client certificate: without one the handshake fails.
        ("ca={ca}", "cannot reach Redis"),
        # A server whose certificate another authority signed is not believed.
        ("ca={other}&cert={cert}&key={key}", "cannot reach Redis"),
        ("ca={ca}&cert={cert}", "needs both cert= and key="),
        ("ca={ca}&verify=no", "options may be ca, cert, key"),
        ("ca=/nonexistent/ca.pem", "ca=/nonexistent/ca.pem is not a readable file"),
        ("ca={ca}&ca={ca}", "once each"),
    ],
)
def test_wrong_tls_settings_are_refused_by_name(
    tls_redis: TlsRedis, query: str, message: str
) -> None:
    t = tls_redis
    q = query.format(ca=t.ca, other=t.other_ca, cert=t.cert, key=t.key)
    with pytest.raises(StoreError, match=message):
        open_store(f"rediss://localhost:{t.port}/0?{q}").close()


def test_a_plain_url_refuses_tls_options_and_a_plain_client_gets_no_answer(
    tls_redis: TlsRedis,
) -> None:
    with pytest.raises(StoreError, match="options are only for TLS"):
        open_store(f"redis://localhost:{tls_redis.port}/0?ca={tls_redis.ca}")
    with pytest.raises(StoreError, match="cannot reach Redis"):
        open_store(f"redis://127.0.0.1:{tls_redis.port}/0")

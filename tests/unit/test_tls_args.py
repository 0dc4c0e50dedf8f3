"""The command line's TLS: how a command finds the coordinator's authority, and the refusal
of plain text anywhere but on loopback, each with one error naming what is wrong."""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago import tls_args
from archipelago.errors import UsageError
from archipelago.tls_args import add_client_tls_args, client_tls
from coordinator.main import CoordinatorConfig, serve
from proto.certificates import CertificateAuthority
from proto.rpc import check_plain_text_host
from worker.main import WorkerConfig, coordinator_authority


def parse(argv: list[str], coordinator: str = "127.0.0.1:7070") -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_client_tls_args(p)
    args = p.parse_args(argv)
    args.coordinator = coordinator
    return args


@pytest.fixture
def no_default_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default authority file, pointed somewhere nothing is (this machine's own stays)."""
    path = tmp_path / "home-ca.pem"
    monkeypatch.setattr(tls_args, "DEFAULT_CA_FILE", path)
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.8.9.10"])
def test_plain_text_is_allowed_on_loopback(host: str) -> None:
    check_plain_text_host(host, "--host")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "coordinator.example", "", "::"])
def test_plain_text_is_refused_elsewhere(host: str) -> None:
    with pytest.raises(ValueError, match=r"--insecure \(plain text\) is for loopback"):
        check_plain_text_host(host, "--host")


def test_a_coordinator_refuses_insecure_on_a_public_address(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(
        token="t" * 16, host="0.0.0.0", port=0, store=f"sqlite:///{tmp_path}/s.db", insecure=True
    )
    with pytest.raises(ValueError, match=r"not --host 0\.0\.0\.0"):
        asyncio.run(serve(cfg))
    assert not (tmp_path / "s.db").exists()  # refused before anything was made


def test_a_command_without_any_authority_names_the_flags(no_default_ca: Path) -> None:
    with pytest.raises(UsageError, match=r"pass --ca-fingerprint .* or --ca FILE"):
        client_tls(parse([]))


def test_a_command_finds_the_authority_in_its_file(no_default_ca: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    no_default_ca.write_bytes(ca.cert_pem)  # as a coordinator with the default store wrote it
    found = client_tls(parse([]))
    assert found is not None and found.ca_pem == ca.cert_pem
    other = tmp_path / "other.pem"
    other.write_bytes(CertificateAuthority.create().cert_pem)
    given = client_tls(parse(["--ca", str(other)]))
    assert given is not None and given.ca_pem == other.read_bytes()
    with pytest.raises(UsageError, match="no such file"):
        client_tls(parse(["--ca", str(tmp_path / "missing.pem")]))


def test_insecure_is_plain_text_on_loopback_only(no_default_ca: Path) -> None:
    assert client_tls(parse(["--insecure"])) is None
    with pytest.raises(UsageError, match="loopback development only, not --coordinator"):
        client_tls(parse(["--insecure"], coordinator="10.0.0.1:7070"))
    with pytest.raises(UsageError, match="--insecure goes with neither"):
        client_tls(parse(["--insecure", "--ca-fingerprint", "sha256:" + "0" * 64]))


def test_a_malformed_fingerprint_is_refused(no_default_ca: Path) -> None:
    with pytest.raises(UsageError, match="is not a certificate fingerprint"):
        client_tls(parse(["--ca-fingerprint", "md5:1234"]))


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, CertificateAuthority]]:
    """A TLS listener presenting an authority's certificate, as a coordinator does."""
    ca = CertificateAuthority.create()
    cert, key = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert.write_bytes(ca.cert_pem)
    key.write_bytes(ca.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(raw, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", ca
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_fingerprint_pins_the_certificate_the_coordinator_presents(
    tls_server: tuple[str, CertificateAuthority], no_default_ca: Path
) -> None:
    address, ca = tls_server
    pinned = client_tls(parse(["--ca-fingerprint", ca.fingerprint], coordinator=address))
    assert pinned is not None and pinned.ca_pem == ca.cert_pem
    other = CertificateAuthority.create().fingerprint
    with pytest.raises(UsageError, match=f"presents certificate {ca.fingerprint}, not {other}"):
        client_tls(parse(["--ca-fingerprint", other], coordinator=address))
    # A worker the same way, and its --ca file checked against its fingerprint.
    worker = WorkerConfig(coordinator=address, token="t" * 16, ca_fingerprint=ca.fingerprint)
    assert asyncio.run(coordinator_authority(worker)) == ca.cert_pem
    wrong = WorkerConfig(coordinator=address, token="t" * 16, ca_fingerprint=other)
    with pytest.raises(ValueError, match="refusing to join"):
        asyncio.run(coordinator_authority(wrong))


def test_a_worker_certificate_is_renewed_past_half_its_life() -> None:
    from proto.certificates import MEMBER_DAYS, new_key, signing_request, worker_name
    from proto.cluster_tls import MemberTls
    from worker.coordinator_link import CERTIFICATE_RENEW_S, CoordinatorLink, RefusedError
    from worker.resources import Resources

    async def run() -> None:
        ca = CertificateAuthority.create()
        member = MemberTls(ca.cert_pem)
        link = CoordinatorLink(
            "127.0.0.1:1",
            token="t" * 16,
            tls=member,
            name="w",
            resources=Resources(gflops=1.0, memory_bytes=1 << 30, device="cpu", threads=1),
        )
        assert not link.renewal_due()  # no certificate yet: nothing to renew
        # A certificate for another name than this worker's is refused, and not taken.
        for name in (worker_name("someone-else"), "w1"):
            wrong = ca.sign(signing_request(new_key()[0]), name)
            with pytest.raises(RefusedError, match="not this worker"):
                link._take_certificate(member, "w1", wrong)
        assert member.cert_pem is None and link.certified_at is None
        link._take_certificate(member, "w1", ca.sign(member.signing_request(), worker_name("w1")))
        assert link.certified_at is not None
        assert CERTIFICATE_RENEW_S == MEMBER_DAYS * 86400 / 2
        assert not link.renewal_due(link.certified_at + CERTIFICATE_RENEW_S - 1)
        assert link.renewal_due(link.certified_at + CERTIFICATE_RENEW_S + 1)
        await link.close()

    asyncio.run(run())

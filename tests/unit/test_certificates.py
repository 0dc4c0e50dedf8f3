"""The cluster's certificate authority: what it signs, under which names, and what it refuses."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from proto.certificates import (
    COORDINATOR_NAME,
    MAX_CSR_BYTES,
    CertificateAuthority,
    CertificateError,
    certificate_name,
    check_fingerprint,
    fingerprint,
    new_key,
    signing_request,
    worker_name,
)


def test_the_authority_is_created_once_and_kept_private(tmp_path: Path) -> None:
    first = CertificateAuthority.open(tmp_path / "tls")
    key = tmp_path / "tls" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = CertificateAuthority.open(tmp_path / "tls")
    assert again.fingerprint == first.fingerprint
    assert first.fingerprint == fingerprint((tmp_path / "tls" / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate(first.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert certificate_name(first.cert_pem) == COORDINATOR_NAME


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.open(tmp_path)
    (tmp_path / "ca.key").write_bytes(CertificateAuthority.create().key_pem)
    with pytest.raises(CertificateError, match="is not the authority certificate's"):
        CertificateAuthority.open(tmp_path)
    (tmp_path / "ca.key").write_bytes(b"garbage")
    with pytest.raises(CertificateError, match="cannot load"):
        CertificateAuthority.open(tmp_path)


def test_an_authority_kept_as_one_blob_comes_back_whole() -> None:
    ca = CertificateAuthority.create()
    again = CertificateAuthority.from_blob(ca.blob, where="the store")
    assert again.fingerprint == ca.fingerprint and again.key_pem == ca.key_pem
    other = CertificateAuthority.create()
    with pytest.raises(CertificateError, match="not the authority certificate's"):
        CertificateAuthority.from_blob(other.key_pem + ca.cert_pem, where="the store")
    with pytest.raises(CertificateError, match="the store has no certificate"):
        CertificateAuthority.from_blob(ca.key_pem, where="the store")


def test_a_member_gets_the_name_the_authority_chooses() -> None:
    ca = CertificateAuthority.create()
    key_pem, _ = new_key()
    cert_pem = ca.sign(signing_request(key_pem), worker_name("w-1"))
    assert certificate_name(cert_pem) == "w-1.workers.archipelago"
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    with pytest.raises((ValueError, InvalidSignature)):
        cert.verify_directly_issued_by(
            x509.load_pem_x509_certificate(CertificateAuthority.create().cert_pem)
        )


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"not a request", "not a PEM CSR"),
        (b"x" * (MAX_CSR_BYTES + 1), "exceeds"),
    ],
)
def test_bad_signing_requests_are_refused(csr: bytes, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        CertificateAuthority.create().sign(csr, worker_name("w1"))


def test_a_request_whose_signature_does_not_match_is_refused() -> None:
    key_pem, _ = new_key()
    pem = signing_request(key_pem)
    der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
    # Flip a bit in the signature (the request's last bytes).
    broken = der[:-3] + bytes([der[-3] ^ 1]) + der[-2:]
    tampered = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(broken)
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CertificateError, match=r"signature|not a PEM CSR"):
        CertificateAuthority.create().sign(tampered, worker_name("w1"))


def test_names_and_fingerprints_are_checked() -> None:
    with pytest.raises(CertificateError, match="cannot name a certificate"):
        worker_name("../evil")
    digest = "AB" * 32
    assert check_fingerprint(f"SHA256:{digest}") == "sha256:" + digest.lower()
    spaced = ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert check_fingerprint(spaced) == "sha256:" + digest.lower()
    with pytest.raises(CertificateError, match="not a certificate fingerprint"):
        check_fingerprint("sha256:1234")

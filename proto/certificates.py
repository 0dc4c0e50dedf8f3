"""The cluster's own certificate authority, and the keys and certificates its members hold.

Every connection between Archipelago's processes is TLS with certificates the coordinator
issues; nobody needs a public CA or a DNS name. The pieces:

- **The authority.** `archipelago coordinator` creates it on first start in its state
  directory: an EC P-256 key (mode 0600) and a self-signed certificate valid 10 years. The
  coordinator's own gRPC server presents this very certificate, under the fixed name
  `COORDINATOR_NAME`, so a joining worker needs only its SHA-256 fingerprint (printed with
  the join token) to know it reached the real coordinator: it reads the certificate the
  server presents, checks the fingerprint, and from then on trusts what it signs.
- **Members.** A worker makes its own key (it never leaves the worker) and sends a
  certificate signing request when it registers. The coordinator signs a certificate whose
  names it chooses itself, never the request's: the worker's id as `<id>.WORKER_DOMAIN`.
  Peers dial a worker's address but verify the name of the worker the plan says is there,
  so a volunteer cannot stand in for another one. The coordinator's client certificate
  toward workers is named `COORDINATOR_CLIENT_NAME`.

Part of the wire: it imports nothing of ours, so every side may use it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The name the coordinator's certificate carries and every client verifies, whatever
# address it dials (gRPC's `grpc.ssl_target_name_override`).
COORDINATOR_NAME = "coordinator.archipelago"
# The name of the coordinator's client certificate, for the calls it makes to workers.
COORDINATOR_CLIENT_NAME = "control.coordinator.archipelago"
# A worker's certificate names it `<worker id>.WORKER_DOMAIN`.
WORKER_DOMAIN = "workers.archipelago"
CA_DAYS = 3650
MEMBER_DAYS = 30
# A CSR arrives from a stranger: a P-256 request is about 250 bytes as PEM.
MAX_CSR_BYTES = 4096
_WORKER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


class CertificateError(Exception):
    """A certificate, key or signing request is missing, malformed or not acceptable."""


def worker_name(worker_id: str) -> str:
    """The DNS-style name a worker's certificate carries (and peers verify)."""
    if not _WORKER_ID.match(worker_id):
        raise CertificateError(f"worker id {worker_id[:80]!r} cannot name a certificate")
    return f"{worker_id}.{WORKER_DOMAIN}"


def fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of a certificate's DER form: what a joining worker pins."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise CertificateError(f"not a PEM certificate: {e}") from None
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_fingerprint(text: str) -> str:
    """A fingerprint as given on a command line, normalised; CertificateError if malformed."""
    value = text.strip().lower().replace(":", "")
    value = "sha256:" + value.removeprefix("sha256")
    if not _FINGERPRINT.match(value):
        raise CertificateError(
            f"{text[:100]!r} is not a certificate fingerprint (expected sha256:<64 hex digits>)"
        )
    return value


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret so that only its owner can ever read it (no window of wider mode)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class KeyPair:
    """A member's private key and certificate, both PEM."""

    key_pem: bytes
    cert_pem: bytes


def new_key() -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return _key_pem(key), key


def signing_request(key_pem: bytes) -> bytes:
    """A CSR for `key_pem` (its subject is left empty: the authority picks the names)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("a member key must be an EC key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def check_signing_request(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The key of a member's signing request, once the request is well formed, small, of
    the one key type members use and signed by that key (CertificateError naming the fault).
    What `CertificateAuthority.sign` checks, callable before anything else changes."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertificateError(f"the signing request exceeds {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CertificateError(f"the signing request is not a PEM CSR: {e}") from None
    try:
        public = csr.public_key()
    except (ValueError, TypeError) as e:
        raise CertificateError(f"the signing request's key cannot be read: {e}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise CertificateError("the signing request's key must be EC P-256")
    try:
        if not csr.is_signature_valid:
            raise CertificateError("the signing request's signature is not valid")
    except InvalidSignature:
        raise CertificateError("the signing request's signature is not valid") from None
    return public


class CertificateAuthority:
    """The coordinator's authority: its key, its certificate, and signing members' requests."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = _key_pem(key)
        self.fingerprint = fingerprint(self.cert_pem)

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        """The authority kept in `directory` (ca.pem, ca.key), created there on first use."""
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        if cert_path.exists() or key_path.exists():
            try:
                cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
            except OSError as e:
                raise CertificateError(
                    f"cannot load the certificate authority in {directory}: {e}"
                ) from None
            return cls.from_pem(cert_pem, key_pem, where=str(directory))
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls.create()
        _write_private(key_path, ca.key_pem)
        cert_path.write_bytes(ca.cert_pem)
        return ca

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, *, where: str) -> CertificateAuthority:
        """The authority whose certificate and key these are (`where`: named in errors)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as e:
            raise CertificateError(
                f"cannot load the certificate authority in {where}: {e}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != cert.public_key().public_numbers()  # type: ignore[union-attr]
        ):
            raise CertificateError(f"the key in {where} is not the authority certificate's")
        return cls(key, cert)

    @classmethod
    def from_blob(cls, blob: bytes, *, where: str) -> CertificateAuthority:
        """The authority stored as one blob (`blob`): key, then certificate, both PEM."""
        marker = b"-----BEGIN CERTIFICATE-----"
        at = blob.find(marker)
        if at < 0:
            raise CertificateError(f"the certificate authority in {where} has no certificate")
        return cls.from_pem(blob[at:], blob[:at], where=where)

    @property
    def blob(self) -> bytes:
        """Key and certificate as one blob, for a store (`from_blob` reads it back)."""
        return self.key_pem + self.cert_pem

    @classmethod
    def create(cls) -> CertificateAuthority:
        """A new authority, in memory only."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COORDINATOR_NAME)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # The authority's certificate is also the coordinator's server certificate.
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(COORDINATOR_NAME)]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def sign(self, csr_pem: bytes, name: str, *, days: int = MEMBER_DAYS) -> bytes:
        """A certificate named `name` for the key of a signing request received from a member.

        The request only proves the member holds the key; every name and use in the
        certificate is chosen here."""
        return self._issue(check_signing_request(csr_pem), name, days)

    def issue(self, name: str, *, days: int = MEMBER_DAYS) -> KeyPair:
        """A key and certificate made here (for the coordinator's own client identity)."""
        key_pem, key = new_key()
        return KeyPair(key_pem, self._issue(key.public_key(), name, days))

    def _issue(self, public: ec.EllipticCurvePublicKey, name: str, days: int) -> bytes:
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def certificate_name(cert_pem: bytes) -> str:
    """The DNS name a member certificate carries."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    if len(dns) != 1:
        raise CertificateError("a member certificate carries exactly one name")
    return dns[0]

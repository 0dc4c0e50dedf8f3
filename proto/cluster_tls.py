"""TLS between the cluster's processes with the coordinator's own authority
(`proto.certificates`): who presents what, who verifies whom, under which name.

- The coordinator's server presents the authority's certificate under `COORDINATOR_NAME`
  and asks for no client certificate: a worker that joins has none yet, and gRPC cannot make
  one optional on a port. Callers prove who they are with their role's credential instead.
- A joining worker knows the authority only by its fingerprint: it reads the certificate the
  coordinator presents (`fetch_coordinator_certificate`), checks the fingerprint, and trusts
  that certificate from then on, for the coordinator and as the authority of its peers.
- A worker's own server is mutual TLS: it presents the certificate the authority signed at
  registration and accepts only callers whose certificate the same authority signed (the
  coordinator's control identity, or another worker). Its server exists before it has a
  certificate (it must advertise its port to register), so it starts with a throw-away one
  and switches when the real one arrives (`MemberTls.set_certificate`).
- Every client verifies the name it expects, not the address it dials: the coordinator's
  name, or `<worker id>.workers.archipelago` for the worker the plan says is there.

Part of the wire: it imports nothing of ours except `proto.*`.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import grpc

from proto.certificates import (
    COORDINATOR_NAME,
    CertificateAuthority,
    CertificateError,
    KeyPair,
    fingerprint,
    new_key,
    signing_request,
)

FETCH_TIMEOUT_S = 10.0


class CoordinatorUnreachable(CertificateError):
    """No TLS answer at the coordinator's address (yet): worth trying again."""


def fetch_coordinator_certificate(
    address: str, expected: str, *, timeout_s: float = FETCH_TIMEOUT_S
) -> bytes:
    """The certificate the coordinator at HOST:PORT presents, if its fingerprint is
    `expected`; CertificateError naming both fingerprints otherwise."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Verified below by fingerprint, which is stronger than a chain for a pinned identity.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=COORDINATOR_NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as e:
        raise CoordinatorUnreachable(
            f"cannot read the coordinator's certificate at {address}: {e}"
        ) from None
    if not der:
        raise CertificateError(f"the coordinator at {address} presented no certificate")
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    got = fingerprint(pem)
    if got != expected:
        raise CertificateError(
            f"the coordinator at {address} presents certificate {got}, not {expected}: "
            "refusing to join (a wrong address, or someone in between)"
        )
    return pem


def caller_name(context: grpc.aio.ServicerContext) -> str | None:
    """The name in the verified client certificate of a call, None without one."""
    auth: dict[str, Any] = context.auth_context() or {}
    names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or []
    if len(names) != 1:
        return None
    value = names[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _channel_options(name: str, options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*options, ("grpc.ssl_target_name_override", name)]


class ClientTls:
    """A client of the coordinator only (the command-line tools): trusts the authority."""

    def __init__(self, ca_pem: bytes) -> None:
        self.ca_pem = ca_pem

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)

    def channel(
        self, address: str, options: list[tuple[str, Any]], name: str = COORDINATOR_NAME
    ) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self.credentials(), _channel_options(name, options))

    def blocking_channel(
        self, address: str, options: list[tuple[str, Any]], name: str = COORDINATOR_NAME
    ) -> grpc.Channel:
        return grpc.secure_channel(address, self.credentials(), _channel_options(name, options))


class MemberTls(ClientTls):
    """A member's TLS: the authority it trusts and its own key and certificate.

    A worker makes its key here and gets its certificate at registration; the coordinator's
    control identity is made whole by `for_coordinator`."""

    def __init__(self, ca_pem: bytes, key_pem: bytes | None = None) -> None:
        super().__init__(ca_pem)
        self.key_pem = key_pem if key_pem is not None else new_key()[0]
        self.cert_pem: bytes | None = None
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_coordinator(cls, ca: CertificateAuthority, name: str) -> MemberTls:
        pair: KeyPair = ca.issue(name)
        member = cls(ca.cert_pem, pair.key_pem)
        member.cert_pem = pair.cert_pem
        return member

    def signing_request(self) -> bytes:
        return signing_request(self.key_pem)

    def set_certificate(self, cert_pem: bytes) -> None:
        """The certificate the authority signed for this member's key: used from the next
        handshake of its server and by every channel it opens after this."""
        with self._lock:
            self.cert_pem = cert_pem
            self._pending = grpc.ssl_server_certificate_configuration(
                [(self.key_pem, cert_pem)], root_certificates=self.ca_pem
            )

    def _fetch_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: callers need a certificate from the same authority."""
        with self._lock:
            if self.cert_pem is not None:
                pair = (self.key_pem, self.cert_pem)
            else:
                # Until registration: a self-signed stand-in nobody trusts, so no call can
                # reach the server before it has its real certificate.
                stand_in = CertificateAuthority.create()
                pair = (stand_in.key_pem, stand_in.cert_pem)
        initial = grpc.ssl_server_certificate_configuration([pair], root_certificates=self.ca_pem)
        return grpc.dynamic_ssl_server_credentials(
            initial, self._fetch_configuration, require_client_authentication=True
        )

    def credentials(self) -> grpc.ChannelCredentials:
        if self.cert_pem is None:
            return super().credentials()
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def coordinator_server_credentials(ca: CertificateAuthority) -> grpc.ServerCredentials:
    """The coordinator's server: the authority's own certificate, no client certificate."""
    return grpc.ssl_server_credentials([(ca.key_pem, ca.cert_pem)])

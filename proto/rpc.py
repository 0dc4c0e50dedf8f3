"""Wire conventions the coordinator, the workers and the command-line client share: how a
caller proves who it is, message size limits, TLS channels, and how a servicer refuses a
call (`abort`).

Credentials travel in call metadata, one header each (what each allows is decided by the
servicers, `coordinator.roles` and `worker.credentials`):

- `x-archipelago-token`: the join token, shared by every volunteer: it allows `Register`.
- `x-archipelago-worker-id` with `x-archipelago-worker-credential`: one worker, by the
  credential the coordinator gave it at its latest registration.
- `x-archipelago-operator`: the operator token (submit, cancel, every read).
- `x-archipelago-coordinator`: the coordinator, toward one worker (a credential only the
  two know).
- `x-archipelago-probe-ticket` (with the prober's worker id): a coordinator-minted ticket
  that lets one worker probe another's link.

Peer transfers carry their stage pair's secret in their header instead. Every secret is
compared in constant time (`secret_matches`); the coordinator stores only hashes of the
workers' credentials (`secret_hash`) and derives the rest with `ticket` (an HMAC).

Part of the wire: it imports nothing of ours, so every side may use it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

TOKEN_HEADER = "x-archipelago-token"
WORKER_ID_HEADER = "x-archipelago-worker-id"
WORKER_CREDENTIAL_HEADER = "x-archipelago-worker-credential"
OPERATOR_HEADER = "x-archipelago-operator"
COORDINATOR_HEADER = "x-archipelago-coordinator"
PROBE_TICKET_HEADER = "x-archipelago-probe-ticket"
# Secrets shorter than this are refused wherever one is received (a credential, a ticket, a
# stage pair's secret are all 43 or 64 characters).
MIN_SECRET_CHARS = 16
# Tensor bytes travel in 1 MiB chunks; whole messages above this are refused (the largest
# ordinary message is a stage assignment, whose graph is tens of kilobytes).
MAX_MESSAGE_BYTES = 16 << 20
# Error details travel percent-encoded in a trailer, and gRPC drops a call whose trailer
# exceeds 16 KiB (the caller sees RESOURCE_EXHAUSTED, not the refusal): messages quoting a
# request's fields are cut to this many characters (at most 12 bytes each once encoded).
MAX_DETAILS_CHARS = 1000
# What a worker's address must look like (HOST:PORT) wherever one is received.
ADDRESS_PATTERN = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,255}:\d{1,5}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Sequence[str], option: str) -> tuple[Network, ...]:
    """CIDR blocks given to `option` as networks; ValueError naming a bad one."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a CIDR block") from None
    return tuple(out)


def address_in_networks(address: str, networks: Sequence[Network]) -> bool:
    """Whether HOST:PORT may be contacted under a restriction to `networks` (none: any).
    With networks given, only a literal IP inside one of them passes: no name is looked
    up, so nothing outside the chosen networks is ever reached."""
    if not networks:
        return True
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in networks if net.version == ip.version)


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


class TlsError(Exception):
    """A TLS file is missing or unreadable."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS files. A server presents `cert`/`key`; a client trusts `ca` (which may be the
    server's own self-signed certificate)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    def _read(self, path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as e:
            raise TlsError(f"cannot read the TLS {what} {path}: {e.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None and self.key is None:
            return None
        if self.cert is None or self.key is None:
            raise TlsError("TLS needs both --tls-cert and --tls-key")
        key = self._read(self.key, "key")
        cert = self._read(self.cert, "certificate")
        assert key is not None and cert is not None
        return grpc.ssl_server_credentials([(key, cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca or self.cert, "CA")
        )


def open_channel(address: str, tls: TlsConfig | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address`, over TLS when configured."""
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def open_blocking_channel(address: str, tls: TlsConfig | None = None) -> grpc.Channel:
    """A blocking channel (for the command-line client)."""
    if tls is not None and tls.enabled:
        return grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


Metadata = tuple[tuple[str, str], ...]


def token_metadata(token: str) -> Metadata:
    """The join token, as a volunteer registering sends it."""
    return ((TOKEN_HEADER, token),)


def operator_metadata(token: str) -> Metadata:
    return ((OPERATOR_HEADER, token),)


def worker_metadata(worker_id: str, credential: str) -> Metadata:
    """One worker's identity: its id and the credential of its latest registration."""
    return ((WORKER_ID_HEADER, worker_id), (WORKER_CREDENTIAL_HEADER, credential))


def coordinator_metadata(credential: str) -> Metadata:
    """The coordinator's credential toward one worker."""
    return ((COORDINATOR_HEADER, credential),)


def probe_metadata(worker_id: str, ticket: str) -> Metadata:
    """A worker probing another's link: its id and the coordinator's ticket for the pair."""
    return ((WORKER_ID_HEADER, worker_id), (PROBE_TICKET_HEADER, ticket))


def metadata_value(metadata: Any, key: str) -> str | None:
    """The first value of header `key` in call metadata (None: absent)."""
    for k, value in metadata or ():
        if k == key:
            return value if isinstance(value, str) else bytes(value).decode(errors="replace")
    return None


def secret_matches(given: str | None, expected: str) -> bool:
    """Whether `given` is `expected`, compared in constant time; never for an empty one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(errors="replace"), expected.encode())


def token_matches(metadata: Any, token: str) -> bool:
    """Whether call metadata carries the expected token (compared in constant time)."""
    return secret_matches(metadata_value(metadata, TOKEN_HEADER), token)


def new_secret() -> str:
    """A fresh random credential (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """What is stored of a credential: its SHA-256 (a credential is random, so no salt or
    slow hash is needed: nothing about it can be guessed)."""
    return hashlib.sha256(secret.encode(errors="replace")).hexdigest()


def ticket(key: str, *scope: object) -> str:
    """An HMAC-SHA256 of `scope` under `key`: a secret for exactly that scope, which only
    holders of `key` can make or check."""
    message = "\x1f".join(str(s) for s in scope).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


async def require_token(context: grpc.aio.ServicerContext, token: str) -> None:
    """Abort the call with UNAUTHENTICATED unless it carries the join token."""
    if not token_matches(context.invocation_metadata(), token):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong join token")


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code` and `message`, cut to MAX_DETAILS_CHARS so the refusal
    itself reaches the caller."""
    await context.abort(code, message[:MAX_DETAILS_CHARS])
    raise AssertionError("abort returns only by raising")

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

Part of the wire: it imports nothing of ours but `proto.*`, so every side may use it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc

from proto.certificates import COORDINATOR_NAME, worker_name
from proto.cluster_tls import ClientTls

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


def check_plain_text_host(host: str, option: str) -> None:
    """Refuse plain text (`--insecure`) on anything but a loopback address: it is for
    development on one machine (ValueError naming `option`)."""
    name = host.strip("[]")
    try:
        loopback = name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"--insecure (plain text) is for loopback development only, not {option} {host}: "
            "drop --insecure to use the coordinator's TLS"
        )


def address_in_networks(
    address: str, networks: Sequence[Network], *, loopback: bool = True
) -> bool:
    """Whether HOST:PORT may be contacted under a restriction to `networks`. With networks
    given, only a literal IP inside one of them passes: no name is looked up, so nothing
    outside the chosen networks is ever reached. Without, any address a machine of a
    cluster can have passes: not link-local (a cloud's metadata service), multicast,
    unspecified or reserved, and loopback only when `loopback` (the caller itself is on
    loopback: a volunteer elsewhere is never at this machine's loopback). A name passes
    (it is resolved when dialled), except `localhost` without `loopback`."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return not networks and (loopback or host.lower() != "localhost")
    if networks:
        return any(ip in net for net in networks if net.version == ip.version)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return loopback
    return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def serves_loopback(host: str) -> bool:
    """Whether a process bound to `host` can be reached on its machine's loopback (a
    loopback address, or every interface)."""
    name = host.strip("[]")
    if name in ("", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


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
    # Channels keep alive while idle (CHANNEL_OPTIONS): without this a server counts each
    # such ping as a strike and drops the connection with GOAWAY too_many_pings within a
    # minute, so every later call paid a new connection (and handshake).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]


def open_channel(
    address: str, tls: ClientTls | None, *, name: str = COORDINATOR_NAME
) -> grpc.aio.Channel:
    """An asyncio channel to `address`. Over TLS (`tls`) the far end must present a
    certificate of the cluster's authority carrying `name`: the coordinator's, or
    `worker_name(id)` of the worker the plan put at that address. `tls` None is plain text,
    which only `--insecure` asks for."""
    if tls is not None:
        return tls.channel(address, CHANNEL_OPTIONS, name)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def open_blocking_channel(
    address: str, tls: ClientTls | None, *, name: str = COORDINATOR_NAME
) -> grpc.Channel:
    """A blocking channel (for the command-line client), as `open_channel`."""
    if tls is not None:
        return tls.blocking_channel(address, CHANNEL_OPTIONS, name)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def worker_channel(address: str, tls: ClientTls | None, worker_id: str) -> grpc.aio.Channel:
    """A channel to the worker the plan put at `address`: over TLS its certificate must
    carry `worker_name(worker_id)` (CertificateError for an id that names none)."""
    if tls is None:
        return open_channel(address, None)
    return open_channel(address, tls, name=worker_name(worker_id))


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

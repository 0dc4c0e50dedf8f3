"""TLS between the cluster's processes, over real gRPC servers on loopback: a joining worker
pins the coordinator by fingerprint; a worker's server speaks mutual TLS only with holders of
certificates the same authority signed, under the name the caller expects."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from proto.certificates import (
    COORDINATOR_CLIENT_NAME,
    CertificateAuthority,
    CertificateError,
    worker_name,
)
from proto.cluster_tls import (
    ClientTls,
    MemberTls,
    caller_name,
    coordinator_server_credentials,
    fetch_coordinator_certificate,
)

Caller = Callable[[grpc.aio.Channel], Awaitable[str]]


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return (caller_name(context) or "-").encode()


async def _serve(credentials: grpc.ServerCredentials) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "t.Who", {"Ask": grpc.unary_unary_rpc_method_handler(_who)}
    )
    server.add_generic_rpc_handlers([handler])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _ask(channel: grpc.aio.Channel) -> str:
    try:
        return (await channel.unary_unary("/t.Who/Ask")(b"", timeout=5)).decode()
    except grpc.RpcError as e:
        return f"refused: {e.code().name}"
    finally:
        await channel.close()


def test_a_joining_worker_pins_the_coordinator_by_fingerprint() -> None:
    async def run() -> None:
        ca = CertificateAuthority.create()
        server, address = await _serve(coordinator_server_credentials(ca))
        try:
            pem = await asyncio.to_thread(fetch_coordinator_certificate, address, ca.fingerprint)
            assert pem.strip() == ca.cert_pem.strip()
            # The pinned certificate is then the client's only trust: calls go through, and
            # carry no client certificate (the coordinator asks for none).
            assert await _ask(ClientTls(pem).channel(address, [])) == "-"
            stranger = CertificateAuthority.create().fingerprint
            with pytest.raises(CertificateError, match=f"presents certificate {ca.fingerprint}"):
                await asyncio.to_thread(fetch_coordinator_certificate, address, stranger)
            # Trusting another authority, a client refuses this coordinator.
            other = CertificateAuthority.create()
            assert (await _ask(ClientTls(other.cert_pem).channel(address, []))).startswith(
                "refused"
            )
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_a_workers_server_is_mutual_tls_under_the_workers_own_name() -> None:
    async def run() -> None:
        ca = CertificateAuthority.create()
        coordinator = MemberTls.for_coordinator(ca, COORDINATOR_CLIENT_NAME)
        w1, w2 = MemberTls(ca.cert_pem), MemberTls(ca.cert_pem)
        server, address = await _serve(w1.server_credentials())
        try:
            # Before registration nobody can reach it (its stand-in certificate is trusted
            # by no one).
            assert (await _ask(coordinator.channel(address, [], worker_name("w1")))).startswith(
                "refused"
            )
            w1.set_certificate(ca.sign(w1.signing_request(), worker_name("w1")))
            w2.set_certificate(ca.sign(w2.signing_request(), worker_name("w2")))
            ch = coordinator.channel(address, [], worker_name("w1"))
            assert await _ask(ch) == COORDINATOR_CLIENT_NAME
            assert await _ask(w2.channel(address, [], worker_name("w1"))) == worker_name("w2")
            # A caller that expects another worker at this address refuses the handshake.
            assert (await _ask(w2.channel(address, [], worker_name("w3")))).startswith("refused")
            # No client certificate, or one from another authority: refused by the server.
            assert (
                await _ask(ClientTls(ca.cert_pem).channel(address, [], worker_name("w1")))
            ).startswith("refused")
            other = CertificateAuthority.create()
            forged = MemberTls(ca.cert_pem)
            forged.set_certificate(other.sign(forged.signing_request(), worker_name("w2")))
            assert (await _ask(forged.channel(address, [], worker_name("w1")))).startswith(
                "refused"
            )
        finally:
            await server.stop(None)

    asyncio.run(run())

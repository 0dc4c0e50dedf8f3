"""The relay's framing and bounds (`proto.relay_link`) and its hub (`coordinator.relay`).

Frames: each malformed frame is refused with a message naming what is wrong. Pumps: two
real pumps joined by a frame queue carry real loopback TCP connections both ways, a
payload many windows long intact; a frame for a connection never opened, past the window,
or an OPEN the relay did not make breaks the protocol; a frame that crossed a close is
dropped. Hub: over real gRPC on loopback, a stream needs the join token, gets a port of its
own, binds only to a worker registered at that port, a second stream bound by the same
worker replaces the first (whose port closes), and the bounds on streams hold.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc
import pytest

from coordinator.registry import Registry
from coordinator.relay import RelayConfig, RelayHub, add_relay_servicer
from coordinator.roles import Gatekeeper
from proto import relay_pb2, relay_pb2_grpc
from proto.relay_link import (
    Frame,
    FrameKind,
    RelayBounds,
    RelayProtocolError,
    RelayPump,
    frame_from_pb,
    frame_pb,
)
from proto.rpc import token_metadata

pytestmark = pytest.mark.unit

JOIN = "join-token-of-this-test"
OPERATOR = "operator-token-of-this-test"
KEY = "coordinator-key-of-this-test-0123456789"
BOUNDS = RelayBounds(max_frame_bytes=1024, window_bytes=4096, max_connections=3)


def pb(**fields: object) -> relay_pb2.RelayFrame:
    return relay_pb2.RelayFrame(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "refusal"),
    [
        (pb(kind=0, connection=1, data=b"x" * 1025), "1025 bytes; at most 1024"),
        (pb(kind=0, connection=1), "empty DATA"),
        (pb(kind=0, connection=0, data=b"x"), "DATA frame with connection id 0"),
        (pb(kind=5, connection=3), "PING frame with connection id 3"),
        (pb(kind=2, connection=1, data=b"x"), "CLOSE frame carries no data"),
        (pb(kind=3, connection=1, acked=0), "ACK of 0 bytes"),
        (pb(kind=3, connection=1, acked=4097), "ACK of 4097 bytes"),
        (pb(kind=4, address="no port"), "is not HOST:PORT"),
        (pb(kind=1, connection=1, address="10.0.0.1:1"), "OPEN frame carries no address"),
        (pb(kind=6, worker_id="w1"), "needs a worker id and credential"),
        (pb(kind=0, connection=1, data=b"x", credential="c"), "carries no credential"),
        (pb(kind=9), "unknown relay frame kind 9"),
    ],
)
def test_malformed_frames_are_refused_by_name(message: relay_pb2.RelayFrame, refusal: str) -> None:
    with pytest.raises(RelayProtocolError, match=refusal):
        frame_from_pb(message, BOUNDS)


def test_frames_survive_their_encoding() -> None:
    for f in (
        Frame(FrameKind.DATA, 7, data=b"\x00\xff" * 512),
        Frame(FrameKind.ACK, 7, acked=4096),
        Frame(FrameKind.ASSIGNED, address="10.77.0.1:40000"),
        Frame(FrameKind.BIND, worker_id="w1", credential="c" * 43),
        Frame(FrameKind.CLOSE, 2),
    ):
        assert frame_from_pb(frame_pb(f), BOUNDS) == f


# -- two pumps joined by queues, carrying real loopback TCP connections --------------------


class Joined:
    """A relay pump and a worker pump, each one's frames delivered to the other in order
    (through the wire encoding and its checks), the worker's connected to `echo`."""

    def __init__(self, local_port: int, bounds: RelayBounds) -> None:
        self.to_worker: asyncio.Queue[relay_pb2.RelayFrame] = asyncio.Queue()
        self.to_relay: asyncio.Queue[relay_pb2.RelayFrame] = asyncio.Queue()
        self.errors: list[BaseException] = []

        async def to(queue: asyncio.Queue[relay_pb2.RelayFrame], f: Frame) -> None:
            await queue.put(frame_pb(f))

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", local_port)

        self.bounds = bounds
        self.relay = RelayPump(lambda f: to(self.to_worker, f), bounds)
        self.worker = RelayPump(lambda f: to(self.to_relay, f), bounds, connect=connect)
        self.tasks = [
            asyncio.create_task(self._deliver(self.to_worker, self.worker)),
            asyncio.create_task(self._deliver(self.to_relay, self.relay)),
        ]

    async def _deliver(self, queue: asyncio.Queue[relay_pb2.RelayFrame], pump: RelayPump) -> None:
        try:
            while True:
                await pump.receive(frame_from_pb(await queue.get(), self.bounds))
        except RelayProtocolError as e:
            self.errors.append(e)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.relay.close()
        await self.worker.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def with_relay(
    body: Callable[[Joined, int], Awaitable[None]], bounds: RelayBounds = BOUNDS
) -> None:
    """Run `body(joined, relay_port)`: an echo server behind a worker pump, and a TCP port
    whose connections the relay pump carries."""
    local = await asyncio.start_server(echo, "127.0.0.1", 0)
    joined = Joined(local.sockets[0].getsockname()[1], bounds)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await joined.relay.attach(reader, writer, peer=writer.get_extra_info("peername")[0])

    front = await asyncio.start_server(accepted, "127.0.0.1", 0)
    try:
        await asyncio.wait_for(body(joined, front.sockets[0].getsockname()[1]), 30)
    finally:
        front.close()
        local.close()
        await joined.close()


def test_connections_carry_bytes_both_ways_through_the_window() -> None:
    payload = bytes(range(256)) * 2000  # 512 000 bytes: 125 windows of 4096

    async def body(joined: Joined, port: int) -> None:
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for i, (_, writer) in enumerate(streams):
            writer.write(payload[i:])
        for i, (reader, _) in enumerate(streams):
            assert await reader.readexactly(len(payload) - i) == payload[i:]
        for _, writer in streams:
            writer.close()
        assert joined.errors == []
        assert joined.relay.bytes_out == joined.relay.bytes_in == 3 * len(payload) - 3

    asyncio.run(with_relay(body))


@pytest.mark.parametrize("per_peer", [3, 2])
def test_connections_past_the_bound_are_closed_at_once(per_peer: int) -> None:
    """At most 3 in all, and at most `per_peer` from one address (here: all of them)."""

    async def body(joined: Joined, port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(per_peer)]
        for reader, writer in held:  # each carried: it echoes
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.read(10) == b""  # closed without a byte
        assert joined.relay.open_connections == per_peer

    bounds = RelayBounds(
        max_frame_bytes=1024,
        window_bytes=4096,
        max_connections=3,
        max_connections_per_peer=per_peer,
    )
    asyncio.run(with_relay(body, bounds))


def test_protocol_breaks_are_refused_and_crossed_frames_dropped() -> None:
    async def run() -> None:
        sent: list[Frame] = []

        async def send(f: Frame) -> None:
            sent.append(f)

        relay = RelayPump(send, BOUNDS)
        with pytest.raises(RelayProtocolError, match="only the relay opens"):
            await relay.receive(Frame(FrameKind.OPEN, 1))
        with pytest.raises(RelayProtocolError, match="connection 5, never opened"):
            await relay.receive(Frame(FrameKind.DATA, 5, data=b"x"))

        async def refuse() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            raise OSError("no local server")

        worker = RelayPump(send, BOUNDS, connect=refuse)
        with pytest.raises(RelayProtocolError, match="connection 2 opened out of order"):
            await worker.receive(Frame(FrameKind.OPEN, 2))
        await worker.receive(Frame(FrameKind.OPEN, 1))
        with pytest.raises(RelayProtocolError, match="past the window of 4096"):
            for _ in range(5):
                await worker.receive(Frame(FrameKind.DATA, 1, data=b"x" * 1024))
        await asyncio.sleep(0.05)  # the local connect fails: connection 1 closes
        assert Frame(FrameKind.CLOSE, 1) in sent and worker.open_connections == 0
        await worker.receive(Frame(FrameKind.DATA, 1, data=b"late"))  # crossed the close
        with pytest.raises(RelayProtocolError, match="not the pump's"):
            await worker.receive(Frame(FrameKind.ASSIGNED, address="10.0.0.1:1"))

    asyncio.run(run())


# -- the hub, over real gRPC on loopback ---------------------------------------------------


class Stream:
    """A client's end of one relay stream."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call

    async def frame(self) -> Frame:
        m = await asyncio.wait_for(self.call.read(), 10)
        assert m is not grpc.aio.EOF, "the stream ended"
        return frame_from_pb(m, RelayBounds())

    async def send(self, f: Frame) -> None:
        await self.call.write(frame_pb(f))

    async def status(self) -> tuple[grpc.StatusCode, str]:
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await asyncio.wait_for(self.call.read(), 10) is not grpc.aio.EOF:
                pass
        return await self.call.code(), await self.call.details()


async def with_hub(
    config: RelayConfig,
    body: Callable[[Callable[..., Stream], Registry, Gatekeeper, RelayHub], Awaitable[None]],
) -> None:
    registry = Registry(timeout_s=5.0)
    gate = Gatekeeper(registry, token=JOIN, operator_token=OPERATOR, coordinator_key=KEY)
    hub = RelayHub(config, registry, gate)
    server = grpc.aio.server()
    add_relay_servicer(server, hub)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = relay_pb2_grpc.RelayStub(channel)

    def open_stream(token: str = JOIN) -> Stream:
        return Stream(stub.Connect(metadata=token_metadata(token)))

    try:
        await asyncio.wait_for(body(open_stream, registry, gate, hub), 30)
    finally:
        await channel.close()
        await server.stop(grace=0)


def join(registry: Registry, gate: Gatekeeper, address: str) -> tuple[str, str]:
    w = registry.register(
        name="w", address=address, gflops=1.0, memory_bytes=1, device="cpu", threads=1
    )
    return w.worker_id, gate.issue(w).credential


async def port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    writer.close()
    return True


def test_a_second_stream_bound_by_the_same_worker_replaces_the_first() -> None:
    async def body(
        open_stream: Callable[..., Stream], registry: Registry, gate: Gatekeeper, hub: RelayHub
    ) -> None:
        first = open_stream()
        a = (await first.frame()).address
        worker_id, credential = join(registry, gate, a)
        await first.send(Frame(FrameKind.BIND, worker_id=worker_id, credential=credential))
        assert await port_open(a) and hub.relayed(a)

        second = open_stream()
        b = (await second.frame()).address
        assert b != a
        # Bound only once the worker registered at the new address.
        await second.send(Frame(FrameKind.BIND, worker_id=worker_id, credential=credential))
        code, details = await second.status()
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not registered at" in details

        third = open_stream()
        c = (await third.frame()).address
        registry.register(
            name="w",
            address=c,
            gflops=1.0,
            memory_bytes=1,
            device="cpu",
            threads=1,
            worker_id=worker_id,
        )
        await third.send(Frame(FrameKind.BIND, worker_id=worker_id, credential=credential))
        code, details = await first.status()
        assert code == grpc.StatusCode.ABORTED and "replaced" in details
        assert not await port_open(a) and not hub.relayed(a)
        assert await port_open(c) and hub.addresses() == {c}

    asyncio.run(with_hub(RelayConfig(host="127.0.0.1"), body))


def test_no_one_binds_a_stream_with_a_wrong_credential_or_without_the_join_token() -> None:
    async def body(
        open_stream: Callable[..., Stream], registry: Registry, gate: Gatekeeper, hub: RelayHub
    ) -> None:
        stranger = open_stream("not-the-join-token")
        code, details = await stranger.status()
        assert code == grpc.StatusCode.UNAUTHENTICATED and "join token" in details

        s = open_stream()
        a = (await s.frame()).address
        worker_id, _ = join(registry, gate, a)
        await s.send(Frame(FrameKind.BIND, worker_id=worker_id, credential="guessed" * 6))
        code, details = await s.status()
        assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong credential" in details
        assert hub.addresses() == frozenset()

        oversize = open_stream()
        await oversize.frame()
        await oversize.send(Frame(FrameKind.PING))
        await oversize.call.write(pb(kind=0, connection=1, data=b"x" * (65 << 10)))
        code, details = await oversize.status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 65536" in details

    asyncio.run(with_hub(RelayConfig(host="127.0.0.1"), body))


def test_the_bounds_on_streams_hold() -> None:
    async def body(
        open_stream: Callable[..., Stream], registry: Registry, gate: Gatekeeper, hub: RelayHub
    ) -> None:
        held = [open_stream(), open_stream()]
        for s in held:
            await s.frame()
        code, details = await open_stream().status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "127.0.0.1 holds 2 relay streams" in details
        # Never bound: closed once the bind timeout passes, and its port with it.
        code, details = await held[0].status()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no worker registered" in details
        assert hub.addresses() == frozenset()

    config = RelayConfig(host="127.0.0.1", max_workers=3, max_per_host=2, bind_timeout_s=0.5)
    asyncio.run(with_hub(config, body))

    async def off(
        open_stream: Callable[..., Stream], registry: Registry, gate: Gatekeeper, hub: RelayHub
    ) -> None:
        code, details = await open_stream().status()
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--max-relayed-workers 0" in details

    asyncio.run(with_hub(RelayConfig(host="127.0.0.1", max_workers=0), off))


class OddPortsOnly:
    """Exclusions (as the planner keeps them) that leave out every even relay port."""

    def excluded_address(self, address: str) -> bool:
        return int(address.rpartition(":")[2]) % 2 == 0


def test_a_port_whose_address_is_excluded_is_never_given_out() -> None:
    async def body(
        open_stream: Callable[..., Stream], registry: Registry, gate: Gatekeeper, hub: RelayHub
    ) -> None:
        registry.exclusions = OddPortsOnly()  # type: ignore[assignment]
        streams = [open_stream() for _ in range(6)]
        ports = [int((await s.frame()).address.rpartition(":")[2]) for s in streams]
        assert all(p % 2 == 1 for p in ports), ports

    asyncio.run(with_hub(RelayConfig(host="127.0.0.1", max_per_host=8), body))

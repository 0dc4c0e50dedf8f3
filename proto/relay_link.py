"""The relay's wire: the frames a relay stream carries, their checks, and `RelayPump`, one
end of a stream (the relay's or the worker's) moving the bytes of its TCP connections.

A worker that takes no inbound connection keeps one `Relay.Connect` stream open to a relay
(`coordinator.relay`, `worker.relay_client`). Each TCP connection the relay accepts for
that worker becomes a connection id (1, 2, ... in order; only the relay opens them); its
bytes go over the stream as DATA frames, both ways, and are pushed into the TCP
connection at the other end. What those bytes are (gRPC, TLS) is nothing to the relay.

Flow control is per connection and in bytes: an end sends at most `window_bytes` of a
connection that the other end has not acknowledged; the receiver acknowledges bytes once
its TCP connection took them (`drain`). A slow reader at one end therefore stops the
sender's reads at the other end instead of filling memory; an end that sends past the
window, a frame larger than `max_frame_bytes`, a frame for a connection that was never
opened, or more open connections than `max_connections` breaks the protocol
(`RelayProtocolError`) and the stream ends. A frame for a connection that was opened and
has since closed is dropped: a close and frames in flight cross each other.

Part of the wire: imports only generated code and the standard library, so both sides use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import relay_pb2, relay_pb2_grpc
from proto.rpc import ADDRESS_PATTERN

log = logging.getLogger("archipelago.relay")


# One frame as it travels (the sides pass it on to `frame_from_pb` unread).
RelayMessage = relay_pb2.RelayFrame
RelayHandler = Callable[[AsyncIterator[RelayMessage], grpc.aio.ServicerContext], Awaitable[None]]


class _RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(self, handler: RelayHandler) -> None:
        self.handler = handler

    async def Connect(
        self, request_iterator: AsyncIterator[RelayMessage], context: grpc.aio.ServicerContext
    ) -> None:
        await self.handler(request_iterator, context)


def add_relay_servicer(server: grpc.aio.Server, handler: RelayHandler) -> None:
    """Serve `Relay.Connect` on `server` with `handler(requests, context)`."""
    relay_pb2_grpc.add_RelayServicer_to_server(_RelayServicer(handler), server)


def open_relay_stream(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> Any:
    """A new `Relay.Connect` call on `channel` (a `grpc.aio.StreamStreamCall`)."""
    return relay_pb2_grpc.RelayStub(channel).Connect(metadata=metadata)


class RelayProtocolError(Exception):
    """The other end of a relay stream broke the protocol; the message says how."""


class FrameKind(enum.IntEnum):
    DATA = relay_pb2.RelayFrame.DATA
    OPEN = relay_pb2.RelayFrame.OPEN
    CLOSE = relay_pb2.RelayFrame.CLOSE
    ACK = relay_pb2.RelayFrame.ACK
    ASSIGNED = relay_pb2.RelayFrame.ASSIGNED
    PING = relay_pb2.RelayFrame.PING
    BIND = relay_pb2.RelayFrame.BIND


# A worker id or credential is far shorter than this (`proto.rpc.new_secret`).
MAX_ID_CHARS = 128
# Frames about one connection name it; the others are about the stream (connection 0).
CONNECTION_KINDS = frozenset({FrameKind.DATA, FrameKind.OPEN, FrameKind.CLOSE, FrameKind.ACK})


@dataclass(frozen=True)
class RelayBounds:
    """What one relay stream may hold: the largest frame's bytes, the unacknowledged bytes of
    one connection in one direction, and the connections open at once. The most one end
    buffers for a stream is about `max_connections * window_bytes`."""

    max_frame_bytes: int = 64 << 10
    window_bytes: int = 256 << 10
    max_connections: int = 32
    # (The relay's end.) Of those, how many one address may hold: a stranger who dials a
    # relayed worker's port cannot take every connection it has.
    max_connections_per_peer: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_frame_bytes <= self.window_bytes:
            raise ValueError("a relay frame must be 1 byte or more and fit in the window")
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ValueError("a relay stream must carry at least one connection")


@dataclass(frozen=True)
class Frame:
    """One relay frame, as the rest of the code sees it."""

    kind: FrameKind
    connection: int = 0
    data: bytes = b""
    acked: int = 0
    address: str = ""
    worker_id: str = ""
    credential: str = ""


def frame_pb(f: Frame) -> relay_pb2.RelayFrame:
    m = relay_pb2.RelayFrame(
        connection=f.connection,
        data=f.data,
        acked=f.acked,
        address=f.address,
        worker_id=f.worker_id,
        credential=f.credential,
    )
    m.kind = int(f.kind)  # type: ignore[assignment]  # the enum's values are its ints
    return m


def frame_from_pb(m: relay_pb2.RelayFrame, bounds: RelayBounds) -> Frame:
    """The frame `m` carries, checked against itself and `bounds`; RelayProtocolError names
    what is wrong."""
    try:
        kind = FrameKind(m.kind)
    except ValueError:
        raise RelayProtocolError(f"unknown relay frame kind {m.kind}") from None
    if len(m.data) > bounds.max_frame_bytes:
        raise RelayProtocolError(
            f"relay frame of {len(m.data)} bytes; at most {bounds.max_frame_bytes} are allowed"
        )
    if m.data and kind != FrameKind.DATA:
        raise RelayProtocolError(f"a {kind.name} frame carries no data")
    if kind == FrameKind.DATA and not m.data:
        raise RelayProtocolError("an empty DATA frame")
    if (kind in CONNECTION_KINDS) != (m.connection != 0):
        raise RelayProtocolError(f"a {kind.name} frame with connection id {m.connection}")
    if kind == FrameKind.ACK and not 1 <= m.acked <= bounds.window_bytes:
        raise RelayProtocolError(f"an ACK of {m.acked} bytes (window {bounds.window_bytes})")
    if m.acked and kind != FrameKind.ACK:
        raise RelayProtocolError(f"a {kind.name} frame acknowledges nothing")
    if kind == FrameKind.ASSIGNED and not ADDRESS_PATTERN.match(m.address):
        raise RelayProtocolError(f"relay address {m.address[:80]!r} is not HOST:PORT")
    if m.address and kind != FrameKind.ASSIGNED:
        raise RelayProtocolError(f"a {kind.name} frame carries no address")
    if kind == FrameKind.BIND and not (
        0 < len(m.worker_id) <= MAX_ID_CHARS and 0 < len(m.credential) <= MAX_ID_CHARS
    ):
        raise RelayProtocolError(
            "a BIND frame needs a worker id and credential (128 chars at most)"
        )
    if (m.worker_id or m.credential) and kind != FrameKind.BIND:
        raise RelayProtocolError(f"a {kind.name} frame carries no credential")
    return Frame(kind, m.connection, bytes(m.data), m.acked, m.address, m.worker_id, m.credential)


@dataclass(eq=False)
class _Connection:
    """One TCP connection carried over the stream, at this end."""

    id: int
    # None while the worker's end is still connecting to its local server.
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    pending: bytearray = field(default_factory=bytearray)  # bytes that came meanwhile
    peer: str = ""  # (the relay's end) the address that opened it
    sent_unacked: int = 0  # our bytes the other end has not acknowledged
    received_unacked: int = 0  # its bytes we took but have not acknowledged yet
    to_ack: int = 0
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    ack_due: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class RelayPump:
    """One end of a relay stream: its connections, the bytes between them and the stream.

    `send` puts one frame on the stream. Frames wait in an outbox that one writer task
    empties, in order: a connection's task may be cancelled at any moment (its connection
    closed), and one cancelled inside grpc's `write` would cancel the whole stream. The
    outbox holds at most a window of DATA per connection and a few small frames. The relay's end
    (`connect` None) opens connections (`attach`); the worker's end is given `connect`,
    which opens the local connection each OPEN asks for. `receive` takes each frame the
    other end sent, in order, and never waits on a connection."""

    def __init__(
        self,
        send: Callable[[Frame], Awaitable[None]],
        bounds: RelayBounds,
        *,
        connect: Connect | None = None,
    ) -> None:
        self._send_frame = send
        self.bounds = bounds
        self._connect = connect
        self._outbox: asyncio.Queue[Frame] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._connections: dict[int, _Connection] = {}
        self._highest = 0  # the last connection id opened
        self._closed = False
        self.bytes_in = 0  # DATA bytes received, and sent, over the stream
        self.bytes_out = 0

    @property
    def is_relay(self) -> bool:
        return self._connect is None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def send(self, frame: Frame) -> None:
        """Queue `frame` for the stream (never waits: the windows bound what is queued)."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_out())
        self._outbox.put_nowait(frame)

    async def _write_out(self) -> None:
        try:
            while True:
                await self._send_frame(await self._outbox.get())
        except Exception as e:  # the stream broke: its reading end ends it
            log.debug("relay stream write failed: %r", e)

    # -- opening ----------------------------------------------------------------------------

    async def attach(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer: str = ""
    ) -> bool:
        """(Relay's end.) Carry a connection the relay accepted from `peer`; False (and it
        is closed) when the stream carries as many as it may, in all or from `peer`, or is
        closing."""
        held = sum(c.peer == peer for c in self._connections.values()) if peer else 0
        if (
            self._closed
            or len(self._connections) >= self.bounds.max_connections
            or held >= self.bounds.max_connections_per_peer
        ):
            writer.close()
            return False
        self._highest += 1
        conn = _Connection(self._highest, writer=writer, reader=reader, peer=peer)
        self._connections[conn.id] = conn
        await self.send(Frame(FrameKind.OPEN, conn.id))
        self._start(conn)
        return True

    async def _open_local(self, conn_id: int) -> None:
        """(Worker's end.) Connect `conn_id` to the local server, or tell the relay it closed."""
        assert self._connect is not None
        try:
            reader, writer = await self._connect()
        except (OSError, TimeoutError) as e:
            log.warning("relay connection %d: local server unreachable (%r)", conn_id, e)
            self._connections.pop(conn_id, None)
            await self._send_close(conn_id)
            return
        conn = self._connections.get(conn_id)
        if conn is None or self._closed:  # closed by the relay while connecting
            writer.close()
            return
        conn.writer, conn.reader = writer, reader
        if conn.pending:
            writer.write(bytes(conn.pending))
            conn.to_ack += len(conn.pending)
            conn.pending.clear()
            conn.ack_due.set()
        self._start(conn)

    def _start(self, conn: _Connection) -> None:
        conn.credit.set()
        conn.tasks = [
            asyncio.create_task(self._pump_out(conn)),
            asyncio.create_task(self._pump_acks(conn)),
        ]

    # -- moving bytes -----------------------------------------------------------------------

    async def _pump_out(self, conn: _Connection) -> None:
        """Read the local connection and send its bytes, within the window."""
        assert conn.reader is not None
        try:
            while True:
                while conn.sent_unacked >= self.bounds.window_bytes:
                    conn.credit.clear()
                    await conn.credit.wait()
                room = self.bounds.window_bytes - conn.sent_unacked
                data = await conn.reader.read(min(self.bounds.max_frame_bytes, room))
                if not data:
                    break
                conn.sent_unacked += len(data)
                self.bytes_out += len(data)
                await self.send(Frame(FrameKind.DATA, conn.id, data))
        except (ConnectionError, OSError):
            pass
        if self._connections.get(conn.id) is conn:
            await self._drop(conn, tell=True)

    async def _pump_acks(self, conn: _Connection) -> None:
        """Acknowledge the other end's bytes once the local connection took them."""
        try:
            while True:
                await conn.ack_due.wait()
                conn.ack_due.clear()
                assert conn.writer is not None
                await conn.writer.drain()
                n, conn.to_ack = conn.to_ack, 0
                if n:
                    conn.received_unacked -= n
                    await self.send(Frame(FrameKind.ACK, conn.id, acked=n))
        except (ConnectionError, OSError):
            if self._connections.get(conn.id) is conn:
                await self._drop(conn, tell=True)

    async def receive(self, frame: Frame) -> None:
        """Act on one frame from the other end; RelayProtocolError when it breaks the
        protocol (the caller then ends the stream)."""
        if frame.kind == FrameKind.PING:
            return
        if frame.kind in (FrameKind.ASSIGNED, FrameKind.BIND):
            raise RelayProtocolError(f"a {frame.kind.name} frame is not the pump's to take")
        if frame.kind == FrameKind.OPEN:
            self._opened(frame.connection)
            return
        conn = self._connections.get(frame.connection)
        if conn is None:
            if frame.connection > self._highest:
                raise RelayProtocolError(
                    f"a {frame.kind.name} frame for connection {frame.connection}, never opened"
                )
            return  # closed already: a frame that crossed the close
        if frame.kind == FrameKind.DATA:
            conn.received_unacked += len(frame.data)
            if conn.received_unacked > self.bounds.window_bytes:
                raise RelayProtocolError(
                    f"connection {conn.id}: {conn.received_unacked} bytes unacknowledged, past "
                    f"the window of {self.bounds.window_bytes}"
                )
            self.bytes_in += len(frame.data)
            if conn.writer is None:  # still connecting locally: held, within the window
                conn.pending += frame.data
                return
            conn.writer.write(frame.data)
            conn.to_ack += len(frame.data)
            conn.ack_due.set()
        elif frame.kind == FrameKind.ACK:
            if frame.acked > conn.sent_unacked:
                raise RelayProtocolError(
                    f"connection {conn.id}: {frame.acked} bytes acknowledged, "
                    f"{conn.sent_unacked} were sent"
                )
            conn.sent_unacked -= frame.acked
            conn.credit.set()
        elif frame.kind == FrameKind.CLOSE:
            await self._drop(conn, tell=False)

    def _opened(self, conn_id: int) -> None:
        if self.is_relay:
            raise RelayProtocolError("only the relay opens connections")
        if conn_id != self._highest + 1:
            raise RelayProtocolError(f"connection {conn_id} opened out of order")
        if len(self._connections) >= self.bounds.max_connections:
            raise RelayProtocolError(
                f"more than {self.bounds.max_connections} connections open at once"
            )
        self._highest = conn_id
        conn = _Connection(conn_id)
        self._connections[conn_id] = conn
        conn.tasks = [asyncio.create_task(self._open_local(conn_id))]

    # -- closing ----------------------------------------------------------------------------

    async def _send_close(self, conn_id: int) -> None:
        if not self._closed:
            with contextlib.suppress(Exception):  # the stream is going: nothing to tell
                await self.send(Frame(FrameKind.CLOSE, conn_id))

    async def _drop(self, conn: _Connection, *, tell: bool) -> None:
        self._connections.pop(conn.id, None)
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()
        if conn.writer is not None:
            conn.writer.close()
        if tell:
            await self._send_close(conn.id)

    async def close(self) -> None:
        """End every connection (the stream is gone)."""
        self._closed = True
        for conn in list(self._connections.values()):
            await self._drop(conn, tell=False)
        if self._writer is not None:
            self._writer.cancel()

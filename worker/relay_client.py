"""A worker's end of its relay stream (`archipelago worker --outbound-only`).

A worker behind NAT or a firewall takes no inbound connection; it serves on loopback only
and keeps one outbound `Relay.Connect` stream open to a relay (the coordinator, by
default). The relay gives it an address on the relay's host (ASSIGNED) and carries each
connection made there over the stream; this end connects each to the worker's own server
on loopback (`proto.relay_link.RelayPump`). The worker registers the relay address as its
own, then binds the stream to its id (BIND), so nothing changes for whoever calls it.

When the stream ends, the worker opens a new one (waiting longer after each failure, up to
`MAX_RETRY_S`), registers again, same id, at the new address, and binds that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from proto.cluster_tls import ClientTls
from proto.relay_link import (
    Frame,
    FrameKind,
    RelayBounds,
    RelayProtocolError,
    RelayPump,
    frame_from_pb,
    frame_pb,
    open_relay_stream,
)
from proto.rpc import open_channel, token_metadata
from worker.coordinator_link import CoordinatorLink
from worker.credentials import NodeCredentials

log = logging.getLogger("archipelago.worker")

# An idle stream still carries a frame this often: NATs forget quiet mappings.
PING_S = 15.0
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 10.0
# The worker's own server on loopback answers at once, or not at all.
LOCAL_CONNECT_TIMEOUT_S = 5.0
# A stream that lived this long was a working one: the next failure starts the waits anew.
STABLE_S = 30.0


class RelayStream:
    """One open relay stream, carrying connections to `local` (HOST, PORT)."""

    def __init__(
        self, call: grpc.aio.StreamStreamCall, local: tuple[str, int], bounds: RelayBounds
    ) -> None:
        self.call = call
        self.bounds = bounds
        self.address = ""

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            async with asyncio.timeout(LOCAL_CONNECT_TIMEOUT_S):
                return await asyncio.open_connection(*local)

        self.pump = RelayPump(self._write, bounds, connect=connect)
        self._tasks: list[asyncio.Task[None]] = []

    async def _write(self, f: Frame) -> None:
        await self.call.write(frame_pb(f))

    async def start(self) -> str:
        """Wait for the relay's address, then carry connections; the address."""
        first = await self.call.read()
        if first is grpc.aio.EOF:
            raise RelayProtocolError("the relay ended the stream before giving an address")
        frame = frame_from_pb(first, self.bounds)
        if frame.kind != FrameKind.ASSIGNED:
            raise RelayProtocolError(f"the relay's first frame is {frame.kind.name}, not ASSIGNED")
        self.address = frame.address
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._ping())]
        return self.address

    async def _read(self) -> None:
        while True:
            m = await self.call.read()
            if m is grpc.aio.EOF:
                return
            await self.pump.receive(frame_from_pb(m, self.bounds))

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_S)
            await self.pump.send(Frame(FrameKind.PING))

    async def bind(self, credentials: NodeCredentials) -> None:
        await self.pump.send(
            Frame(
                FrameKind.BIND,
                worker_id=credentials.worker_id,
                credential=credentials.credential,
            )
        )

    async def ended(self) -> str:
        """Wait until the stream ends; why it did."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task.cancelled():
                return "cancelled"
            if task.exception() is not None:
                return repr(task.exception())
        with contextlib.suppress(Exception):
            await self.call
        code = await self.call.code()
        return f"{code.name}: {await self.call.details()}"

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.call.cancel()
        await self.pump.close()


class RelayClient:
    """Keeps a relay stream open for a worker serving on `local` (loopback)."""

    def __init__(
        self,
        relay: str,
        *,
        token: str,
        tls: ClientTls | None,
        local: tuple[str, int],
        credentials: NodeCredentials,
        bounds: RelayBounds | None = None,
    ) -> None:
        self.relay = relay
        self.token = token
        self.local = local
        self.credentials = credentials
        self.bounds = bounds or RelayBounds()
        self._channel = open_channel(relay, tls)
        self.stream: RelayStream | None = None

    async def open(self) -> str:
        """Open a stream; the address the relay gives this worker. grpc's error on refusal."""
        # The join token only: the stream is proved this worker's by BIND, once registered
        # (a restarted coordinator may not know the worker's credential yet).
        call = open_relay_stream(self._channel, token_metadata(self.token))
        stream = RelayStream(call, self.local, self.bounds)
        try:
            address = await stream.start()
        except BaseException:
            await stream.close()
            raise
        self.stream = stream
        log.info("reachable through relay %s at %s", self.relay, address)
        return address

    async def open_first(self) -> str:
        """`open`, trying again while the relay is unreachable (it may not be up yet);
        ValueError when it refuses this worker."""
        delay = FIRST_RETRY_S
        while True:
            try:
                return await self.open()
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise ValueError(f"relay {self.relay} refused this worker: {_why(e)}") from None
                log.warning("relay %s unreachable; trying again in %.1f s", self.relay, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_RETRY_S, 2 * delay)

    async def bind(self) -> None:
        """Tell the relay the stream is this (registered) worker's."""
        if self.stream is not None:
            await self.stream.bind(self.credentials)

    async def keep(self, rejoin: Callable[[str], Awaitable[None]]) -> None:
        """Forever: when the stream ends, open another and `rejoin` at its address (the
        worker registers there again), then bind it. A stream that ended soon after it
        opened (or failed to open) doubles the wait before the next try."""
        delay = FIRST_RETRY_S
        opened = asyncio.get_running_loop().time()
        while True:
            if self.stream is not None:
                why = await self.stream.ended()
                log.warning("relay stream to %s ended (%s); reconnecting", self.relay, why)
                await self.stream.close()
                self.stream = None
                if asyncio.get_running_loop().time() - opened > STABLE_S:
                    delay = FIRST_RETRY_S
                else:
                    await asyncio.sleep(delay)
                    delay = min(MAX_RETRY_S, 2 * delay)
            try:
                address = await self.open()
                opened = asyncio.get_running_loop().time()
                await rejoin(address)
                await self.bind()
            except Exception as e:  # this loop is all that keeps the worker reachable
                log.warning("relay %s: %s; trying again in %.1f s", self.relay, _why(e), delay)
                if self.stream is not None:
                    await self.stream.close()
                    self.stream = None
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY_S, 2 * delay)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        await self._channel.close()


def check_outbound_only(listen: str, advertise: str) -> None:
    """ValueError unless an outbound-only worker serves on loopback and advertises nothing
    of its own (the relay gives its address)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"--outbound-only serves on loopback only, not --listen {listen}")
    if advertise:
        raise ValueError("--outbound-only takes its address from the relay: drop --advertise")


async def reach_through_relay(relay: RelayClient, link: CoordinatorLink) -> None:
    """(A task beside the worker, once `link` registered at the first stream's address.)
    Bind that stream, then keep one open, registering again at each new one's address."""
    await relay.bind()

    async def rejoin(address: str) -> None:
        link.advertise = address
        await link.register()

    await relay.keep(rejoin)


def _why(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)

"""The coordinator as a relay for workers that take no inbound connection (behind NAT).

Such a worker (`archipelago worker --outbound-only`) opens a `Relay.Connect` stream here.
The relay listens on a fresh TCP port of its own host for it, says which in the stream's
first frame (ASSIGNED), and carries every connection made to that port over the stream
(`proto.relay_link`); the worker registers that address as its own, so the coordinator's
calls and its peers' reach it there, unchanged, TLS and all: the relay moves bytes, it
cannot read them.

Who may hold a port, and how many: a stream needs the join token (or a worker's
credential), and the relay holds at most `max_workers` streams, at most `max_per_host`
from one address (NAT puts several volunteers behind one). A port is the stream's alone
and closes with it; it is never handed to another stream. Once registered at its relay
address the worker says so on the stream (BIND, with its id and credential); a stream not
bound within `bind_timeout_s` is closed, so the join token alone holds a port only briefly.
A stream bound by a worker that already has one replaces the old one (which is closed): the
worker is reconnecting, and the old stream is a half-dead one it can no longer use. A BIND
is refused unless its credential proves the id and that worker is registered at this very
stream's address, so no one can bind, and so close, another worker's stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import grpc

from coordinator.registry import Registry
from coordinator.roles import Gatekeeper, Role, Unauthenticated
from proto.concurrency import peer_host
from proto.relay_link import (
    Frame,
    FrameKind,
    RelayBounds,
    RelayMessage,
    RelayProtocolError,
    RelayPump,
    frame_from_pb,
    frame_pb,
)
from proto.relay_link import add_relay_servicer as add_relay_handler
from proto.rpc import worker_metadata

log = logging.getLogger("archipelago.coordinator")

DEFAULT_MAX_RELAYED_WORKERS = 64
DEFAULT_MAX_RELAYED_PER_HOST = 8
DEFAULT_BIND_TIMEOUT_S = 60.0
MAX_PORT_TRIES = 16
WILDCARDS = frozenset({"0.0.0.0", "::", "[::]"})


@dataclass(frozen=True)
class RelayConfig:
    """How the coordinator relays (built from its command line)."""

    # The address relay ports listen on and are given out at: one the peers can reach
    # ("": the coordinator's own --host).
    host: str = ""
    max_workers: int = DEFAULT_MAX_RELAYED_WORKERS  # 0: no relaying
    max_per_host: int = DEFAULT_MAX_RELAYED_PER_HOST
    bind_timeout_s: float = DEFAULT_BIND_TIMEOUT_S
    bounds: RelayBounds = field(default_factory=RelayBounds)

    def __post_init__(self) -> None:
        if self.max_workers < 0 or self.max_per_host < 1:
            raise ValueError(
                "--max-relayed-workers must be 0 or more and the per-host bound at least 1"
            )
        if self.max_workers and self.host in WILDCARDS:
            raise ValueError(
                f"relay ports need an address peers can dial, not {self.host!r} "
                "(--relay-host, or --max-relayed-workers 0)"
            )


def relay_hub(
    config: RelayConfig, coordinator_host: str, registry: Registry, gate: Gatekeeper
) -> RelayHub:
    """The hub for `config`, its ports on `coordinator_host` unless it names a host; one
    bound to a wildcard address relays nobody (a warning says why)."""
    host = config.host or coordinator_host
    if config.max_workers and host in WILDCARDS:
        log.warning(
            "relaying no workers: --host %s is no address peers can dial (give --relay-host)",
            host,
        )
        return RelayHub(replace(config, host="", max_workers=0), registry, gate)
    return RelayHub(replace(config, host=host), registry, gate)


@dataclass(eq=False)
class RelayedStream:
    """One worker's relay stream, as the hub knows it."""

    address: str  # HOST:PORT peers dial
    host: str  # the worker's address as the relay sees it (its NAT's)
    pump: RelayPump
    opened_at: float = field(default_factory=time.monotonic)
    worker_id: str = ""  # "" until bound
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class RelayRefused(Exception):
    """A stream the relay does not take; `code` is the status to end it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class RelayHub:
    """Every relay stream: the bounds on them, their binding to workers, who is relayed."""

    def __init__(self, config: RelayConfig, registry: Registry, gate: Gatekeeper) -> None:
        self.config = config
        self.registry = registry
        self.gate = gate
        self.streams: list[RelayedStream] = []

    def addresses(self) -> frozenset[str]:
        """The relay addresses in use: a worker registered at one is relayed."""
        return frozenset(s.address for s in self.streams)

    def relayed(self, address: str) -> bool:
        return any(s.address == address for s in self.streams)

    def admit(self, host: str) -> None:
        """Raise RelayRefused when a new stream from `host` is past a bound."""
        if not self.config.max_workers:
            raise RelayRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this coordinator relays no workers (--max-relayed-workers 0)",
            )
        if len(self.streams) >= self.config.max_workers:
            raise RelayRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the relay carries {len(self.streams)} workers, the most it may "
                f"(--max-relayed-workers {self.config.max_workers})",
            )
        held = sum(s.host == host for s in self.streams)
        if held >= self.config.max_per_host:
            raise RelayRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{host} holds {held} relay streams, the most one address may "
                f"({self.config.max_per_host})",
            )

    def bind(self, stream: RelayedStream, worker_id: str, credential: str) -> RelayedStream | None:
        """Bind `stream` to the worker the credential proves; the stream it replaces, if
        any. RelayRefused when the credential is wrong or the worker is not registered at
        this stream's address."""
        try:
            proved = self.gate.worker(worker_metadata(worker_id, credential))
        except Unauthenticated as e:
            raise RelayRefused(grpc.StatusCode.UNAUTHENTICATED, f"BIND: {e}") from None
        w = self.registry.get(proved or "")
        if w is None or w.address != stream.address:
            raise RelayRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"BIND: worker {worker_id[:64]!r} is not registered at this stream's "
                f"address {stream.address}",
            )
        if stream.worker_id and stream.worker_id != w.worker_id:
            raise RelayRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"BIND: this stream is worker {stream.worker_id}'s already",
            )
        old = next(
            (s for s in self.streams if s.worker_id == w.worker_id and s is not stream), None
        )
        stream.worker_id = w.worker_id
        if old is not None:
            old.ended.set()
        return old

    async def serve(
        self, requests: AsyncIterator[RelayMessage], context: grpc.aio.ServicerContext
    ) -> None:
        """One stream, from the first frame to the end; raises RelayRefused to end it."""
        try:
            caller = self.gate.identify(context.invocation_metadata())
        except Unauthenticated as e:
            raise RelayRefused(grpc.StatusCode.UNAUTHENTICATED, f"Relay: {e}") from None
        if caller.role not in (Role.VOLUNTEER, Role.WORKER):
            raise RelayRefused(
                grpc.StatusCode.PERMISSION_DENIED, f"Relay is for workers; {caller} is not one"
            )
        host = peer_host(context.peer() or "")
        self.admit(host)
        bounds = self.config.bounds

        async def send(f: Frame) -> None:
            await context.write(frame_pb(f))

        pump = RelayPump(send, bounds)
        stream: RelayedStream | None = None

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peername = writer.get_extra_info("peername")
            await pump.attach(reader, writer, peer=str(peername[0]) if peername else "")

        server, address = await self._listen(accepted)
        try:
            stream = RelayedStream(address=address, host=host, pump=pump)
            self.streams.append(stream)
            await pump.send(Frame(FrameKind.ASSIGNED, address=stream.address))
            log.info("relaying %s for a worker at %s", stream.address, host)
            reading = asyncio.create_task(self._read(stream, requests))
            ended = asyncio.create_task(stream.ended.wait())
            done, _ = await asyncio.wait(
                {reading, ended},
                timeout=self.config.bind_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done and not stream.worker_id:
                reading.cancel()
                ended.cancel()
                raise RelayRefused(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no worker registered at {stream.address} within "
                    f"{self.config.bind_timeout_s:.0f} s",
                )
            if not done:
                done, _ = await asyncio.wait({reading, ended}, return_when=asyncio.FIRST_COMPLETED)
            for task in (reading, ended):
                if task not in done:
                    task.cancel()
            if reading in done:
                reading.result()  # its refusal, if any
            else:
                raise RelayRefused(
                    grpc.StatusCode.ABORTED, "replaced by a newer stream of the same worker"
                )
        finally:
            server.close()
            await pump.close()
            if stream is not None and stream in self.streams:
                self.streams.remove(stream)
                log.info("relay port %s closed", stream.address)

    async def _listen(
        self, accepted: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> tuple[asyncio.Server, str]:
        """A fresh port for one stream. The system reuses ports, and the planner leaves out
        an address that a bad worker had (`coordinator.exclusions`): a port whose address
        is excluded is given up for another, so no worker inherits another's exclusion."""
        exclusions = self.registry.exclusions
        given_up: list[asyncio.Server] = []  # held until the end, so none comes back
        try:
            for _ in range(MAX_PORT_TRIES):
                server = await asyncio.start_server(accepted, host=self.config.host, port=0)
                address = f"{self.config.host}:{server.sockets[0].getsockname()[1]}"
                if exclusions is None or not exclusions.excluded_address(address):
                    return server, address
                given_up.append(server)
        finally:
            for s in given_up:
                s.close()
        raise RelayRefused(grpc.StatusCode.UNAVAILABLE, "no free relay port; try again later")

    async def _read(self, stream: RelayedStream, requests: AsyncIterator[RelayMessage]) -> None:
        try:
            async for m in requests:
                frame = frame_from_pb(m, self.config.bounds)
                if frame.kind == FrameKind.BIND:
                    self.bind(stream, frame.worker_id, frame.credential)
                    log.info("relay port %s is worker %s's", stream.address, stream.worker_id)
                    continue
                await stream.pump.receive(frame)
        except RelayProtocolError as e:
            raise RelayRefused(grpc.StatusCode.INVALID_ARGUMENT, f"Relay: {e}") from None


def add_relay_servicer(server: grpc.aio.Server, hub: RelayHub) -> None:
    """Serve `hub`'s streams on `server`; a refusal ends a stream with its status and message."""

    async def connect(
        requests: AsyncIterator[RelayMessage], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            await hub.serve(requests, context)
        except RelayRefused as e:
            log.info("relay stream from %s ended: %s", context.peer(), e)
            await context.abort(e.code, str(e))
        except Exception:
            log.exception("relay stream from %s failed", context.peer())
            raise

    add_relay_handler(server, connect)

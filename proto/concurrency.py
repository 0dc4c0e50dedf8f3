"""Bounds on the calls a gRPC server serves at once, in all and per peer address.

`bounded_server` builds a `grpc.aio.Server` whose `CallLimit` interceptor refuses a call past
either bound with RESOURCE_EXHAUSTED and a message naming the bound and its flag, before
the handler runs; grpc's own `maximum_concurrent_rpcs` stands behind it, at twice the bound,
for calls that never reach a handler. A peer is its IP address (an IPv6 peer, its /64: one
host holds a whole /64), whatever connections or ports it opens.

Any handler behind the interceptor may raise `LimitExceeded` to end its call with
RESOURCE_EXHAUSTED and the exception's message (the registration limit does), and may ask
`caller_host()` whose call it is serving (a handler that returns one answer).

Part of the wire: it imports nothing of ours, so every side may use it.
"""

from __future__ import annotations

import argparse
import contextvars
import inspect
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class LimitExceeded(Exception):
    """A bound is reached; the message names it (and the flag that sets it)."""


@dataclass(frozen=True)
class RpcLimits:
    """How many calls one server serves at once: in all, and from one peer address."""

    max_concurrent: int
    max_per_peer: int

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_per_peer < 1:
            raise ValueError(
                f"--max-rpcs ({self.max_concurrent}) and --max-rpcs-per-peer "
                f"({self.max_per_peer}) must be at least 1"
            )


# The coordinator serves every worker and user (heart-beats, reports, watches); a worker
# serves its coordinator and a few peers. One address may hold a fair share of either: the
# fuzz tests keep 96 calls in flight from one address, a pipeline's peers a handful each.
COORDINATOR_RPC_LIMITS = RpcLimits(max_concurrent=1024, max_per_peer=128)
WORKER_RPC_LIMITS = RpcLimits(max_concurrent=256, max_per_peer=128)

_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("archipelago_caller", default="")


def caller_host() -> str:
    """The peer (as `peer_host` names it) whose call is being served; "" outside a call."""
    return _CALLER.get()


def peer_host(peer: str) -> str:
    """The address a call's peer (`context.peer()`: "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")
    is counted under: its IP without the port; for IPv6, its /64."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer  # a unix socket: one local peer
    host = rest.rpartition(":")[0].strip("[]").partition("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host or peer
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class CallLimit(grpc.aio.ServerInterceptor):
    """Counts the calls being served, in all and by peer, and refuses one past a bound."""

    def __init__(self, limits: RpcLimits) -> None:
        self.limits = limits
        self.active = 0
        self.by_peer: dict[str, int] = {}

    def _enter(self, host: str) -> str | None:
        """Count a call in; or the refusal's message when a bound is reached."""
        if self.active >= self.limits.max_concurrent:
            return (
                f"this server is serving {self.active} calls, its limit (--max-rpcs "
                f"{self.limits.max_concurrent}); retry later"
            )
        held = self.by_peer.get(host, 0)
        if held >= self.limits.max_per_peer:
            return (
                f"{host} has {held} calls in progress on this server, the most one address "
                f"may have (--max-rpcs-per-peer {self.limits.max_per_peer}); retry later"
            )
        self.active += 1
        self.by_peer[host] = held + 1
        return None

    def _leave(self, host: str) -> None:
        self.active -= 1
        left = self.by_peer[host] - 1
        if left:
            self.by_peer[host] = left
        else:
            del self.by_peer[host]  # the table holds only peers with calls in progress

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # no such method: grpc answers UNIMPLEMENTED
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        behaviour = getattr(handler, kind)
        if behaviour is None:
            return handler
        wrapped = self._streaming(behaviour) if _yields(behaviour) else self._unary(behaviour)
        # Every grpc handler is a namedtuple (grpc's _RpcMethodHandler).
        replaced: grpc.RpcMethodHandler = handler._replace(**{kind: wrapped})
        return replaced

    def _unary(self, behaviour: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            host = peer_host(context.peer() or "")
            refusal = self._enter(host)
            if refusal is not None:
                await context.abort(RESOURCE_EXHAUSTED, refusal)
            token = _CALLER.set(host)
            try:
                return await behaviour(request, context)
            except LimitExceeded as e:
                await context.abort(RESOURCE_EXHAUSTED, str(e))
            finally:
                self._leave(host)
                _CALLER.reset(token)

        return limited

    def _streaming(self, behaviour: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            host = peer_host(context.peer() or "")
            refusal = self._enter(host)
            if refusal is not None:
                await context.abort(RESOURCE_EXHAUSTED, refusal)
            # No caller_host() here: a generator may be closed from another context, where
            # a context variable could not be reset.
            try:
                async for reply in behaviour(request, context):
                    yield reply
            except LimitExceeded as e:
                await context.abort(RESOURCE_EXHAUSTED, str(e))
            finally:
                self._leave(host)

        return limited


def _yields(behaviour: Callable[..., Any]) -> bool:
    """Whether a handler streams its answers by yielding them (else it returns one, or
    writes them with `context.write` and returns)."""
    return inspect.isasyncgenfunction(behaviour)


def bounded_server(
    limits: RpcLimits,
    *,
    options: Sequence[tuple[str, Any]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> grpc.aio.Server:
    """A grpc.aio server that serves at most `limits` calls at once (in all, per peer);
    `interceptors` run after the limit, so a refused call costs them nothing."""
    return grpc.aio.server(
        options=list(options),
        interceptors=[CallLimit(limits), *interceptors],
        maximum_concurrent_rpcs=2 * limits.max_concurrent,
    )


def positive_int(text: str) -> int:
    """A flag's whole number >= 1, written plainly or as 1e9."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(value)


def add_rpc_limit_flags(parser: argparse._ActionsContainer, defaults: RpcLimits) -> None:
    """The --max-rpcs and --max-rpcs-per-peer options of a serving command."""
    parser.add_argument(
        "--max-rpcs",
        type=positive_int,
        default=defaults.max_concurrent,
        metavar="N",
        help=f"calls served at once; more are refused (default {defaults.max_concurrent})",
    )
    parser.add_argument(
        "--max-rpcs-per-peer",
        type=positive_int,
        default=defaults.max_per_peer,
        metavar="N",
        help="calls served at once for one peer address (an IPv6 /64); more are refused "
        f"(default {defaults.max_per_peer})",
    )


def rpc_limits_from_flags(args: argparse.Namespace) -> RpcLimits:
    """The limits --max-rpcs and --max-rpcs-per-peer ask for."""
    return RpcLimits(max_concurrent=args.max_rpcs, max_per_peer=args.max_rpcs_per_peer)

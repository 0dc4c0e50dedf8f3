"""The coordinator's and workers' bounds on callers: calls served at once (in all, per
peer address), registrations per address and live workers; their messages, and their flags."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from archipelago.cli import build_parser
from coordinator.limits import (
    CoordinatorLimits,
    RegistrationLimiter,
    RegistrationLimits,
    coordinator_limits_from_flags,
)
from coordinator.planning.spec_limits import GB, SpecLimits
from coordinator.registry import Registry
from coordinator.states import WorkerStatus
from coordinator.worker_admission import Registration, WorkerAdmission
from proto.concurrency import (
    COORDINATOR_RPC_LIMITS,
    WORKER_RPC_LIMITS,
    CallLimit,
    LimitExceeded,
    RpcLimits,
    bounded_server,
    caller_host,
    peer_host,
    rpc_limits_from_flags,
)
from tests.unit.test_credentials import FakeManager, gate_with

# -- registrations ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def join(registry: Registry, n: int = 1) -> None:
    for i in range(n):
        registry.register(
            name=f"w{i}", address=f"10.0.0.1:{7000 + i}", gflops=1.0, memory_bytes=1, device="cpu",
            threads=1,
        )  # fmt: skip


def test_registrations_past_the_rate_of_one_address_are_refused() -> None:
    clock, registry = Clock(), Registry(timeout_s=5)
    limiter = RegistrationLimiter(RegistrationLimits(per_address_per_minute=3), clock=clock)
    for _ in range(3):
        limiter.admit("10.0.0.1", registry)
    with pytest.raises(LimitExceeded) as info:
        limiter.admit("10.0.0.1", registry)
    assert str(info.value) == (
        "registration refused: 10.0.0.1 registered 3 workers in the last minute, the most one "
        "address may (--registrations-per-minute 3)"
    )
    limiter.admit("10.0.0.2", registry)  # another address has its own allowance
    clock.now += 30
    with pytest.raises(LimitExceeded):
        limiter.admit("10.0.0.1", registry)
    clock.now += 30.5  # a minute after the first three: the window has moved past them
    limiter.admit("10.0.0.1", registry)


def test_refused_registrations_do_not_use_up_the_allowance() -> None:
    clock, registry = Clock(), Registry(timeout_s=5)
    limiter = RegistrationLimiter(RegistrationLimits(per_address_per_minute=1), clock=clock)
    limiter.admit("10.0.0.1", registry)
    for _ in range(100):
        clock.now += 0.5
        with pytest.raises(LimitExceeded):
            limiter.admit("10.0.0.1", registry)
    clock.now += 10.5  # 60.5 s after the one admitted
    limiter.admit("10.0.0.1", registry)


def test_old_addresses_are_forgotten() -> None:
    clock, registry = Clock(), Registry(timeout_s=5)
    limiter = RegistrationLimiter(RegistrationLimits(), clock=clock)
    for i in range(500):
        limiter.admit(f"10.1.{i // 250}.{i % 250}", registry)
    clock.now += 61
    limiter.admit("10.0.0.1", registry)
    assert list(limiter._admitted) == ["10.0.0.1"]


def test_live_workers_past_the_cap_are_refused_but_a_returning_one_is_not() -> None:
    registry = Registry(timeout_s=5)
    limiter = RegistrationLimiter(RegistrationLimits(max_workers=3), clock=Clock())
    join(registry, 3)
    with pytest.raises(LimitExceeded) as info:
        limiter.admit("10.0.0.9", registry)
    assert str(info.value) == (
        "registration refused: 3 workers are registered, the most this coordinator takes "
        "(--max-workers 3)"
    )
    # A worker that comes back under its own id is one of them already.
    limiter.admit("10.0.0.9", registry, next(iter(registry.workers)))
    # Lost workers do not count.
    next(iter(registry.workers.values())).state = WorkerStatus.LOST
    limiter.admit("10.0.0.9", registry)


def test_registration_limits_are_at_least_one() -> None:
    with pytest.raises(ValueError, match="--registrations-per-minute and --max-workers"):
        RegistrationLimits(max_workers=0)


# -- calls at once -----------------------------------------------------------------------------


def test_peer_host_counts_an_ip_without_its_port_and_an_ipv6_host_by_its_64() -> None:
    assert peer_host("ipv4:127.0.0.1:52814") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:52814") == "::/64"
    assert peer_host("ipv6:[2001:db8:1:2:3:4:5:6]:443") == "2001:db8:1:2::/64"
    assert peer_host("ipv6:[2001:db8:1:2::9]:1") == "2001:db8:1:2::/64"
    assert peer_host("ipv6:[::ffff:10.1.2.3]:80") == "10.1.2.3"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"


class Served:
    """A loopback server whose calls wait until released, behind a CallLimit."""

    def __init__(self, limits: RpcLimits) -> None:
        self.limit = CallLimit(limits)
        self.release = asyncio.Event()
        self.server = grpc.aio.server(interceptors=[self.limit])
        self.port = 0

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self.release.wait()
        return b"done"

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield b"first"
        await self.release.wait()
        yield b"last"

    async def who(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return caller_host().encode()

    async def refuse(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise LimitExceeded("a bound of the handler's own (--some-flag 1)")

    async def __aenter__(self) -> Served:
        handlers = {
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
            "Who": grpc.unary_unary_rpc_method_handler(self.who),
            "Refuse": grpc.unary_unary_rpc_method_handler(self.refuse),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Limits", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(grace=0)

    def call(self, method: str) -> Any:
        return self.channel.unary_unary(f"/test.Limits/{method}")(b"", timeout=10)

    async def until(self, active: int) -> None:
        for _ in range(200):
            if self.limit.active == active:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.limit.active} calls active, not {active}")


async def refused(call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return str(info.value.details())


def test_calls_past_the_bound_per_peer_are_refused_and_their_slots_come_back() -> None:
    async def go() -> None:
        async with Served(RpcLimits(max_concurrent=10, max_per_peer=2)) as s:
            held = [asyncio.ensure_future(s.call("Hold")) for _ in range(2)]
            await s.until(2)
            assert await refused(s.call("Hold")) == (
                "127.0.0.1 has 2 calls in progress on this server, the most one address may "
                "have (--max-rpcs-per-peer 2); retry later"
            )
            s.release.set()
            assert await asyncio.gather(*held) == [b"done", b"done"]
            await s.until(0)
            assert s.limit.by_peer == {}
            assert await s.call("Hold") == b"done"

    asyncio.run(go())


def test_calls_past_the_bound_of_the_server_are_refused() -> None:
    async def go() -> None:
        async with Served(RpcLimits(max_concurrent=2, max_per_peer=5)) as s:
            held = [asyncio.ensure_future(s.call("Hold")) for _ in range(2)]
            await s.until(2)
            assert await refused(s.call("Who")) == (
                "this server is serving 2 calls, its limit (--max-rpcs 2); retry later"
            )
            s.release.set()
            await asyncio.gather(*held)

    asyncio.run(go())


def test_a_stream_holds_its_slot_until_it_ends_or_is_cancelled() -> None:
    async def go() -> None:
        async with Served(RpcLimits(max_concurrent=10, max_per_peer=1)) as s:
            stream = s.channel.unary_stream("/test.Limits/Stream")(b"", timeout=10)
            assert await stream.read() == b"first"
            await s.until(1)
            assert "--max-rpcs-per-peer 1" in await refused(s.call("Who"))
            stream.cancel()
            await s.until(0)
            assert await s.call("Who") == b"127.0.0.1"

    asyncio.run(go())


def test_a_handler_raising_limit_exceeded_ends_its_call_with_resource_exhausted() -> None:
    async def go() -> None:
        async with Served(RpcLimits(max_concurrent=10, max_per_peer=10)) as s:
            assert await refused(s.call("Refuse")) == "a bound of the handler's own (--some-flag 1)"
            await s.until(0)

    asyncio.run(go())


async def caller(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return caller_host().encode()


def test_bounded_server_serves_within_its_limits() -> None:
    async def go() -> None:
        server = bounded_server(RpcLimits(1, 1), options=[])
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Limits", {"Who": grpc.unary_unary_rpc_method_handler(caller)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            who = channel.unary_unary("/test.Limits/Who")
            assert await who(b"", timeout=10) == b"127.0.0.1"
        await server.stop(grace=0)

    asyncio.run(go())


# -- the flags -------------------------------------------------------------------------------


def test_coordinator_flags_default_to_the_limits_defaults() -> None:
    args = build_parser().parse_args(["coordinator", "--token", "secret-token"])
    assert coordinator_limits_from_flags(args) == CoordinatorLimits()
    assert CoordinatorLimits().rpc == COORDINATOR_RPC_LIMITS


def test_coordinator_flags_set_every_limit() -> None:
    flags = (
        "--max-spec-bytes 1000 --max-spec-depth 5 --max-spec-nodes 50 --max-batch-size 64 "
        "--max-micro-batches 8 --max-steps 100 --max-model-params 5e6 --max-model-memory-gb 2 "
        "--max-model-operators 900 --max-rpcs 40 --max-rpcs-per-peer 4 "
        "--registrations-per-minute 5 --max-workers 20"
    )
    args = build_parser().parse_args(["coordinator", "--token", "secret-token", *flags.split()])
    assert coordinator_limits_from_flags(args) == CoordinatorLimits(
        spec=SpecLimits(
            max_bytes=1000,
            max_depth=5,
            max_nodes=50,
            max_batch_size=64,
            max_micro_batches=8,
            max_steps=100,
            max_parameters=5_000_000,
            max_memory_bytes=2 * GB,
            max_operators=900,
        ),
        rpc=RpcLimits(max_concurrent=40, max_per_peer=4),
        registration=RegistrationLimits(per_address_per_minute=5, max_workers=20),
    )


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "lots"])
def test_a_limit_flag_that_is_no_whole_number_of_at_least_one_is_a_usage_error(value: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["coordinator", "--token", "secret-token", "--max-workers", value]
        )


def test_worker_flags_set_its_rpc_limits() -> None:
    base = ["worker", "--token", "secret-token"]
    assert rpc_limits_from_flags(build_parser().parse_args(base)) == WORKER_RPC_LIMITS
    args = build_parser().parse_args([*base, "--max-rpcs", "9", "--max-rpcs-per-peer", "3"])
    assert rpc_limits_from_flags(args) == RpcLimits(max_concurrent=9, max_per_peer=3)


# -- the admission path ----------------------------------------------------------------------


def test_admission_refuses_past_the_rate_and_stores_nothing_of_the_refused() -> None:
    manager = FakeManager()
    manager.limits = CoordinatorLimits(registration=RegistrationLimits(per_address_per_minute=2))
    gate = gate_with()
    admission = WorkerAdmission(gate.registry, manager, gate=gate)  # type: ignore[arg-type]
    for i in range(2):
        asyncio.run(
            admission.admit(Registration(f"w{i}", f"127.0.0.1:{7100 + i}", 1.0, 1, "cpu", 1))
        )
    with pytest.raises(LimitExceeded, match=r"\(--registrations-per-minute 2\)$"):
        asyncio.run(admission.admit(Registration("w2", "127.0.0.1:7102", 1.0, 1, "cpu", 1)))
    assert sorted(w.name for w in gate.registry.workers.values()) == ["w0", "w1"]
    assert len(manager.saved) == 2

"""The one retry policy for gRPC calls: bounded waits that back off, only the codes given
are retried, and a refusal or the last failure surfaces as it came."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from proto.retry import RetryPolicy, retry

pytestmark = pytest.mark.unit


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="no")


def test_waits_back_off_to_the_cap_and_stop_after_the_last_attempt() -> None:
    policy = RetryPolicy(attempts=6, first_delay_s=0.2, backoff=2.0, max_delay_s=1.0)
    assert list(policy.delays()) == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.total_wait_s == pytest.approx(3.4)
    endless = RetryPolicy(attempts=None, first_delay_s=0.5, backoff=1.0, max_delay_s=0.5)
    waits = endless.delays()
    assert [next(waits) for _ in range(100)] == [0.5] * 100
    assert endless.total_wait_s == float("inf")


def test_jitter_only_shortens_a_wait() -> None:
    policy = RetryPolicy(attempts=50, first_delay_s=1.0, backoff=1.0, max_delay_s=1.0, jitter=0.5)
    waits = list(policy.delays(random.Random(3)))
    assert all(0.5 <= w <= 1.0 for w in waits) and len(set(waits)) > 1
    assert policy.total_wait_s == 49.0


@pytest.mark.parametrize(
    "settings",
    [
        {"attempts": 0, "first_delay_s": 0.1},
        {"attempts": 3, "first_delay_s": 0.0},  # no busy loops
        {"attempts": 3, "first_delay_s": 0.1, "backoff": 0.5},
        {"attempts": 3, "first_delay_s": 1.0, "max_delay_s": 0.5},
        {"attempts": 3, "first_delay_s": 0.1, "jitter": 1.0},
    ],
)
def test_a_policy_that_is_not_bounded_or_would_spin_is_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**settings)


def test_retry_returns_once_a_retried_failure_passes_and_reports_each_retry() -> None:
    failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    seen: list[tuple[grpc.StatusCode, float]] = []

    async def call() -> str:
        if failures:
            raise rpc_error(failures.pop(0))
        return "done"

    policy = RetryPolicy(attempts=3, first_delay_s=0.01, backoff=2.0, max_delay_s=1.0)
    result = asyncio.run(
        retry(
            call,
            policy,
            retry_on={grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED},
            on_retry=lambda e, wait: seen.append((e.code(), wait)),
        )
    )
    assert result == "done"
    assert seen == [(grpc.StatusCode.UNAVAILABLE, 0.01), (grpc.StatusCode.DEADLINE_EXCEEDED, 0.02)]


def test_a_code_not_given_and_the_last_failure_surface_unchanged() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(grpc.StatusCode.UNAUTHENTICATED)

    policy = RetryPolicy(attempts=5, first_delay_s=0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(retry(refused, policy, retry_on={grpc.StatusCode.UNAVAILABLE}))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and calls == 1

    async def away() -> None:
        nonlocal calls
        calls += 1
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)

    calls = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(retry(away, policy, retry_on={grpc.StatusCode.UNAVAILABLE}))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and calls == 5

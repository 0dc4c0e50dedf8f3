"""Retrying a gRPC call that failed for a reason that may pass (a peer restarting, a link
dropping for a moment), by one bounded policy instead of a loop at each call site.

A `RetryPolicy` says how many tries and how long to wait between them; `retry` makes the
call under it and retries only the status codes it is given, so a refusal (a wrong token,
a bad argument) surfaces at once. Waits are never zero: no busy loops.

gRPC's own retry policy (a channel's service config) is not used: it cannot re-send a
client stream larger than its retry buffer (a checkpoint upload, a transfer), and callers
here log, re-register or give up by codes in their own ways.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a failing call is retried.

    At most `attempts` tries (None: until it succeeds or fails with a code not retried).
    After the first failure it waits `first_delay_s`, then `backoff` times longer after
    each further one, never more than `max_delay_s`. `jitter` (in [0, 1)) shortens each
    wait by up to that fraction at random, so many callers do not retry in step; a wait
    is never longer than the policy's bound.
    """

    attempts: int | None
    first_delay_s: float
    backoff: float = 2.0
    max_delay_s: float = 30.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts: at least 1, or None for no limit, not {self.attempts}")
        if not (math.isfinite(self.first_delay_s) and self.first_delay_s > 0):
            raise ValueError(f"first_delay_s: a positive number, not {self.first_delay_s}")
        if not (math.isfinite(self.backoff) and self.backoff >= 1.0):
            raise ValueError(f"backoff: a factor of at least 1, not {self.backoff}")
        if not (math.isfinite(self.max_delay_s) and self.max_delay_s >= self.first_delay_s):
            raise ValueError(
                f"max_delay_s: at least first_delay_s ({self.first_delay_s}), "
                f"not {self.max_delay_s}"
            )
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter: a fraction in [0, 1), not {self.jitter}")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits between tries, in order: one fewer than `attempts` (endless if None)."""
        for bound in self._bounds():
            yield bound * (1.0 - (rng or random).random() * self.jitter) if self.jitter else bound

    @property
    def total_wait_s(self) -> float:
        """The longest time spent waiting between tries (inf without an attempt limit)."""
        return math.inf if self.attempts is None else sum(self._bounds())

    def _bounds(self) -> Iterator[float]:
        """The longest each wait may be: the backoff progression, capped."""
        waits = itertools.count() if self.attempts is None else range(self.attempts - 1)
        delay = self.first_delay_s
        for _ in waits:
            yield delay
            delay = min(self.max_delay_s, delay * self.backoff)


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retry_on: Collection[grpc.StatusCode],
    on_retry: Callable[[grpc.aio.AioRpcError, float], object] | None = None,
) -> T:
    """The result of `call()`, retried under `policy` while it fails with a code in
    `retry_on`. Any other failure, or that of the last try, is raised as it came.
    `on_retry(error, wait_s)` is told of each failure that will be retried (to log it).

    `call` must make a fresh call each time it is invoked (a fresh request stream too).
    """
    waits = policy.delays()
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as e:
            if e.code() not in retry_on:
                raise
            wait = next(waits, None)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(e, wait)
            await asyncio.sleep(wait)

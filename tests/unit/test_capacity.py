"""The bounds on what a worker may claim, and the speeds the planner believes instead."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.capacity import (
    MAX_CLAIMED_GFLOPS,
    UNMEASURED_GFLOPS,
    Capacity,
    check_claim,
)
from coordinator.events import CLUSTER, EventLog
from coordinator.registry import Registry, WorkerState
from coordinator.store import open_store
from coordinator.worker_admission import Registration, check_registration

pytestmark = pytest.mark.unit


def registration(**claims: float) -> Registration:
    figures = {"gflops": 50.0, "memory_bytes": 8 << 30, "threads": 4, **claims}
    return Registration(
        name="w",
        address="127.0.0.1:5000",
        gflops=float(figures["gflops"]),
        memory_bytes=int(figures["memory_bytes"]),
        device="cpu",
        threads=int(figures["threads"]),
    )


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"gflops": 1e9}, "claimed speed 1e\\+09 GFLOP/s is above"),
        ({"gflops": float("nan")}, "not a finite number"),
        ({"gflops": float("inf")}, "not a finite number"),
        ({"gflops": -1.0}, "not a finite number"),
        ({"memory_bytes": 2**63}, "claimed memory 9223372036854775808 bytes is above the 64 TiB"),
        ({"threads": 1 << 20}, "at most 4096"),
    ],
)
def test_a_registration_claiming_what_no_worker_has_is_refused(
    claims: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_registration(registration(**claims), ())


def test_plausible_claims_pass_up_to_the_bound() -> None:
    check_registration(registration(), ())
    check_claim(MAX_CLAIMED_GFLOPS, 1 << 46, 4096)
    check_claim(0.0, 0, 0)  # a worker that could not measure itself still joins


def registry_with(capacity: Capacity, claims: dict[str, float]) -> Registry:
    registry = Registry(timeout_s=5.0)
    registry.capacity = capacity
    for wid, gflops in claims.items():
        registry.workers[wid] = WorkerState(
            worker_id=wid, name=wid, address="127.0.0.1:1", gflops=gflops
        )
    return registry


def test_unmeasured_claims_are_planned_at_a_low_figure_never_above_the_claim(
    tmp_path: Path,
) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        registry = registry_with(Capacity(store), {"a": 50.0, "fake": MAX_CLAIMED_GFLOPS, "c": 2.0})
        speeds = {s.worker_id: s.gflops for s in registry.free()}
        assert speeds == {"a": UNMEASURED_GFLOPS, "fake": UNMEASURED_GFLOPS, "c": 2.0}


def test_measured_workers_bound_the_unmeasured_and_a_liar_gets_its_measurement(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            capacity = Capacity(store, EventLog(store))
            claims = {"a": 40.0, "b": 60.0, "c": 50.0, "liar": 1e5, "new": 1e5}
            registry = registry_with(capacity, claims)
            # Honest workers reach a quarter of their matmul speed on real operators; the
            # liar reaches what a 20 GFLOP/s machine would.
            for wid in ("a", "b", "c"):
                capacity.note(wid, wid, claims[wid], 0.25 * claims[wid] * 1e9)
            capacity.note("liar", "liar", claims["liar"], 0.25 * 20.0 * 1e9)
            await capacity.flush()
            speeds = {s.worker_id: s.gflops for s in registry.free()}
            assert speeds["a"] == pytest.approx(40.0) and speeds["b"] == pytest.approx(60.0)
            assert speeds["liar"] == pytest.approx(20.0)
            # Not measured yet: the median of the measured figures, not its claim.
            assert speeds["new"] == pytest.approx(45.0)
            [event] = await EventLog(store).since(CLUSTER)
            assert event["kind"] == "capacity_doubted" and event["worker_id"] == "liar"
            assert "claimed 1e+05 GFLOP/s; measured 20 GFLOP/s" in event["text"]
            # A restarted coordinator believes the same figures.
            again = Capacity(store)
            await again.load()
            assert again.believed("liar", 1e5) == pytest.approx(20.0)
            assert again.believed("new", 1e5) == pytest.approx(45.0)

    asyncio.run(run())


def test_a_measurement_never_lifts_a_worker_above_its_claim(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        capacity = Capacity(store)
        capacity.note("a", "a", 10.0, 0.5 * 10.0e9)
        capacity.note("b", "b", 10.0, 0.5 * 10.0e9)
        # Reports its profile 100x faster than its claim allows.
        capacity.note("boaster", "boaster", 10.0, 0.5 * 1000.0e9)
        assert capacity.believed("boaster", 10.0) == 10.0
        capacity.note("nan", "nan", 10.0, float("nan"))
        assert capacity.measured("nan") is None

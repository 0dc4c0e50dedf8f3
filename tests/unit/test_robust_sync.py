"""A sync group of three replicas without a network, with `sync.aggregate: median`: every
member is told the aggregate, leaves a step with bitwise the same combined gradient, leaves
out a share whose sign is flipped and names its sender; a share that is not finite is
refused on arrival, before any averaging."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import torch
import yaml

from coordinator.planning.jobspec import parse_job_spec
from coordinator.planning.plan import WorkerSlot
from opdag.capture import capture
from opdag.ir import CapturedModel
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages
from worker.replica_sync import ReplicaSync
from worker.robust_aggregate import combine
from worker.value_guard import SHARE, SuspectValue, Suspicion, ValueGuard

pytestmark = pytest.mark.unit

GPT = {"layers": 1, "d_model": 16, "heads": 2, "context": 8}
WORKERS = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7300 + i}", 10.0) for i in range(3)]


@pytest.fixture(scope="module")
def model() -> CapturedModel:
    m = build_model("gpt", GPT, seed=0)
    return capture(m, example_batch("gpt", GPT, 2, device="meta"), name="gpt")


def group(
    model: CapturedModel, mp: pytest.MonkeyPatch, flip: int = -1
) -> tuple[list[ReplicaSync], list[list[Suspicion]]]:
    """The three members of the one stage's group, joined by direct calls, each with its
    guard; member `flip` flips the sign of what it sends."""
    doc = {
        "name": "robust",
        "model": {"zoo": "gpt", "args": GPT},
        "data": {"corpus": "stdlib-text", "batch_size": 6, "micro_batches": 3},
        "steps": 4,
        "parallel": {"planner": "even", "stages": 1, "replicas": 3},
        "sync": {"kind": "sync", "aggregate": "median"},
    }
    _, plans = planned_stages(model, parse_job_spec(yaml.safe_dump(doc)), WORKERS)
    syncs = [ReplicaSync(sp, token="t", tls=None, timeout_s=1.0) for sp in plans]
    reports: list[list[Suspicion]] = [[] for _ in syncs]
    for sync, got in zip(syncs, reports, strict=True):
        assert sync.plan.sync_aggregate == "median"
        sync.guard = ValueGuard(on_refusal=got.append)

        async def send(
            replica: int,
            step: int,
            own: list[tuple[str, torch.Tensor]],
            src: int = sync.plan.replica,
        ) -> None:
            if src == flip:
                own = [(n, -t if n != "#loss" else t) for n, t in own]
            await syncs[replica].deliver(step, src, own)

        mp.setattr(sync, "_send", send)
    return syncs, reports


def average(syncs: Sequence[ReplicaSync], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for sync, p in zip(syncs, params, strict=True):
        sync.attach([("w", p)], loss=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()

    async def run() -> None:
        await asyncio.gather(
            *(
                s.average(0, [("w", p)], 1.0 + i)
                for i, (s, p) in enumerate(zip(syncs, params, strict=True))
            )
        )

    asyncio.run(run())
    return [p.grad.detach().clone() for p in params if p.grad is not None]


def shares_of_one_gradient() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    common = torch.randn(40, 3, generator=g)
    return [common + 0.4 * torch.randn(40, 3, generator=g) for _ in range(3)]


def test_every_member_applies_bitwise_the_same_median(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, reports = group(model, monkeypatch)
    grads = shares_of_one_gradient()
    out = average(syncs, grads)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(out[0], combine(grads, "median"))
    assert reports == [[], [], []]


def test_a_flipped_share_is_left_out_and_its_sender_named(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, reports = group(model, monkeypatch, flip=2)
    grads = shares_of_one_gradient()
    out = average(syncs, grads)
    # The honest members combine their two shares alone (the mean of two).
    torch.testing.assert_close(out[0], (grads[0] + grads[1]) / 2)
    assert torch.equal(out[0], out[1])
    for got in reports[:2]:
        (s,) = got
        assert (s.kind, s.stage, s.replica, s.step) == (SHARE, 0, 2, 0)
        assert "cosine" in s.evidence
    assert reports[2] == []  # the flipper holds its own share unflipped: no outlier


def test_a_share_that_is_not_finite_is_refused_on_arrival(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, reports = group(model, monkeypatch)
    p = torch.nn.Parameter(torch.zeros(40, 3))
    for sync in syncs:
        sync.attach([("w", p)], loss=False)
    bad = torch.zeros(40, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(SuspectValue, match="not finite"):
        asyncio.run(syncs[0].deliver(0, 1, [("w", bad)]))
    assert [(s.kind, s.replica) for s in reports[0]] == [(SHARE, 1)]

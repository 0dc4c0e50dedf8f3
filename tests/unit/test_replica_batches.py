"""Each replica's share of a step's batch: a pure function of (step, replica), the shares
together exactly the global batch in order, and a clear error when they cannot be equal."""

from __future__ import annotations

import pytest
import torch

from opdag.data import (
    DataConfig,
    DataError,
    build_source,
    replica_micro_batches,
    split_micro_batches,
)

pytestmark = pytest.mark.unit


def batch(rows: int = 8) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(rows * 3).reshape(rows, 3), "y": torch.arange(rows)}


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_the_replicas_shares_are_exactly_the_global_micro_batches_in_order(replicas: int) -> None:
    b = batch()
    whole = split_micro_batches(b, 4)
    shares = [replica_micro_batches(b, 4, replicas, r) for r in range(replicas)]
    assert all(len(s) == 4 // replicas for s in shares)
    joined = [mb for share in shares for mb in share]
    assert len(joined) == len(whole)
    for got, want in zip(joined, whole, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_replicas_share_depends_only_on_seed_step_and_replica() -> None:
    cfg = DataConfig(corpus="stdlib-text", batch_size=8, micro_batches=4, max_bytes=200_000)
    one, two = build_source(cfg, context=16), build_source(cfg, context=16)
    for step in (0, 3):
        a = replica_micro_batches(one.batch(step), 4, 2, 1)
        b = replica_micro_batches(two.batch(step), 4, 2, 1)
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    name = one.input_names[0]
    first = replica_micro_batches(one.batch(0), 4, 2, 0)
    other = replica_micro_batches(one.batch(0), 4, 2, 1)
    assert not torch.equal(first[0][name], other[0][name])


def test_micro_batches_that_do_not_split_over_the_replicas_are_refused() -> None:
    with pytest.raises(DataError, match="micro_batches=4 do not split over 3 replicas"):
        replica_micro_batches(batch(), 4, 3, 0)
    with pytest.raises(DataError, match="replica 2 of 2 is out of range"):
        replica_micro_batches(batch(), 4, 2, 2)

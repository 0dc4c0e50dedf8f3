"""Events and step records as ListEvents and JobRecords carry them: every field a stored
value fills, and a value that does not fit its message field sent as 0, never raised on."""

from __future__ import annotations

import math

import pytest

from coordinator.history_serde import event_list_pb, record_pages

pytestmark = pytest.mark.unit


def test_events_keep_their_figures_and_odd_values_become_zero() -> None:
    pb = event_list_pb(
        [
            {"seq": 3, "at": 12.5, "kind": "validation", "text": "t", "step": 40, "loss": 2.5},
            {"seq": 4, "at": "noon", "kind": "planned", "epoch": 2**40, "step": float("nan")},
        ]
    )
    first, second = pb.events
    assert (first.seq, first.at, first.kind, first.text) == (3, 12.5, "validation", "t")
    assert first.step == 40
    assert first.HasField("loss") and first.loss == 2.5
    assert (second.at, second.epoch, second.step) == (0.0, 0, 0)
    assert not second.HasField("loss")


def test_records_come_in_pages_with_their_losses_only_where_stored() -> None:
    records = [
        {"step": s, "stage": 1, "loss": float("nan") if s == 0 else 1.0 + s, "bytes": 10}
        for s in range(5)
    ] + [{"step": 5, "stage": 0, "replica": 1, "replica_loss": 3.0, "bytes": 2**70}]
    pages = list(record_pages(records, 2))
    assert [len(p.records) for p in pages] == [2, 2, 2]
    flat = [r for p in pages for r in p.records]
    assert [r.step for r in flat] == [0, 1, 2, 3, 4, 5]
    assert math.isnan(flat[0].loss) and flat[1].loss == 2.0
    last = flat[-1]
    assert (last.replica, last.bytes, last.replica_loss) == (1, 0, 3.0)
    assert not last.HasField("loss")

"""Policies the spec accepts but the workers do not run yet are refused at submission, by
name, instead of being run as something else."""

from __future__ import annotations

import pytest
import yaml

from coordinator.planning.jobspec import parse_job_spec
from coordinator.runnable import RUNNABLE_SYNC_KINDS, RUNNABLE_SYNC_VALUES, unrunnable_setting

pytestmark = pytest.mark.unit

BASE = {
    "name": "t",
    "model": {"zoo": "gpt", "args": {"layers": 1, "d_model": 16, "heads": 2, "context": 8}},
    "data": {"corpus": "stdlib-text", "batch_size": 4, "micro_batches": 2},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "steps": 2,
}


def spec_with(sync: object) -> str:
    return yaml.safe_dump({**BASE, "sync": sync})


def test_sync_runs() -> None:
    assert unrunnable_setting(parse_job_spec(spec_with("sync"))) is None
    assert unrunnable_setting(parse_job_spec(yaml.safe_dump(BASE))) is None


@pytest.mark.parametrize(
    ("sync", "field"),
    [
        *(
            (({"kind": "sync", "values": "fp16"}, "sync.values"),)
            * ("fp16" not in RUNNABLE_SYNC_VALUES)
        ),
        *(
            ({"kind": kind, "period": 4}, "sync.kind")
            for kind in ("local-sgd", "partial-local-sgd")
            if kind not in RUNNABLE_SYNC_KINDS
        ),
    ],
)
def test_what_the_workers_cannot_run_is_named(sync: object, field: str) -> None:
    why = unrunnable_setting(parse_job_spec(spec_with(sync)))
    assert why is not None and why.startswith(f"{field}: "), why

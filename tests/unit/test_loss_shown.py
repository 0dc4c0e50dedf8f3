"""A reported loss as the user sees it: a NaN loss is `nan` (a fault to see), no loss yet
is `-`; through the coordinator's JobInfo and the client's view, as `status` prints it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from archipelago.job_lines import job_line, loss_text
from archipelago.serde import job_view
from coordinator.job_record import Job
from coordinator.planning.jobspec import parse_job_spec
from coordinator.serde import job_info_pb

pytestmark = pytest.mark.unit

SPEC = """
name: tiny
model: {zoo: gpt, args: {layers: 1, d_model: 16, heads: 2, context: 8}}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2}
optimizer: {name: adamw, lr: 0.003}
steps: 10
"""


def test_loss_text_shows_nan_and_inf_and_dashes_none() -> None:
    assert loss_text(None) == "-"
    assert loss_text(math.nan) == "nan"
    assert loss_text(math.inf) == "inf" and loss_text(-math.inf) == "-inf"
    assert loss_text(2.345678) == "2.3457"


@pytest.mark.parametrize(("loss", "shown"), [(None, "-"), (math.nan, "nan"), (3.5, "3.5000")])
def test_a_jobs_loss_reaches_the_status_line_as_reported(loss: float | None, shown: str) -> None:
    job = Job(job_id="j1", name="tiny", spec=parse_job_spec(SPEC), loss=loss)
    view = job_view(job_info_pb(job))
    assert (view.loss is None) == (loss is None)
    assert f"loss {shown:>7}" in job_line(view)
    if loss is not None and math.isnan(loss):
        assert view.loss is not None and math.isnan(view.loss)
        assert "val" not in job_line(view)
        val = dataclasses.replace(view, val_loss=math.nan, val_step=4)
        assert "val nan @4" in job_line(val)

"""The README's walkthrough model (examples/my-model) captures on the submit path as it is
written there: its job spec parses, the logits forward gets its loss, the tied head stays
one tensor, and the captured graph computes the module's own loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from archipelago.model_source import prepare_model
from coordinator.planning.jobspec import parse_job_spec
from opdag.stage import StageModule
from tests.user_models import load

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my-model"


def test_the_walkthrough_model_captures_and_computes_its_own_loss() -> None:
    raw = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    assert raw["data"]["dataset"] == "mytext"
    parse_job_spec((EXAMPLE / "job.yaml").read_text())
    # The same job on the built-in corpus: no coordinator is needed for its manifest.
    raw["data"] = {"corpus": "stdlib-text", "batch_size": 16, "micro_batches": 4}
    spec = parse_job_spec(yaml.safe_dump(raw))
    prepared = prepare_model(spec, EXAMPLE)
    graph, state = prepared.captured.graph, prepared.captured.state
    assert graph.loss
    names = dict(prepared.names)
    assert names["head.weight"] == names["emb.weight"]  # tied: one tensor, two names

    user = load(EXAMPLE / "model.py").build(**dict(spec.model.args))
    user.load_state_dict({k: state[t] for k, t in prepared.names}, strict=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (4, 64), generator=g)
    targets = torch.randint(0, 256, (4, 64), generator=g)
    stage = StageModule(graph, state).eval()
    with torch.no_grad():
        ours = float(stage({"tokens": tokens, "targets": targets})[graph.loss])
        theirs = float(F.cross_entropy(user.eval()(tokens).flatten(0, 1), targets.flatten()))
    assert ours == pytest.approx(theirs, rel=1e-5)

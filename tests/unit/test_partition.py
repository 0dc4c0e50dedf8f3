"""Cutting graphs into stages: what is accepted, what is refused and why, and the default
FLOPs-balanced cut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opdag.capture import capture
from opdag.errors import PartitionError
from opdag.partition import balanced_assignment, partition
from opdag.rad import LocalPipeline
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

GPT = {"layers": 2, "d_model": 32, "heads": 2, "context": 16}


@pytest.fixture(scope="module")
def gpt_graph():  # type: ignore[no-untyped-def]
    return capture(build_model("gpt", GPT), example_batch("gpt", GPT, 4, device="meta")).graph


class Diamond(nn.Module):
    """x -> a -> (b, c) -> d: a fork and a merge, with one parameter read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * self.scale
        out = self.b(h) + self.c(h)
        return ((out * self.scale - y) ** 2).mean()


def _diamond():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Diamond()
    example = {"x": torch.zeros(2, 4), "y": torch.zeros(2, 4)}
    return model, capture(model, example)


def test_non_convex_stage_is_refused_naming_the_path() -> None:
    _, captured = _diamond()
    g = captured.graph
    names = [n.name for n in g.compute_nodes]
    assignment = {n: 0 for n in names}
    # b (the second linear) in stage 1, but the merge that reads it back in stage 0.
    assignment["linear_1"] = 1
    with pytest.raises(PartitionError, match=r"stage 0 is not convex: .*linear_1 \(stage 1\)"):
        partition(g, assignment)


def test_values_flowing_to_a_lower_stage_are_refused() -> None:
    _, captured = _diamond()
    g = captured.graph
    assignment = {n.name: 1 for n in g.compute_nodes}
    for n in g.compute_nodes[-3:]:
        assignment[n.name] = 0
    with pytest.raises(PartitionError, match="lower to higher stage numbers"):
        partition(g, assignment)


def test_incomplete_unknown_and_malformed_assignments_are_refused(gpt_graph) -> None:  # type: ignore[no-untyped-def]
    full = balanced_assignment(gpt_graph, 2)
    missing = dict(full)
    missing.pop(next(iter(missing)))
    with pytest.raises(PartitionError, match="have no stage"):
        partition(gpt_graph, missing)
    with pytest.raises(PartitionError, match="does not have"):
        partition(gpt_graph, {**full, "no_such_node": 0})
    with pytest.raises(PartitionError, match="not a non-negative integer"):
        partition(gpt_graph, {**full, next(iter(full)): -1})
    with pytest.raises(PartitionError, match="are data"):
        partition(gpt_graph, {**full, "tokens": 0})
    gap = {k: (2 if v == 1 else v) for k, v in full.items()}
    with pytest.raises(PartitionError, match=r"stages \[1\] have no nodes"):
        partition(gpt_graph, gap)


def test_module_called_from_two_stages_shares_its_weights_across_them() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(torch.relu(self.f(x))).sum()

    torch.manual_seed(0)
    model = Twice()
    captured = capture(model, {"x": torch.zeros(2, 4)})
    g = captured.graph
    assignment = {n.name: 0 for n in g.compute_nodes}
    assignment[g.compute_nodes[-1].name] = 1
    assignment[g.compute_nodes[-2].name] = 1
    p = partition(g, assignment)
    # The module's weights live in stage 0 and travel to stage 1 as values.
    assert {e.node for e in p.edges} >= {"p_f_weight", "p_f_bias"}
    assert not p.stages[1].graph.params
    pipe = LocalPipeline(p, captured.state, num_micro_batches=1)
    x = torch.randn(2, 4)
    stats = pipe.forward_backward([{"x": x}])
    loss = model(x)
    loss.backward()
    assert stats.loss == pytest.approx(loss.item(), rel=1e-6)
    ours = dict(pipe.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_parameter_read_in_two_stages_travels_and_gets_its_full_gradient() -> None:
    model, captured = _diamond()
    g = captured.graph
    assignment = {}
    for n in g.compute_nodes:
        assignment[n.name] = 0 if g.position(n.name) <= g.position("mul") else 1
    p = partition(g, assignment)
    assert any(e.node == "p_scale" and e.dsts == (1,) for e in p.edges)

    pipe = LocalPipeline(p, captured.state, num_micro_batches=2)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    stats = pipe.forward_backward([{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}])
    loss = (model(x[:2], y[:2]) + model(x[2:], y[2:])) / 2
    loss.backward()
    assert stats.loss == pytest.approx(loss.item(), rel=1e-6)
    ours = dict(pipe.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name].grad, param.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_balanced_cut_is_valid_balanced_and_prefers_light_edges(gpt_graph) -> None:  # type: ignore[no-untyped-def]
    total = gpt_graph.total("fwd_flops") + gpt_graph.total("bwd_flops")
    for n in (1, 2, 3, 4, 6):
        p = partition(gpt_graph, balanced_assignment(gpt_graph, n))
        assert len(p.stages) == n
        work = [r["fwd_flops"] + r["bwd_flops"] for r in p.summary()]  # type: ignore[operator]
        assert sum(work) == pytest.approx(total)
    # Two stages of a two-block gpt: the cut falls between blocks, where only the residual
    # stream crosses (one [batch, context, d_model] tensor), not inside a block.
    p = partition(gpt_graph, balanced_assignment(gpt_graph, 2))
    assert [e.meta.shape for e in p.edges] == [(4, 16, 32)]


def test_balanced_cut_refuses_impossible_stage_counts(gpt_graph) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PartitionError, match="at least 1"):
        balanced_assignment(gpt_graph, 0)
    with pytest.raises(PartitionError, match="stages asked for a graph of"):
        balanced_assignment(gpt_graph, len(gpt_graph.compute_nodes) + 1)


def test_stage_graphs_carry_only_their_own_parameters(gpt_graph) -> None:  # type: ignore[no-untyped-def]
    p = partition(gpt_graph, balanced_assignment(gpt_graph, 3))
    seen: set[str] = set()
    for stage in p.stages:
        names = {spec.name for spec in stage.graph.params}
        assert not names & seen
        seen |= names
        stage.graph.check_structure()
    assert seen == {spec.name for spec in gpt_graph.params}
    assert p.stages[-1].loss == gpt_graph.loss
    assert all(not s.loss for s in p.stages[:-1])

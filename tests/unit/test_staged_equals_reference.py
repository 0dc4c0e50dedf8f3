"""A model cut into stages and trained by remote autodiff equals the same model trained in
one plain PyTorch process: same losses, same gradients, same parameters, step after step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from opdag.capture import capture
from opdag.data import DataConfig
from opdag.ir import Graph
from opdag.local import LocalTrainer
from opdag.optim import OptimizerConfig
from opdag.partition import balanced_assignment
from opdag.reference import ReferenceTrainer
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

TEXT = DataConfig(corpus="stdlib-text", batch_size=8, micro_batches=2, max_bytes=400_000)
IMAGES = DataConfig(corpus="synthetic-shapes", batch_size=8, micro_batches=2)
MODELS: dict[str, tuple[dict[str, Any], DataConfig]] = {
    "gpt": ({"layers": 2, "d_model": 32, "heads": 2, "context": 16}, TEXT),
    "moe-gpt": ({"layers": 2, "d_model": 32, "heads": 2, "context": 16, "experts": 4}, TEXT),
    "resnet": ({"widths": (8, 16, 16), "blocks": (1, 1, 1)}, IMAGES),
    "mlp": ({"hidden": 32, "layers": 3}, IMAGES),
}
STEPS = 5


def _ancestors(graph: Graph, name: str) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        for ref in graph.node(stack.pop()).refs():
            if ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return seen


def residual_split(graph: Graph) -> dict[str, int]:
    """Three stages around a residual merge `out = branch(x) + shortcut(x)`: everything up
    to the fork `x` in stage 0, the branch alone in stage 1, the shortcut side, the merge and
    the rest in stage 2, so `x` travels from stage 0 straight to stage 2, past the branch."""
    for merge in graph.compute_nodes:
        if merge.target != "aten.add.Tensor":
            continue
        refs = list(dict.fromkeys(merge.refs()))
        if len(refs) != 2:
            continue
        lineage = [_ancestors(graph, r) | {r} for r in refs]
        common = [n for n in lineage[0] & lineage[1] if graph.node(n).op == "function"]
        if not common:
            continue
        fork = max(common, key=graph.position)
        # The branch is the side with more of its own work between the fork and the merge.
        sides = [lin - _ancestors(graph, fork) - {fork} for lin in lineage]
        branch = max(sides, key=len)
        assignment = {}
        for n in graph.compute_nodes:
            if graph.position(n.name) <= graph.position(fork):
                assignment[n.name] = 0
            elif n.name in branch:
                assignment[n.name] = 1
            else:
                assignment[n.name] = 2
        return assignment
    raise AssertionError(f"{graph.name} has no residual merge")


def experts_apart(graph: Graph) -> dict[str, int]:
    """moe-gpt's first MoE block with each expert on a stage of its own: what only expert e
    computes goes to stage e + 1; what the experts share comes before, the rest after."""
    stack = next(n for n in graph.compute_nodes if n.target == "aten.stack.default")
    outs = list(dict.fromkeys(stack.refs()))
    lineage = [_ancestors(graph, o) | {o} for o in outs]
    upstream = _ancestors(graph, stack.name)
    assignment = {}
    for n in graph.compute_nodes:
        owners = [e for e, lin in enumerate(lineage) if n.name in lin]
        if len(owners) == 1:
            assignment[n.name] = 1 + owners[0]
        else:
            assignment[n.name] = 0 if n.name in upstream else len(outs) + 1
    return assignment


def every_module_apart(graph: Graph) -> dict[str, int]:
    """A new stage at every operator that reads a parameter (a layer: the finest cut along
    the order)."""
    stage, assignment = 0, {}
    for n in graph.compute_nodes:
        if any(graph.node(r).op == "param" for r in n.refs()) and assignment:
            stage += 1
        assignment[n.name] = stage
    return assignment


Cut = Callable[[Graph], Mapping[str, int]]
CUTS: dict[str, list[tuple[str, Cut]]] = {
    "gpt": [
        ("2 balanced", lambda g: balanced_assignment(g, 2)),
        ("4 balanced", lambda g: balanced_assignment(g, 4)),
        ("residual split", residual_split),
    ],
    "moe-gpt": [
        ("3 balanced", lambda g: balanced_assignment(g, 3)),
        ("residual split", residual_split),
        ("experts apart", experts_apart),
    ],
    "resnet": [
        ("2 balanced", lambda g: balanced_assignment(g, 2)),
        ("5 balanced", lambda g: balanced_assignment(g, 5)),
        ("residual split", residual_split),
    ],
    "mlp": [
        ("2 balanced", lambda g: balanced_assignment(g, 2)),
        ("3 balanced", lambda g: balanced_assignment(g, 3)),
        ("every module apart", every_module_apart),
    ],
}
CASES = [(model, label, cut) for model, cuts in CUTS.items() for label, cut in cuts]


@pytest.mark.parametrize(
    ("model", "label", "cut"), CASES, ids=[f"{m}-{lbl}" for m, lbl, _ in CASES]
)
def test_staged_run_equals_single_process_reference(model: str, label: str, cut: Cut) -> None:
    args, data = MODELS[model]
    optimizer = OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.01)
    captured = capture(
        build_model(model, args, seed=0),
        example_batch(model, args, data.micro_batch_size, device="meta"),
        name=model,
    )
    assignment = cut(captured.graph)
    staged = LocalTrainer(
        model=model,
        model_args=args,
        data=data,
        optimizer=optimizer,
        assignment=assignment,
        captured=captured,
    )
    reference = ReferenceTrainer(model=model, model_args=args, data=data, optimizer=optimizer)
    assert len(staged.partition.stages) >= 2

    for step in range(STEPS):
        stats, grads = staged.train_step_with_grads(step)
        ref_loss, ref_grads = reference.train_step_with_grads(step)
        assert stats.loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7), f"step {step}"
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            err = (grads[name] - ref).norm().item()
            assert err <= 1e-5 * ref.norm().item() + 1e-12, f"step {step}: grad of {name}"

    ours = staged.pipeline.state_dict()
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_backward_order_keeps_runs_bit_identical_over_many_steps() -> None:
    # Gradient accumulation sums micro-batches in the reference's order, so long runs do
    # not drift apart by rounding.
    args, data = MODELS["gpt"]
    data = DataConfig(corpus="stdlib-text", batch_size=8, micro_batches=4, max_bytes=400_000)
    optimizer = OptimizerConfig(lr=3e-3)
    staged = LocalTrainer(model="gpt", model_args=args, data=data, optimizer=optimizer, stages=3)
    reference = ReferenceTrainer(model="gpt", model_args=args, data=data, optimizer=optimizer)
    ours = staged.run(30).losses
    theirs = reference.run(30).losses
    assert ours == theirs
    assert theirs[-1] < theirs[0]


def test_evaluation_matches_reference() -> None:
    args, data = MODELS["resnet"]
    staged = LocalTrainer(
        model="resnet", model_args=args, data=data, optimizer=OptimizerConfig(), stages=3
    )
    reference = ReferenceTrainer(
        model="resnet", model_args=args, data=data, optimizer=OptimizerConfig()
    )
    for step in range(2):
        staged.train_step(step)
        reference.train_step(step)
    # BatchNorm in eval mode uses the running statistics both runs accumulated.
    assert staged.evaluate(2) == pytest.approx(reference.evaluate(2), rel=1e-6)


@pytest.mark.parametrize("model", ["gpt", "moe-gpt", "resnet"])
def test_residual_split_sends_the_fork_past_the_branch(model: str) -> None:
    args, data = MODELS[model]
    graph = capture(build_model(model, args), example_batch(model, args, 4, device="meta")).graph
    staged = LocalTrainer(
        model=model,
        model_args=args,
        data=data,
        optimizer=OptimizerConfig(),
        assignment=residual_split(graph),
        captured=None,
    )
    skips = [e for e in staged.partition.edges if e.src == 0 and 2 in e.dsts]
    assert skips, "no value goes from stage 0 straight to stage 2"
    merge_stage = {staged.partition.stage_of(c) for e in skips for c in graph.consumers[e.node]}
    assert merge_stage == {1, 2}


def test_experts_apart_puts_each_expert_on_its_own_stage() -> None:
    args, _ = MODELS["moe-gpt"]
    graph = capture(
        build_model("moe-gpt", args), example_batch("moe-gpt", args, 4, device="meta")
    ).graph
    assignment = experts_apart(graph)
    for e in range(args["experts"]):
        nodes = [
            n.name for n in graph.compute_nodes if n.source.startswith(f"blocks.0.moe.experts.{e}.")
        ]
        assert nodes and {assignment[n] for n in nodes} == {e + 1}
    assert max(assignment.values()) == args["experts"] + 1

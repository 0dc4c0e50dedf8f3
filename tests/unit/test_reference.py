"""The reference trainer and the optimizers: the single-process ground truth."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from opdag.data import DataConfig, DataError, split_micro_batches
from opdag.optim import OptimizerConfig, OptimizerError, build_optimizer
from opdag.reference import ReferenceResult, ReferenceTrainer
from opdag.zoo import build_model

pytestmark = pytest.mark.unit

GPT = {"layers": 2, "d_model": 32, "heads": 2, "context": 16}
RESNET = {"widths": (8, 16), "blocks": (1, 1)}
TEXT = DataConfig("stdlib-text", batch_size=8, max_bytes=400_000)
IMAGES = DataConfig("synthetic-shapes", batch_size=16)


def trainer(
    model: str = "gpt",
    args: dict[str, Any] | None = None,
    data: DataConfig = TEXT,
    optimizer: OptimizerConfig | None = None,
    seed: int = 0,
) -> ReferenceTrainer:
    return ReferenceTrainer(
        model=model,
        model_args=GPT if args is None else args,
        data=data,
        optimizer=optimizer or OptimizerConfig(lr=1e-3),
        seed=seed,
    )


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_split_optimizers_equal_one_optimizer(name: str) -> None:
    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1)
    whole = build_model("gpt", GPT, seed=2)
    split = build_model("gpt", GPT, seed=2)
    one = build_optimizer(whole.named_parameters(), cfg)
    named = list(split.named_parameters())
    # One optimizer per "stage": the first third of the parameters, then the rest (bare).
    stages = [
        build_optimizer(named[: len(named) // 3], cfg),
        build_optimizer([p for _, p in named[len(named) // 3 :]], cfg),
    ]
    batch = {"tokens": torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))}
    batch["targets"] = batch["tokens"].roll(-1, dims=1)
    for _ in range(3):
        whole(**batch).backward()
        split(**batch).backward()
        one.step()
        for opt in stages:
            opt.step()
        one.zero_grad()
        for opt in stages:
            opt.zero_grad()
    for (n, a), b in zip(whole.named_parameters(), split.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert not torch.equal(whole.lm_head.weight, build_model("gpt", GPT, seed=2).lm_head.weight)


def test_weight_decay_spares_biases_and_norm_gains() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model.parameters(), OptimizerConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, old in zip(model.parameters(), before, strict=True):
        if p.ndim >= 2:
            torch.testing.assert_close(p, old * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, old)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "lion"}, "name='lion'"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"betas": (0.9, 1.5)}, "betas=(0.9, 1.5)"),
        ({"momentum": 1.0}, "momentum=1.0"),
    ],
)
def test_optimizer_config_rejects_bad_values_naming_them(
    kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(OptimizerError) as raised:
        OptimizerConfig(**kwargs)
    assert fragment in str(raised.value)
    assert OptimizerConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)  # type: ignore[arg-type]


def test_build_optimizer_rejects_an_empty_parameter_list() -> None:
    with pytest.raises(OptimizerError, match="no trainable parameters"):
        build_optimizer([], OptimizerConfig())


@pytest.mark.parametrize("model", ["gpt", "moe-gpt"])
def test_reference_losses_decrease_on_text(model: str) -> None:
    result = trainer(model, optimizer=OptimizerConfig(lr=3e-3)).run(30, eval_batches=2)
    assert isinstance(result, ReferenceResult) and len(result.losses) == 30
    assert result.losses[0] == pytest.approx(5.55, abs=0.3)  # ~ln(256) at init
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.5
    assert result.val_loss is not None and result.val_loss < result.losses[0] - 1.0
    assert result.samples_per_s > 0 and result.seconds > 0


@pytest.mark.parametrize(
    ("model", "args", "lr", "steps"),
    [("resnet", RESNET, 1e-2, 40), ("mlp", {"hidden": 64}, 3e-3, 80)],
)
def test_reference_losses_decrease_on_images(
    model: str, args: dict[str, Any], lr: float, steps: int
) -> None:
    ref = trainer(
        model, args, DataConfig("synthetic-shapes", batch_size=32), OptimizerConfig(lr=lr)
    )
    val_before = ref.evaluate(2)
    run = ref.run(steps, eval_batches=2)
    assert sum(run.losses[-5:]) / 5 < sum(run.losses[:5]) / 5 - 0.3
    assert run.val_loss is not None and run.val_loss < val_before - 0.3


def manual_step_grads(
    model: nn.Module, batch: dict[str, torch.Tensor], m: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """Oracle: accumulate (loss / m) over m micro-batches by hand."""
    losses = []
    for micro in split_micro_batches(batch, m):
        loss = model(**micro)
        (loss / m).backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return sum(losses) / m, grads


@pytest.mark.parametrize(
    ("model", "args", "data"), [("gpt", GPT, TEXT), ("resnet", RESNET, IMAGES)]
)
def test_train_step_accumulates_micro_batches_like_manual_autograd(
    model: str, args: dict[str, Any], data: DataConfig
) -> None:
    data = DataConfig(data.corpus, batch_size=data.batch_size, micro_batches=2, max_bytes=400_000)
    ref = trainer(model, args, data, seed=3)
    oracle = build_model(model, args, seed=3)
    loss, grads = ref.train_step_with_grads(4)
    expected_loss, expected = manual_step_grads(oracle, ref.source.batch(4), 2)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in ref.model.parameters())  # cleared after the step


def test_micro_batching_leaves_gpt_gradients_unchanged() -> None:
    whole = trainer()
    micro = trainer(
        data=DataConfig("stdlib-text", batch_size=8, micro_batches=4, max_bytes=400_000)
    )
    loss_whole, g_whole = whole.train_step_with_grads(0)
    loss_micro, g_micro = micro.train_step_with_grads(0)
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)
    for name, grad in g_whole.items():
        torch.testing.assert_close(g_micro[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batchnorm_statistics_are_per_micro_batch() -> None:
    whole = trainer("resnet", RESNET, IMAGES)
    micro = trainer(
        "resnet", RESNET, DataConfig("synthetic-shapes", batch_size=16, micro_batches=2)
    )
    _, g_whole = whole.train_step_with_grads(0)
    _, g_micro = micro.train_step_with_grads(0)
    # Different normalisation statistics give different gradients (unlike the GPT case).
    assert not torch.allclose(g_micro["stem_conv.weight"], g_whole["stem_conv.weight"], atol=1e-5)


def test_reference_runs_are_deterministic() -> None:
    a, b = trainer(seed=1), trainer(seed=1)
    assert a.run(3).losses == b.run(3).losses
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert trainer(seed=2).run(1).losses[0] != a.run(1).losses[0]


def test_evaluate_is_fixed_and_restores_train_mode() -> None:
    ref = trainer("resnet", RESNET, IMAGES)
    first = ref.evaluate(2)
    assert ref.model.training
    assert ref.evaluate(2) == first  # eval mode: running statistics are not updated
    ref.train_step(0)
    assert ref.evaluate(2) != first


def test_reference_rejects_data_of_the_wrong_kind() -> None:
    with pytest.raises(DataError, match="synthetic-shapes"):
        trainer("gpt", GPT, IMAGES)

"""The model zoo: losses, fx traceability within the allow-list, MoE routing, config errors."""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from opdag.zoo import (
    ZOO_NAMES,
    ZooError,
    build_model,
    data_kind,
    example_batch,
    input_names,
    model_config,
)
from opdag.zoo.moe_gpt import MoE

pytestmark = pytest.mark.unit

LEAVES = (
    nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.Conv2d, nn.BatchNorm1d,
    nn.BatchNorm2d, nn.GroupNorm, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout,
    nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
)  # fmt: skip
TORCH_FUNCTIONS = """add sub mul div matmul bmm cat stack einsum softmax log_softmax topk cumsum
    sum mean arange zeros_like ones_like where exp log sqrt rsqrt tanh sigmoid relu transpose
    flatten reshape clamp"""
F_FUNCTIONS = """linear gelu relu silu softmax log_softmax dropout layer_norm embedding
    cross_entropy one_hot scaled_dot_product_attention pad avg_pool2d adaptive_avg_pool2d"""
TENSOR_METHODS = """view reshape transpose permute contiguous size flatten unflatten chunk split
    unsqueeze squeeze expand mean sum softmax masked_fill float type_as to long mul add pow exp
    topk cumsum clamp gather scatter_add view_as reshape_as new_zeros"""
ALLOWED_FUNCTIONS = (
    {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv}
    | {operator.neg, operator.getitem}
    | {getattr(torch, n) for n in TORCH_FUNCTIONS.split()}
    | {getattr(F, n) for n in F_FUNCTIONS.split()}
)
ALLOWED_METHODS = set(TENSOR_METHODS.split())

TINY: dict[str, dict[str, Any]] = {
    "gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16},
    "moe-gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16, "experts": 3},
    "resnet": {"widths": (8, 16), "blocks": (1, 2)},
    "mlp": {"hidden": 32, "layers": 3},
}


class LeafTracer(fx.Tracer):
    """The capture layer's view: only standard layers are leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAVES)


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, LeafTracer().trace(model))


def random_batch(name: str, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = example_batch(name, TINY[name], batch_size)
    if data_kind(name) == "text":
        return {k: torch.randint(0, 256, v.shape, generator=g) for k, v in batch.items()}
    return {
        "images": torch.randn(batch["images"].shape, generator=g),
        "labels": torch.randint(0, 10, (batch_size,), generator=g),
    }


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_model_traces_to_same_loss_and_grads_as_eager(name: str) -> None:
    model = build_model(name, TINY[name], seed=1)
    batch = random_batch(name)
    gm = trace(model)
    traced_loss = gm(**batch)
    traced_loss.backward()
    traced_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager_loss = model(**batch)
    eager_loss.backward()
    assert traced_loss.dim() == 0
    assert torch.equal(traced_loss, eager_loss)
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.equal(traced_grads[n], p.grad), n


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_traced_graph_uses_only_allowed_operators_and_leaves(name: str) -> None:
    model = build_model(name, TINY[name])
    gm = trace(model)
    modules = dict(model.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, node.format_node()
        elif node.op == "call_method":
            assert node.target in ALLOWED_METHODS, node.format_node()
        elif node.op == "call_module":
            assert isinstance(modules[node.target], LEAVES), node.format_node()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_example_batch_matches_forward_arguments_and_works_on_meta(name: str) -> None:
    model = build_model(name, TINY[name])
    params = list(inspect.signature(model.forward).parameters)
    batch = example_batch(name, TINY[name], 3, device="meta")
    assert tuple(params) == input_names(name) == tuple(batch)
    assert all(t.device.type == "meta" and t.size(0) == 3 for t in batch.values())
    loss = model.to("meta")(**batch)
    assert loss.device.type == "meta" and loss.dim() == 0
    cpu_batch = example_batch(name, TINY[name], 3)
    assert model_config(name, TINY[name]) == build_model(name, TINY[name]).config
    assert build_model(name, TINY[name])(**cpu_batch).isfinite()


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_no_parameter_is_shared_between_modules(name: str) -> None:
    model = build_model(name, TINY[name])
    owned = [id(p) for m in model.modules() for p in m.parameters(recurse=False)]
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))


def test_gpt_parameter_names_are_readable() -> None:
    model = build_model("gpt", {"layers": 1, "d_model": 16, "heads": 2, "context": 8})
    names = {n.rsplit(".", 1)[0] if n != "pos" else n for n, _ in model.named_parameters()}
    assert names == {
        "tok_emb", "pos", "blocks.0.ln1", "blocks.0.attn.qkv", "blocks.0.attn.proj",
        "blocks.0.ln2", "blocks.0.mlp.fc", "blocks.0.mlp.proj", "ln_f", "lm_head",
    }  # fmt: skip
    assert model.pos.shape == (8, 16)


def test_gpt_is_causal() -> None:
    model = build_model("gpt", TINY["gpt"])
    logits: list[torch.Tensor] = []
    model.lm_head.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
    batch = random_batch("gpt")
    model(**batch)
    changed = batch["tokens"].clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    model(tokens=changed, targets=batch["targets"])
    assert torch.equal(logits[0][:, :-1], logits[1][:, :-1])
    assert not torch.equal(logits[0][:, -1], logits[1][:, -1])


def test_gpt_accepts_sequences_shorter_than_context() -> None:
    model = build_model("gpt", TINY["gpt"])
    tokens = torch.randint(0, 256, (2, 5))
    assert model(tokens=tokens, targets=tokens).isfinite()


def test_gpt_init_scales_residual_projections() -> None:
    layers = 4
    model = build_model("gpt", {"layers": layers, "d_model": 64, "heads": 4, "context": 8})
    residual_std = 0.02 / math.sqrt(2 * layers)
    for i in range(layers):
        block = model.blocks[i]
        assert block.attn.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.mlp.proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(block.mlp.fc.bias == 0)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_build_model_is_deterministic_per_seed_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("gpt", TINY["gpt"], seed=5)
    b = build_model("gpt", TINY["gpt"], seed=5)
    c = build_model("gpt", TINY["gpt"], seed=6)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if not name.endswith("bias") and "ln" not in name:
            assert not torch.equal(pa, pc), name
    assert a.training


def moe_by_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Oracle: route token by token in plain Python, first choices before second ones."""
    flat = x.flatten(0, 1)
    probs = torch.softmax(moe.router(flat), dim=-1)
    gate, chosen = probs.topk(moe.top_k, dim=-1)
    if moe.top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    capacity = math.ceil(
        moe.capacity_num * moe.top_k * flat.size(0) / (moe.num_experts * moe.capacity_den)
    )
    used = [0] * moe.num_experts
    out = torch.zeros_like(flat)
    for j in range(moe.top_k):
        for n in range(flat.size(0)):
            e = int(chosen[n, j])
            if used[e] < capacity:
                used[e] += 1
                out[n] += gate[n, j] * moe.experts[e](flat[n : n + 1])[0]
    return out.view_as(x)


@pytest.mark.parametrize(
    ("top_k", "capacity_factor", "drops"), [(2, 8.0, False), (2, 0.5, True), (1, 0.3, True)]
)
def test_moe_matches_token_by_token_routing_with_capacity_drops(
    top_k: int, capacity_factor: float, drops: bool
) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        moe = MoE(16, 32, experts=4, top_k=top_k, capacity_factor=capacity_factor, dropout=0.0)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    y, aux = moe(x)
    expected = moe_by_loop(moe, x)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    dropped_rows = (expected.flatten(0, 1).abs().sum(-1) == 0).sum().item()
    assert (dropped_rows > 0) == drops
    assert aux.dim() == 0 and aux.item() > 0


def test_moe_loss_adds_weighted_load_balancing_loss() -> None:
    args = {**TINY["moe-gpt"], "aux_loss_weight": 0.0}
    plain = build_model("moe-gpt", args)
    weighted = build_model("moe-gpt", {**args, "aux_loss_weight": 0.5})
    routers: list[torch.Tensor] = []
    for block in weighted.blocks:
        block.moe.router.register_forward_hook(lambda m, i, o: routers.append(o.detach()))
    batch = random_batch("moe-gpt")
    difference = weighted(**batch) - plain(**batch)
    aux = 0.0
    for logits in routers:
        probs = logits.softmax(-1)
        counts = F.one_hot(probs.topk(2, dim=-1).indices, 3).float().sum((0, 1))
        aux += 3 * (counts / counts.sum() * probs.mean(0)).sum().item()
    assert len(routers) == 2
    assert difference.item() == pytest.approx(0.5 * aux, rel=1e-4)


def test_moe_experts_are_separate_subgraphs() -> None:
    model = build_model("moe-gpt", TINY["moe-gpt"])
    gm = trace(model)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}

    def ancestors(node: fx.Node) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            for parent in stack.pop().all_input_nodes:
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    for i in range(2):
        outputs = []
        for e in range(3):
            fc = nodes[f"blocks.{i}.moe.experts.{e}.fc"]
            proj = nodes[f"blocks.{i}.moe.experts.{e}.proj"]
            # Each expert eats its own slice expert_in[e] of the dispatched buffer.
            (slice_node,) = fc.all_input_nodes
            assert slice_node.target is operator.getitem and slice_node.args[1] == e
            assert fc in ancestors(proj)
            outputs.append(proj)
        for e, proj in enumerate(outputs):
            other = {f"blocks.{i}.moe.experts.{o}." for o in range(3) if o != e}
            assert not any(
                a.op == "call_module" and str(a.target).startswith(tuple(other))
                for a in ancestors(proj)
            )
        # ...and the experts' outputs meet again in one stack.
        stacks = [n for n in gm.graph.nodes if n.target is torch.stack]
        assert any(all(o in ancestors(s) for o in outputs) for s in stacks)
    assert "blocks.0.moe.router" in nodes


def test_moe_every_mixes_dense_and_moe_blocks() -> None:
    model = build_model("moe-gpt", {**TINY["moe-gpt"], "layers": 4, "moe_every": 2})
    kinds = ["moe" if hasattr(b, "moe") else "mlp" for b in model.blocks]
    assert kinds == ["mlp", "moe", "mlp", "moe"]
    assert model(**random_batch("moe-gpt")).isfinite()


def test_resnet_residual_branches_fan_out_and_back_in() -> None:
    model = build_model("resnet", TINY["resnet"])
    gm = trace(model)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for prefix, shortcut in (
        ("stages.0.0", "stages.0.0.shortcut"),
        ("stages.1.0", "stages.1.0.shortcut.1"),
        ("stages.1.1", "stages.1.1.shortcut"),
    ):
        (block_input,) = nodes[f"{prefix}.conv1"].all_input_nodes
        assert len(block_input.users) == 2  # fan-out: main branch and shortcut
        (joined,) = nodes[f"{prefix}.relu2"].all_input_nodes
        assert joined.target is operator.add  # fan-in
        assert set(joined.all_input_nodes) == {nodes[f"{prefix}.bn2"], nodes[shortcut]}


def test_resnet_relus_are_distinct_modules() -> None:
    model = build_model("resnet", TINY["resnet"])
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 2 * 3


def test_mlp_layers_counts_linear_layers() -> None:
    model = build_model("mlp", {"hidden": 8, "layers": 3})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 8), (8, 8), (8, 10)]


@pytest.mark.parametrize(
    ("name", "args", "fragments"),
    [
        ("gpt", {"d_model": 250, "heads": 8}, ["gpt", "d_model=250", "heads=8"]),
        ("gpt", {"layerz": 2}, ["layerz", "valid arguments", "layers"]),
        ("gpt", {"layers": "6"}, ["layers='6'", "int"]),
        ("gpt", {"layers": True}, ["layers=True"]),
        ("gpt", {"dropout": 1.5}, ["dropout=1.5"]),
        ("moe-gpt", {"experts": 2, "top_k": 3}, ["top_k=3", "experts=2"]),
        ("moe-gpt", {"layers": 2, "moe_every": 3}, ["moe_every=3"]),
        ("moe-gpt", {"capacity_factor": 0}, ["capacity_factor=0"]),
        ("resnet", {"widths": (8, 16), "blocks": (1,)}, ["widths", "blocks"]),
        ("resnet", {"widths": "16"}, ["widths='16'"]),
        ("mlp", {"in_features": 100}, ["in_features=100"]),
        ("transformer", {}, ["transformer", "gpt", "moe-gpt", "resnet", "mlp"]),
    ],
)
def test_zoo_rejects_bad_arguments_naming_them(
    name: str, args: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ZooError) as raised:
        model_config(name, args)
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_zoo_accepts_yaml_style_values() -> None:
    config = model_config("resnet", {"widths": [8, 16], "blocks": [1, 1]})
    assert config.widths == (8, 16) and config.blocks == (1, 1)
    moe = model_config("moe-gpt", {"capacity_factor": 2, "aux_loss_weight": 0})
    assert isinstance(moe.capacity_factor, float) and moe.capacity_factor == 2.0
    assert data_kind("resnet") == "image" and input_names("gpt") == ("tokens", "targets")

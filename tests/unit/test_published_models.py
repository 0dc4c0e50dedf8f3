"""Published model definitions capture as they are: Hugging Face `transformers` GPT-2 (tied
input and output embeddings, attention masks built from shapes) and Llama (rotary embeddings,
RMSNorm, grouped-query attention), each from a small config with random weights. Cut into 2
and 3 stages and trained 5 steps, every loss and every gradient equals the same model
trained in one plain PyTorch process."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers  # pinned in the dev extra
from torch import nn

from opdag.capture import capture
from opdag.partition import balanced_assignment, partition
from opdag.rad import LocalPipeline
from opdag.stage import StageModule

pytestmark = pytest.mark.unit

VOCAB, CONTEXT, BATCH, MICRO_BATCHES, STEPS = 96, 16, 4, 2, 5


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=3,
        n_head=4,
        # Dropout off: the two runs are compared value for value.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,  # training: no key/value cache in the outputs
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: two query heads per key head
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,  # training: no key/value cache in the outputs
    )
    return transformers.LlamaForCausalLM(config)


MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": gpt2, "llama": llama}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    model.train()
    return model


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g)
        out.append({"input_ids": tokens, "labels": tokens.clone()})
    return out


def _micro(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    size = BATCH // MICRO_BATCHES
    rows = [slice(i * size, (i + 1) * size) for i in range(MICRO_BATCHES)]
    return [{k: v[r] for k, v in batch.items()} for r in rows]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module", params=list(MODELS))
def captured(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    name = request.param
    example = {
        "input_ids": torch.zeros(BATCH // MICRO_BATCHES, CONTEXT, dtype=torch.int64),
        "labels": torch.zeros(BATCH // MICRO_BATCHES, CONTEXT, dtype=torch.int64),
    }
    return name, capture(_build(name), example, name=name)


def test_the_published_model_captures_as_it_is(captured) -> None:  # type: ignore[no-untyped-def]
    name, model = captured
    graph = model.graph
    assert graph.loss, "the model's own loss (from `labels`) starts the backward pass"
    assert all(n.target.split(".")[0] in ("aten", "operator") for n in graph.compute_nodes)
    reference = _build(name)
    keys = dict(graph.state_keys)
    assert set(keys) == set(reference.state_dict())
    if name == "gpt2":
        # Tied embeddings: one parameter, under both of the module's names.
        assert keys["lm_head.weight"] == keys["transformer.wte.weight"] == "transformer.wte.weight"
        assert "lm_head.weight" not in graph.param_specs
    else:
        targets = {n.target for n in graph.compute_nodes}
        assert {"aten.cos.default", "aten.sin.default", "aten.rsqrt.default"} <= targets
    # The whole graph in one stage gives the module's loss, for any batch size.
    stage = StageModule(graph, model.state)
    for rows in (1, 3):
        batch = {k: v[:rows] for k, v in _batches()[0].items()}
        ours = stage(batch)[graph.loss]
        theirs = reference(**batch).loss
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stages", [2, 3])
def test_staged_training_equals_plain_pytorch(captured, stages: int) -> None:  # type: ignore[no-untyped-def]
    name, model = captured
    cut = partition(model.graph, balanced_assignment(model.graph, stages))
    assert len(cut.stages) == stages
    if name == "gpt2":
        # The tied weight lives in the first stage and travels to the head in the last.
        tied = next(n.name for n in model.graph.nodes if n.target == "transformer.wte.weight")
        edge = next(e for e in cut.edges if e.node == tied)
        assert edge.src == 0 and stages - 1 in edge.dsts
    pipe = LocalPipeline(cut, model.state, num_micro_batches=MICRO_BATCHES)
    ours = dict(pipe.named_parameters())
    opt = torch.optim.AdamW(list(ours.values()), lr=1e-3, weight_decay=0.01)

    reference = _build(name)
    theirs = dict(reference.named_parameters())
    assert set(ours) == set(theirs)
    ref_opt = torch.optim.AdamW(list(theirs.values()), lr=1e-3, weight_decay=0.01)

    worst_loss = worst_grad = 0.0
    for batch in _batches():
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        stats = pipe.forward_backward(_micro(batch))
        losses = [reference(**mb).loss for mb in _micro(batch)]
        loss = torch.stack(losses).mean()
        loss.backward()
        worst_loss = max(worst_loss, abs(stats.loss - loss.item()))
        for key, param in theirs.items():
            assert param.grad is not None and ours[key].grad is not None, key
            worst_grad = max(worst_grad, _relative(ours[key].grad, param.grad))
        opt.step()
        ref_opt.step()
    print(
        f"{name}, {stages} stages: largest loss difference {worst_loss:.2e}, "
        f"largest relative gradient difference {worst_grad:.2e}"
    )
    assert worst_loss <= 1e-4
    assert worst_grad <= 1e-5

"""`moe-gpt`: the `gpt` transformer with mixture-of-experts feed-forward blocks.

The MoE layer has static shapes (GShard/Switch capacity dispatch): every expert receives a
[capacity, d_model] buffer built with one-hot dispatch tensors, so the traced graph holds
each expert as its own subgraph and no shape depends on the routing decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from opdag.zoo import ZooError
from opdag.zoo.gpt import (
    VOCAB,
    Block,
    CausalSelfAttention,
    FeedForward,
    check_transformer_args,
    init_gpt_weights,
)


@dataclass(frozen=True)
class MoEGPTConfig:
    """Arguments of the `moe-gpt` model: those of `gpt` plus the expert layout."""

    layers: int = 6
    d_model: int = 256
    heads: int = 8
    context: int = 128
    dropout: float = 0.0
    mlp_ratio: int = 4
    experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    moe_every: int = 1

    def __post_init__(self) -> None:
        check_transformer_args(
            "moe-gpt",
            layers=self.layers,
            d_model=self.d_model,
            heads=self.heads,
            context=self.context,
            dropout=self.dropout,
            mlp_ratio=self.mlp_ratio,
        )
        if self.experts < 1:
            raise ZooError(f"moe-gpt: experts={self.experts} must be >= 1")
        if not 1 <= self.top_k <= self.experts:
            raise ZooError(
                f"moe-gpt: top_k={self.top_k} must be between 1 and experts={self.experts}"
            )
        if not self.capacity_factor > 0:
            raise ZooError(f"moe-gpt: capacity_factor={self.capacity_factor} must be > 0")
        if not self.aux_loss_weight >= 0:
            raise ZooError(f"moe-gpt: aux_loss_weight={self.aux_loss_weight} must be >= 0")
        if not 1 <= self.moe_every <= self.layers:
            raise ZooError(
                f"moe-gpt: moe_every={self.moe_every} must be between 1 and "
                f"layers={self.layers} so that at least one block is a MoE block"
            )

    def is_moe_block(self, index: int) -> bool:
        """Whether block `index` (0-based) is a MoE block: every moe_every-th one."""
        return (index + 1) % self.moe_every == 0


class MoE(nn.Module):
    """Top-k routed experts with fixed capacity; returns (output, load-balancing loss).

    Tokens routed beyond an expert's capacity get a zero output, so the block's residual
    connection passes them through unchanged.
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        experts: int,
        top_k: int,
        capacity_factor: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_experts = experts
        self.top_k = top_k
        # The capacity is ceil(factor * top_k * tokens / experts); keeping the factor as a
        # ratio of ints keeps the traced computation in exact integer arithmetic.
        ratio = Fraction(capacity_factor).limit_denominator(1000)
        self.capacity_num = ratio.numerator
        self.capacity_den = ratio.denominator
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, hidden, dropout) for _ in range(experts))

    def capacity(self, tokens: int) -> int:
        """Buffer rows per expert for a batch of `tokens` tokens."""
        return -(
            -(tokens * self.top_k * self.capacity_num) // (self.num_experts * self.capacity_den)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(0, 1)  # [N, d]
        capacity = self.capacity(x.size(0) * x.size(1))
        probs = torch.softmax(self.router(flat), dim=-1)  # [N, E]
        gate, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.top_k > 1:
            # Renormalise over the chosen experts (GShard); with top-1 the raw probability is
            # kept, otherwise the gate would be constant 1 and the router would get no gradient.
            gate = gate / gate.sum(-1, keepdim=True)

        # choice[j, n, e] = 1 when token n's j-th choice is expert e. Counting buffer slots in
        # choice-major order lets every first choice claim a slot before any second choice.
        choice = F.one_hot(chosen.transpose(0, 1), self.num_experts)  # [k, N, E]
        order = choice.flatten(0, 1).cumsum(0).view_as(choice)
        # 1-based slot of token n in expert e's buffer, or 0 where e was not chosen (the top-k
        # experts of one token are distinct, so at most one choice contributes).
        slot = (order * choice).sum(0)  # [N, E]
        # One-hot over slots; column 0 (not chosen) and column capacity+1 (over capacity, by
        # the clamp) are cut away, which is how overflowing tokens are dropped.
        dispatch = F.one_hot(slot.clamp(max=capacity + 1), capacity + 2)[:, :, 1 : capacity + 1]
        dispatch = dispatch.type_as(flat)  # [N, E, C]
        gate_ne = (choice.type_as(gate) * gate.transpose(0, 1).unsqueeze(-1)).sum(0)  # [N, E]
        combine = dispatch * gate_ne.unsqueeze(-1)  # [N, E, C]

        expert_in = torch.einsum("nec,nd->ecd", dispatch, flat)  # [E, C, d]
        expert_out = torch.stack(
            [expert(expert_in[e]) for e, expert in enumerate(self.experts)]
        )  # [E, C, d]
        y = torch.einsum("nec,ecd->nd", combine, expert_out)

        # Switch load-balancing loss: experts * sum_e (share of routing choices to e) *
        # (mean router probability of e); 1 when balanced. Only the probabilities carry
        # gradient, the counts are piecewise constant.
        share = choice.type_as(probs).mean(dim=(0, 1))  # [E]
        aux = (share * probs.mean(0)).sum() * self.num_experts
        return y.view_as(x), aux


class MoEBlock(nn.Module):
    """A pre-LN transformer block whose feed-forward is a MoE; returns (x, aux loss)."""

    def __init__(self, config: MoEGPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, config.heads, config.dropout)
        self.ln2 = nn.LayerNorm(d)
        self.moe = MoE(
            d,
            config.mlp_ratio * d,
            experts=config.experts,
            top_k=config.top_k,
            capacity_factor=config.capacity_factor,
            dropout=config.dropout,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class MoEGPT(nn.Module):
    """Byte-level GPT with MoE feed-forwards; forward(tokens, targets) returns the
    cross-entropy plus aux_loss_weight times the summed load-balancing losses."""

    def __init__(self, config: MoEGPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.aux_loss_weight = config.aux_loss_weight
        self.tok_emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(config.context, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            MoEBlock(config)
            if config.is_moe_block(i)
            else Block(d, config.heads, config.mlp_ratio * d, config.dropout)
            for i in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB)
        init_gpt_weights(self, config.layers)
        nn.init.normal_(self.pos, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(tokens) + self.pos[: tokens.size(1)])
        aux_terms: list[torch.Tensor] = []
        for block in self.blocks:
            if isinstance(block, MoEBlock):
                x, aux = block(x)
                aux_terms.append(aux)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux_total = aux_terms[0]
        for aux in aux_terms[1:]:
            aux_total = aux_total + aux
        return loss + self.aux_loss_weight * aux_total

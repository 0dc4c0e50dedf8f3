"""`gpt`: a byte-level decoder-only transformer (pre-LN, GPT-2 style) returning its LM loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opdag.zoo import ZooError

VOCAB = 256  # byte-level: every byte value is a token


def check_transformer_args(
    model: str,
    *,
    layers: int,
    d_model: int,
    heads: int,
    context: int,
    dropout: float,
    mlp_ratio: int,
) -> None:
    """Validate the arguments `gpt` and `moe-gpt` share; errors name the bad argument."""
    for arg, value in (
        ("layers", layers),
        ("d_model", d_model),
        ("heads", heads),
        ("context", context),
        ("mlp_ratio", mlp_ratio),
    ):
        if value < 1:
            raise ZooError(f"{model}: {arg}={value} must be >= 1")
    if d_model % heads:
        raise ZooError(f"{model}: d_model={d_model} is not divisible by heads={heads}")
    if not 0.0 <= dropout < 1.0:
        raise ZooError(f"{model}: dropout={dropout} must be in [0, 1)")


@dataclass(frozen=True)
class GPTConfig:
    """Arguments of the `gpt` model."""

    layers: int = 6
    d_model: int = 256
    heads: int = 8
    context: int = 128
    dropout: float = 0.0
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        check_transformer_args(
            "gpt",
            layers=self.layers,
            d_model=self.d_model,
            heads=self.heads,
            context=self.context,
            dropout=self.dropout,
            mlp_ratio=self.mlp_ratio,
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # [B, T, d] -> [B, heads, T, head_dim]
        q = q.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        # No dropout on attention probabilities: a dropout_p chosen from self.training would
        # be frozen into the traced graph, whereas nn.Dropout leaves follow train()/eval().
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).flatten(2)
        return self.drop(self.proj(y))


class FeedForward(nn.Module):
    """The transformer MLP: Linear, GELU, Linear (also the shape of one MoE expert)."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, d_model: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def init_gpt_weights(model: nn.Module, layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the projections that write
    into the residual stream scaled by 1/sqrt(2 * layers) so its variance stays bounded."""
    residual_std = 0.02 / math.sqrt(2 * layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(".proj") else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


class GPT(nn.Module):
    """Decoder-only byte-level transformer; forward(tokens, targets) returns the mean
    next-byte cross-entropy."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.tok_emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(config.context, d))
        self.drop = nn.Dropout(config.dropout)
        hidden = config.mlp_ratio * d
        self.blocks = nn.ModuleList(
            Block(d, config.heads, hidden, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB)  # untied: no parameter is shared between modules
        init_gpt_weights(self, config.layers)
        nn.init.normal_(self.pos, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok_emb(tokens) + self.pos[: tokens.size(1)])
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

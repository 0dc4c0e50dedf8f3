"""The README's walkthrough model: a small GPT-2-like language model in plain PyTorch.

Nothing here knows about Archipelago. `archipelago submit job.yaml` imports this file on your
machine, calls `build(**args)` and captures the module; workers get only the captured graph.
The forward returns logits (`loss: cross_entropy` in job.yaml adds the loss), asserts its
sequence length and ties the output head to the token embedding, as GPT-2 does.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).split(x.size(-1), dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A small GPT: token and position embeddings, blocks, a head tied to the embedding."""

    def __init__(
        self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.context = context
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.size(1) <= self.context, "sequence longer than the context"
        x = self.emb(tokens) + self.pos[: tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # logits


def build(**args: int) -> TinyLM:
    return TinyLM(**args)

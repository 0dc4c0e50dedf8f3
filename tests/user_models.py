"""A user's own model file, as the tests of users' own models write it to disk: a small
GPT-2-like model in plain torch (its output head tied to the token embedding, a forward that
asserts its sequence length), with factories for its two forms (one that returns its loss,
one that returns logits) and for the ways a user's file goes wrong.

`load` imports the same text here, so a test computes the expected loss with plain torch
from exactly the code the submitter captured.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

MODEL_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q = q.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = v.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).flatten(2))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, d=32, heads=2, layers=2, context=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2 ties them
        nn.init.normal_(self.emb.weight, std=0.02)
        self.context = context

    def logits(self, tokens):
        assert tokens.size(1) <= self.context, "sequence longer than the context"
        x = self.emb(tokens) + self.pos[: tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class WithLoss(TinyGPT):
    def forward(self, tokens, targets):
        return F.cross_entropy(self.logits(tokens).flatten(0, 1), targets.flatten())


class Logits(TinyGPT):
    def forward(self, tokens):
        return self.logits(tokens)


class Spectral(TinyGPT):
    """Uses an operator no allow-list has (an FFT)."""

    def forward(self, tokens, targets):
        x = torch.fft.rfft(self.emb(tokens).float(), dim=-1).abs()
        return x.mean()


class Unused(WithLoss):
    """Holds a layer its forward never reads."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spare = nn.Linear(4, 4)


class Tied(Logits):
    """GPT-2's way: the output layer is the input embedding (one parameter, two names), and
    the forward checks its sequence length."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.head.weight = self.emb.weight
        self.context = kw.get("context", 16)

    def forward(self, tokens):
        assert tokens.size(1) <= self.context, "sequence longer than the context"
        return self.logits(tokens)


def build(**kw):
    return WithLoss(**kw)


def build_tied(**kw):
    return Tied(**kw)


def build_logits(**kw):
    return Logits(**kw)


def build_spectral(**kw):
    return Spectral(**kw)


def build_unused(**kw):
    return Unused(**kw)


def broken(**kw):
    raise RuntimeError("the factory is broken")


def not_a_module(**kw):
    return 42
'''


def write_model(folder: Path, name: str = "mymodel.py") -> Path:
    """Write the model file into `folder`; its path."""
    path = folder / name
    path.write_text(MODEL_SOURCE)
    return path


def load(path: Path) -> ModuleType:
    """Import a model file written by `write_model` (for the expected numbers)."""
    name = f"tests_user_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

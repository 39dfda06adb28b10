"""A small decoder-only transformer language model as an ordered list of named blocks.

Blocks are ``"embed"`` (token and learnt positional embeddings), ``"blocks.0"`` …
``"blocks.{depth-1}"`` (pre-norm causal blocks) and ``"readout"`` (final LayerNorm and the
unembedding to next-token logits), which always belongs to the last module. Inputs are
``(N, T)`` int64 tokens, features between blocks ``(N, T, D)``, outputs ``(N, T, V)`` logits.

>>> lm = lm_micro(vocab_size=32, context=16)
>>> [name for name, _ in lm.named_blocks()][:3], lm(torch.zeros(2, 16, dtype=torch.long)).shape
(['embed', 'blocks.0', 'blocks.1'], torch.Size([2, 16, 32]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

EMBED_STD = 0.02
"""Standard deviation of the token and positional embeddings."""


class TokenEmbedding(nn.Module):
    """Token embedding plus a learnt positional embedding for up to ``context`` positions."""

    def __init__(self, vocab_size: int, dim: int, context: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, context, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token.weight, std=EMBED_STD)
        nn.init.normal_(self.position, std=EMBED_STD)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.token(tokens) + self.position[:, :tokens.shape[1]]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from one qkv Linear and an output Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of the {heads} heads; choose dim = heads · k")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "n t (three h e) -> three n h t e", three=3, h=self.heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(rearrange(y, "n h t e -> n t (h e)"))


class DecoderBlock(nn.Module):
    """Pre-norm causal block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Readout(nn.Module):
    """Final LayerNorm and the unembedding: ``(N, T, D) -> (N, T, V)`` next-token logits."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.unembed = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.unembed(self.norm(x))


class DecoderLM(nn.Module):
    """Embedding, ``depth`` causal blocks of width ``dim``, readout."""

    def __init__(self, *, vocab_size: int, context: int, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 4):
        super().__init__()
        if min(vocab_size, context, dim, depth, heads, mlp_ratio) < 1:
            raise ValueError("DecoderLM sizes (vocabulary, context, dim, depth, heads, mlp ratio) must all be "
                             "positive")
        self.vocab_size, self.context, self.dim = vocab_size, context, dim
        self.embed = TokenEmbedding(vocab_size, dim, context)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.readout = Readout(dim, vocab_size)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The ordered blocks local learning splits between: embed, ``blocks.i``, readout."""
        return ([("embed", self.embed)] + [(f"blocks.{i}", b) for i, b in enumerate(self.blocks)]
                + [("readout", self.readout)])

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.readout(x)


def lm_micro(vocab_size: int, context: int) -> DecoderLM:
    """A test- and CPU-sized LM: width 32, 4 blocks, 2 heads, MLP ratio 2."""
    return DecoderLM(vocab_size=vocab_size, context=context, dim=32, depth=4, heads=2, mlp_ratio=2)

"""The GPT itself: a plain PyTorch module you can read top to bottom.

A character-level decoder-only transformer in the style of the microgpt teaching script:
token and learned position embeddings, RMSNorm with no learnable gain, causal multi-head
self-attention and a squared-ReLU MLP in every block, residual connections, and no biases
anywhere. Nothing in this file depends on Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-5


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (no learnable gain)."""
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for one attention layer: (B, n_head, block_size, head_size)."""

    k: torch.Tensor
    v: torch.Tensor


def sequence_mask(positions: torch.Tensor) -> torch.Tensor:
    """Attention mask (B, 1, T, T) for rows of sequences laid end to end, each starting at position 0:
    a token sees the tokens of its own sequence up to itself."""
    sequence = (positions == 0).cumsum(1)
    same = sequence[:, :, None] == sequence[:, None, :]
    return (same & (positions[:, None, :] <= positions[:, :, None]))[:, None]


def size_problem(flag: str = "", **sizes: float) -> str | None:
    """What is wrong with a GPT's sizes (``n_embd``, ``n_head``, ``n_layer``, ``block_size``, ``dropout`` and,
    when given, ``vocab_size``), in one sentence naming each setting with ``flag`` before it; None if nothing."""
    for name in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size"):
        if name in sizes and sizes[name] < 1:
            return f"{flag}{name} must be a positive integer, got {sizes[name]}."
    if sizes["n_embd"] % sizes["n_head"]:
        return f"{flag}n_embd ({sizes['n_embd']}) must be divisible by {flag}n_head ({sizes['n_head']})."
    if not 0 <= sizes["dropout"] < 1:
        return f"{flag}dropout must be in [0, 1), got {sizes['dropout']}."
    return None


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the positions before it."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        # Three matrices, not one fused (3C x C) matmul: the fused one draws the same initial weights but
        # rounds differently in float32, and the seed recipe must match the reference loop to 1e-5.
        self.q = nn.Linear(n_embd, n_embd, bias=False)
        self.k = nn.Linear(n_embd, n_embd, bias=False)
        self.v = nn.Linear(n_embd, n_embd, bias=False)
        self.o = nn.Linear(n_embd, n_embd, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, n_head, T, C // n_head)."""
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend causally; with a ``cache``, ``x`` holds positions ``start..start+T-1`` and the
        cache supplies the earlier ones (either ``start == 0`` or one new position at a time).
        A boolean ``mask`` (B, 1, T, T), true where a query may see a key, replaces the causal triangle."""
        B, T, C = x.shape
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(x)), self.split_heads(self.v(x))
        if cache is not None:
            cache.k[:, :, start : start + T] = k
            cache.v[:, :, start : start + T] = v
            k, v = cache.k[:, :, : start + T], cache.v[:, :, : start + T]
        if start > 0 and T > 1:
            raise ValueError("with a cache, pass either the positions from 0 or one new position.")
        # a single new position sees every cached one; from position 0 the mask is the causal triangle
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=start == 0 and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Two linear maps with a squared ReLU between them, 4x wider in the middle."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.fc2 = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


class Block(nn.Module):
    """One transformer block: pre-norm attention and pre-norm MLP, each added to the residual stream."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = MLP(n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(rms_norm(x), cache, start, mask))
        return x + self.drop(self.mlp(rms_norm(x)))


class GPT(nn.Module):
    """A character-level GPT.

    Args:
        vocab_size: Number of token ids, the end/start token included.
        n_embd: Width of the residual stream.
        n_head: Number of attention heads; must divide ``n_embd``.
        n_layer: Number of transformer blocks.
        block_size: Longest context the model conditions on.
        dropout: Dropout probability on the residual branches and attention weights.
    """

    def __init__(
        self,
        vocab_size: int,
        n_embd: int = 16,
        n_head: int = 4,
        n_layer: int = 1,
        block_size: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        problem = size_problem(vocab_size=vocab_size, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                               block_size=block_size, dropout=dropout)
        if problem:
            raise ValueError(problem)
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every weight from N(0, 0.02) in module order, then zero each block's output projections."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
        for block in self.blocks:
            block.attn.o.weight.zero_()
            block.mlp.fc2.weight.zero_()

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Map token ids (B, T) at positions ``start..start+T-1`` (within block_size) to next-token
        logits (B, T, vocab_size). ``caches`` (one per block, from ``new_caches``) keep keys and values
        so that later calls need only pass the new positions.

        ``positions`` (B, T) instead gives every token its own position, for rows that hold several
        sequences one after another: each sequence starts at position 0 and attends only within itself,
        so it gets the logits it would get alone.
        """
        T = idx.size(1)
        mask = None
        if positions is None:
            if start + T > self.block_size:
                raise ValueError(f"sequence length {start + T} exceeds block_size {self.block_size}.")
            pos = torch.arange(start, start + T, device=idx.device)
        else:
            pos = positions
            mask = sequence_mask(positions)
        x = self.drop(rms_norm(self.wte(idx) + self.wpe(pos)))
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, start, mask)
        return self.lm_head(x)

    def new_caches(self, batch_size: int) -> list[KVCache]:
        """Empty key/value caches for ``batch_size`` sequences, one per block."""
        attn = self.blocks[0].attn
        shape = (batch_size, attn.n_head, self.block_size, self.wte.embedding_dim // attn.n_head)
        like = self.wte.weight
        return [KVCache(like.new_empty(shape), like.new_empty(shape)) for _ in self.blocks]


class Ensemble(nn.Module):
    """Several GPTs with the same vocabulary and context length, predicting the average of their
    next-character probabilities. Its logits are the log of that average, so softmax, cross-entropy
    and ``microgpt.model.sampling`` treat it as one model.

    Args:
        members: The GPTs to average, each given the same weight.
    """

    def __init__(self, members: list[GPT]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model.")
        if len({m.block_size for m in members}) > 1:
            raise ValueError(f"the models' context lengths differ: {[m.block_size for m in members]}.")
        self.members = nn.ModuleList(members)
        self.block_size = members[0].block_size

    def forward(self, idx: torch.Tensor, caches: list[list[KVCache]] | None = None, start: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """As ``GPT.forward``, with one list of caches per member (from ``new_caches``)."""
        log_probs = torch.stack([
            F.log_softmax(m(idx, caches[i] if caches is not None else None, start, positions), dim=-1)
            for i, m in enumerate(self.members)
        ])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))

    def new_caches(self, batch_size: int) -> list[list[KVCache]]:
        """Empty key/value caches for ``batch_size`` sequences, one list per member."""
        return [m.new_caches(batch_size) for m in self.members]

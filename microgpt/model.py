"""The GPT itself: a plain PyTorch module you can read top to bottom.

A character-level decoder-only transformer in the style of the microgpt teaching script:
token and learned position embeddings, RMSNorm with no learnable gain, causal multi-head
self-attention and a squared-ReLU MLP in every block, residual connections, and no biases
anywhere. Nothing in this file depends on Lightning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-5


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (no learnable gain)."""
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and the positions before it."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        # q, k and v in one matrix (rows in that order): one matmul instead of three, and the same
        # random draws as three separate n_embd x n_embd layers built and initialised in turn.
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.o = nn.Linear(n_embd, n_embd, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, n_head, T, C // n_head)."""
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = map(self.split_heads, self.qkv(x).split(C, dim=-1))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(rms_norm(x)))
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
        for name, value in [("vocab_size", vocab_size), ("n_embd", n_embd), ("n_head", n_head),
                            ("n_layer", n_layer), ("block_size", block_size)]:
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}).")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Map token ids (B, T) with T <= block_size to next-token logits (B, T, vocab_size)."""
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}.")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(rms_norm(self.wte(idx) + self.wpe(pos)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)

    @torch.no_grad()
    def generate(
        self, bos: int, num_samples: int, temperature: float = 0.5, generator: torch.Generator | None = None
    ) -> list[list[int]]:
        """Sample ``num_samples`` token sequences one at a time, each started and ended by ``bos``.

        Every step feeds at most the last ``block_size`` tokens, draws the next token with
        ``torch.multinomial`` from the softmax of the logits divided by ``temperature``, and
        stops at ``bos`` or after ``block_size`` tokens. The returned sequences exclude ``bos``.
        """
        device = self.wte.weight.device
        samples = []
        for _ in range(num_samples):
            idx = torch.tensor([[bos]], device=device)
            out: list[int] = []
            for _ in range(self.block_size):
                logits = self(idx[:, -self.block_size :])[0, -1]
                probs = F.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
                if token == bos:
                    break
                out.append(token)
                idx = torch.cat([idx, torch.tensor([[token]], device=device)], dim=1)
            samples.append(out)
        return samples

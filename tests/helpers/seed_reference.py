"""The seed recipe written out by hand in plain PyTorch, independently of the package.

Used by the fidelity tests as the ground truth: same shuffle, same ``torch.manual_seed`` init
order, same data order, same optimizer and schedule. The forward pass exists twice: with torch's
fused primitives (``F.rms_norm``, ``F.scaled_dot_product_attention``), which round exactly like
any float32 program built on them, and with RMSNorm and masked-softmax attention spelled out as
formulas, which agree with the primitives to float64 precision but not bit for bit in float32.
"""

import functools
import math
import random

import torch
import torch.nn.functional as F
from torch import nn


def load_split(path, val_size=1000, seed=42):
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    random.seed(seed)
    random.shuffle(names)
    chars = sorted(set("".join(names)))
    return names[:-val_size], names[-val_size:], chars


def build_params(vocab_size, n_embd=16, n_layer=1, block_size=8):
    """The seed's modules, built in order right after ``torch.manual_seed``, then re-drawn from N(0, 0.02)."""
    p = {"wte": nn.Embedding(vocab_size, n_embd), "wpe": nn.Embedding(block_size, n_embd)}
    for i in range(n_layer):
        for name in ("q", "k", "v", "o"):
            p[f"{i}.{name}"] = nn.Linear(n_embd, n_embd, bias=False)
        p[f"{i}.fc1"] = nn.Linear(n_embd, 4 * n_embd, bias=False)
        p[f"{i}.fc2"] = nn.Linear(4 * n_embd, n_embd, bias=False)
    p["lm_head"] = nn.Linear(n_embd, vocab_size, bias=False)
    weights = {k: m.weight for k, m in p.items()}
    with torch.no_grad():
        for w in weights.values():
            w.normal_(0.0, 0.02)
        for i in range(n_layer):
            weights[f"{i}.o"].zero_()
            weights[f"{i}.fc2"].zero_()
    return weights


def rmsnorm(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)


def attention_formula(q, k, v, n_head):
    T, C = q.shape
    hs = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    heads = []
    for j in range(n_head):
        sl = slice(j * hs, (j + 1) * hs)
        att = (q[:, sl] @ k[:, sl].T) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(att @ v[:, sl])
    return torch.cat(heads, -1)


def attention_fused(q, k, v, n_head):
    T, C = q.shape
    q, k, v = (t.view(1, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(T, C)


def forward(w, tokens, n_head=4, n_layer=1, spelled_out=False):
    """Logits for a single sequence of token ids (a 1-D tensor)."""
    norm = rmsnorm if spelled_out else (lambda x: F.rms_norm(x, (x.shape[-1],), eps=1e-5))
    attention = attention_formula if spelled_out else attention_fused
    T = len(tokens)
    x = norm(w["wte"][tokens] + w["wpe"][:T])
    for i in range(n_layer):
        h = norm(x)
        q, k, v = (h @ w[f"{i}.{n}"].T for n in "qkv")
        x = x + attention(q, k, v, n_head) @ w[f"{i}.o"].T
        h = norm(x)
        x = x + (torch.relu(h @ w[f"{i}.fc1"].T) ** 2) @ w[f"{i}.fc2"].T
    return x @ w["lm_head"].T


def encode(name, stoi, bos, block_size):
    return ([bos] + [stoi[c] for c in name] + [bos])[: block_size + 1]


def train_seed(path, steps=500, block_size=8, lr=1e-2, num_samples=20, temperature=0.5,
               dtype=torch.float32, spelled_out=False):
    """Run the seed recipe; return per-step losses, the held-out NLL, and the sampled names."""
    train, val, chars = load_split(path)
    stoi = {c: i for i, c in enumerate(chars)}
    bos = len(chars)
    torch.manual_seed(42)
    w = {k: v.detach().to(dtype).requires_grad_() for k, v in build_params(len(chars) + 1, block_size=block_size).items()}
    forward_ = functools.partial(forward, spelled_out=spelled_out)
    opt = torch.optim.Adam(w.values(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    losses = []
    for step in range(steps):
        tokens = torch.tensor(encode(train[step % len(train)], stoi, bos, block_size))
        loss = F.cross_entropy(forward_(w, tokens[:-1]), tokens[1:])
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        total, count = 0.0, 0
        for name in val:
            tokens = torch.tensor(encode(name, stoi, bos, block_size))
            nll = F.cross_entropy(forward_(w, tokens[:-1]), tokens[1:], reduction="sum")
            total, count = total + nll.item(), count + len(tokens) - 1
        # all names are drawn in parallel: one multinomial call over every sequence per step, until all have ended
        seqs = [[bos] for _ in range(num_samples)]
        ended = [False] * num_samples
        for _ in range(block_size if num_samples else 0):
            logits = torch.stack([forward_(w, torch.tensor(seq[-block_size:]))[-1] for seq in seqs])
            tokens = torch.multinomial(F.softmax(logits / temperature, -1), 1)[:, 0].tolist()
            for seq, token in zip(seqs, tokens):
                seq.append(token)
            ended = [e or t == bos for e, t in zip(ended, tokens)]
            if all(ended):
                break
        samples = []
        for seq in seqs:
            body = seq[1:]
            body = body[: body.index(bos)] if bos in body else body
            samples.append("".join(chars[t] for t in body))
    return losses, total / count, samples

"""Drawing continuations from a GPT (or an Ensemble): the one sampling loop of microgpt. Torch only.

``generate`` takes a list of ``SampleRequest``s, each with its own prompt, count, temperature, top-k, top-p
and random numbers, and draws every continuation of every request together, one forward pass per step for
all rows. ``sample``, ``predict``, the sampling callback and ``serve`` all draw through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from microgpt.model.gpt import GPT, Ensemble


def sampling_problem(temperature: float, top_k: int | None = None, top_p: float | None = None) -> str | None:
    """What is wrong with the settings of a draw, in one sentence naming the setting; None if nothing."""
    if not temperature > 0:
        return f"temperature must be positive, got {temperature}."
    if top_k is not None and top_k < 1:
        return f"top_k must be a positive integer, got {top_k}."
    if top_p is not None and not 0 < top_p <= 1:
        return f"top_p must be in (0, 1], got {top_p}."
    return None


@dataclass
class SampleRequest:
    """``count`` continuations of ``prompt`` (token ids).

    Args:
        prompt: Token ids to continue, normally the end/start token followed by a prefix.
        count: How many continuations.
        temperature: Softmax temperature, positive.
        top_k: Draw only among the k most likely tokens; all when unset.
        top_p: Draw only among the smallest set of likeliest tokens whose probability reaches top_p; all when unset.
        generator: The random numbers of this request alone; torch's global ones when unset.
    """

    prompt: list[int]
    count: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@torch.no_grad()
def generate(model: GPT | Ensemble, requests: list[SampleRequest], end_token: int,
             max_new_tokens: int | None = None) -> list[list[list[int]]]:
    """The new tokens (without ``end_token``) of every continuation of every request, drawn together.

    Each step draws one token for every row of a request with one ``torch.multinomial`` over the request's
    (count, vocabulary) block, from the softmax of the logits divided by its temperature, keeping only its
    ``top_k`` likeliest tokens when given, then only the smallest set of likeliest tokens whose probability
    reaches its ``top_p`` (nucleus sampling). A request with a generator draws from it alone, so a seeded
    request gets the same tokens whatever else is in the batch (up to float rounding of the logits, which may
    differ in the last bits with the batch's shape); requests without one draw together from torch's global
    random numbers. A request draws until every continuation has drawn ``end_token`` or ``max_new_tokens``
    (default ``block_size``) tokens; its ended rows draw on with the others, so a request's random numbers do
    not depend on when each row ended.

    All rows read the positions that every prompt has in one pass; then every row advances one position per
    step, feeding its prompt's remaining tokens before it draws. Keys and values are cached, so a step costs
    one position; once the rows outgrow the context, each step re-reads the last ``block_size`` tokens, as
    the model was trained.
    """
    if not requests:
        return []
    for r in requests:
        if r.count < 1 or not r.prompt:
            raise ValueError("every request needs a prompt and a positive count.")
        if problem := sampling_problem(r.temperature, r.top_k, r.top_p):
            raise ValueError(problem)
    max_new_tokens = model.block_size if max_new_tokens is None else max_new_tokens
    device = next(model.parameters()).device
    counts = [r.count for r in requests]
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    repeat = torch.tensor(counts, device=device)
    per_row = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device).repeat_interleave(repeat)[:, None]
    width = max(len(r.prompt) for r in requests)
    common = min(len(r.prompt) for r in requests)  # positions every row reads from its prompt
    prompts = torch.tensor([r.prompt + [end_token] * (width - len(r.prompt)) for r in requests], device=device)
    prompts = prompts.repeat_interleave(repeat, dim=0)
    caches = model.new_caches(len(prompts))
    context = prompts[:, :common][:, -model.block_size:]
    logits = model(context, caches)[:, -1]
    vocab_size = logits.size(-1)
    temperature = per_row([r.temperature for r in requests], torch.float)
    top_k = per_row([min(r.top_k or vocab_size, vocab_size) for r in requests], torch.long)
    # a top_p of 1 keeps every token: no cut at all, rather than one a rounded cumulative sum could make
    top_p = per_row([r.top_p if r.top_p is not None and r.top_p < 1 else float("inf") for r in requests], torch.float)
    cut_k, cut_p = bool((top_k < vocab_size).any()), bool(torch.isfinite(top_p).any())
    lengths = per_row([len(r.prompt) for r in requests], torch.long)[:, 0]

    draws = [0] * len(requests)
    done = [False] * len(requests)
    ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    history = []  # the token of every row at positions common, common + 1, ...: its prompt's, then its draws
    position = common
    while True:
        tokens = prompts[:, position] if position < width else torch.full_like(prompts[:, 0], end_token)
        drawing = [i for i, r in enumerate(requests) if not done[i] and len(r.prompt) <= position]
        if drawing:
            probs = F.softmax(choices(logits / temperature, top_k if cut_k else None, top_p if cut_p else None), dim=-1)
            tokens = tokens.clone()
            shared = [i for i in drawing if requests[i].generator is None]
            if shared:  # the requests without a generator draw from torch's global one, together
                rows = torch.tensor([row for i in shared for row in range(bounds[i], bounds[i + 1])], device=device)
                tokens[rows] = torch.multinomial(probs[rows], 1)[:, 0]
            for i in drawing:
                if requests[i].generator is not None:
                    a, b = bounds[i], bounds[i + 1]
                    tokens[a:b] = torch.multinomial(probs[a:b], 1, generator=requests[i].generator)[:, 0]
                draws[i] += 1
            ended |= (tokens == end_token) & (lengths <= position)
            ended_rows = ended.tolist()
            for i in drawing:
                done[i] = all(ended_rows[bounds[i]:bounds[i + 1]]) or draws[i] == max_new_tokens
        history.append(tokens)
        if all(done):
            break
        context = torch.cat([context, tokens[:, None]], dim=1)
        if context.size(1) <= model.block_size:  # the cache has room: feed the new position only
            logits = model(tokens[:, None], caches, start=context.size(1) - 1)[:, -1]
        else:  # the window slides and every position shifts: re-read it whole
            context = context[:, -model.block_size:]
            logits = model(context)[:, -1]
        position += 1
    history = torch.stack(history, dim=1).tolist()
    out = []
    for i, r in enumerate(requests):
        first = len(r.prompt) - common  # the column of its first draw
        rows = [row[first : first + draws[i]] for row in history[bounds[i]:bounds[i + 1]]]
        out.append([row[: row.index(end_token)] if end_token in row else row for row in rows])
    return out


def choices(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """``logits`` (B, V) with -inf outside each row's ``top_k`` likeliest tokens (B, 1), then outside the
    nucleus of probability ``top_p`` (B, 1) of what is left (None: no cut)."""
    if top_k is not None:
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, top_k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits if top_p is None else keep_top_p(logits, top_p)


def keep_top_p(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """``logits`` (..., V) with -inf outside each row's nucleus: the smallest set of likeliest tokens whose
    probability reaches ``top_p`` (a number, or one per row shaped (..., 1)). The likeliest token always stays."""
    ranked, order = logits.sort(dim=-1, descending=True)
    probs = F.softmax(ranked, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the probability of the tokens ranked above each one
    drop = before >= top_p  # p was already reached without this token
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))

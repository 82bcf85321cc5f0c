"""Many sampling requests in one batch of rows, each with its own prompt, settings and random numbers.

This is how ``serve`` answers the requests that arrive together with one forward pass per step. Torch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from microgpt.model.gpt import GPT, Ensemble, keep_top_p, sampling_problem


@dataclass
class SampleRequest:
    """``count`` continuations of ``prompt`` (token ids), drawn as ``GPT.generate`` draws them.

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
def generate_batch(model: GPT | Ensemble, requests: list[SampleRequest], end_token: int,
                   max_new_tokens: int | None = None) -> list[list[list[int]]]:
    """The new tokens (without ``end_token``) of every continuation of every request, generated together.

    Every row starts at position 0 and all rows advance one position per step with one forward pass, sharing
    the key/value cache (and, past ``block_size``, the sliding window); a row feeds its prompt's tokens until
    they run out, then draws. A request draws with its own generator, a (count, vocabulary) block per step,
    from its first token after the prompt until its continuations have ended or drawn ``max_new_tokens``
    (default ``block_size``): the very draws ``model.generate`` makes for that request alone. So a seeded
    request gets the same tokens whatever else is in the batch (up to float rounding of the logits, which
    may differ in the last bits with the batch's shape). Requests without a generator draw together from
    torch's global random numbers. ``stream_batch`` gives the same continuations as each one ends.
    """
    out = [[[] for _ in range(r.count)] for r in requests]
    for finished in stream_batch(model, requests, end_token, max_new_tokens):
        for i, row, tokens in finished:
            out[i][row] = tokens
    return out


@torch.no_grad()
def stream_batch(model: GPT | Ensemble, requests: list[SampleRequest], end_token: int,
                 max_new_tokens: int | None = None,
                 cancelled: Callable[[], set[int]] | None = None) -> Iterator[list[tuple[int, int, list[int]]]]:
    """``generate_batch``'s continuations as they end: after every step, the ``(request, row, tokens)`` that
    ended in it (possibly none). Before each step, ``cancelled()`` names requests to drop: their rows leave the
    batch at once and draw nothing more; the others draw exactly what they would have drawn."""
    if not requests:
        return
    for r in requests:
        if r.count < 1 or not r.prompt:
            raise ValueError("every request needs a prompt and a positive count.")
        if problem := sampling_problem(r.temperature, r.top_k, r.top_p):
            raise ValueError(problem)
    max_new_tokens = model.block_size if max_new_tokens is None else max_new_tokens
    device = next(model.parameters()).device
    live = list(range(len(requests)))  # the requests whose rows are in the batch, in row order
    counts = [r.count for r in requests]
    width = max(len(r.prompt) for r in requests)
    prompts = torch.tensor([r.prompt + [end_token] * (width - len(r.prompt)) for r in requests], device=device)
    prompts = prompts.repeat_interleave(torch.tensor(counts, device=device), dim=0)
    per_row = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device).repeat_interleave(
        torch.tensor(counts, device=device))[:, None]
    caches = model.new_caches(len(prompts))
    context = prompts[:, :1]
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
    sent = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # rows whose continuation was given out
    ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    history = prompts[:, :0]  # the token of every row at positions 1, 2, ...: its prompt's, then its draws
    position = 1
    while True:
        dropped = set(cancelled()) & set(live) if cancelled is not None else set()
        if dropped:  # take the cancelled requests' rows out of every per-row tensor
            keep = torch.tensor(rows_of(live, counts, set(live) - dropped), device=device)
            live = [i for i in live if i not in dropped]
            if not live:
                return
            prompts, temperature, top_k, top_p, lengths = (t[keep] for t in (prompts, temperature, top_k, top_p, lengths))
            sent, ended, history, context, logits = (t[keep] for t in (sent, ended, history, context, logits))
            for cache in caches:
                cache.k, cache.v = cache.k[keep], cache.v[keep]
            for i in dropped:
                done[i] = True
        starts = [0, *torch.tensor([counts[i] for i in live]).cumsum(0).tolist()]
        bounds = {i: (starts[n], starts[n + 1]) for n, i in enumerate(live)}
        tokens = prompts[:, position] if position < width else torch.full_like(prompts[:, 0], end_token)
        drawing = [i for i in live if not done[i] and len(requests[i].prompt) <= position]
        finished = []
        if drawing:
            probs = F.softmax(choices(logits / temperature, top_k if cut_k else None, top_p if cut_p else None), dim=-1)
            tokens = tokens.clone()
            shared = [i for i in drawing if requests[i].generator is None]
            if shared:  # the requests without a generator draw from torch's global one, together
                rows = torch.tensor([row for i in shared for row in range(*bounds[i])], device=device)
                tokens[rows] = torch.multinomial(probs[rows], 1)[:, 0]
            for i in drawing:
                if requests[i].generator is not None:
                    a, b = bounds[i]
                    tokens[a:b] = torch.multinomial(probs[a:b], 1, generator=requests[i].generator)[:, 0]
                draws[i] += 1
            ended |= (tokens == end_token) & (lengths <= position)
            ended_rows = ended.tolist()
            for i in drawing:
                a, b = bounds[i]
                done[i] = all(ended_rows[a:b]) or draws[i] == max_new_tokens
        history = torch.cat([history, tokens[:, None]], dim=1)
        if drawing:
            ready = (ended | torch.tensor([done[i] for i in live], device=device).repeat_interleave(
                torch.tensor([counts[i] for i in live], device=device))) & ~sent
            if ready.any():
                sent |= ready
                ready_rows = ready.nonzero()[:, 0].tolist()
                owner = [(i, row - bounds[i][0]) for i in live for row in range(*bounds[i])]
                for row in ready_rows:
                    i, r = owner[row]
                    first = len(requests[i].prompt) - 1  # the column of its first draw
                    drawn = history[row, first : first + draws[i]].tolist()
                    finished.append((i, r, drawn[: drawn.index(end_token)] if end_token in drawn else drawn))
        yield finished
        if all(done[i] for i in live):
            return
        context = torch.cat([context, tokens[:, None]], dim=1)
        if context.size(1) <= model.block_size:  # the cache has room: feed the new position only
            logits = model(tokens[:, None], caches, start=context.size(1) - 1)[:, -1]
        else:  # the window slides and every position shifts: re-read it whole
            context = context[:, -model.block_size:]
            logits = model(context)[:, -1]
        position += 1


def rows_of(live: list[int], counts: list[int], wanted: set[int]) -> list[int]:
    """The batch rows (in the order of ``live``) of the requests in ``wanted``."""
    rows, start = [], 0
    for i in live:
        if i in wanted:
            rows.extend(range(start, start + counts[i]))
        start += counts[i]
    return rows


def choices(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """``logits`` (B, V) with -inf outside each row's ``top_k`` likeliest tokens (B, 1), then outside the
    nucleus of probability ``top_p`` (B, 1) of what is left: per row, what ``GPT.generate`` keeps (None: no cut)."""
    if top_k is not None:
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, top_k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits if top_p is None else keep_top_p(logits, top_p)

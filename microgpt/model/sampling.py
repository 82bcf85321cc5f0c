"""Drawing continuations from a GPT (or an Ensemble): the one sampling loop of microgpt. Torch only.

``stream_rows`` is the one loop that draws characters: it takes a list of ``SampleRequest``s, each with its own
prompt, count, temperature, top-k, top-p and random numbers, draws every continuation of every request
together, one forward pass per step for all rows, and gives each out as it ends. ``Drawing`` adds rounds of
redraws for the requests that turn draws down, and ``generate`` collects what it keeps. ``sample``,
``predict``, the sampling callback and ``serve`` (streamed or not) all draw through them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

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
        lengths: ``(fewest, most)`` new tokens before ``end_token``: a continuation must end within them.
            Unset, one ends at ``end_token`` or is cut after ``max_new_tokens``.
        unique: No continuation twice.
        refuse: Continuations (new tokens, without the end) to draw again instead, e.g. names already known.
        max_tries: With ``lengths``, ``unique`` or ``refuse``: at most this many continuations are drawn in
            all (default ``TRIES_PER_NAME`` per one asked for); fewer than ``count`` may come back.
    """

    prompt: list[int]
    count: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    lengths: tuple[int, int] | None = None
    unique: bool = False
    refuse: Callable[[list[int]], bool] | None = None
    max_tries: int | None = None

    @property
    def selective(self) -> bool:
        """Whether some draws may be turned down and drawn again."""
        return self.lengths is not None or self.unique or self.refuse is not None


@dataclass
class Drawn:
    """What ``generate`` drew for one request: the continuations (new tokens without the end), the natural log
    of the model's probability of each given the prompt (at temperature 1 with no cut; its end included when it
    ended, rather than being cut at the most tokens), and how many continuations it drew to find them."""

    tokens: list[list[int]]
    logprobs: list[float]
    tries: int


TRIES_PER_NAME = 100  # continuations drawn at most, per one asked for, by a request that turns some down
ROUND_ROWS = 2048  # rows a request adds to a round of redraws at most


@torch.no_grad()
def generate(model: GPT | Ensemble, requests: list[SampleRequest], end_token: int,
             max_new_tokens: int | None = None) -> list[Drawn]:
    """Every continuation of every request, drawn together: what a ``Drawing`` of them keeps, once it is over."""
    drawing = Drawing(model, requests, end_token, max_new_tokens)
    for _ in drawing:
        pass
    return drawing.found


class Drawing:
    """Every continuation of every request, drawn together, given out as each is kept: iterating yields, after
    every step of drawing, the ``(request, index, tokens, logprob)`` of the continuations kept in it (possibly
    none), ``index`` being its place among its request's continuations; ``found`` holds them all (for each
    request, ``Drawn``) when the iteration is over.

    A request that turns some draws down (``lengths``, ``unique``, ``refuse``) keeps the ones it takes, in the
    order of its rows, and draws again in further rounds until it has ``count`` or has drawn ``max_tries``.
    Turning down a draw from the model's distribution and drawing again is exact rejection sampling: the names
    it keeps follow the model's distribution conditioned on being taken (a length range, new, not yet drawn).
    The first round draws ``count`` rows, so a request that takes every draw gets exactly one round, the draws
    it always got; a round's size depends only on the request's own draws so far, so a seeded request gets the
    same continuations whatever else is in the batch. Such a request's continuation is given out once every row
    before it has ended, so a stream keeps what a whole round keeps; one that takes every draw gives each out
    as it ends.

    ``cancelled()``, called before each step, names requests (by position in ``requests``) to drop: their rows
    leave the batch at once and they draw nothing more; the others draw exactly what they would have drawn.
    """

    def __init__(self, model: GPT | Ensemble, requests: list[SampleRequest], end_token: int,
                 max_new_tokens: int | None = None, cancelled: Callable[[], set[int]] | None = None):
        for r in requests:
            if r.count < 1 or not r.prompt:
                raise ValueError("every request needs a prompt and a positive count.")
            if problem := sampling_problem(r.temperature, r.top_k, r.top_p):
                raise ValueError(problem)
            if r.lengths is not None and not 0 <= r.lengths[0] <= r.lengths[1]:
                raise ValueError(f"lengths must be (fewest, most) with 0 <= fewest <= most, got {r.lengths}.")
        self.model, self.requests, self.end_token, self.max_new_tokens = model, requests, end_token, max_new_tokens
        self.cancelled = cancelled
        # a request that takes every draw fills its rows' places as they end, in any order
        self.found = [Drawn([], [], 0) if r.selective else Drawn([None] * r.count, [None] * r.count, 0)
                      for r in requests]

    def __iter__(self) -> Iterator[list[tuple[int, int, list[int], float]]]:
        requests, found = self.requests, self.found
        seen: list[set[tuple[int, ...]]] = [set() for _ in requests]
        rows = [r.count for r in requests]
        gone: set[int] = set()
        while True:
            active = [i for i, n in enumerate(rows) if n > 0 and i not in gone]
            if not active:
                return

            def dropped(active: list[int] = active) -> set[int]:  # this round's cancelled requests, by place in it
                gone.update(set(self.cancelled()) & set(active))
                return {k for k, i in enumerate(active) if i in gone}

            waiting: dict[int, dict[int, tuple[list[int], float, bool]]] = {i: {} for i in active}
            decided = dict.fromkeys(active, 0)  # a selective request's rows before this one are decided
            round_requests = [replace(requests[i], count=rows[i]) for i in active]
            for finished in stream_rows(self.model, round_requests, self.end_token, self.max_new_tokens,
                                        dropped if self.cancelled is not None else None):
                kept = []
                for k, row, tokens, logprob, ended in finished:
                    i = active[k]
                    r, got = requests[i], found[i]
                    if not r.selective:
                        got.tokens[row], got.logprobs[row] = tokens, logprob
                        kept.append((i, row, tokens, logprob))
                        continue
                    waiting[i][row] = tokens, logprob, ended
                    while decided[i] in waiting[i]:
                        tokens, logprob, ended = waiting[i].pop(decided[i])
                        decided[i] += 1
                        if len(got.tokens) < r.count and takes(r, tokens, ended, seen[i]):
                            got.tokens.append(tokens)
                            got.logprobs.append(logprob)
                            kept.append((i, len(got.tokens) - 1, tokens, logprob))
                yield kept
            for i in active:
                if i not in gone:
                    found[i].tries += rows[i]
                    rows[i] = next_round(requests[i], len(found[i].tokens), found[i].tries)


def takes(request: SampleRequest, continuation: list[int], ended: bool, seen: set[tuple[int, ...]]) -> bool:
    """Whether ``request`` keeps a drawn continuation (remembering it in ``seen`` for ``unique``)."""
    if request.lengths is not None and not (ended and request.lengths[0] <= len(continuation) <= request.lengths[1]):
        return False
    if request.unique:
        key = tuple(continuation)
        if key in seen:
            return False
        seen.add(key)
    return request.refuse is None or not request.refuse(continuation)


def next_round(request: SampleRequest, kept: int, tries: int) -> int:
    """How many rows ``request`` draws in its next round: enough for the continuations it still needs at the rate
    it has kept them so far, within its tries left (0: it is done)."""
    needed = request.count - kept
    if needed == 0 or not request.selective:
        return 0
    left = (request.max_tries or TRIES_PER_NAME * request.count) - tries
    return max(0, min(left, max(needed, min(ROUND_ROWS, math.ceil(needed * tries / max(kept, 1))))))


@torch.no_grad()
def stream_rows(model: GPT | Ensemble, requests: list[SampleRequest], end_token: int,
                max_new_tokens: int | None = None, cancelled: Callable[[], set[int]] | None = None,
                ) -> Iterator[list[tuple[int, int, list[int], float, bool]]]:
    """One round: ``count`` continuations of every request, drawn together, the one loop that draws characters.
    After every step it yields the ``(request, row, tokens, logprob, ended)`` of the rows that finished in it
    (possibly none): the new tokens without the end, the natural log of the model's probability of them given
    the prompt (at temperature 1 with no cut; the end included when it ended), and whether the row drew
    ``end_token`` rather than being cut. Before each step, ``cancelled()`` names requests (by position in
    ``requests``) to drop: their rows leave every per-row tensor and the caches, and they draw nothing more.

    Each step draws one token for every row of a request with one ``torch.multinomial`` over the request's
    (rows, vocabulary) block, from the softmax of the logits divided by its temperature, keeping only its
    ``top_k`` likeliest tokens when given, then only the smallest set of likeliest tokens whose probability
    reaches its ``top_p`` (nucleus sampling). A request with a generator draws from it alone, so a seeded
    request gets the same tokens whatever else is in the batch (up to float rounding of the logits, which may
    differ in the last bits with the batch's shape); requests without one draw together from torch's global
    random numbers. A request draws until every continuation has drawn ``end_token`` or the most it may draw
    (with ``lengths``, one more than the most new tokens, to see the end; else ``max_new_tokens``, default
    ``block_size``); its ended rows draw on with the others, so a request's random numbers do not depend on
    when each row ended.

    All rows read the positions that every prompt has in one pass; then every row advances one position per
    step, feeding its prompt's remaining tokens before it draws. Keys and values are cached, so a step costs
    one position; once the rows outgrow the context, each step re-reads the last ``block_size`` tokens, as
    the model was trained.
    """
    if not requests:
        return
    default_most = model.block_size if max_new_tokens is None else max_new_tokens
    most = [default_most if r.lengths is None else r.lengths[1] + 1 for r in requests]
    device = next(model.parameters()).device
    counts = [r.count for r in requests]
    members = list(range(len(requests)))  # the requests whose rows are in the batch, in row order
    per_row = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device).repeat_interleave(
        torch.tensor(counts, device=device))[:, None]
    width = max(len(r.prompt) for r in requests)
    common = min(len(r.prompt) for r in requests)  # positions every row reads from its prompt
    prompts = torch.tensor([r.prompt + [end_token] * (width - len(r.prompt)) for r in requests], device=device)
    prompts = prompts.repeat_interleave(torch.tensor(counts, device=device), dim=0)
    caches = model.new_caches(len(prompts))
    context = prompts[:, :common][:, -model.block_size:]
    logits = model(context, caches)[:, -1]
    vocab_size = logits.size(-1)
    temperature = per_row([r.temperature for r in requests], torch.float)
    top_k = per_row([min(r.top_k or vocab_size, vocab_size) for r in requests], torch.long)
    # a top_p of 1 keeps every token: no cut at all, rather than one a rounded cumulative sum could make
    top_p = per_row([r.top_p if r.top_p is not None and r.top_p < 1 else float("inf") for r in requests], torch.float)
    cut_k, cut_p = bool((top_k < vocab_size).any()), bool(torch.isfinite(top_p).any())

    draws = [0] * len(requests)
    done = [False] * len(requests)
    ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    sent = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # rows already given out
    logprob = torch.zeros(len(prompts), device=device)
    history = prompts[:, :0]  # the token of every row at positions common, common + 1, ...: its prompt's, then its draws
    position = common
    while True:
        dropped = set(cancelled()) & set(members) if cancelled is not None else set()
        if dropped:  # take the cancelled requests' rows out of every per-row tensor and the caches
            keep = torch.tensor(rows_of(members, counts, set(members) - dropped), dtype=torch.long, device=device)
            members = [i for i in members if i not in dropped]
            if not members:
                return
            prompts, temperature, top_k, top_p = (t[keep] for t in (prompts, temperature, top_k, top_p))
            ended, sent, logprob, history, context, logits = (t[keep] for t in (ended, sent, logprob, history,
                                                                                context, logits))
            for cache in caches:
                cache.k, cache.v = cache.k[keep], cache.v[keep]
            for i in dropped:
                done[i] = True
        sizes = torch.tensor([counts[i] for i in members], device=device)
        starts = [0, *sizes.cumsum(0).tolist()]
        bounds = {i: (starts[n], starts[n + 1]) for n, i in enumerate(members)}
        tokens = prompts[:, position] if position < width else torch.full_like(prompts[:, 0], end_token)
        drawing = [i for i in members if not done[i] and len(requests[i].prompt) <= position]
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
            live = torch.tensor([i in drawing for i in members], device=device).repeat_interleave(sizes)  # rows that drew
            # the model's own probability of each drawn token, for the rows that had not ended before it
            gain = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]
            logprob += torch.where(live & ~ended, gain, torch.zeros_like(gain))
            ended |= live & (tokens == end_token)
            ended_rows = ended.tolist()
            for i in drawing:
                done[i] = all(ended_rows[bounds[i][0]:bounds[i][1]]) or draws[i] == most[i]
        history = torch.cat([history, tokens[:, None]], dim=1)
        if drawing:
            over = torch.tensor([done[i] for i in members], device=device).repeat_interleave(sizes)
            ready = (ended | over) & ~sent
            if ready.any():
                sent |= ready
                logprobs = logprob.tolist()
                owner = [(i, row) for i in members for row in range(counts[i])]
                for row in ready.nonzero()[:, 0].tolist():
                    i, r = owner[row]
                    first = len(requests[i].prompt) - common  # the column of its first draw
                    drawn = history[row, first : first + draws[i]].tolist()
                    finished.append((i, r, drawn[: drawn.index(end_token)] if end_token in drawn else drawn,
                                     logprobs[row], ended_rows[row]))
        yield finished
        if all(done[i] for i in members):
            return
        context = torch.cat([context, tokens[:, None]], dim=1)
        if context.size(1) <= model.block_size:  # the cache has room: feed the new position only
            logits = model(tokens[:, None], caches, start=context.size(1) - 1)[:, -1]
        else:  # the window slides and every position shifts: re-read it whole
            context = context[:, -model.block_size:]
            logits = model(context)[:, -1]
        position += 1


def rows_of(members: list[int], counts: list[int], wanted: set[int]) -> list[int]:
    """The batch rows (in the order of ``members``) of the requests in ``wanted``."""
    rows, start = [], 0
    for i in members:
        if i in wanted:
            rows.extend(range(start, start + counts[i]))
        start += counts[i]
    return rows


@dataclass
class Likeliest:
    """What ``likeliest`` found: the continuations, most probable first, the natural log of each one's
    probability given the prompt (its end included), and whether the search ran out of nodes to expand."""

    tokens: list[list[int]]
    logprobs: list[float]
    exhausted: bool


EXPAND_AT_ONCE = 256  # nodes of the character tree read in one forward pass
MAX_EXPANDED = 100_000  # nodes a search reads at most (the 1,000 likeliest names of names.txt take under 20,000)


@torch.no_grad()
def likeliest(model: GPT | Ensemble, prompt: list[int], end_token: int, count: int, lengths: tuple[int, int],
              refuse: Callable[[list[int]], bool] | None = None, max_expanded: int = MAX_EXPANDED) -> Likeliest:
    """The ``count`` most probable continuations of ``prompt`` that end within ``lengths`` = ``(fewest, most)``
    new tokens and are not refused, by the model's own probabilities (temperature 1, no cut).

    An exact best-first search of the tree of continuations: a priority queue holds partial continuations and
    finished ones (ended, in range, not refused), each with its log-probability. A partial one is an upper bound
    on every continuation under it, since adding a token only lowers the probability, so a finished one that
    tops the queue is the likeliest still to be found. Partial ones are read up to ``EXPAND_AT_ONCE`` at a time
    in one forward pass; any below the ``count``-th best finished one found so far is dropped, since nothing
    under it can enter the result. Gives up after reading ``max_expanded`` nodes (``exhausted``).
    """
    fewest, most = lengths
    if len(prompt) + most > model.block_size:
        raise ValueError(f"a prompt of {len(prompt)} tokens and {most} new ones exceed block_size {model.block_size}.")
    device = next(model.parameters()).device
    # (-logprob, order pushed, tokens, finished): heapq pops the most probable first
    queue: list[tuple[float, int, tuple[int, ...], bool]] = [(-0.0, 0, (), False)]
    best: list[float] = []  # the log-probabilities of the ``count`` likeliest finished continuations so far
    pushed, expanded = 1, 0
    found = Likeliest([], [], False)
    floor = lambda: best[0] if len(best) == count else -math.inf
    while queue and len(found.tokens) < count:
        if queue[0][3]:
            negative, _, tokens, _ = heapq.heappop(queue)
            found.tokens.append(list(tokens))
            found.logprobs.append(-negative)
            continue
        nodes = []
        while queue and not queue[0][3] and len(nodes) < EXPAND_AT_ONCE:
            node = heapq.heappop(queue)
            if -node[0] >= floor():
                nodes.append(node)
        if not nodes:
            continue
        if expanded >= max_expanded:
            found.exhausted = True
            break
        expanded += len(nodes)
        rows = [prompt + list(tokens) for _, _, tokens, _ in nodes]
        width = max(map(len, rows))
        idx = torch.tensor([row + [end_token] * (width - len(row)) for row in rows], device=device)
        last = torch.tensor([len(row) - 1 for row in rows], device=device)
        logits = model(idx)[torch.arange(len(rows), device=device), last]
        parents = torch.tensor([-n[0] for n in nodes], dtype=torch.float64)[:, None]
        children = (F.log_softmax(logits.float(), dim=-1).cpu().double() + parents).tolist()
        for (_, _, tokens, _), scores in zip(nodes, children):
            for token, score in enumerate(scores):
                if score < floor() or score == -math.inf:
                    continue
                if token == end_token:
                    if fewest <= len(tokens) and (refuse is None or not refuse(list(tokens))):
                        heapq.heappush(queue, (-score, pushed, tokens, True))
                        if len(best) < count:
                            heapq.heappush(best, score)
                        else:
                            heapq.heappushpop(best, score)
                elif len(tokens) < most:
                    heapq.heappush(queue, (-score, pushed, (*tokens, token), False))
                else:
                    continue
                pushed += 1
    return found


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

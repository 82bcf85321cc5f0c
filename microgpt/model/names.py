"""Names from a model with the options people draw them with: a length range, only new names, no repeats, the
likeliest names, and each name's log-probability. The settings are checked here, once, for ``sample``,
``predict``, the sampling callback, ``serve`` and the Python API, and every draw goes through
``microgpt.model.sampling``. ``score_names`` scores names as ``test`` does. Torch only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from microgpt.errors import UserError
from microgpt.model.gpt import GPT, Ensemble
from microgpt.model.sampling import MAX_EXPANDED, Drawing, SampleRequest, likeliest, sampling_problem
from microgpt.model.tokenizer import CharTokenizer

LIKELIEST_MAX = 1000  # names one --likeliest search returns at most


class Known(Protocol):
    """The names of the run that made a checkpoint (``microgpt.data.known.KnownNames``)."""

    def kind(self, name: str) -> str | None:
        """``"training"``, ``"held-out"``, or None for a new name."""


@dataclass
class NameOptions:
    """How to draw names.

    Args:
        count: How many names.
        prefix: Every name starts with these characters.
        temperature: Softmax temperature, positive.
        top_k: Draw only among the k likeliest characters; all when unset.
        top_p: Draw only among the fewest likeliest characters whose probability reaches this; all when unset.
        min_length: Names have at least this many characters, the prefix included.
        max_length: Names have at most this many characters, the prefix included.
        only_new: Only names that are neither training nor held-out names of the run that made the model.
        unique: No name twice.
        likeliest: This many of the most probable names instead of drawn ones, most probable first (by the
            model's own probabilities: temperature, top_k and top_p play no part).
    """

    count: int = 20
    prefix: str = ""
    temperature: float = 0.5
    top_k: int | None = None
    top_p: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    only_new: bool = False
    unique: bool = False
    likeliest: int | None = None

    def lengths(self, block_size: int) -> tuple[int, int] | None:
        """The range of new characters after the prefix, or None when every draw is taken (no length setting)."""
        if self.min_length is None and self.max_length is None and self.likeliest is None:
            return None
        most = block_size - 1 if self.max_length is None else self.max_length
        return max((self.min_length or 0) - len(self.prefix), 0), most - len(self.prefix)


def options_problem(options: NameOptions, tokenizer: CharTokenizer, block_size: int, known: Known | None,
                    flag: str = "--") -> tuple[str, str] | None:
    """What is wrong with ``options`` for a model of context ``block_size``, as (the setting, one sentence naming
    it with ``flag`` before it); None if nothing. ``known``: the names of the model's run, when it has them."""
    o = options
    if o.count < 1:
        return "count", f"{flag}count must be a positive integer, got {o.count}."
    if problem := sampling_problem(o.temperature, o.top_k, o.top_p):
        return problem.split()[0], flag + problem
    if unknown := tokenizer.unknown(o.prefix):
        return "prefix", f"the prefix {o.prefix!r} has characters the model has never seen: {''.join(unknown)!r}."
    room = block_size - 1  # a name's end is predicted after the start token and the name: both within the context
    for name in ("min_length", "max_length", "likeliest"):
        value = getattr(o, name)
        if value is not None and value < 1:
            return name, f"{flag}{name} must be a positive integer, got {value}."
    for name in ("min_length", "max_length"):
        value = getattr(o, name)
        if value is not None and value > room:
            return name, (f"{flag}{name} {value} is beyond the model's context: it can end names of at most {room} "
                          f"characters (block_size {block_size}).")
    if o.min_length is not None and o.max_length is not None and o.min_length > o.max_length:
        return "min_length", f"{flag}min_length {o.min_length} is above {flag}max_length {o.max_length}."
    if o.likeliest is not None and o.likeliest > LIKELIEST_MAX:
        return "likeliest", f"{flag}likeliest is at most {LIKELIEST_MAX}, got {o.likeliest}."
    lengths = o.lengths(block_size)
    if lengths is not None and lengths[1] < 0:
        if o.max_length is not None:
            return "max_length", f"the prefix {o.prefix!r} is longer than {flag}max_length {o.max_length}."
        return "prefix", (f"the prefix {o.prefix!r} is longer than the names the model can end ({room} characters, "
                          f"block_size {block_size}).")
    if o.only_new and known is None:
        return "only_new", (f"{flag}only_new needs the names of the run that made the checkpoint, and this "
                            "checkpoint does not carry them (it was written before microgpt stored them).")
    return None


@dataclass
class Names:
    """Names with the natural log of each one's probability given the prefix (its end included, by the model's
    own probabilities), and a sentence when fewer than asked for were found."""

    names: list[str]
    logprobs: list[float]
    shortfall: str | None = None


def draw_names(model: GPT | Ensemble, tokenizer: CharTokenizer,
               jobs: list[tuple[NameOptions, torch.Generator | None]], known: Known | None = None) -> list[Names]:
    """The names of every ``(options, generator)`` job, the draws of all of them in one batch of rows, each with
    its own random numbers: a seeded job gets the same names alone or among others (``NameStream``, once over).
    The options must have passed ``options_problem``."""
    stream = NameStream(model, tokenizer, jobs, known)
    for _ in stream:
        pass
    return stream.results


class NameStream:
    """The names of every ``(options, generator)`` job, drawn in one batch of rows (``microgpt.model.sampling``)
    and given out as each is kept: iterating yields, after every step, the ``(job, index, name, logprob)`` of the
    names kept in it (possibly none), ``index`` being the name's place in its job's ``Names``; ``results`` holds
    every job's ``Names`` once the iteration is over. The likeliest names come all at once, at the first step.
    ``cancelled()`` names jobs to drop (see ``microgpt.model.sampling.Drawing``). The options must have passed
    ``options_problem``. ``model`` is in eval mode while it draws."""

    def __init__(self, model: GPT | Ensemble, tokenizer: CharTokenizer,
                 jobs: list[tuple[NameOptions, torch.Generator | None]], known: Known | None = None,
                 cancelled: Callable[[], set[int]] | None = None):
        self.model, self.tokenizer, self.jobs, self.known, self.cancelled = model, tokenizer, jobs, known, cancelled
        self.results: list[Names | None] = [None] * len(jobs)

    def __iter__(self) -> Iterator[list[tuple[int, int, str, float]]]:
        model, tokenizer, jobs = self.model, self.tokenizer, self.jobs
        was_training = model.training
        model.eval()
        try:
            requests, drawn_jobs, first = [], [], []
            for i, (o, generator) in enumerate(jobs):
                refuse = refusal(tokenizer, o.prefix, self.known) if o.only_new else None
                prompt = [tokenizer.bos, *tokenizer.encode(o.prefix)]
                lengths = o.lengths(model.block_size)
                if o.likeliest is not None:
                    found = likeliest(model, prompt, tokenizer.bos, o.likeliest, lengths, refuse)
                    names = [o.prefix + tokenizer.decode(t) for t in found.tokens]
                    self.results[i] = Names(names, found.logprobs, likeliest_shortfall(o, len(names), found.exhausted))
                    first.extend((i, k, name, lp) for k, (name, lp) in enumerate(zip(names, found.logprobs)))
                    continue
                requests.append(SampleRequest(prompt, o.count, o.temperature, o.top_k, o.top_p, generator, lengths,
                                              o.unique, refuse))
                drawn_jobs.append(i)
            if first:
                yield first
            drawing = Drawing(model, requests, tokenizer.bos,
                              cancelled=None if self.cancelled is None else lambda: self.dropped(drawn_jobs))
            for kept in drawing:
                yield [(drawn_jobs[k], index, jobs[drawn_jobs[k]][0].prefix + tokenizer.decode(tokens), logprob)
                       for k, index, tokens, logprob in kept]
            for i, drawn in zip(drawn_jobs, drawing.found):
                o = jobs[i][0]
                names = [o.prefix + tokenizer.decode(t) for t in drawn.tokens if t is not None]
                short = None
                if len(names) < o.count:
                    short = (f"found only {len(names)} of {o.count} names {wanted(o)} in {drawn.tries:,} draws; "
                             "ask for fewer, or loosen the settings.")
                self.results[i] = Names(names, [lp for lp in drawn.logprobs if lp is not None], short)
        finally:
            model.train(was_training)

    def dropped(self, drawn_jobs: list[int]) -> set[int]:
        """The cancelled jobs, by their place among the drawn ones."""
        gone = set(self.cancelled())
        return {k for k, i in enumerate(drawn_jobs) if i in gone}


def invent(model: GPT | Ensemble, tokenizer: CharTokenizer, options: NameOptions,
           generator: torch.Generator | None = None, known: Known | None = None, flag: str = "") -> Names:
    """The names ``options`` ask for, with their log-probabilities: the Python API of ``sample``. A bad setting is
    a ``UserError`` naming it (with ``flag`` before it); ``known``: the names of the model's run, for only_new
    (``microgpt.data.known.KnownNames.from_file(checkpoint)``)."""
    if problem := options_problem(options, tokenizer, model.block_size, known, flag):
        raise UserError(problem[1])
    return draw_names(model, tokenizer, [(options, generator)], known)[0]


def refusal(tokenizer: CharTokenizer, prefix: str, known: Known):
    """The continuations of ``prefix`` that make a known name."""
    return lambda tokens: known.kind(prefix + tokenizer.decode(tokens)) is not None


def wanted(o: NameOptions) -> str:
    """Words for what ``o`` asks of a name, e.g. "that are new, unique and of 4 to 6 characters"."""
    parts = [word for word, on in (("new", o.only_new), ("unique", o.unique)) if on]
    if o.min_length is not None or o.max_length is not None:
        low, high = o.min_length, o.max_length
        parts.append(f"of {low} character{'s' * (low != 1)}" if low == high
                     else f"of {low} to {high} characters" if low is not None and high is not None
                     else f"of at least {low} characters" if low is not None else f"of at most {high} characters")
    return "that are " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def likeliest_shortfall(o: NameOptions, found: int, exhausted: bool) -> str | None:
    if found == o.likeliest:
        return None
    what = " " + wanted(o) if o.only_new or o.min_length is not None or o.max_length is not None else ""
    if exhausted:
        return (f"found only {found} of the {o.likeliest} likeliest names{what} after reading {MAX_EXPANDED:,} "
                "partial names, the search's bound; ask for fewer, or a lower min_length.")
    return f"the model gives only {found} names{what} a probability above zero."


def sample_names(gpt: GPT | Ensemble, tokenizer: CharTokenizer, num_samples: int, temperature: float = 0.5,
                 top_k: int | None = None, prefix: str = "", generator: torch.Generator | None = None,
                 top_p: float | None = None) -> list[str]:
    """``num_samples`` names starting with ``prefix``, drawn in parallel (``gpt`` in eval mode for the draw);
    ``top_p`` keeps only the smallest set of likeliest characters whose probability reaches it. For lengths,
    new names, no repeats, the likeliest names and log-probabilities, see ``invent``."""
    return invent(gpt, tokenizer, NameOptions(num_samples, prefix, temperature, top_k, top_p), generator).names


@torch.no_grad()
def score_names(gpt: GPT | Ensemble, tokenizer: CharTokenizer, names: list[str]) -> list[float]:
    """Each name's mean negative log-likelihood per predicted character (its end included), in nats,
    as ``test`` scores them: the model reads ``[BOS] + name`` cut to its context and predicts one step ahead."""
    rows = [[tokenizer.bos, *tokenizer.encode(name), tokenizer.bos][: gpt.block_size + 1] for name in names]
    width = max(len(row) for row in rows)
    device = next(gpt.parameters()).device
    tokens = torch.tensor([row + [tokenizer.bos] * (width - len(row)) for row in rows], device=device)
    lengths = torch.tensor([len(row) - 1 for row in rows], device=device)
    was_training = gpt.training
    gpt.eval()
    try:
        logits = gpt(tokens[:, :-1])
    finally:
        gpt.train(was_training)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    real = torch.arange(width - 1, device=device) < lengths[:, None]
    return ((nll * real).sum(1) / lengths).tolist()


def predict_names(gpt: GPT | Ensemble, tokenizer: CharTokenizer, request: dict) -> list[str]:
    """The lines ``predict`` writes for one request of ``NamesDataModule.predict_dataloader`` (settings checked
    there): names, or ``name<TAB>log-probability`` with ``show_logprob`` or ``likeliest``. When fewer names than
    asked for turn up, it says so on stderr and keeps those it found."""
    if request["count"] == 0:
        return []
    generator = torch.Generator(next(gpt.parameters()).device).manual_seed(request["seed"])
    options = NameOptions(request["count"], request["prefix"], request["temperature"], request["top_k"],
                          request["top_p"], *(request.get(k) for k in ("min_length", "max_length")),
                          bool(request.get("only_new")), bool(request.get("unique")), request.get("likeliest"))
    found = invent(gpt, tokenizer, options, generator, request.get("known"), "--data.predict_")
    if found.shortfall:
        print(f"microgpt predict: {found.shortfall}", file=sys.stderr, flush=True)
    return format_names(found, bool(request.get("show_logprob") or request.get("likeliest"))).splitlines()


def format_names(found: Names, logprobs: bool) -> str:
    """One name a line, as ``name<TAB>log-probability`` (4 decimals) with ``logprobs``."""
    if logprobs:
        return "".join(f"{name}\t{logprob:.4f}\n" for name, logprob in zip(found.names, found.logprobs))
    return "".join(f"{name}\n" for name in found.names)

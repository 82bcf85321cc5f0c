"""``microgpt serve``'s LitServe APIs, run in its inference workers: ``/predict`` and ``/score`` (and the base
of ``/v1/completions``, ``serve_openai``). The drawing endpoints are LitServe streaming APIs: a worker's first
message for a request is a head line (status, media type, id) that ``serve_asgi.Answers`` turns into the
response's status and headers, then the body's pieces as its names are kept (``microgpt.model.names.NameStream``).
"""

import json
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field

import litserve as ls
import torch
from fastapi import Header, HTTPException

from microgpt.checkpoints.loading import load_model
from microgpt.commands.serve_http import JSON_TYPE, NDJSON, Invalid, PredictBody, ScoreBody
from microgpt.data.known import KnownNames
from microgpt.model.names import NameOptions, NameStream, options_problem, score_names
from microgpt.threads import use_threads


@dataclass
class Draw:
    """A decoded drawing request: its options and random numbers, what it asks of the encoder, and an id to cancel
    it by."""

    options: NameOptions
    generator: torch.Generator | None
    stream: bool
    settings: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(8))


class CheckpointAPI(ls.LitAPI):
    """A LitServe API that loads a microgpt checkpoint in its worker and checks the API key.

    Args:
        ckpt_path: The checkpoint file, or a folder ``microgpt export`` wrote.
        api_key: When set, a request without this key (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``)
            is answered 401.
        max_batch_size: Requests LitServe hands ``predict`` at once.
        batch_timeout: Seconds LitServe waits for a batch to fill.
        api_path: The endpoint.
        cancel_dir: Where the HTTP process leaves a file named by a request's id when its client has gone.
        stream: Whether LitServe streams this API's answers.
    """

    def __init__(self, ckpt_path: str, api_key: str | None, max_batch_size: int, batch_timeout: float, api_path: str,
                 cancel_dir: str | None = None, stream: bool = False):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path, stream=stream)
        self.ckpt_path = ckpt_path
        self.api_key = api_key
        self.cancel_dir = cancel_dir
        self.processes = 1  # the worker processes of the server, which share the machine's cores

    def setup(self, device: str) -> None:
        # Ctrl-C reaches every process of the terminal's group: the main process stops this one (SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.gpt, self.tokenizer = load_model(self.ckpt_path, device)
        if device == "cpu":  # the workers share the cores; a batch is at most max_batch_size names of block_size
            print(use_threads(self.max_batch_size * self.gpt.block_size, self.gpt, self.processes), file=sys.stderr)
        self.gpt.eval()
        from microgpt.commands import metrics  # after serve has pointed prometheus-client at its folder

        self.metrics = metrics

    def authorize(self, x_api_key: str | None = Header(default=None),
                  authorization: str | None = Header(default=None)) -> None:
        """LitServe's hook, run in the HTTP process before the request is queued."""
        if self.api_key is None:
            return
        key = x_api_key
        if key is None and authorization is not None and authorization.startswith("Bearer "):
            key = authorization.removeprefix("Bearer ")
        if key is None:
            raise HTTPException(401, detail="this server needs an API key: send it in the X-API-Key header "
                                            "(or Authorization: Bearer).")
        if not secrets.compare_digest(key.encode(), self.api_key.encode()):
            raise HTTPException(401, detail="the X-API-Key header does not hold this server's API key.")

    def unknown_characters(self, text: str) -> str | None:
        """A sentence naming the characters of ``text`` the model never saw, or None."""
        unknown = self.tokenizer.unknown(text)
        if not unknown:
            return None
        return f"has characters the model has never seen: {''.join(unknown)!r} (it knows {self.tokenizer.chars!r})"

    def prompt_problem(self, prefix: str, field_name: str, openai: bool = False) -> Invalid | None:
        """What stops ``prefix`` from starting a name of this model, or None."""
        problem = self.unknown_characters(prefix)
        if problem:
            return Invalid((field_name,), f"the {field_name} {prefix!r} {problem}.", openai)
        room = self.gpt.block_size - 1  # the start token takes one place of the context
        if len(prefix) > room:
            return Invalid((field_name,), f"the {field_name} is {len(prefix)} characters long; this model's context "
                                          f"holds {room} after the start token (block_size {self.gpt.block_size}).",
                           openai)
        return None

    @property
    def batched(self) -> bool:
        """Whether LitServe hands ``predict`` a list of requests (its batched loops) rather than one request."""
        return self.max_batch_size > 1

    def generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(self.gpt.lm_head.weight.device).manual_seed(seed)


@dataclass
class End:
    """The last item ``DrawingAPI.predict`` yields for every request: why it has fewer names than asked, if so."""

    shortfall: str | None = None


class DrawingAPI(CheckpointAPI):
    """A streaming API that draws names. ``predict`` yields, for the requests of a batch, what each has not yet
    been sent: first its decoded form (a ``Draw`` or an ``Invalid``), then the ``(index, name, logprob)`` of its
    names as they are kept, then an ``End``. ``encode_response`` turns each request's news into one message: a
    head line (status, media type, id) the first time, then a body piece (``Answer``).

    LitServe sends every request of a batch a message at every yield, wanted or not, so ``predict`` yields only
    when a streamed request has news; a request answered whole rides along with the next yield after its names
    are drawn, at the latest the batch's last."""

    known: KnownNames | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, stream=True)

    def cancelled(self, draws: list[Draw]) -> set[int]:
        """The draws whose clients have gone (one directory listing a step)."""
        gone = set(os.listdir(self.cancel_dir))
        return {j for j, d in enumerate(draws) if d.id in gone} if gone else set()

    def predict(self, batch):
        decoded = batch if self.batched else [batch]
        self.metrics.BATCH.labels(self.api_path).observe(len(decoded))
        at = [k for k, d in enumerate(decoded) if isinstance(d, Draw)]  # the batch position of each draw
        draws = [decoded[k] for k in at]
        streamed = {k for k in at if decoded[k].stream}
        news = [[d] for d in decoded]  # each request's items not yet yielded

        def flush():
            out = [tuple(items) for items in news]
            for items in news:
                items.clear()
            return out if self.batched else out[0]

        if streamed:  # heads first, so that a streamed request's client can go before its first name
            yield flush()
        cancelled = (lambda: self.cancelled(draws)) if self.cancel_dir and streamed else None
        names = NameStream(self.gpt, self.tokenizer, [(d.options, d.generator) for d in draws], self.known, cancelled)
        for kept in names:
            for j, index, name, logprob in kept:
                news[at[j]].append((index, name, logprob))
            if any(at[j] in streamed for j, *_ in kept):
                yield flush()
        if cancelled:
            for d in draws:
                try:
                    os.remove(os.path.join(self.cancel_dir, d.id))
                except FileNotFoundError:
                    pass
        shortfalls = {k: result.shortfall for k, result in zip(at, names.results) if result is not None}
        for k, items in enumerate(news):
            items.append(End(shortfalls.get(k)))
        yield flush()

    def encode_response(self, outputs):
        answers = None
        for items in outputs:
            items = items if self.batched else [items]
            if answers is None:  # a request's first items start with how it was decoded
                answers = [self.answer(news[0]) for news in items]
            messages = [a.message(news) for a, news in zip(answers, items)]
            yield messages if self.batched else messages[0]

    def answer(self, decoded: Draw | Invalid) -> "Answer":
        raise NotImplementedError


class Answer:
    """One request's answer, built from what ``DrawingAPI.predict`` yields: a head line, then body pieces."""

    def __init__(self, api: DrawingAPI, decoded: Draw | Invalid):
        self.api, self.decoded = api, decoded
        self.names: dict[int, tuple[str, float]] = {}
        self.finished = False

    def message(self, news: tuple) -> str:
        """The head line if ``news`` starts with the decoded request, then the body piece of the rest."""
        head = ""
        if news and isinstance(news[0], (Draw, Invalid)):
            head, news = self.head(), news[1:]
        return head + self.feed(news) if news else head

    def head(self) -> str:
        d = self.decoded
        if isinstance(d, Invalid):
            head = {"status": d.status, "media_type": JSON_TYPE, "body": d.body()}
            self.api.metrics.NAMES.labels(self.api.api_path, str(d.status)).inc(0)
        else:
            head = {"status": 200, "media_type": self.stream_type if d.stream else JSON_TYPE, "id": d.id}
        return json.dumps(head) + "\n"

    def feed(self, news: tuple) -> str:
        """The body's next piece, framed as a JSON line ``{"data": text, "last": bool}`` ("" when there is
        none): a request's answer ends as soon as its own names have, whatever else its batch still draws."""
        if isinstance(self.decoded, Invalid) or self.finished:
            return ""
        pieces, end, kept = [], None, 0
        for item in news:
            if isinstance(item, End):
                end = item
                break
            index, name, logprob = item
            self.names[index] = name, logprob
            kept += 1
            if self.decoded.stream:
                pieces.append(self.line(index, name, logprob))
        if kept:
            self.api.metrics.NAMES.labels(self.api.api_path, "200").inc(kept)
        o = self.decoded.options
        self.finished = end is not None or len(self.names) == (o.count if o.likeliest is None else o.likeliest)
        if self.finished:
            pieces.append(self.end(end.shortfall if end is not None else None))
        text = "".join(pieces)
        return json.dumps({"data": text, "last": self.finished}) + "\n" if text or self.finished else ""

    def end(self, shortfall: str | None) -> str:
        raise NotImplementedError


class PredictAnswer(Answer):
    stream_type = NDJSON

    def kind(self, name: str) -> str | None:
        """"new", "training" or "held-out"; None for a checkpoint without its run's names."""
        known = self.api.known
        return None if known is None else known.kind(name) or "new"

    def line(self, index: int, name: str, logprob: float) -> str:
        return json.dumps({"name": name, "logprob": logprob, "kind": self.kind(name)}) + "\n"

    def end(self, shortfall: str | None) -> str:
        """Streamed, a last ``{"message"}`` line when fewer names than asked for turned up; else
        ``{"names", "logprobs", "kinds"}``, with that "message"."""
        if self.decoded.stream:
            return "" if shortfall is None else json.dumps({"message": shortfall}) + "\n"
        names = [self.names[i][0] for i in sorted(self.names)]
        body = {"names": names, "logprobs": [self.names[i][1] for i in sorted(self.names)],
                "kinds": None if self.api.known is None else [self.kind(name) for name in names]}
        return json.dumps(body if shortfall is None else {**body, "message": shortfall})


class PredictAPI(DrawingAPI):
    """``POST /predict``: names, drawn for every request of a batch in one batch of rows."""

    def setup(self, device: str) -> None:
        super().setup(device)
        self.known = KnownNames.from_file(self.ckpt_path)  # None for a checkpoint or folder without its run's names

    def decode_request(self, request: PredictBody) -> Draw | Invalid:
        if problem := self.prompt_problem(request.prefix, "prefix"):
            return problem
        options = NameOptions(request.count, request.prefix, request.temperature, request.top_k, request.top_p,
                              request.min_length, request.max_length, request.only_new, request.unique,
                              request.likeliest)
        if problem := options_problem(options, self.tokenizer, self.gpt.block_size, self.known, flag=""):
            return Invalid((problem[0],), problem[1])
        return Draw(options, self.generator(request.seed), request.stream)

    def answer(self, decoded):
        return PredictAnswer(self, decoded)


class ScoreAPI(CheckpointAPI):
    """``POST /score``: each name's mean NLL per character, every name of a batch in one forward pass."""

    def decode_request(self, request: ScoreBody) -> list[str] | Invalid:
        for i, name in enumerate(request.names):
            problem = self.unknown_characters(name)
            if problem:
                return Invalid(("names", i), f"the name {name!r} {problem}.")
        return request.names

    def predict(self, batch):
        decoded = batch if self.batched else [batch]
        self.metrics.BATCH.labels(self.api_path).observe(len(decoded))
        names = [name for d in decoded if not isinstance(d, Invalid) for name in d]
        scores = iter(score_names(self.gpt, self.tokenizer, names) if names else [])
        out = [d if isinstance(d, Invalid) else [next(scores) for _ in d] for d in decoded]
        return out if self.batched else out[0]

    def encode_response(self, output: list[float] | Invalid):
        if isinstance(output, Invalid):
            self.metrics.NAMES.labels(self.api_path, str(output.status)).inc(0)
            return output.response()
        self.metrics.NAMES.labels(self.api_path, "200").inc(len(output))
        return {"nll": output}

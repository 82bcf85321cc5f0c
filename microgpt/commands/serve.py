"""``microgpt serve``: invent and score names over HTTP with LitServe, an OpenAI-compatible endpoint, Prometheus
metrics, and a page at ``/`` to try the model.

``microgpt serve --ckpt_path best|last|FILE|DIR [--root_dir D] [--host H] [--port P] [--device D]
[--max_batch_size N] [--batch_timeout S] [--workers_per_device N] [--timeout S] [--api_key KEY]``
(the serve extra: ``pip install -e '.[serve]'`` in a checkout).

* ``POST /predict`` ``{"count", "prefix", "temperature", "top_k", "top_p", "seed", "min_length", "max_length",
  "only_new", "unique", "likeliest", "stream"}`` (all optional) answers ``{"names": [...], "logprobs": [...],
  "kinds": [...]}``, or with ``"stream": true`` ``application/x-ndjson``: a ``{"name": ..., "logprob": ...,
  "kind": ...}`` line as each name is kept. Requests that arrive together are drawn in one batch of rows, each
  with its own settings and, when seeded, its own random numbers (``microgpt.model.names``,
  ``microgpt.model.sampling``).
* ``POST /v1/completions`` (OpenAI's completions API: the prompt is the prefix, each choice's text the rest of
  a name) and ``GET /v1/models``.
* ``POST /score`` ``{"names": [...]}`` answers ``{"nll": [...]}``: each name's mean negative log-likelihood per
  character, its end included, as ``test`` scores it.
* ``GET /`` the page (``page.html``); ``GET /health`` answers ``ok`` (text) once the model is loaded;
  ``GET /metrics`` Prometheus' text format. These three need no API key.

What can be checked from a request alone is checked by pydantic in the HTTP process; what needs the model (the
prefix's characters and length, the names' characters) is checked in the worker, and a bad request there is
answered on its own, so it never spoils the batch it arrived in. The drawing endpoints are LitServe streaming
APIs: a worker's first message for a request is a head line (status, media type, id) that ``Answers``, a
middleware in the HTTP process, turns into the response's status and headers. Like ``sample``, nothing here
imports Lightning.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Annotated

import litserve as ls
import torch
from fastapi import Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from microgpt.checkpoints.loading import load_model
from microgpt.commands.sample import positive_int, resolve, score_names
from microgpt.data.known import KnownNames
from microgpt.errors import OneLineParser, UserError, exit_on_user_error
from microgpt.model.names import LIKELIEST_MAX, NameOptions, NameStream, options_problem
from microgpt.model.tokenizer import CharTokenizer

MAX_COUNT = 1000  # names per /predict request
MAX_NAMES = 1000  # names per /score request
MAX_NAME = 100  # characters per name to /score (a longer one is cut to the context anyway)
MAX_BODY = 1024 * 1024  # bytes; a larger body is answered 413. Any body the schema allows fits: MAX_NAMES names
# of MAX_NAME characters, each escaped to 6 bytes, come to 600 KB
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # beyond these float32 logits overflow or lose every difference
API_KEY_ENV = "MICROGPT_API_KEY"
MODEL_ID = "microgpt"  # the model's name on /v1
HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}
NDJSON, SSE, JSON_TYPE = "application/x-ndjson", "text/event-stream", "application/json"
DRAWING = ("/predict", "/v1/completions")  # the streaming APIs, whose answers start with a head line
OPEN = ("/", "/health", "/metrics")  # no API key needed


class JSONBody(BaseModel):
    """A request body read as JSON whatever its Content-Type says (``curl -d`` sends a form's), checked strictly:
    no unknown fields, no strings for numbers, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def parse(cls, data):
        if isinstance(data, (bytes, str)):
            try:
                return json.loads(data)
            except ValueError:
                raise ValueError("the body is not valid JSON") from None
        return data


class PredictBody(JSONBody):
    """The JSON body of ``POST /predict``; every field may be left out."""

    count: int = Field(10, ge=1, le=MAX_COUNT, description="how many names")
    prefix: str = Field("", description="every name starts with these characters")
    temperature: float = Field(0.5, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="softmax temperature")
    top_k: int | None = Field(None, ge=1, description="draw only among the k likeliest characters")
    top_p: float | None = Field(None, gt=0, le=1, description="draw only among the fewest likeliest characters "
                                                                "whose probability reaches p")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same names")
    min_length: int | None = Field(None, ge=1, description="names have at least this many characters, prefix "
                                                           "included (at most max_length)")
    max_length: int | None = Field(None, ge=1, description="names have at most this many characters, prefix "
                                                           "included (at least the prefix's)")
    only_new: bool = Field(False, description="only names that are neither training nor held-out names of the run")
    unique: bool = Field(False, description="no name twice")
    likeliest: int | None = Field(None, ge=1, le=LIKELIEST_MAX,
                                  description="this many of the most probable names instead of drawn ones")
    stream: bool = Field(False, description="answer application/x-ndjson, a {\"name\": ..., \"logprob\": ...} line "
                                            "as each name is kept")


class ScoreBody(JSONBody):
    """The JSON body of ``POST /score``."""

    names: list[Annotated[str, Field(max_length=MAX_NAME)]] = Field(min_length=1, max_length=MAX_NAMES,
                                                                     description="the names to score")


class CompletionBody(JSONBody):
    """The JSON body of ``POST /v1/completions``: OpenAI's fields that make sense for names; any other is refused."""

    model: str = Field(MODEL_ID, description=f"the served model: {MODEL_ID}")
    prompt: str = Field("", description="every name starts with it; a choice's text is the rest of the name")
    n: int = Field(1, ge=1, le=MAX_COUNT, description="how many names")
    max_tokens: int | None = Field(None, ge=1, description="at most this many characters after the prompt")
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, description="softmax temperature; 0 draws the "
                                                                        "likeliest character every time")
    top_p: float = Field(1.0, gt=0, le=1, description="draw only among the fewest likeliest characters whose "
                                                      "probability reaches p")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same names")
    stream: bool = Field(False, description="answer server-sent events, one per name, ending with data: [DONE]")
    logprobs: int | None = Field(None, ge=0, le=5, description="each character's log-probability (temperature 1), "
                                                               "and this many likeliest alternatives")


@dataclass
class Invalid:
    """A request the model cannot take: answered on its own, naming the field (``loc``); ``openai``: in that
    API's error shape."""

    loc: tuple[str | int, ...]
    message: str
    openai: bool = False
    status: int = 0

    def __post_init__(self):
        self.status = self.status or (400 if self.openai else 422)

    def body(self) -> str:
        if self.openai:
            return json.dumps(openai_error(self.message, ".".join(map(str, self.loc)) or None, self.status))
        return json.dumps({"detail": [{"type": "value_error", "loc": ["body", *self.loc], "msg": self.message}]})

    def response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type=JSON_TYPE)


def openai_error(message: str, param: str | None, status: int) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": "model_not_found" if status == 404 else None}}


def error_response(errors: list[dict], openai: bool = False) -> Response:
    """A 422 in the shape FastAPI gives pydantic's errors (``type``, ``loc``, ``msg``), leaving out the input
    itself: escaped to ASCII, any input (a lone surrogate, NaN) is answered as JSON, never a 500. On ``/v1``
    a 400 in OpenAI's error shape, naming the first field."""
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
    if openai:
        first = detail[0]
        param = ".".join(str(x) for x in first["loc"] if x != "body") or None
        message = "; ".join(f"{'.'.join(str(x) for x in d['loc'] if x != 'body') or 'body'}: "
                            f"{'unsupported field' if d['type'] == 'extra_forbidden' else d['msg']}" for d in detail)
        return Response(json.dumps(openai_error(message, param, 400)), status_code=400, media_type=JSON_TYPE)
    return Response(json.dumps({"detail": detail}), status_code=422, media_type=JSON_TYPE)


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [{**e, "msg": "the body must be a JSON object ({} for every default)"}
              if e["type"] == "missing" and tuple(e["loc"]) == ("body",) else e for e in exc.errors()]
    return error_response(errors, request.url.path.startswith("/v1/"))


async def http_error(request: Request, exc: HTTPException) -> Response:
    """FastAPI's ``{"detail": ...}``, or on ``/v1`` OpenAI's error shape."""
    if request.url.path.startswith("/v1/"):
        body = openai_error(str(exc.detail), None, exc.status_code)
    else:
        body = {"detail": exc.detail}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


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

    def setup(self, device: str) -> None:
        # Ctrl-C reaches every process of the terminal's group: the main process stops this one (SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if device == "cpu":
            # requests are small: one thread each, rather than threads that spin waiting for work while the
            # HTTP process and the other worker need the same cores
            torch.set_num_threads(1)
        self.gpt, self.tokenizer = load_model(self.ckpt_path, device)
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

    def generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(self.gpt.lm_head.weight.device).manual_seed(seed)


def rows(batch):
    """LitServe hands ``predict`` a list with batching and a single request without."""
    return (batch, True) if isinstance(batch, list) else ([batch], False)


@dataclass
class End:
    """The last item ``DrawingAPI.predict`` yields for every request: why it has fewer names than asked, if so."""

    shortfall: str | None = None


class DrawingAPI(CheckpointAPI):
    """A streaming API that draws names: ``predict`` yields, for each request, first its decoded form (a ``Draw``
    or an ``Invalid``), then after each step the ``(index, name, logprob)`` of its names kept in it, then an
    ``End``; ``encode_response`` turns these into a head line and the body's pieces (``answer``)."""

    known: KnownNames | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, stream=True)

    def cancelled(self, draws: list[Draw]) -> set[int]:
        """The draws whose clients have gone (one directory listing a step)."""
        gone = set(os.listdir(self.cancel_dir))
        return {j for j, d in enumerate(draws) if d.id in gone} if gone else set()

    def predict(self, batch):
        decoded, batched = rows(batch)
        self.metrics.BATCH.labels(self.api_path).observe(len(decoded))
        at = [k for k, d in enumerate(decoded) if isinstance(d, Draw)]  # the batch position of each draw
        draws = [decoded[k] for k in at]
        step = lambda items: items if batched else items[0]
        yield step(decoded)
        cancelled = (lambda: self.cancelled(draws)) if self.cancel_dir else None
        names = NameStream(self.gpt, self.tokenizer, [(d.options, d.generator) for d in draws], self.known, cancelled)
        for kept in names:
            if kept:
                out = [[] for _ in decoded]
                for j, index, name, logprob in kept:
                    out[at[j]].append((index, name, logprob))
                yield step(out)
        for d in draws:
            if self.cancel_dir:
                try:
                    os.remove(os.path.join(self.cancel_dir, d.id))
                except FileNotFoundError:
                    pass
        ends = [End() for _ in decoded]
        for k, result in zip(at, names.results):
            ends[k] = End(result.shortfall if result is not None else None)
        yield step(ends)

    def encode_response(self, outputs):
        answers, batched = None, False
        for items in outputs:
            if answers is None:  # the first item of every request: how it was decoded
                batched = isinstance(items, list)
                answers = [self.answer(d) for d in (items if batched else [items])]
                heads = [a.head() for a in answers]
                yield heads if batched else heads[0]
                continue
            pieces = [a.feed(item) for a, item in zip(answers, items if batched else [items])]
            yield pieces if batched else pieces[0]

    def answer(self, decoded: Draw | Invalid) -> "Answer":
        raise NotImplementedError


class Answer:
    """One request's answer, built from what ``DrawingAPI.predict`` yields: a head line, then body pieces."""

    def __init__(self, api: DrawingAPI, decoded: Draw | Invalid):
        self.api, self.decoded = api, decoded
        self.names: dict[int, tuple[str, float]] = {}
        self.finished = False

    def head(self) -> str:
        d = self.decoded
        if isinstance(d, Invalid):
            head = {"status": d.status, "media_type": JSON_TYPE, "body": d.body()}
            self.api.metrics.NAMES.labels(self.api.api_path, str(d.status)).inc(0)
        else:
            head = {"status": 200, "media_type": self.stream_type if d.stream else JSON_TYPE, "id": d.id}
        return json.dumps(head) + "\n"

    def feed(self, item) -> str:
        """The body's next piece, framed as a JSON line ``{"data": text, "last": bool}`` ("" when there is
        none): a request's answer ends as soon as its own names have, whatever else its batch still draws."""
        if isinstance(self.decoded, Invalid) or self.finished:
            return ""
        pieces = []
        for index, name, logprob in [] if isinstance(item, End) else item:
            self.names[index] = name, logprob
            self.api.metrics.NAMES.labels(self.api.api_path, "200").inc()
            if self.decoded.stream:
                pieces.append(self.line(index, name, logprob))
        o = self.decoded.options
        self.finished = isinstance(item, End) or len(self.names) == (o.count if o.likeliest is None else o.likeliest)
        if self.finished:
            pieces.append(self.end(item.shortfall if isinstance(item, End) else None))
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


class CompletionAnswer(Answer):
    stream_type = SSE

    def __init__(self, api, decoded):
        super().__init__(api, decoded)
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def prompt(self) -> list[int]:
        return [self.api.tokenizer.bos, *self.api.tokenizer.encode(self.decoded.options.prefix)]

    def choice(self, row: int, name: str) -> dict:
        tokens = self.api.tokenizer.encode(name[len(self.decoded.options.prefix):])
        limit = self.decoded.settings["max_tokens"]
        kept = tokens[:limit]
        logprobs = None
        if self.decoded.settings["logprobs"] is not None:
            logprobs = self.api.logprobs(self.prompt(), kept, self.decoded.settings["logprobs"])
        return {"text": self.api.tokenizer.decode(kept), "index": row, "logprobs": logprobs,
                "finish_reason": "length" if len(tokens) >= limit else "stop"}

    def chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": MODEL_ID,
                "choices": choices}

    def line(self, index: int, name: str, logprob: float) -> str:
        return f"data: {json.dumps(self.chunk([self.choice(index, name)]))}\n\n"

    def end(self, shortfall: str | None) -> str:
        if self.decoded.stream:
            return "data: [DONE]\n\n"
        choices = [self.choice(r, self.names[r][0]) for r in sorted(self.names)]
        prompt_tokens = len(self.prompt())
        completion_tokens = sum(len(c["text"]) for c in choices)  # a character is a token
        return json.dumps({**self.chunk(choices), "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})


class CompletionAPI(DrawingAPI):
    """``POST /v1/completions``: OpenAI's completions API, each choice a name that starts with the prompt."""

    def decode_request(self, request: CompletionBody) -> Draw | Invalid:
        if request.model != MODEL_ID:
            return Invalid(("model",), f"the model {request.model!r} does not exist here; this server serves "
                                       f"{MODEL_ID!r} (GET /v1/models).", True, 404)
        if problem := self.prompt_problem(request.prompt, "prompt", openai=True):
            return problem
        most = self.gpt.block_size  # a name is drawn until it ends or has drawn a whole context
        if request.max_tokens is not None and request.max_tokens > most:
            return Invalid(("max_tokens",), f"max_tokens is {request.max_tokens}; this model draws at most {most} "
                                            f"characters after the prompt (its context).", True)
        greedy = request.temperature == 0  # OpenAI's temperature 0: the likeliest character every time
        options = NameOptions(request.n, request.prompt, 1.0 if greedy else max(request.temperature, MIN_TEMPERATURE),
                              1 if greedy else None, request.top_p)
        return Draw(options, self.generator(request.seed), request.stream,
                    {"max_tokens": request.max_tokens or most, "logprobs": request.logprobs})

    def answer(self, decoded):
        return CompletionAnswer(self, decoded)

    @torch.no_grad()
    def logprobs(self, prompt: list[int], tokens: list[int], top: int) -> dict:
        """OpenAI's logprobs of a choice: each character's log-probability under the model (temperature 1)
        after the prompt and the characters before it (the last ``block_size`` of them, as they were drawn),
        and the ``top`` likeliest characters there."""
        device, block = self.gpt.lm_head.weight.device, self.gpt.block_size
        sequence = prompt + tokens
        first = torch.log_softmax(self.gpt(torch.tensor([sequence[:block]], device=device))[0].float(), dim=-1)
        rows = []
        for j in range(len(prompt), len(sequence)):  # the distribution token j was drawn from
            if j <= block:
                rows.append(first[j - 1])
            else:  # past the context the window slides
                window = torch.tensor([sequence[j - block : j]], device=device)
                rows.append(torch.log_softmax(self.gpt(window)[0, -1].float(), dim=-1))
        name = lambda i: self.tokenizer.decode([i]) if i != self.tokenizer.bos else ""
        offset = len(self.tokenizer.decode(prompt))
        out = {"tokens": [name(t) for t in tokens], "token_logprobs": [r[t].item() for r, t in zip(rows, tokens)],
               "top_logprobs": None, "text_offset": [offset + i for i in range(len(tokens))]}
        if top:
            best = [r.topk(top) for r in rows]
            out["top_logprobs"] = [{name(j): v for v, j in zip(b.values.tolist(), b.indices.tolist())} for b in best]
        return out


class ScoreAPI(CheckpointAPI):
    """``POST /score``: each name's mean NLL per character, every name of a batch in one forward pass."""

    def decode_request(self, request: ScoreBody) -> list[str] | Invalid:
        for i, name in enumerate(request.names):
            problem = self.unknown_characters(name)
            if problem:
                return Invalid(("names", i), f"the name {name!r} {problem}.")
        return request.names

    def predict(self, batch):
        decoded, batched = rows(batch)
        self.metrics.BATCH.labels(self.api_path).observe(len(decoded))
        names = [name for d in decoded if not isinstance(d, Invalid) for name in d]
        scores = iter(score_names(self.gpt, self.tokenizer, names) if names else [])
        out = [d if isinstance(d, Invalid) else [next(scores) for _ in d] for d in decoded]
        return out if batched else out[0]

    def encode_response(self, output: list[float] | Invalid):
        if isinstance(output, Invalid):
            self.metrics.NAMES.labels(self.api_path, str(output.status)).inc(0)
            return output.response()
        self.metrics.NAMES.labels(self.api_path, "200").inc(len(output))
        return {"nll": output}


class Answers:
    """ASGI middleware in the HTTP process for the drawing endpoints: LitServe starts their streaming answers
    as 200 with no Content-Type; the worker's head line says the status and media type (and the body, for a
    request it refused), so they are sent as the worker decided. It also ends an answer whose client stopped
    reading for ``stall`` seconds, and tells the worker (a file in ``cancel_dir``) to drop the rows of one
    whose client has gone."""

    def __init__(self, app, cancel_dir: str, stall: float):
        self.app, self.cancel_dir, self.stall = app, cancel_dir, stall

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in DRAWING:
            return await self.app(scope, receive, send)
        state = {"start": None, "head": None, "passthrough": False, "done": False}
        watcher = None

        async def deliver(message):
            try:
                await asyncio.wait_for(send(message), self.stall)
            except TimeoutError:  # the client stopped reading: give its answer up and free its rows
                state["done"] = True
                cancel(state["head"]["id"])

        async def relay(message):
            if message["type"] == "http.response.start":
                if message["status"] != 200:  # refused before the worker saw it: 401, 413, 422
                    state["passthrough"] = True
                    return await send(message)
                state["start"] = message
                return
            if state["passthrough"] or message["type"] != "http.response.body":
                return await send(message)
            body, more = message.get("body", b""), message.get("more_body", False)
            if state["head"] is None:
                if not body and more:
                    return
                if not body:  # the stream ended before the worker answered: it timed out waiting in the queue
                    await send_json(504, json.dumps(timeout_body(scope["path"])))
                    state["done"] = True
                    return
                head = state["head"] = json.loads(body)
                if "body" in head:
                    await send_json(head["status"], head["body"])
                    state["done"] = True
                    return
                headers = [(k, v) for k, v in state["start"]["headers"] if k.lower() != b"content-type"]
                headers.append((b"content-type", head["media_type"].encode()))
                if head["media_type"] != JSON_TYPE:
                    headers.append((b"cache-control", b"no-cache"))
                    headers.append((b"x-accel-buffering", b"no"))
                await deliver({"type": "http.response.start", "status": 200, "headers": headers})
                nonlocal watcher
                watcher = asyncio.create_task(watch())  # the body has been read: receive now waits for the end
                return
            if state["done"] or not body:
                return
            frame = json.loads(body)
            await deliver({"type": "http.response.body", "body": frame["data"].encode(), "more_body": not frame["last"]})
            state["done"] = state["done"] or frame["last"]

        async def send_json(status: int, body: str):
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", JSON_TYPE.encode()),
                                    (b"content-length", str(len(body.encode())).encode())]})
            await send({"type": "http.response.body", "body": body.encode(), "more_body": False})

        async def watch():  # a client that goes away mid-answer: free its rows now, not at its next name
            while (await receive())["type"] != "http.disconnect":
                pass
            if state["head"] is not None and "id" in state["head"] and not state["done"]:
                cancel(state["head"]["id"])

        def cancel(id: str):
            try:
                os.close(os.open(os.path.join(self.cancel_dir, id), os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError:
                pass

        try:
            await self.app(scope, receive, relay)
            if state["head"] is not None and not state["done"]:  # the worker failed mid-answer: end it
                state["done"] = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None:
                watcher.cancel()
            head = state["head"]
            if head and "id" in head and not state["done"]:  # its client went away or stalled: free its rows
                cancel(head["id"])


class Keyed:
    """ASGI middleware: with an API key, the routes LitServe's ``authorize`` does not guard (``/info``, ``/docs``,
    ``/openapi.json``, ...) need it too; only the page, ``/health`` and ``/metrics`` are open."""

    def __init__(self, app, api_key: str | None, guarded: set[str]):
        self.app, self.api_key, self.guarded = app, api_key, guarded

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or self.api_key is None or path in OPEN or path in self.guarded:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key = headers.get(b"x-api-key")
        bearer = headers.get(b"authorization", b"")
        if key is None and bearer.startswith(b"Bearer "):
            key = bearer.removeprefix(b"Bearer ")
        if key is None or not secrets.compare_digest(key, self.api_key.encode()):
            words = "this server needs an API key: send it in the X-API-Key header (or Authorization: Bearer)."
            body = json.dumps(openai_error(words, None, 401) if path.startswith("/v1/") else {"detail": words})
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", JSON_TYPE.encode())]})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await self.app(scope, receive, send)


def timeout_body(path: str) -> dict:
    message = "the request waited longer than the server's --timeout for a worker; try again."
    return openai_error(message, None, 504) if path.startswith("/v1/") else {"detail": message}


class Metrics:
    """ASGI middleware counting every request by endpoint and status, and timing it to the end of its answer."""

    def __init__(self, app, endpoints: set[str]):
        self.app, self.endpoints = app, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from microgpt.commands import metrics

        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        started, status = time.monotonic(), ["500"]

        async def relay(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, relay)
        finally:
            metrics.REQUESTS.labels(endpoint, status[0]).inc()
            metrics.LATENCY.labels(endpoint).observe(time.monotonic() - started)


def page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: only its own inline script and style run, nothing is fetched
    from elsewhere, and it may talk to this server alone."""
    html = (files("microgpt.commands") / "page.html").read_text(encoding="utf-8")
    digest = lambda tag: " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL))
    policy = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


def character_class(chars: str) -> str:
    """A regular expression class of ``chars``, the same in ECMAScript (JSON Schema's), Python and Rust."""
    return "[" + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c for c in chars) + "]"


def truthful_schema(app, tokenizer: CharTokenizer, block_size: int, knows_names: bool) -> dict:
    """FastAPI's OpenAPI schema with what only the model knows (the characters a prefix or name may hold, the
    prefix's length, the names' lengths, max_tokens' bound, whether only_new can be had) and each route's real
    media types and error shapes. Two rules span fields and are stated in their descriptions only: min_length
    is at most max_length, and the prefix is no longer than max_length."""
    schema = get_openapi(title="microgpt serve", version="1", routes=app.routes,
                         description="Invent and score names with a microgpt model.")
    text = f"^{character_class(tokenizer.chars)}*$"
    parts = schema["components"]["schemas"]
    prefix = {"type": "string", "pattern": text, "maxLength": block_size - 1}
    parts["PredictBody"]["properties"]["prefix"].update(prefix)
    for length in ("min_length", "max_length"):  # a name's end is predicted within the context
        parts["PredictBody"]["properties"][length]["anyOf"][0]["maximum"] = block_size - 1
    if not knows_names:
        parts["PredictBody"]["properties"]["only_new"].update({"enum": [False]})
    parts["CompletionBody"]["properties"]["prompt"].update(prefix)
    parts["CompletionBody"]["properties"]["model"].update({"enum": [MODEL_ID]})
    parts["CompletionBody"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] = block_size
    parts["ScoreBody"]["properties"]["names"]["items"].update({"pattern": text})
    name = {"type": "string", "pattern": text}
    kinds = ["new", "training", "held-out"]
    error = {"type": "object", "properties": {"detail": {}}, "required": ["detail"]}
    openai = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                         "param": {"type": ["string", "null"]}, "code": {}}}}}
    json_of = lambda body: {"application/json": {"schema": body}}
    errors = lambda body, codes: {str(c): {"description": d, "content": json_of(body)} for c, d in codes}
    common = [(401, "no or a wrong API key"), (413, "a body over the size limit"),
              (504, "waited longer than --timeout for a worker")]
    responses = {
        "/predict": {"200": {"description": "the names, or with stream one JSON object a line as each is kept "
                                            "(and a last {\"message\"} line when fewer names turned up)",
                             "content": {**json_of({"type": "object", "required": ["names", "logprobs", "kinds"],
                                                    "properties": {"names": {"type": "array", "items": name},
                                                                   "logprobs": {"type": "array",
                                                                                "items": {"type": "number"}},
                                                                   "kinds": {"type": ["array", "null"],
                                                                             "items": {"enum": kinds}},
                                                                   "message": {"type": "string"}}}),
                                 NDJSON: {"schema": {"type": "object", "properties": {
                                     "name": name, "logprob": {"type": "number"},
                                     "kind": {"enum": [*kinds, None]}, "message": {"type": "string"}}}}}},
                     **errors(error, [(422, "a field the server cannot take, named in loc"), *common])},
        "/score": {"200": {"description": "each name's mean negative log-likelihood per character",
                           "content": json_of({"type": "object", "required": ["nll"], "properties": {
                               "nll": {"type": "array", "items": {"type": "number"}}}})},
                   **errors(error, [(422, "a field the server cannot take, named in loc"), *common])},
        "/v1/completions": {"200": {"description": "OpenAI's text_completion, or with stream its server-sent events",
                                    "content": {**json_of({"type": "object", "required": ["choices"]}),
                                                SSE: {"schema": {"type": "string"}}}},
                            **errors(openai, [(400, "a field the server cannot take, named in param"),
                                              (404, "an unknown model"), *common])},
    }
    for path, answers in responses.items():
        schema["paths"][path]["post"]["responses"] = answers
    return schema


def build_server(ckpt_path: str, device: str, api_key: str | None, max_batch_size: int, batch_timeout: float,
                 workers_per_device: int = 1, timeout: float = 30.0, cancel_dir: str | None = None) -> ls.LitServer:
    """The LitServer with ``/predict``, ``/score``, ``/v1/completions``, ``/v1/models``, ``/metrics``,
    ``/health`` and the page at ``/``."""
    gpt, tokenizer = load_model(ckpt_path)
    knows_names = KnownNames.from_file(ckpt_path) is not None
    args = (ckpt_path, api_key, max_batch_size, batch_timeout)
    apis = [PredictAPI(*args, "/predict", cancel_dir), ScoreAPI(*args, "/score"),
            CompletionAPI(*args, "/v1/completions", cancel_dir)]
    kind, _, index = device.partition(":")
    accelerator = {"accelerator": "cpu"} if kind == "cpu" else {"accelerator": kind, "devices": [int(index or 0)]}
    endpoints = {api.api_path for api in apis} | {"/", "/health", "/metrics", "/v1/models", "/info"}
    server = ls.LitServer(apis, **accelerator, workers_per_device=workers_per_device, timeout=timeout,
                          max_payload_size=MAX_BODY, model_metadata={"checkpoint": ckpt_path},
                          middlewares=[(Answers, {"cancel_dir": cancel_dir or tempfile.gettempdir(),
                                                  "stall": timeout}),
                                       (Keyed, {"api_key": api_key,
                                                "guarded": {api.api_path for api in apis} | {"/v1/models"}}),
                                       (Metrics, {"endpoints": endpoints})])
    html, policy = page()
    app = server.app
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    health = next(r.endpoint for r in app.router.routes if getattr(r, "path", None) == "/health")
    # LitServe's "litserve running" at /, and its /health, which sends no Content-Type, are replaced
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/health")]

    async def plain_health(request: Request) -> PlainTextResponse:
        answer = await health(request)
        return PlainTextResponse(answer.body, answer.status_code)

    def metrics_text() -> Response:
        from microgpt.commands import metrics

        return Response(metrics.exposition(server.litapi_request_queues), media_type=metrics.CONTENT_TYPE)

    def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0,
                                                         "owned_by": "microgpt", "root": ckpt_path}]})

    text = lambda description: {200: {"description": description, "content": {"text/plain": {}}}}
    app.add_api_route("/", lambda: HTMLResponse(html, headers={"Content-Security-Policy": policy}), methods=["GET"],
                      include_in_schema=False)
    app.add_api_route("/health", plain_health, methods=["GET"], response_class=PlainTextResponse,
                      responses={200: {"description": "ok: the model is loaded", "content": {"text/plain": {}}},
                                 503: {"description": "not ready", "content": {"text/plain": {}}}})
    app.add_api_route("/metrics", metrics_text, methods=["GET"], response_class=PlainTextResponse,
                      responses=text("Prometheus' text format"))
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(apis[0].authorize)],
                      responses={401: {"description": "no or a wrong API key"}})

    def openapi() -> dict:  # FastAPI's documented way to change the schema it serves
        if app.openapi_schema is None:
            app.openapi_schema = truthful_schema(app, tokenizer, gpt.block_size, knows_names)
        return app.openapi_schema

    app.openapi = openapi
    return server


def check_device(device: str) -> str:
    """``device`` as ``cpu``, ``cuda[:N]`` or ``mps``, checked to exist here."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise UserError(f"--device {device}: serve runs on cpu, cuda, cuda:N or mps.")
    if kind == "cuda" and not (torch.cuda.is_available() and int(index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here.")
    return device


def check_port(host: str, port: int) -> None:
    """Refuse, before any process starts, an address another program listens on (bound as uvicorn binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); "
                            "pass another --port, or stop the program that uses it.") from None


def port(text: str) -> int:
    value = int(text)
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1024 to 65535, got {text}")
    return value


def host(text: str) -> str:
    if text not in HOSTS:
        raise argparse.ArgumentTypeError(f"must be 127.0.0.1 (this machine only), 0.0.0.0 (every IPv4 address) "
                                         f"or :: (every IPv6 address), got {text}")
    return HOSTS[text]


def seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be from 0 to 10 seconds, got {text}")
    return value


def timeout_seconds(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0.1 to 3600 seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="microgpt serve", description="Serve a trained checkpoint over HTTP: "
                                     "POST /predict (streamed on request) and /score, OpenAI's /v1/completions and "
                                     "/v1/models, a page to try it at /, GET /health and /metrics.")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint written by fit, a folder written by export, or 'last' / 'best' for the "
                             "newest run's under --root_dir")
    parser.add_argument("--root_dir", default=".",
                        help="where --ckpt_path last / best look for runs, as fit's --trainer.default_root_dir (default .)")
    parser.add_argument("--host", type=host, default="127.0.0.1",
                        help="address to listen on: 127.0.0.1 (default: this machine only), 0.0.0.0 or ::")
    parser.add_argument("--port", type=port, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    parser.add_argument("--max_batch_size", type=positive_int, default=64,
                        help="requests drawn together in one batch (default 64; 1 turns batching off)")
    parser.add_argument("--batch_timeout", type=seconds, default=0.005,
                        help="seconds to wait for a batch to fill (default 0.005)")
    parser.add_argument("--workers_per_device", type=positive_int, default=1,
                        help="inference processes per endpoint on the device (default 1; more use more cores)")
    parser.add_argument("--timeout", type=timeout_seconds, default=30.0,
                        help="seconds a request may wait for a worker, and a streaming client may stop reading, "
                             "before it is given up (default 30)")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"requests to all but /, /health and /metrics must send this in the X-API-Key header "
                             f"or as Authorization: Bearer (default ${API_KEY_ENV}; unset: none)")
    with exit_on_user_error("microgpt serve"):
        serve(parser.parse_args(argv))


def stop_on_signal(parent: int) -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in this process, where LitServe shuts down on it; the processes
    LitServe forks inherit the handler and simply exit once their own shutdown is done (uvicorn re-raises the
    signal it caught), without a traceback."""
    def stop(signum, frame):
        if os.getpid() == parent:
            raise KeyboardInterrupt
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve(args: argparse.Namespace) -> None:
    """Check everything that can be wrong, then serve until SIGTERM or Ctrl-C."""
    path = resolve(args.ckpt_path, args.root_dir, "microgpt serve")
    device = check_device(args.device)
    if args.batch_timeout >= args.timeout:
        raise UserError(f"--batch_timeout {args.batch_timeout} must be shorter than --timeout {args.timeout}.")
    gpt, _ = load_model(path)  # a checkpoint that will not load stops here, before anything listens
    parameters = sum(p.numel() for p in gpt.parameters())
    del gpt
    check_port(args.host, args.port)
    work = tempfile.mkdtemp(prefix="microgpt-serve-")
    try:
        # every process of the server keeps its metrics under here (read by prometheus-client at its import)
        os.makedirs(os.path.join(work, "metrics"))
        os.makedirs(os.path.join(work, "cancelled"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(work, "metrics")
        server = build_server(path, device, args.api_key or None, args.max_batch_size, args.batch_timeout,
                              args.workers_per_device, args.timeout, os.path.join(work, "cancelled"))
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"microgpt serve: {path} ({parameters:,} parameters) on {device} at http://{shown}:{args.port}/ "
              f"(GET /health answers once it is loaded; Ctrl-C stops it)", flush=True)
        # SIGTERM stops the server as Ctrl-C does: LitServe then stops its HTTP and inference processes
        stop_on_signal(os.getpid())
        try:
            server.run(host=args.host, port=args.port, num_api_servers=1, log_level="warning",
                       generate_client_file=False)
        except KeyboardInterrupt:  # arrived while LitServe was starting, before it watches for it
            pass
        finally:
            for child in multiprocessing.active_children():  # whatever LitServe did not get to stop
                child.terminate()
            for child in multiprocessing.active_children():
                child.join(5)
                if child.is_alive():
                    child.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("microgpt serve: stopped.", flush=True)

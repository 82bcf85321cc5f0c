"""``microgpt serve``: invent and score names over HTTP with LitServe, and a page at ``/`` to try the model.

``microgpt serve --ckpt_path best|last|FILE [--root_dir D] [--host H] [--port P] [--device D]
[--max_batch_size N] [--batch_timeout S] [--api_key KEY]`` (the serve extra: ``pip install -e '.[serve]'`` in a checkout).

* ``POST /predict`` ``{"count", "prefix", "temperature", "top_k", "top_p", "seed", "min_length", "max_length",
  "only_new", "unique", "likeliest"}`` (all optional) answers ``{"names": [...], "logprobs": [...], "kinds": [...]}``.
  Requests that arrive together are drawn in one batch of rows, each with its own settings and, when seeded, its
  own random numbers (``microgpt.model.names``, ``microgpt.model.sampling``).
* ``POST /score`` ``{"names": [...]}`` answers ``{"nll": [...]}``: each name's mean negative log-likelihood per
  character, its end included, as ``test`` scores it.
* ``GET /`` the page (``page.html``); ``GET /health`` answers ``ok`` once the model is loaded.

What can be checked from a request alone is checked by pydantic in the HTTP process; what needs the model (the
prefix's characters and length, the names' characters) is checked in the worker, and a bad request there is
answered on its own, so it never spoils the batch it arrived in. Like ``sample``, nothing here imports Lightning.
"""

import argparse
import base64
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import signal
import socket
from dataclasses import dataclass
from importlib.resources import files

import litserve as ls
import torch
from fastapi import Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from microgpt.errors import OneLineParser, UserError, exit_on_user_error
from microgpt.checkpoints.loading import load_model
from microgpt.data.known import KnownNames
from microgpt.model.names import LIKELIEST_MAX, NameOptions, Names, draw_names, options_problem
from microgpt.threads import use_threads
from microgpt.commands.sample import positive_int, resolve, score_names

MAX_COUNT = 1000  # names per /predict request
MAX_NAMES = 1000  # names per /score request
MAX_BODY = 64 * 1024  # bytes; a larger body is answered 413
API_KEY_ENV = "MICROGPT_API_KEY"
HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}


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
    temperature: float = Field(0.5, gt=0, description="softmax temperature")
    top_k: int | None = Field(None, ge=1, description="draw only among the k likeliest characters")
    top_p: float | None = Field(None, gt=0, le=1, description="draw only among the fewest likeliest characters "
                                                                "whose probability reaches p")
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same names")
    min_length: int | None = Field(None, ge=1, description="names have at least this many characters, prefix included")
    max_length: int | None = Field(None, ge=1, description="names have at most this many characters, prefix included")
    only_new: bool = Field(False, description="only names that are neither training nor held-out names of the run")
    unique: bool = Field(False, description="no name twice")
    likeliest: int | None = Field(None, ge=1, le=LIKELIEST_MAX,
                                  description="this many of the most probable names instead of drawn ones")


class ScoreBody(JSONBody):
    """The JSON body of ``POST /score``."""

    names: list[str] = Field(min_length=1, max_length=MAX_NAMES, description="the names to score")


@dataclass
class Invalid:
    """A request the model cannot take: answered 422, naming the field (``loc``), on its own."""

    loc: tuple[str | int, ...]
    message: str

    def response(self) -> Response:
        return error_response([{"type": "value_error", "loc": ["body", *self.loc], "msg": self.message}])


def error_response(errors: list[dict]) -> Response:
    """A 422 in the shape FastAPI gives pydantic's errors (``type``, ``loc``, ``msg``), leaving out the input
    itself: escaped to ASCII, any input (a lone surrogate, NaN) is answered as JSON, never a 500."""
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
    return Response(json.dumps({"detail": detail}), status_code=422, media_type="application/json")


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [{**e, "msg": "the body must be a JSON object ({} for every default)"}
              if e["type"] == "missing" and tuple(e["loc"]) == ("body",) else e for e in exc.errors()]
    return error_response(errors)


@dataclass
class Draw:
    """A decoded ``/predict`` request."""

    options: NameOptions
    generator: torch.Generator | None


class CheckpointAPI(ls.LitAPI):
    """A LitServe API that loads a microgpt checkpoint in its worker and checks the API key.

    Args:
        ckpt_path: The checkpoint file.
        api_key: When set, a request without this ``X-API-Key`` header is answered 401.
        max_batch_size: Requests LitServe hands ``predict`` at once.
        batch_timeout: Seconds LitServe waits for a batch to fill.
        api_path: The endpoint.
    """

    def __init__(self, ckpt_path: str, api_key: str | None, max_batch_size: int, batch_timeout: float, api_path: str):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=api_path)
        self.ckpt_path = ckpt_path
        self.api_key = api_key

    def setup(self, device: str) -> None:
        # Ctrl-C reaches every process of the terminal's group: the main process stops this one (SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.gpt, self.tokenizer = load_model(self.ckpt_path, device)
        if device == "cpu":  # the two inference workers (/predict, /score) share the cores; a batch is at most
            # max_batch_size names of block_size characters
            print(use_threads(self.max_batch_size * self.gpt.block_size, self.gpt, processes=2), file=sys.stderr)
        self.gpt.eval()

    def authorize(self, x_api_key: str | None = Header(default=None)) -> None:
        """LitServe's hook, run in the HTTP process before the request is queued."""
        if self.api_key is None:
            return
        if x_api_key is None:
            raise HTTPException(401, detail="this server needs an API key: send it in the X-API-Key header.")
        if not secrets.compare_digest(x_api_key.encode(), self.api_key.encode()):
            raise HTTPException(401, detail="the X-API-Key header does not hold this server's API key.")

    def unknown_characters(self, text: str) -> str | None:
        """A sentence naming the characters of ``text`` the model never saw, or None."""
        unknown = self.tokenizer.unknown(text)
        if not unknown:
            return None
        return f"has characters the model has never seen: {''.join(unknown)!r} (it knows {self.tokenizer.chars!r})"


def rows(batch):
    """LitServe hands ``predict`` a list with batching and a single request without."""
    return (batch, True) if isinstance(batch, list) else ([batch], False)


class PredictAPI(CheckpointAPI):
    """``POST /predict``: names, drawn for every request of a batch in one batch of rows."""

    def decode_request(self, request: PredictBody) -> Draw | Invalid:
        problem = self.unknown_characters(request.prefix)
        if problem:
            return Invalid(("prefix",), f"the prefix {request.prefix!r} {problem}.")
        room = self.gpt.block_size - 1  # the start token takes one place of the context
        if len(request.prefix) > room:
            return Invalid(("prefix",), f"the prefix is {len(request.prefix)} characters long; this model's context "
                                        f"holds {room} after the start token (block_size {self.gpt.block_size}).")
        options = NameOptions(request.count, request.prefix, request.temperature, request.top_k, request.top_p,
                              request.min_length, request.max_length, request.only_new, request.unique,
                              request.likeliest)
        if problem := options_problem(options, self.tokenizer, self.gpt.block_size, self.known, flag=""):
            return Invalid((problem[0],), problem[1])
        generator = None
        if request.seed is not None:
            generator = torch.Generator(self.gpt.lm_head.weight.device).manual_seed(request.seed)
        return Draw(options, generator)

    def setup(self, device: str) -> None:
        super().setup(device)
        self.known = KnownNames.from_file(self.ckpt_path)  # None for a checkpoint written without its run's names

    def predict(self, batch):
        decoded, batched = rows(batch)
        draws = [d for d in decoded if isinstance(d, Draw)]
        drawn = iter(draw_names(self.gpt, self.tokenizer, [(d.options, d.generator) for d in draws], self.known))
        out = [d if isinstance(d, Invalid) else next(drawn) for d in decoded]
        return out if batched else out[0]

    def encode_response(self, output: Names | Invalid):
        """``{"names", "logprobs", "kinds"}``: each name's "new", "training" or "held-out" (null for a checkpoint
        without its run's names), and a "message" when fewer names than asked for turned up."""
        if isinstance(output, Invalid):
            return output.response()
        kinds = [self.known.kind(name) or "new" for name in output.names] if self.known is not None else None
        body = {"names": output.names, "logprobs": output.logprobs, "kinds": kinds}
        return body if output.shortfall is None else {**body, "message": output.shortfall}


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
        names = [name for d in decoded if not isinstance(d, Invalid) for name in d]
        scores = iter(score_names(self.gpt, self.tokenizer, names) if names else [])
        out = [d if isinstance(d, Invalid) else [next(scores) for _ in d] for d in decoded]
        return out if batched else out[0]

    def encode_response(self, output: list[float] | Invalid):
        return output.response() if isinstance(output, Invalid) else {"nll": output}


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


def build_server(ckpt_path: str, device: str, api_key: str | None, max_batch_size: int,
                 batch_timeout: float) -> ls.LitServer:
    """The LitServer with ``/predict``, ``/score``, ``/health`` and the page at ``/``."""
    apis = [PredictAPI(ckpt_path, api_key, max_batch_size, batch_timeout, "/predict"),
            ScoreAPI(ckpt_path, api_key, max_batch_size, batch_timeout, "/score")]
    kind, _, index = device.partition(":")
    accelerator = {"accelerator": "cpu"} if kind == "cpu" else {"accelerator": kind, "devices": [int(index or 0)]}
    server = ls.LitServer(apis, **accelerator, max_payload_size=MAX_BODY, model_metadata={"checkpoint": ckpt_path})
    html, policy = page()
    app = server.app
    app.add_exception_handler(RequestValidationError, validation_error)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]  # LitServe's "litserve running"
    app.add_api_route("/", lambda: HTMLResponse(html, headers={"Content-Security-Policy": policy}), methods=["GET"],
                      include_in_schema=False)
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


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="microgpt serve", description="Serve a trained checkpoint over HTTP: "
                                     "POST /predict and /score, a page to try it at /, GET /health.")
    parser.add_argument("--ckpt_path", required=True,
                        help="checkpoint written by fit, or 'last' / 'best' for the newest run's under --root_dir")
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
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"requests must send this in the X-API-Key header (default ${API_KEY_ENV}; unset: none)")
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
    gpt, _ = load_model(path)  # a checkpoint that will not load stops here, before anything listens
    parameters = sum(p.numel() for p in gpt.parameters())
    del gpt
    check_port(args.host, args.port)
    server = build_server(path, device, args.api_key or None, args.max_batch_size, args.batch_timeout)
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
    print("microgpt serve: stopped.", flush=True)

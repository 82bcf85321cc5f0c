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

This module builds the server and runs the command; the rest lives beside it: ``serve_http`` (request bodies,
error answers, the OpenAPI schema), ``serve_apis`` (the LitServe APIs of ``/predict`` and ``/score``),
``serve_openai`` (``/v1/completions``), ``serve_asgi`` (the middleware) and ``metrics``.
"""

import argparse
import base64
import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
from importlib.resources import files

import litserve as ls
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from microgpt.checkpoints.loading import load_model
from microgpt.commands.sample import positive_int, resolve
from microgpt.commands.serve_apis import PredictAPI, ScoreAPI
from microgpt.commands.serve_asgi import Answers, Keyed, Metrics
from microgpt.commands.serve_http import MAX_BODY, MODEL_ID, http_error, truthful_schema, validation_error
from microgpt.commands.serve_openai import CompletionAPI
from microgpt.data.known import KnownNames
from microgpt.errors import OneLineParser, UserError, exit_on_user_error

API_KEY_ENV = "MICROGPT_API_KEY"
HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}


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


def build_server(ckpt_path: str, device: str, api_key: str | None, max_batch_size: int, batch_timeout: float,
                 workers_per_device: int = 1, timeout: float = 30.0, cancel_dir: str | None = None) -> ls.LitServer:
    """The LitServer with ``/predict``, ``/score``, ``/v1/completions``, ``/v1/models``, ``/metrics``,
    ``/health`` and the page at ``/``."""
    gpt, tokenizer = load_model(ckpt_path)
    knows_names = KnownNames.from_file(ckpt_path) is not None
    args = (ckpt_path, api_key, max_batch_size, batch_timeout)
    # /score unbatched: one request already scores its names in one pass, and LitServe's unbatched loop waits on
    # its queue where the batched one polls it every millisecond, about a fifth of a core for an idle endpoint
    apis = [PredictAPI(*args, "/predict", cancel_dir), ScoreAPI(ckpt_path, api_key, 1, 0.0, "/score"),
            CompletionAPI(*args, "/v1/completions", cancel_dir)]
    for api in apis:
        api.processes = len(apis) * workers_per_device
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

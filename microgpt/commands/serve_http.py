"""What ``microgpt serve``'s endpoints accept and answer: the request bodies (checked by pydantic in the HTTP
process), the error answers (FastAPI's shape, or OpenAI's on ``/v1``), and the OpenAPI schema with what only the
model knows."""

import json
from dataclasses import dataclass
from typing import Annotated

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from microgpt.model.names import LIKELIEST_MAX
from microgpt.model.tokenizer import CharTokenizer

MAX_COUNT = 1000  # names per /predict request
MAX_NAMES = 1000  # names per /score request
MAX_NAME = 100  # characters per name to /score (a longer one is cut to the context anyway)
MAX_BODY = 1024 * 1024  # bytes; a larger body is answered 413. Any body the schema allows fits: MAX_NAMES names
# of MAX_NAME characters, each escaped to 6 bytes, come to 600 KB
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # beyond these float32 logits overflow or lose every difference
MODEL_ID = "microgpt"  # the model's name on /v1
NDJSON, SSE, JSON_TYPE = "application/x-ndjson", "text/event-stream", "application/json"


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


def timeout_body(path: str) -> dict:
    message = "the request waited longer than the server's --timeout for a worker; try again."
    return openai_error(message, None, 504) if path.startswith("/v1/") else {"detail": message}


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

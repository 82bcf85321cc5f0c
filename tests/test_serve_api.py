"""``microgpt serve`` speaking the ecosystem: streamed /predict, OpenAI's /v1 through the official client,
Prometheus /metrics, and the OpenAPI schema driving the server. One server, with two workers per endpoint, serving an exported safetensors folder (the tests compare its
draws with the checkpoint file's)."""

import json
import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers.serving import Server, get, live_session_processes, post, random_checkpoint, request, serve_env

from microgpt.checkpoints.loading import load_model
from microgpt.commands.export import export
from microgpt.model.names import sample_names

pytestmark = pytest.mark.slow  # several fresh fits or processes: `-m "not slow"` leaves them out

KEY = "k3y"
VOCAB = "abcdefghijklmnopqrstuvwxyz-]^\\' "  # characters a regular expression class must escape
BLOCK = 256  # long rows: a request of many names spans many steps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_api")
    ckpt = random_checkpoint(tmp / "model.ckpt", VOCAB, n_embd=16, n_head=2, n_layer=1, block_size=BLOCK, seed=2)
    folder = export(str(ckpt), "safetensors", str(tmp / "exported"))  # served: it must draw what ckpt draws
    s = Server(folder, tmp / "serve.log", "--workers_per_device", "2", "--timeout", "10", "--max_batch_size", "8",
               env=serve_env(MICROGPT_API_KEY=KEY))
    try:
        s.wait_ready()
        s.ckpt = ckpt
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def model(server):
    gpt, tokenizer = load_model(server.ckpt)
    return gpt.eval(), tokenizer


def stream(url: str, payload: dict) -> tuple[int, str, list[str]]:
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    status, body, got = request(url, json.dumps(payload).encode(), headers, "POST")
    return status, got.get("content-type", ""), body.decode().splitlines()


def test_a_seeded_stream_gives_the_names_of_the_same_request_unstreamed(server, model):
    ask = {"count": 40, "prefix": "m", "temperature": 1.3, "top_p": 0.9, "seed": 9}
    status, unstreamed = post(server.url + "/predict", ask, key=KEY)
    assert status == 200
    status, media, lines = stream(server.url + "/predict", {**ask, "stream": True})
    assert status == 200 and media == "application/x-ndjson"
    streamed = [json.loads(line)["name"] for line in lines]
    assert sorted(streamed) == sorted(unstreamed["names"])  # streamed as each ends, so in the order they end
    gpt, tokenizer = model
    assert unstreamed["names"] == sample_names(gpt, tokenizer, 40, 1.3, None, "m", torch.Generator().manual_seed(9), 0.9)
    status, media, lines = stream(server.url + "/predict", {"prefix": "A", "stream": True})  # refused before streaming
    assert status == 422 and media == "application/json" and json.loads(lines[0])["detail"][0]["loc"] == ["body",
                                                                                                          "prefix"]


def metric(server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(server.url + "/metrics")
    assert status == 200
    return sum(s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def raw_stream(server, payload: dict) -> socket.socket:
    """A streaming /predict sent on a bare socket, which reads nothing unless told."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-API-Key: " + KEY.encode()
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_a_client_that_disconnects_frees_its_rows_and_one_that_stalls_holds_nothing(server):
    names = lambda: metric(server, "microgpt_names_total", endpoint="/predict", status="200")
    before = names()
    sock = raw_stream(server, {"count": 1000, "temperature": 1.0, "seed": 1, "stream": True})
    sock.settimeout(30)
    received = b""
    while b'{"name"' not in received:  # its first names have arrived: the rest are still being drawn
        received += sock.recv(4096)
    sock.close()
    assert post(server.url + "/predict", {"count": 1}, key=KEY)[0] == 200  # the server keeps serving
    seen, deadline = [], time.monotonic() + 30
    while len(seen) < 3 or len(set(seen[-3:])) > 1:  # until the workers have stopped sending names
        assert time.monotonic() < deadline
        time.sleep(0.3)
        seen.append(names())
    assert seen[-1] - before - 1 < 1000, "the rows of a client that went away were still drawn"
    stalled = [raw_stream(server, {"count": 300, "stream": True}) for _ in range(3)]  # and never read
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: post(server.url + "/predict", {"count": 3, "seed": i}, key=KEY), range(24)))
        assert [status for status, _ in answers] == [200] * 24 and all(len(b["names"]) == 3 for _, b in answers)
    finally:
        for sock in stalled:
            sock.close()


def test_metrics_count_requests_and_names_by_endpoint_and_status_time_them_and_see_batches(server):
    assert post(server.url + "/predict", {"count": 7}, key=KEY)[0] == 200
    assert post(server.url + "/predict", {"prefix": "Q"}, key=KEY)[0] == 422
    assert post(server.url + "/predict", {"count": 7})[0] == 401
    assert post(server.url + "/score", {"names": ["ab", "c"]}, key=KEY)[0] == 200
    status, body, headers = request(server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(server, "microgpt_requests_total", endpoint="/predict", status="200") >= 1
    assert metric(server, "microgpt_requests_total", endpoint="/predict", status="422") >= 1
    assert metric(server, "microgpt_requests_total", endpoint="/predict", status="401") >= 1
    assert metric(server, "microgpt_names_total", endpoint="/predict", status="200") >= 7
    assert metric(server, "microgpt_names_total", endpoint="/score", status="200") >= 2
    assert metric(server, "microgpt_request_seconds_count", endpoint="/predict") >= 3
    assert metric(server, "microgpt_batch_requests_count", endpoint="/predict") >= 1
    assert "microgpt_requests_waiting" in body.decode()
    for path in ("/health", "/metrics", "/"):  # open without the key
        assert get(server.url + path)[0] == 200
    for path in ("/info", "/openapi.json", "/docs", "/v1/models"):  # the rest need it
        assert get(server.url + path)[0] == 401
        assert request(server.url + path, headers={"X-API-Key": KEY})[0] == 200
    assert len(live_session_processes(server.proc.pid)) >= 2 + 3 * 2  # two workers for each of the 3 endpoints


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_openai_client_lists_the_model_and_draws_what_sample_draws_seeded_and_streamed(client, model):
    gpt, tokenizer = model
    assert [m.id for m in client.models.list()] == ["microgpt"]
    answer = client.completions.create(model="microgpt", prompt="ma", n=6, temperature=0.8, top_p=0.9, seed=4)
    expected = sample_names(gpt, tokenizer, 6, 0.8, None, "ma", torch.Generator().manual_seed(4), 0.9)
    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == [n[2:] for n in expected]
    assert all(c.finish_reason == "stop" for c in answer.choices if len(c.text) < BLOCK)
    assert answer.usage.completion_tokens == sum(len(n) - 2 for n in expected)
    texts = {}
    for chunk in client.completions.create(model="microgpt", prompt="ma", n=6, temperature=0.8, top_p=0.9, seed=4,
                                           stream=True):
        for choice in chunk.choices:
            texts[choice.index] = choice.text
    assert [texts[i] for i in range(6)] == [n[2:] for n in expected]
    greedy = client.completions.create(model="microgpt", prompt="b", n=2, temperature=0, max_tokens=5)
    likeliest = sample_names(gpt, tokenizer, 1, 1.0, 1, "b")[0][1:]
    assert [c.text for c in greedy.choices] == [likeliest[:5]] * 2
    assert greedy.choices[0].finish_reason == ("length" if len(likeliest) >= 5 else "stop")


def test_logprobs_are_the_models_and_the_stream_ends_with_done(client, server, model):
    gpt, tokenizer = model
    answer = client.completions.create(model="microgpt", prompt="k", n=3, seed=1, logprobs=2)
    for choice in answer.choices:
        ids = [tokenizer.bos, *tokenizer.encode("k" + choice.text)]
        with torch.no_grad():
            logp = torch.log_softmax(gpt(torch.tensor([ids]))[0], -1)
        expected = [logp[i, t].item() for i, t in enumerate(ids[2:], start=1)]
        assert choice.logprobs.tokens == list(choice.text)
        assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    status, body, headers = request(server.url + "/v1/completions", json.dumps(
        {"prompt": "a", "n": 2, "stream": True}).encode(), {"Authorization": f"Bearer {KEY}"}, "POST")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 3


def test_bad_openai_requests_are_4xx_in_openais_error_shape(client, server):
    import openai

    cases = [({"model": "gpt-4", "prompt": "a"}, openai.NotFoundError, "model"),
             ({"model": "microgpt", "prompt": "a", "n": 0}, openai.BadRequestError, "n"),
             ({"model": "microgpt", "prompt": "a", "max_tokens": BLOCK + 1}, openai.BadRequestError, "max_tokens"),
             ({"model": "microgpt", "prompt": [1, 2]}, openai.BadRequestError, "prompt"),
             ({"model": "microgpt", "prompt": "aZ"}, openai.BadRequestError, "prompt"),
             ({"model": "microgpt", "prompt": "a", "echo": True}, openai.BadRequestError, "echo"),
             ({"model": "microgpt", "prompt": "a", "extra_body": {"best_of": 2}}, openai.BadRequestError, "best_of")]
    for kwargs, error, param in cases:
        with pytest.raises(error) as caught:
            client.completions.create(**kwargs)
        assert caught.value.body["param"] == param and param in caught.value.body["message"], caught.value.body
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def from_schema(schema: dict, spec: dict, rng: random.Random):
    """A random value the JSON schema ``schema`` accepts, often at its bounds (``$ref``s resolved in ``spec``)."""
    if "$ref" in schema:
        return from_schema(spec["components"]["schemas"][schema["$ref"].split("/")[-1]], spec, rng)
    if "anyOf" in schema:
        return from_schema(rng.choice(schema["anyOf"]), spec, rng)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        required = set(schema.get("required", []))
        return {k: from_schema(v, spec, rng) for k, v in schema["properties"].items()
                if k in required or rng.random() < 0.6}
    if kind == "array":
        low, high = schema.get("minItems", 0), min(schema.get("maxItems", 50), 1000)
        return [from_schema(schema["items"], spec, rng) for _ in range(rng.choice([low, high, rng.randint(low, 8)]))]
    if kind == "boolean":
        return rng.random() < 0.5
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**31)))
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**70))
        if kind == "integer":
            low, high = int(low), int(high)
            low += "exclusiveMinimum" in schema
            high -= "exclusiveMaximum" in schema
            return rng.choice([low, high, rng.randint(low, min(high, low + 20))])
        tiny = 1e-300 if "exclusiveMinimum" in schema else 0.0
        return rng.choice([low + tiny, high, rng.uniform(low, min(high, low + 3)) + tiny])
    if kind == "string":
        chars = re.fullmatch(r"\^\[(.*)\]\*\$", schema["pattern"]).group(1).encode().decode("unicode_escape")
        length = rng.choice([0, schema.get("maxLength", 12), rng.randint(0, min(schema.get("maxLength", 12), 12))])
        return "".join(rng.choice(chars) for _ in range(length))
    if kind == "null":
        return None
    raise AssertionError(f"the schema has a type the test does not know: {schema}")


def test_requests_drawn_from_the_servers_own_schema_are_never_refused_and_answers_are_as_documented(server):
    status, body, _ = request(server.url + "/openapi.json", headers={"X-API-Key": KEY})
    spec = json.loads(body)
    assert status == 200
    predict = spec["components"]["schemas"]["PredictBody"]["properties"]
    assert predict["prefix"]["maxLength"] == BLOCK - 1 and predict["seed"]["anyOf"][0]["exclusiveMaximum"] == 2**63
    assert re.fullmatch(predict["prefix"]["pattern"], VOCAB) and not re.fullmatch(predict["prefix"]["pattern"], "A")
    rng = random.Random(0)
    for path in ("/predict", "/score", "/v1/completions"):
        operation = spec["paths"][path]["post"]
        documented = operation["responses"]["200"]["content"]
        body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
        for _ in range(8):
            payload = from_schema(body_schema, spec, rng)
            # the two rules that span fields, stated in the descriptions (JSON Schema cannot compare fields):
            # min_length <= max_length, and the prefix within max_length
            if path == "/predict" and payload.get("max_length") is not None:
                payload["prefix"] = payload.get("prefix", "")[: payload["max_length"]]
                if payload.get("min_length") is not None:
                    payload["min_length"] = min(payload["min_length"], payload["max_length"])
            status, answer, headers = request(server.url + path, json.dumps(payload).encode(),
                                              {"Content-Type": "application/json", "X-API-Key": KEY}, "POST")
            assert status == 200, (path, payload, answer[:300])
            media = headers["content-type"].split(";")[0]
            assert media in documented, (path, media)
            if media == "application/json":
                json.loads(answer)
    for path, item in spec["paths"].items():  # every GET answers the media type its schema states
        if "get" in item and not item["get"].get("parameters"):
            status, answer, headers = request(server.url + path, headers={"X-API-Key": KEY})
            assert status == 200 and headers["content-type"].split(";")[0] in item["get"]["responses"]["200"]["content"]

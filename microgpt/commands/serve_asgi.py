"""``microgpt serve``'s ASGI middleware in its HTTP process: the drawing endpoints' answers sent as the worker
decided (and their rows freed when a client goes or stalls), the API key on the routes LitServe does not guard,
and every request counted and timed for ``/metrics``."""

import asyncio
import json
import os
import secrets
import time

from microgpt.commands.serve_http import JSON_TYPE, openai_error, timeout_body

DRAWING = ("/predict", "/v1/completions")  # the streaming APIs, whose answers start with a head line
OPEN = ("/", "/health", "/metrics")  # no API key needed


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
            if state["done"] or not body:
                if state["head"] is None and not body and not more:  # the stream ended before the worker answered:
                    await send_json(504, json.dumps(timeout_body(scope["path"])))  # it timed out in the queue
                    state["done"] = True
                return
            lines = body.splitlines()
            if state["head"] is None:  # a worker's first message starts with the head line
                head = state["head"] = json.loads(lines.pop(0))
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
            for line in lines:  # then body pieces, each a frame {"data", "last"}
                if state["done"]:
                    return
                frame = json.loads(line)
                await deliver({"type": "http.response.body", "body": frame["data"].encode(),
                               "more_body": not frame["last"]})
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

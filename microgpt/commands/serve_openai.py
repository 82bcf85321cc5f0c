"""``POST /v1/completions``: OpenAI's completions API, each choice a name that starts with the prompt, drawn
as ``/predict`` draws (``serve_apis.DrawingAPI``)."""

import json
import secrets
import time

import torch

from microgpt.commands.serve_apis import Answer, Draw, DrawingAPI
from microgpt.commands.serve_http import MIN_TEMPERATURE, MODEL_ID, SSE, CompletionBody, Invalid
from microgpt.model.names import NameOptions


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

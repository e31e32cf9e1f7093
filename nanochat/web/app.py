"""An OpenAI-compatible chat server: FastAPI routes over continuous-batching workers.

    app = create_app([BatchScheduler(model, tokenizer)])
    make_server(app, host="127.0.0.1", port=8000).run()       # nanochat.web.server: uvicorn with timeouts

Routes: GET / (the chat page), POST /v1/chat/completions (chat, OpenAI schema), POST /v1/completions
(plain text in, plain text out), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics
(Prometheus text). Both generation routes stream (SSE) or not, and honour n, seed, temperature, top_p,
top_k, stop, logprobs and stream_options.include_usage; a field they cannot honour is refused (params.py).
Every error answers {"error": {"message", "type", "param", "code"}}, the shape OpenAI clients parse.
With `api_key`, /v1/* and /metrics need "Authorization: Bearer <key>".

Requests go to the least loaded worker (one per GPU); within a worker, requests share decode steps (see
scheduler.py). A request body is read up to `Limits.max_body_bytes` (413 past it) and parsed, validated
and tokenized in a worker thread, so that a large one never stalls the event loop that streams everyone's
tokens. A client that goes away cancels its generation, streaming or not.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from collections import deque
from json.encoder import encode_basestring_ascii as json_string  # json.dumps of a str
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nanochat.conversation import render_for_completion
from nanochat.web.choice import Choice, chat_logprobs, text_logprobs
from nanochat.web.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from nanochat.web.params import (ApiError, BadRequest, Limits, Params, parse_chat_request,
                                 parse_completion_request)
from nanochat.web.scheduler import BatchScheduler, GenerationRequest

__all__ = ["ApiError", "BadRequest", "Limits", "create_app"]
UI_PATH = Path(__file__).with_name("ui.html")


class _Inbox:
    """One request's events: appended by a scheduler thread (deque appends are thread-safe), taken by
    the request's handler, which a `_Mailbox` wakes. Lighter than an asyncio.Queue, whose put and get
    cost the event loop ~5 µs per streamed token."""

    def __init__(self):
        self.events: deque[tuple] = deque()
        self.waiter: asyncio.Future | None = None

    async def take(self) -> list[tuple]:
        """Every event that has arrived, waiting for the first: a stream that fell behind catches up
        in one write instead of one per token."""
        while not self.events:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return [self.events.popleft() for _ in range(len(self.events))]

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _Mailbox:
    """Carries events from the scheduler threads to the request handlers on one event loop.

    Waking the loop (call_soon_threadsafe) costs a socket write; once per event it cost the scheduler
    thread ~10 µs per token of every active sequence. Here the loop is woken only when no wake-up is
    already on its way, so a step's tokens mostly travel together."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.posted, self.wake_scheduled = loop, deque(), False

    def post(self, inbox: _Inbox, event: tuple) -> None:
        """Any thread: add `event` to `inbox`, whose handler runs on this loop."""
        inbox.events.append(event)
        self.posted.append(inbox)
        if not self.wake_scheduled:
            self.wake_scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self.wake_scheduled = False  # first: an event posted from here on schedules another delivery
        while self.posted:
            self.posted.popleft().wake()


class _ChatFormat:
    """The chat completion's JSON: chunks carry a delta {"content"}, the answer a message."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, rid: str, created: int, model: str, tokenizer):
        self.base = {"id": rid, "object": self.chunk_object, "created": created, "model": model}
        self.tokenizer = tokenizer
        # a content chunk's fixed part, encoded once: json.dumps of the whole chunk cost the event loop
        # ~4 µs per streamed token
        self.head = "data: " + json.dumps(self.base)[:-1] + ', "choices": [{"index": '

    def _sse(self, index: int, payload: dict, finish_reason: str | None) -> str:
        choice = {"index": index, **payload, "finish_reason": finish_reason}
        return f"data: {json.dumps({**self.base, 'choices': [choice]})}\n\n"

    def first(self, n: int) -> str:
        return "".join(self._sse(i, {"delta": {"role": "assistant", "content": ""}}, None) for i in range(n))

    def fast(self, index: int, text: str) -> str:
        """chunk(index, text) of a plain choice."""
        return f'{self.head}{index}, "delta": {{"content": {json_string(text)}}}, "finish_reason": null}}]}}\n\n'

    def chunk(self, index: int, text: str, entries: list | None, finish_reason: str | None) -> str:
        """A chunk with `text` (and the logprobs of `entries`), then one with the finish reason once known."""
        out = ""
        if text or entries:
            payload = {"delta": {"content": text}}
            if entries is not None:
                payload["logprobs"] = chat_logprobs(self.tokenizer, entries)
            out = self._sse(index, payload, None)
        if finish_reason is not None:
            out += self._sse(index, {"delta": {}}, finish_reason)
        return out

    def choice(self, index: int, choice: Choice) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": choice.full_text()},
                "logprobs": chat_logprobs(self.tokenizer, choice.new_entries()) if choice.wants_logprobs else None,
                "finish_reason": choice.finish_reason}


class _TextFormat(_ChatFormat):
    """The (legacy) text completion's JSON: chunks and answer carry "text", logprobs in the legacy lists."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl-"

    def first(self, n: int) -> str:
        return ""

    def fast(self, index: int, text: str) -> str:
        return f'{self.head}{index}, "text": {json_string(text)}, "logprobs": null, "finish_reason": null}}]}}\n\n'

    def chunk(self, index: int, text: str, entries: list | None, finish_reason: str | None) -> str:
        if not (text or entries or finish_reason):
            return ""
        logprobs = text_logprobs(self.tokenizer, entries) if entries is not None else None
        return self._sse(index, {"text": text, "logprobs": logprobs}, finish_reason)

    def choice(self, index: int, choice: Choice) -> dict:
        return {"index": index, "text": choice.full_text(),
                "logprobs": text_logprobs(self.tokenizer, choice.new_entries()) if choice.wants_logprobs else None,
                "finish_reason": choice.finish_reason}


def _error_response(exc: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("the request body's JSON is nested too deeply; flatten it") from None
    except ValueError as exc:  # also bad UTF-8, and integers of more than 4300 digits
        raise BadRequest(f"the request body is not valid JSON ({str(exc)[:200]})") from None


def create_app(workers: list[BatchScheduler], model_name: str = "nanochat", limits: Limits | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app over already started workers (each a model replica with its own thread)."""
    if not workers:
        raise ValueError("create_app needs at least one worker (a BatchScheduler)")
    limits = limits or Limits()
    tokenizer = workers[0].tokenizer
    app = FastAPI(title="nanochat")
    metrics = Metrics(workers)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    ui = UI_PATH.read_text(encoding="utf-8")
    created = int(time.time())
    mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        close = {"Connection": "close"} if exc.status == 413 else None  # do not read the rest of the body
        return _error_response(exc, close)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        what = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            err = ApiError(f"no such route: {what}; the API is under /v1 (GET /v1/models)", 404, code="not_found")
        elif exc.status_code == 405:
            err = ApiError(f"method not allowed: {what}; allowed: {(exc.headers or {}).get('Allow', '?')}", 405,
                           code="method_not_allowed")
        else:
            err = ApiError(str(exc.detail), exc.status_code)
        return _error_response(err, exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(f"internal error: {type(exc).__name__}", 500, kind="server_error"))

    async def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
                           "the server was started with (--api_key)", 401, code="invalid_api_key")

    guard = [Depends(check_key)] if api_key else []

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(ui)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "workers": len(workers),
                "load": [w.load() for w in workers]}

    @app.get("/metrics", dependencies=guard)
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=guard)
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}", dependencies=guard)
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise ApiError(f"the model '{model_id[:100]}' does not exist; this server serves '{model_name}'",
                           404, param="model", code="model_not_found")
        return model_card

    async def read_body(request: Request) -> bytes:
        """The body, refused with 413 once it is known to exceed the limit (by its Content-Length, or
        while it streams in), so that no more of it is read or held."""
        cap = limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = (f"request body of {{}} bytes exceeds this server's limit of {cap}; send less "
                     "(the server's --max_body_bytes sets it)")
        if declared.isdigit() and int(declared) > cap:
            raise ApiError(too_large.format(declared), 413, code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise ApiError(too_large.format(f"more than {cap}"), 413, code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise BadRequest("the client went away before sending the whole body") from None
        return b"".join(chunks)

    def prepare_chat(raw: bytes) -> tuple[Params, list[int]]:
        params = parse_chat_request(_parse_json(raw), limits, model_name)
        try:
            return params, render_for_completion(tokenizer, {"messages": params.messages})
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None

    def prepare_text(raw: bytes) -> tuple[Params, list[int]]:
        params = parse_completion_request(_parse_json(raw), limits, model_name)
        return params, tokenizer.encode(params.prompt, prepend="<|bos|>")

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat_completions(request: Request):
        start = time.perf_counter()
        params, prompt = await asyncio.to_thread(prepare_chat, await read_body(request))
        return await generate(request, params, prompt, _ChatFormat, start)

    @app.post("/v1/completions", dependencies=guard)
    async def completions(request: Request):
        start = time.perf_counter()
        params, prompt = await asyncio.to_thread(prepare_text, await read_body(request))
        return await generate(request, params, prompt, _TextFormat, start)

    async def generate(request: Request, params: Params, prompt: list[int], format_cls, start: float):
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.get(loop) or mailboxes.setdefault(loop, _Mailbox(loop))
        inbox = _Inbox()
        gen = GenerationRequest(
            prompt=prompt, emit=functools.partial(mailbox.post, inbox),
            num_samples=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
            top_k=params.top_k, top_p=params.top_p, seed=params.seed, logprobs=params.logprobs)
        try:
            min(workers, key=lambda w: w.load()).submit(gen)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        fmt = format_cls(f"{format_cls.id_prefix}{uuid.uuid4().hex[:24]}", int(time.time()), model_name, tokenizer)
        choices = [Choice(tokenizer, params.stop, params.logprobs) for _ in range(params.n)]
        state = {"first": True, "failed": False}

        def first_events() -> None:
            if state["first"]:
                state["first"] = False
                metrics.first_token.observe(time.perf_counter() - start)

        def apply(index: int, kind: str, value) -> str:
            """An event of sample `index`; returns the text it releases."""
            choice = choices[index]
            if choice.finish_reason is not None:  # ended by a stop string: the scheduler's last events
                return ""
            if kind == "logprob":
                choice.on_logprob(value)
                return ""
            if kind == "token":
                text = choice.on_token(value)
                if choice.finish_reason is not None:
                    gen.stopped.add(index)  # a stop string: free the slot
                return text
            return choice.on_done(value)

        def usage() -> dict:
            completion = sum(c.generated() for c in choices)
            return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion}

        def finish() -> None:
            """Every way a request ends (done, failed, client gone): free its slots, count it."""
            gen.cancelled.set()
            if not state["failed"] and any(c.finish_reason is None for c in choices):
                metrics.cancelled.inc()
            metrics.prompt_tokens.inc(len(prompt))
            metrics.completion_tokens.inc(sum(c.generated() for c in choices))

        def failure(message: str) -> ApiError:
            state["failed"] = True
            return ApiError(f"generation failed: {message}", 500, kind="server_error")

        if not params.stream:
            async def watch_disconnect() -> None:
                """A client that goes away cancels its generation (the only receive after the body)."""
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                mailbox.post(inbox, ("gone", -1, None))

            watcher = asyncio.ensure_future(watch_disconnect())
            try:
                while any(c.finish_reason is None for c in choices):
                    events = await inbox.take()
                    first_events()
                    for kind, index, value in events:
                        if kind == "gone":
                            return Response(status_code=499)  # nobody reads it
                        if kind == "error":
                            raise failure(value)
                        apply(index, kind, value)
            finally:
                watcher.cancel()
                finish()
            return JSONResponse({"id": fmt.base["id"], "object": fmt.object, "created": fmt.base["created"],
                                 "model": model_name, "choices": [fmt.choice(i, c) for i, c in enumerate(choices)],
                                 "usage": usage()})

        async def stream():
            try:
                yield fmt.first(len(choices))
                while not state["failed"] and any(c.finish_reason is None for c in choices):
                    out = []
                    events = await inbox.take()
                    first_events()
                    for kind, index, value in events:
                        if kind == "error":
                            out.append(f"data: {json.dumps(failure(value).body())}\n\n")
                            break
                        choice = choices[index]
                        if choice.plain and kind == "token":  # the common case: the token's text as it decodes
                            if delta := choice.add(value):
                                out.append(fmt.fast(index, delta))
                            continue
                        if choice.finish_reason is not None:
                            continue
                        text = apply(index, kind, value)
                        entries = choice.new_entries() if choice.wants_logprobs else None
                        out.append(fmt.chunk(index, text, entries, choice.finish_reason))
                    if data := "".join(out):
                        yield data
                if params.include_usage and not state["failed"]:
                    yield f"data: {json.dumps({**fmt.base, 'choices': [], 'usage': usage()})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also runs when the client disconnects (Stop button): free the slots
                finish()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

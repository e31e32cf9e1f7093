"""An OpenAI-compatible chat server: FastAPI routes over continuous-batching workers.

    app = create_app([BatchScheduler(model, tokenizer)])
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET / (the chat page), POST /v1/chat/completions (OpenAI schema, stream true/false),
GET /v1/models, GET /health. Bad requests answer 400 with {"error": {"message", "type"}}, the shape
OpenAI clients parse. Requests go to the least loaded worker (one per GPU); within a worker, requests
share decode steps (see scheduler.py).
"""
from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as json_string  # json.dumps of a str
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.conversation import render_for_completion
from nanochat.engine import TextStream
from nanochat.web.scheduler import BatchScheduler, GenerationRequest

UI_PATH = Path(__file__).with_name("ui.html")


@dataclass
class Limits:
    max_messages: int = 500
    max_chars_per_message: int = 8000
    max_tokens: int = 2048        # cap on a request's max_tokens
    default_max_tokens: int = 512
    max_n: int = 8


class BadRequest(Exception):
    pass


def error_response(message: str, status: int = 400, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {value}")
    return int(value) if integer else float(value)


def _content_text(content: Any, index: int) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts")


def parse_chat_request(body: Any, limits: Limits) -> dict:
    """Validated generation settings from an OpenAI chat request body; raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"too many messages: {len(messages)} > {limits.max_messages}; start a new chat")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        text = _content_text(msg.get("content"), i)
        if len(text) > limits.max_chars_per_message:
            raise BadRequest(f"messages[{i}] is too long: {len(text)} characters > "
                             f"{limits.max_chars_per_message}; shorten it")
        clean.append({"role": msg.get("role"), "content": text})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "messages": clean,
        "stream": bool(body.get("stream", False)),
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", limits.default_max_tokens,
                              1, limits.max_tokens, integer=True),
        "temperature": _number(body, "temperature", 0.8, 0.0, 2.0),
        "top_p": _number(body, "top_p", None, 0.0, 1.0),
        "top_k": _number(body, "top_k", None, 1, 1 << 20, integer=True),
        "n": _number(body, "n", 1, 1, limits.max_n, integer=True),
        "seed": _number(body, "seed", None, 0, 2 ** 63 - 1, integer=True),
    }


class _Choice(TextStream):
    """One sample of the response: its text stream and, once it ends, why ("stop" or "length")."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.finish_reason: str | None = None


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


def create_app(workers: list[BatchScheduler], model_name: str = "nanochat", limits: Limits | None = None) -> FastAPI:
    """The FastAPI app over already started workers (each a model replica with its own thread)."""
    if not workers:
        raise ValueError("create_app needs at least one worker (a BatchScheduler)")
    limits = limits or Limits()
    tokenizer = workers[0].tokenizer
    app = FastAPI(title="nanochat")
    ui = UI_PATH.read_text(encoding="utf-8")
    created = int(time.time())
    mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(ui)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, "workers": len(workers),
                "load": [w.load() for w in workers]}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(f"the request body is not valid JSON ({exc})")
        try:
            params = parse_chat_request(body, limits)
            prompt = render_for_completion(tokenizer, {"messages": params["messages"]})
        except (BadRequest, ValueError) as exc:
            return error_response(str(exc))
        loop = asyncio.get_running_loop()
        mailbox = mailboxes.get(loop) or mailboxes.setdefault(loop, _Mailbox(loop))
        inbox = _Inbox()
        gen = GenerationRequest(
            prompt=prompt, emit=functools.partial(mailbox.post, inbox),
            num_samples=params["n"], max_tokens=params["max_tokens"], temperature=params["temperature"],
            top_k=params["top_k"], top_p=params["top_p"], seed=params["seed"])
        try:
            min(workers, key=lambda w: w.load()).submit(gen)
        except ValueError as exc:
            return error_response(str(exc))
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        choices = [_Choice(tokenizer) for _ in range(params["n"])]

        def usage() -> dict:
            completion = sum(len(c.tokens) + (c.finish_reason == "stop") for c in choices)
            return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion}

        if not params["stream"]:
            try:
                while any(c.finish_reason is None for c in choices):
                    for kind, index, value in await inbox.take():
                        if kind == "error":
                            return error_response(f"generation failed: {value}", 500, "server_error")
                        if kind == "token":
                            choices[index].add(value)
                        else:
                            choices[index].finish_reason = value
            finally:
                gen.cancelled.set()
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text()},
                                 "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                    "usage": usage()}

        def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(data)}\n\n"

        head = "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                      "model": model_name})[:-1] + ', "choices": [{"index": '

        def content_chunk(index: int, text: str) -> str:
            """chunk(index, {"content": text}), its fixed part encoded once: json.dumps of the whole
            chunk cost the event loop ~4 µs per streamed token."""
            return f'{head}{index}, "delta": {{"content": {json_string(text)}}}, "finish_reason": null}}]}}\n\n'

        def event_text(kind: str, index: int, value) -> str:
            """A token or "done" event as SSE text ("" while a character is incomplete)."""
            choice = choices[index]
            if kind == "token":
                delta = choice.add(value)
                return content_chunk(index, delta) if delta else ""
            choice.finish_reason, tail = value, choice.finish()
            return (chunk(index, {"content": tail}) if tail else "") + chunk(index, {}, value)

        async def stream():
            try:
                yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(choices)))
                failed = False
                while not failed and any(c.finish_reason is None for c in choices):
                    out = []
                    for kind, index, value in await inbox.take():
                        if kind == "error":
                            err = {"error": {"message": f"generation failed: {value}", "type": "server_error"}}
                            out.append(f"data: {json.dumps(err)}\n\n")
                            failed = True
                            break
                        out.append(event_text(kind, index, value))
                    if text := "".join(out):
                        yield text
                yield "data: [DONE]\n\n"
            finally:  # also runs when the client disconnects (Stop button): free the slots
                gen.cancelled.set()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app

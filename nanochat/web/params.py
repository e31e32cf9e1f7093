"""OpenAI request bodies -> validated generation settings, or an `ApiError` that names the field.

The server answers every field it accepts: a field it cannot honour is refused with 400 naming it
(a client that sent `tools` must learn that no tool will be called, not get a plain answer), and so is
a field it does not know, as OpenAI does. Labels that never change an answer (`user`, `metadata`, ...)
are accepted and have no effect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanochat.web.scheduler import MAX_TOP_LOGPROBS


@dataclass
class Limits:
    """What one request may ask for; also flags of scripts.chat_web, whose WebConfig derives from this."""
    max_messages: int = field(default=500, metadata={"help": "most messages a request may hold"})
    max_chars_per_message: int = field(default=8000, metadata={"help": "longest message a request may hold"})
    max_tokens: int = field(default=2048, metadata={"help": "most tokens a request may ask for"})
    default_max_tokens: int = field(default=512, metadata={"help": "tokens per reply when a request names none "
                                                                   "(at most max_tokens)"})
    max_n: int = field(default=8, metadata={"help": "most samples (n) a request may ask for"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "larger request bodies get 413, unread"})

    def __post_init__(self) -> None:
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


MAX_STOPS, MAX_STOP_CHARS = 4, 64   # stop strings per request (OpenAI's limit) and characters per string

IGNORED = {"user", "metadata", "safety_identifier", "prompt_cache_key"}  # labels: no effect on the answer
# fields whose default is the only value served: any other is refused, naming the field
DEFAULT_ONLY: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "modalities": (None, ["text"]), "store": (None, False), "service_tier": (None, "auto", "default"),
    "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
    "verbosity": (None,), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
          "logprobs"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"} | IGNORED | (
    DEFAULT_ONLY.keys() - {"echo", "suffix", "best_of"})
TEXT_FIELDS = COMMON | {"prompt"} | IGNORED | {"presence_penalty", "frequency_penalty", "logit_bias", "store",
                                               "service_tier", "echo", "suffix", "best_of"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    """A 400: the request itself is wrong."""


@dataclass
class Params:
    """One request's generation settings. `prompt` is the text of a /v1/completions request; `messages`
    the conversation of a chat request."""
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    seed: int | None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None   # None: off; k: each token's log-probability and the k most likely
    messages: list[dict] | None = None
    prompt: str | None = None


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and isinstance(value, float) and not value.is_integer()):
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}, got {str(value)[:40]}",
                         param=key)
    if not lo <= value <= hi:  # ints compare exactly however long (a float() of a 401-digit int overflows)
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {str(value)[:40]}", param=key)
    return int(value) if integer else float(value)


def _boolean(body: dict, key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'{param or key}' must be true or false (a JSON boolean), got {value!r:.40}",
                         param=param or key)
    return bool(value)


def _content_text(content: Any, index: int) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def _check_fields(body: dict, known: set[str], model_name: str) -> None:
    for key, value in body.items():
        if key not in known:
            raise BadRequest(f"unrecognized request argument '{key}'; leave it out", param=key,
                             code="unrecognized_argument")
        if key in DEFAULT_ONLY and not any(value == ok and isinstance(value, bool) == isinstance(ok, bool)
                                           for ok in DEFAULT_ONLY[key]):
            raise BadRequest(f"'{key}' is not supported by this server (got {str(value)[:60]}); leave it out",
                             param=key, code="unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r:.40}", param="model")
    if model is not None and model != model_name:
        raise ApiError(f"the model '{model[:100]}' does not exist; this server serves '{model_name}' "
                       "(GET /v1/models lists it)", status=404, param="model", code="model_not_found")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters, got {str(stop)[:60]}", param="stop")
    return stops


def _common(body: dict, limits: Limits, max_tokens: Any) -> dict:
    """The settings both endpoints share; `max_tokens` is the request's (whichever field set it)."""
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest("'stream_options' needs \"stream\": true", param="stream_options")
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object such as {\"include_usage\": true}",
                             param="stream_options")
        extra = sorted(options.keys() - {"include_usage"})
        if extra:
            raise BadRequest(f"unrecognized argument 'stream_options.{extra[0]}'; only include_usage is served",
                             param=f"stream_options.{extra[0]}")
    temperature = _number(body, "temperature", 0.8, 0.0, 2.0)
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p == 0.0:  # only the most likely token is left: greedy (the sampler reads 0 as "no top-p")
        temperature, top_p = 0.0, None
    return dict(
        stream=stream, include_usage=_boolean(options or {}, "include_usage", "stream_options.include_usage"),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", limits.default_max_tokens,
                           1, limits.max_tokens, integer=True),
        temperature=temperature, top_p=top_p,
        top_k=_number(body, "top_k", None, 1, 1 << 20, integer=True),
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        seed=_number(body, "seed", None, 0, 2 ** 63 - 1, integer=True),
        stop=_stop(body))


def parse_chat_request(body: Any, limits: Limits, model_name: str) -> Params:
    """Validated settings of a /v1/chat/completions body; raises ApiError."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_fields(body, CHAT_FIELDS, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"too many messages: {len(messages)} > {limits.max_messages}; start a new chat",
                         param="messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        text = _content_text(msg.get("content"), i)
        if len(text) > limits.max_chars_per_message:
            raise BadRequest(f"messages[{i}] is too long: {len(text)} characters > "
                             f"{limits.max_chars_per_message}; shorten it", param="messages")
        clean.append({"role": msg.get("role"), "content": text})
    new, old = body.get("max_completion_tokens"), body.get("max_tokens")
    if new is not None and old is not None and new != old:
        raise BadRequest(f"'max_completion_tokens' ({str(new)[:20]}) and 'max_tokens' ({str(old)[:20]}) differ; "
                         "send one of them", param="max_completion_tokens")
    logprobs = _boolean(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise BadRequest("'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
    return Params(**_common(body, limits, new if new is not None else old), messages=clean,
                  logprobs=(top or 0) if logprobs else None)


def parse_completion_request(body: Any, limits: Limits, model_name: str) -> Params:
    """Validated settings of a /v1/completions body (plain text in, plain text out); raises ApiError."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_fields(body, TEXT_FIELDS, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (one prompt per request; token-id prompts are not served)",
                         param="prompt")
    return Params(**_common(body, limits, body.get("max_tokens")), prompt=prompt,
                  logprobs=_number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True))

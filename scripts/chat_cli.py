"""Talk to a trained model in the terminal.

    python -m scripts.chat_cli                       # interactive: 'quit' exits, 'clear' starts over
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one answer; last line is JSON
    python -m scripts.chat_cli --model path/to/step_000800  # a checkpoint directory from anywhere

Ctrl-C during a reply stops that reply; at the prompt it exits. When the conversation no longer fits the
model's context, the oldest exchanges are dropped (said once). Log lines that the backends write while a
reply streams are shown after it, each distinct line once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from nanochat.checkpoint import ModelChoice
from nanochat.common import autodetect_device_type, compute_init
from nanochat.conversation import render_for_completion
from nanochat.flags import parse_flags
from nanochat.inference.engine import Engine, TextStream, cast_params


@dataclass
class ChatConfig(ModelChoice):
    """Chat with a trained model in the terminal."""
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int | None = field(default=50, metadata={"help": "sample among the k likeliest tokens; none = all"})
    max_tokens: int = field(default=512, metadata={"help": "longest reply, in tokens"})
    prompt: str = field(default="", metadata={"help": "answer this one message and exit (last line: JSON)"})
    seed: int = field(default=42, metadata={"help": "sampling seed"})


FLAG_ALIASES = {"-i": "source", "-t": "temperature", "-p": "prompt", "--tag": "model_tag"}


def parse_args(argv: list[str] | None = None) -> ChatConfig:
    """Flags as every script takes them, plus -i, -t, -p and the old --tag."""
    return parse_flags(ChatConfig, argv, description=__doc__, aliases=FLAG_ALIASES)


class HeldLogs:
    """Holds nanochat's log records and Python warnings while a reply streams, and prints them after it
    (each distinct message once per session): a backend's line such as the decode attention it picked
    would otherwise land in the middle of the reply's text."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    @contextlib.contextmanager
    def during_reply(self) -> Iterator[None]:
        logger = logging.getLogger("nanochat")
        holder = logging.handlers.BufferingHandler(capacity=1 << 30)
        handlers, logger.handlers = logger.handlers, [holder]
        try:
            with warnings.catch_warnings(record=True) as caught:
                yield
        finally:
            logger.handlers = handlers
            for record in holder.buffer:
                if record.getMessage() not in self.shown:
                    self.shown.add(record.getMessage())
                    logger.handle(record)
            for w in caught:
                if str(w.message) not in self.shown:
                    self.shown.add(str(w.message))
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def reply(engine: Engine, messages: list[dict], cfg: ChatConfig) -> tuple[str, int, float]:
    """Stream one assistant turn to stdout; returns (text, tokens, seconds). Ctrl-C stops the reply
    (the text so far is returned, marked on screen with [stopped])."""
    tokenizer = engine.tokenizer
    prompt = render_for_completion(tokenizer, {"messages": messages})
    stream = TextStream(tokenizer)
    start = time.perf_counter()
    try:
        for column, _ in engine.generate(prompt, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                         top_k=cfg.top_k, seed=cfg.seed):
            if column[0] in engine.tools.stop_ids:
                break
            print(stream.add(column[0]), end="", flush=True)
    except KeyboardInterrupt:
        print(stream.finish() + " [stopped]", flush=True)
    else:
        print(stream.finish(), flush=True)  # a character the reply left incomplete, as U+FFFD
    return stream.text(), len(stream.tokens), time.perf_counter() - start


def fit_context(engine: Engine, messages: list[dict], max_tokens: int) -> int:
    """Drop the oldest exchanges (user + assistant) from `messages`, in place, until the prompt leaves room
    for a reply of min(max_tokens, context / 2) tokens; returns how many messages were dropped. Raises
    ValueError when the last message alone is too long."""
    context = engine.config.sequence_len
    room = min(max_tokens, context // 2)
    dropped = 0
    while True:
        length = len(render_for_completion(engine.tokenizer, {"messages": messages}))
        if length + room <= context:
            return dropped
        if len(messages) < 3:
            raise ValueError(f"this message is {length} tokens with the chat format; the model's context is "
                             f"{context} tokens, {room} of them kept for the reply: write a shorter message")
        del messages[:2]
        dropped += 2


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    from nanochat.checkpoint import load_model

    device_type = autodetect_device_type() if cfg.device_type == "auto" else cfg.device_type
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_model(cfg.source, device=device, tag=cfg.model_tag, step=cfg.step,
                                        model_dir=cfg.model or None)
    if device.type == "cuda":
        cast_params(model)  # bf16 weights: decode reads half the bytes
    engine = Engine(model, tokenizer)
    name = cfg.model or cfg.source
    if cfg.prompt:
        messages = [{"role": "user", "content": cfg.prompt}]
        try:
            fit_context(engine, messages, cfg.max_tokens)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        text, n, secs = reply(engine, messages, cfg)
        print(json.dumps({"source": name, "step": meta.get("step"), "reply": text, "tokens": n,
                          "tokens_per_s": round(n / max(secs, 1e-9), 2)}))
        return
    print(f"nanochat ({name}, step {meta.get('step')}) -- 'quit' to exit, 'clear' for a new conversation, "
          "Ctrl-C stops a reply")
    held = HeldLogs()
    messages: list[dict] = []
    said_dropping = False
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line.lower() in ("quit", "exit"):
            break
        if line.lower() == "clear":
            messages = []
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            dropped = fit_context(engine, messages, cfg.max_tokens)
        except ValueError as exc:
            print(f"[{exc}]", file=sys.stderr)
            messages.pop()
            continue
        if dropped and not said_dropping:
            print(f"(the conversation outgrew the model's context of {engine.config.sequence_len} tokens: "
                  "from now on its oldest exchanges are dropped)")
            said_dropping = True
        print("Assistant: ", end="", flush=True)
        with held.during_reply():
            text, _, _ = reply(engine, messages, cfg)
        messages.append({"role": "assistant", "content": text if text.strip() else "..."})


if __name__ == "__main__":
    main()

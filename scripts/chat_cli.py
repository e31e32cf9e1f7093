"""Talk to a trained model in the terminal.

    python -m scripts.chat_cli                       # interactive: 'quit' exits, 'clear' starts over
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one answer; last line is JSON
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from nanochat.common import autodetect_device_type, compute_init
from nanochat.conversation import render_for_completion
from nanochat.engine import Engine, TextStream, cast_params
from nanochat.flags import parse_flags


@dataclass
class ChatConfig:
    source: str = "sft"              # checkpoint phase: sft | base | rl
    tag: str | None = None
    step: int | None = None
    device_type: str = "auto"
    temperature: float = 0.6
    top_k: int | None = 50
    max_tokens: int = 512
    prompt: str = ""                 # one-shot mode when set
    seed: int = 42


SHORT_FLAGS = {"-i": "source", "-t": "temperature", "-p": "prompt"}


def parse_args(argv: list[str] | None = None) -> ChatConfig:
    """Flags as every script takes them, plus the short forms -i, -t and -p."""
    return parse_flags(ChatConfig, argv, description=__doc__, short=SHORT_FLAGS)


def reply(engine: Engine, messages: list[dict], cfg: ChatConfig) -> tuple[str, int, float]:
    """Stream one assistant turn to stdout; returns (text, tokens, seconds)."""
    tokenizer = engine.tokenizer
    prompt = render_for_completion(tokenizer, {"messages": messages})
    stream = TextStream(tokenizer)
    start = time.perf_counter()
    for column, _ in engine.generate(prompt, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                     top_k=cfg.top_k, seed=cfg.seed):
        if column[0] in engine.tools.stop_ids:
            break
        print(stream.add(column[0]), end="", flush=True)
    print(stream.finish(), flush=True)  # a character the reply left incomplete, as U+FFFD
    return stream.text(), len(stream.tokens), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    from nanochat.checkpoint import load_model

    device_type = autodetect_device_type() if cfg.device_type == "auto" else cfg.device_type
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_model(cfg.source, device=device, tag=cfg.tag, step=cfg.step)
    if device.type == "cuda":
        cast_params(model)  # bf16 weights: decode reads half the bytes
    engine = Engine(model, tokenizer)
    if cfg.prompt:
        text, n, secs = reply(engine, [{"role": "user", "content": cfg.prompt}], cfg)
        print(json.dumps({"source": cfg.source, "step": meta.get("step"), "reply": text, "tokens": n,
                          "tokens_per_s": round(n / max(secs, 1e-9), 2)}))
        return
    print(f"nanochat ({cfg.source}, step {meta.get('step')}) -- 'quit' to exit, 'clear' for a new conversation")
    messages: list[dict] = []
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
        print("Assistant: ", end="", flush=True)
        try:
            text, _, _ = reply(engine, messages, cfg)
        except ValueError as exc:  # e.g. the conversation outgrew the context
            print(f"[{exc}]", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": text or "..."})


if __name__ == "__main__":
    main()

"""Chat conversations -> token ids (for training and for generation).

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}`:
  - an optional "system" message first, then "user" and "assistant" strictly alternating, user first;
  - user and system content is a non-empty string;
  - assistant content is a non-empty string, or a non-empty list of parts `{"type", "text"}` with type
    "text" (plain reply), "python" (a calculator call) or "python_output" (what the tool returned).

Rendered layout:

    <|bos|> <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> <|user_start|> ...

inside an assistant turn a "python" part becomes `<|python_start|> code <|python_end|>` and a
"python_output" part `<|output_start|> out <|output_end|>`.

The mask says which tokens the model is trained to produce: 1 on the assistant's own tokens (its text,
its tool calls and the closing <|assistant_end|>), 0 everywhere else, including <|assistant_start|>
(the prompt supplies it at inference) and tool outputs (the engine forces those, the model never
samples them).

The model has no system-prompt tokens, so a system message is merged into the first user message
(system text, a blank line, then the user text), as nanochat does.
"""
from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def _messages(conversation: Any) -> list[dict]:
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError('a conversation must be a dict {"messages": [...]}; got '
                         f"{type(conversation).__name__}")
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('conversation["messages"] must be a non-empty list of {"role", "content"} dicts')
    return messages


def _check_text(content: Any, index: int, role: str) -> str:
    if not isinstance(content, str):
        raise ValueError(f"message {index} ({role}): content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise ValueError(f"message {index} ({role}): content is empty; drop the message or give it text")
    return content


def _check_assistant(content: Any, index: int) -> list[dict]:
    """Assistant content as a list of parts (a plain string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": _check_text(content, index, "assistant")}]
    if not isinstance(content, list) or not content:
        raise ValueError(f"message {index} (assistant): content must be a non-empty string or a non-empty "
                         f'list of {{"type", "text"}} parts')
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise ValueError(f'message {index} (assistant): part {j} must be a dict with a string "text"')
        if part.get("type") not in PART_TYPES:
            raise ValueError(f"message {index} (assistant): part {j} has unknown type {part.get('type')!r}; "
                             f"use one of {PART_TYPES}")
    if not any(part["text"].strip() for part in content):
        raise ValueError(f"message {index} (assistant): every part is empty")
    return content


def validate_messages(conversation: dict) -> list[tuple[str, Any]]:
    """Checked (role, content) pairs with a leading system message merged into the first user message.

    Raises ValueError naming the offending message index and what is wrong with it.
    """
    messages = _messages(conversation)
    turns: list[tuple[str, Any]] = []
    system: str | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f'message {i}: must be a dict with "role" and "content"')
        role = msg["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; use one of {ROLES}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message is only allowed first")
            system = _check_text(msg["content"], i, role)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            where = "the first message (after an optional system message)" if not turns else "this turn"
            raise ValueError(f"message {i}: role {role!r} where {where} must be {expected!r}; "
                             f"roles must alternate user/assistant, starting with user")
        if role == "user":
            text = _check_text(msg["content"], i, role)
            if system is not None:
                text, system = system + "\n\n" + text, None
            turns.append((role, text))
        else:
            turns.append((role, _check_assistant(msg["content"], i)))
    if not turns:
        raise ValueError("the conversation holds only a system message; add a user message")
    return turns


def _render_turns(tokenizer, turns: list[tuple[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids and mask of already validated (role, content) turns, from <|bos|> on."""
    special = tokenizer.encode_special
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], m: int) -> None:
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    add([tokenizer.get_bos_token_id()], 0)
    for role, content in turns:
        if role == "user":
            add([special("<|user_start|>")] + tokenizer.encode(content) + [special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        for part in content:
            text = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([special("<|python_start|>")] + text + [special("<|python_end|>")], 1)
            else:  # python_output: produced by the tool, not the model
                add([special("<|output_start|>")] + text + [special("<|output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    return ids, mask


def render_conversation(tokenizer, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """Token ids and training mask (1 = assistant token to learn), truncated to `max_tokens`."""
    ids, mask = _render_turns(tokenizer, validate_messages(conversation))
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer, conversation: dict) -> list[int]:
    """Prompt ids for generating the next assistant turn: a trailing assistant message is dropped
    (it is the answer to predict) and the sequence ends with <|assistant_start|>."""
    turns = validate_messages(conversation)
    if turns[-1][0] == "assistant":
        turns = turns[:-1]  # validated alternation: what remains ends with a user turn
    ids, _ = _render_turns(tokenizer, turns)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]

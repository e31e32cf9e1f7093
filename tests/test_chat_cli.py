"""scripts.chat_cli on the tiny model: the streamed text is the reply, one-shot prints JSON last, and the
interactive loop handles clear, empty lines and quit."""
import json

import pytest

from nanochat.engine import Engine
from scripts.chat_cli import ChatConfig, main, reply
from tests.helpers_chat import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny_checkpoint(monkeypatch):
    """load_model answers with the tiny model (step 7) instead of reading a checkpoint."""
    model, tok = tiny_model(), tiny_tokenizer()
    monkeypatch.setattr("nanochat.checkpoint.load_model", lambda *a, **k: (model, tok, {"step": 7}))
    return model, tok


def test_reply_streams_exactly_what_it_returns(tiny_checkpoint, capsys):
    model, tok = tiny_checkpoint
    text, tokens, _ = reply(Engine(model, tok), [{"role": "user", "content": "Where is my lord?"}],
                            ChatConfig(temperature=0.0, max_tokens=24))
    assert tokens > 0 and text
    assert capsys.readouterr().out == text + "\n"


def test_one_shot_prints_json_last(tiny_checkpoint, capsys):
    main(["--device_type", "cpu", "-t", "0", "--max_tokens", "12", "-p", "How now?"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 7 and last["reply"] and 0 < last["tokens"] <= 12


def test_interactive_session(tiny_checkpoint, monkeypatch, capsys):
    lines = iter(["hello there", "clear", "", "How now?", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["--device_type", "cpu", "-t", "0", "--max_tokens", "8"])
    out = capsys.readouterr().out
    assert "step 7" in out and "(new conversation)" in out and out.count("Assistant: ") == 2

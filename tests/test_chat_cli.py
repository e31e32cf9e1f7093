"""scripts.chat_cli on the tiny model: the streamed text is the reply, one-shot prints JSON last, and the
interactive loop handles clear, empty lines and quit."""
import json

import pytest

from nanochat.conversation import render_for_completion
from nanochat.inference.engine import Engine
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


def recording_engine(monkeypatch, interrupt_first: bool = False, log_line: str | None = None):
    """Engine for scripts.chat_cli that records each prompt; its first reply can be interrupted by a
    KeyboardInterrupt (as Ctrl-C would), and it can log a line while each reply streams (as a backend's first
    decode step does)."""
    from nanochat.common import log0

    prompts = []

    class Recording(Engine):
        def generate(self, tokens, *args, **kwargs):
            prompts.append(list(tokens))
            if len(prompts) == 1 and interrupt_first:  # " la la la", then Ctrl-C
                for token in self.tokenizer.encode(" la la la"):
                    yield [token], [1]
                raise KeyboardInterrupt
            for i, item in enumerate(super().generate(tokens, *args, **kwargs)):
                if i == 0 and log_line:
                    log0(log_line)
                yield item

    monkeypatch.setattr("scripts.chat_cli.Engine", Recording)
    return prompts


def test_ctrl_c_stops_the_reply_not_the_program(tiny_checkpoint, monkeypatch, capsys):
    _, tok = tiny_checkpoint
    prompts = recording_engine(monkeypatch, interrupt_first=True)
    lines = iter(["hello there", "How now?", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["--device_type", "cpu", "-t", "0", "--max_tokens", "8"])
    out = capsys.readouterr().out
    assert out.count("[stopped]") == 1 and out.count("Assistant: ") == 2
    # the second prompt holds the text streamed before Ctrl-C as a finished assistant turn
    partial = out.split("Assistant: ")[1].split(" [stopped]")[0]
    assert partial == " la la la" and prompts[1] == render_for_completion(tok, {"messages": [
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": partial},
        {"role": "user", "content": "How now?"}]})


def test_log_lines_wait_until_the_reply_ends(tiny_checkpoint, monkeypatch):
    import io
    import sys

    recording_engine(monkeypatch, log_line="decode attention: picked for the test")
    screen = io.StringIO()  # stdout and stderr on one terminal
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    lines = iter(["hello there", "How now?", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["--device_type", "cpu", "-t", "0", "--max_tokens", "8"])
    text = screen.getvalue()
    shown = [line for line in text.splitlines() if "picked for the test" in line]
    assert shown == ["[nanochat] decode attention: picked for the test"]  # on its own line, once per session
    assert text.index("picked for the test") > text.index("Assistant: ")


def test_long_conversation_drops_the_oldest_turns(monkeypatch, capsys):
    from scripts.chat_cli import fit_context

    model, tok = tiny_model(sequence_len=64), tiny_tokenizer()
    monkeypatch.setattr("nanochat.checkpoint.load_model", lambda *a, **k: (model, tok, {"step": 1}))
    prompts = recording_engine(monkeypatch)
    said = ["Now is the winter of our discontent", "Made glorious summer by this sun of York",
            "And all the clouds that lour'd upon our house", "In the deep bosom of the ocean buried",
            "Now are our brows bound with victorious wreaths"]
    lines = iter(said + ["quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["--device_type", "cpu", "-t", "0", "--max_tokens", "8"])
    captured = capsys.readouterr()
    assert captured.out.count("Assistant: ") == len(said) and "[this message" not in captured.err
    assert captured.out.count("outgrew the model's context of 64 tokens") == 1
    assert all(len(p) + 8 <= 64 for p in prompts) and prompts[-1][-1] == tok.encode_special("<|assistant_start|>")

    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="write a shorter message"):
        fit_context(engine, [{"role": "user", "content": " ".join(said)}], 8)


def saved_tiny_model(root) -> tuple:
    """The tiny model saved as a checkpoint dir that carries its tokenizer (as the trainers save them)."""
    from dataclasses import asdict

    from nanochat.checkpoint import save_checkpoint

    model, tok = tiny_model(), tiny_tokenizer()
    tok.save(root / "tok")
    step_dir = save_checkpoint(root / "run", 12, model.state_dict(), None,
                               {"model_config": asdict(model.config), "train_config": {}}, tokenizer_dir=root / "tok")
    return model, tok, step_dir


def test_model_dir_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty_base"))
    model, tok, step_dir = saved_tiny_model(tmp_path)
    main(["--device_type", "cpu", "-t", "0", "--max_tokens", "6", "-p", "How now?", "--model", str(step_dir)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    seqs, _ = Engine(model, tok).generate_batch(
        render_for_completion(tok, {"messages": [{"role": "user", "content": "How now?"}]}), max_tokens=6,
        temperature=0.0)
    assert last["step"] == 12 and last["source"] == str(step_dir) and last["tokens"] >= 1
    assert last["reply"] == tok.decode([t for t in seqs[0][-last["tokens"]:]])


def test_chat_web_loads_a_model_dir(tmp_path, monkeypatch):
    """Only scripts.chat_web's flags and loading: the first worker's construction stops the run."""
    from scripts import chat_web

    class Loaded(Exception):
        pass

    def first_worker(model, tokenizer, **kwargs):
        raise Loaded(model, tokenizer)

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty_base"))
    _, tok, _ = saved_tiny_model(tmp_path)
    monkeypatch.setattr("nanochat.web.scheduler.BatchScheduler", first_worker)
    with pytest.raises(Loaded) as loaded:
        chat_web.main(["--device_type", "cpu", "--model", str(tmp_path / "run")])
    model, tokenizer = loaded.value.args
    assert model.config.n_layer == 2 and tokenizer.encode("hi") == tok.encode("hi")

"""Checkpoints: exact round trip, atomicity under exceptions and kill -9, no pickle code on load,
clear errors, keep_last, per-rank optimizer files, load_model, and (issue 27) another run's steps in the same
dir, damaged files refused by their checksum, and the tokenizer found after the base dir moved."""
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import nanochat.checkpoint as ckpt
from helpers_dist import spawn_gloo
from nanochat.checkpoint import latest_step, load_checkpoint, load_model, save_checkpoint
from nanochat.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]


def tiny_gpt():
    from nanochat.model.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, head_dim=16)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model, cfg


def trained_state(steps: int = 3):
    torch.manual_seed(0)
    model, cfg = tiny_gpt()
    opt = build_optimizer(model)
    for _ in range(steps):
        idx = torch.randint(0, cfg.vocab_size, (2, 8))
        model(idx, idx.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()
    return model, cfg, opt


def meta_for(cfg, step=0, **extra):
    return {"step": step, "model_config": asdict(cfg), "train_config": {"lr": 0.02},
            "loader_state": {"shard": 1, "row": 5}, "tokenizer_dir": "", **extra}


def assert_nested_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_round_trip(tmp_path):
    model, cfg, opt = trained_state()
    state = model.state_dict()
    state["extra_bf16"] = torch.randn(3, 4).bfloat16()
    state["shared_view"] = state["wte.weight"][:, :4]  # non-contiguous view sharing storage
    path = save_checkpoint(tmp_path, 7, state, opt.state_dict(), meta_for(cfg, 7))
    assert path == tmp_path / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optim_rank0.pt"]
    m, o, meta = load_checkpoint(tmp_path)
    assert set(m) == set(state)
    for k, v in state.items():
        assert m[k].dtype == v.dtype and torch.equal(m[k], v), k
    assert_nested_equal(opt.state_dict(), o)
    assert meta == meta_for(cfg, 7)
    _, o2, _ = load_checkpoint(tmp_path, step=7, load_optimizer=False)
    assert o2 is None


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    model, cfg, opt = trained_state()
    save_checkpoint(tmp_path, 3, model.state_dict(), opt.state_dict(), meta_for(cfg, 3))
    m, o, _ = load_checkpoint(tmp_path)
    model_b, _ = tiny_gpt()
    model_b.load_state_dict(m, strict=True)
    opt_b = build_optimizer(model_b)
    opt_b.load_state_dict(o)
    torch.manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (2, 8)) for _ in range(3)]
    for mdl, op in ((model, opt), (model_b, opt_b)):
        for idx in batches:
            mdl(idx, idx.roll(-1, 1)).backward()
            op.step()
            op.zero_grad()
    for (name, a), b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="meta.json"):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, None, {"bad": object()})
    assert latest_step(tmp_path) is None and not any(tmp_path.iterdir())


def test_optimizer_state_must_be_plain(tmp_path):
    with pytest.raises(TypeError, match="optimizer_state"):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"x": object()}, {})


def small(step):
    return {"w": torch.full((4, 4), float(step))}, {"v": torch.full((3,), float(step)), "n": step}


def test_latest_step_ignores_tmp_and_incomplete(tmp_path):
    assert latest_step(tmp_path / "missing") is None
    for s in (1, 5):
        save_checkpoint(tmp_path, s, *small(s), {})
    (tmp_path / ".tmp_step_000009_12345").mkdir()
    (tmp_path / ".tmp_step_000009_12345" / "meta.json").write_text("{}")
    (tmp_path / "step_000007").mkdir()  # no meta.json
    (tmp_path / "step_000007" / "model.safetensors").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    assert latest_step(tmp_path) == 5
    assert load_checkpoint(tmp_path)[2]["step"] == 5
    with pytest.raises(FileNotFoundError, match=r"available steps: \[1, 5\]"):
        load_checkpoint(tmp_path, step=7)


def test_missing_or_empty_dir_error(tmp_path):
    for d in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError) as e:
            load_checkpoint(d)
        assert str(d) in str(e.value) and "scripts.base_train" in str(e.value)


def test_exception_mid_save_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, *small(1), {"x": 1})

    def torn_write(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\x00" * 100)  # half-written file, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", torn_write)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 2, *small(2), {"x": 2})
    monkeypatch.undo()
    assert latest_step(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # the temporary dir was removed
    m, o, meta = load_checkpoint(tmp_path)
    assert m["w"][0, 0] == 1 and o["n"] == 1 and meta["x"] == 1


@pytest.mark.parametrize("short_by", [1, 0])
def test_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch, short_by):
    """A full disk mid-write fails with torch's opaque 'unexpected pos' (S25, d20): refuse up front instead, saying
    how much is needed and free and what to do. The tensors of small(2): 16 + 3 float32 = 76 bytes."""
    save_checkpoint(tmp_path, 1, *small(1), {"x": 1})
    real = shutil.disk_usage(tmp_path)
    free = 76 + ckpt.DISK_MARGIN - short_by
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: real._replace(free=free))
    if not short_by:  # exactly enough: saved
        save_checkpoint(tmp_path, 2, *small(2), {"x": 2})
        assert latest_step(tmp_path) == 2
        return
    with pytest.raises(OSError, match="No space") as e:
        save_checkpoint(tmp_path, 2, *small(2), {"x": 2})
    message = str(e.value)
    assert str(tmp_path) in message and "--keep_last" in message and "--save_every" in message
    assert "step 1, intact" in message
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]  # nothing half-written left behind


@pytest.mark.parametrize("keep_last, fits_beside, kept", [(2, 1, ["step_000002", "step_000003"]),
                                                         (1, 0, ["step_000002"]),
                                                         (None, 1, ["step_000001", "step_000002"])])
def test_short_of_space_a_save_first_deletes_what_keep_last_would(tmp_path, monkeypatch, keep_last, fits_beside, kept):
    """Steps 1 and 2 saved; step 3 fits beside at most `fits_beside` of them. keep_last=2 would delete step 1 after
    saving 3: it goes first and the save succeeds. keep_last=1 would delete both, but the newest complete step
    stays until a new one is whole: step 1 goes, still short, refused. Without keep_last nothing goes: refused."""
    for s in (1, 2):
        save_checkpoint(tmp_path, s, *small(s), {})
    real = shutil.disk_usage(tmp_path)
    steps_there = lambda: len(list(tmp_path.glob("step_*")))
    room = lambda path: real._replace(free=76 + ckpt.DISK_MARGIN - (steps_there() > fits_beside))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", room)
    if "step_000003" in kept:
        save_checkpoint(tmp_path, 3, *small(3), {}, keep_last=keep_last)
    else:
        with pytest.raises(OSError, match="No space .* step 2, intact"):
            save_checkpoint(tmp_path, 3, *small(3), {}, keep_last=keep_last)
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


@pytest.mark.parametrize("first, every, saves", [(0, -1, 1), (0, 0, 0), (0, 6, 2), (6, 6, 1), (4, 6, 2), (0, 5, 3),
                                                 (12, 6, 0)])
def test_planned_saves_counts_the_periodic_ones_and_the_last(first, every, saves):
    assert ckpt.planned_saves(first, 12, every) == saves


def with_free(monkeypatch, path, free):
    real = shutil.disk_usage(path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real._replace(free=free))


@pytest.mark.parametrize("short_by", [1, 0])
def test_run_whose_disk_cannot_hold_one_checkpoint_is_refused_at_its_start(tmp_path, monkeypatch, short_by):
    """Checked after a run's first step (its optimizer state exists), not at its first save hours on; the
    tensors of small(1): 76 bytes."""
    with_free(monkeypatch, tmp_path, 76 + ckpt.DISK_MARGIN - short_by)
    check = lambda: ckpt.check_room_for_checkpoints(tmp_path / "run", 1, *small(1), saves=1, keep_last=2)
    if not short_by:
        check()
        return
    with pytest.raises(OSError, match="No space for this run's checkpoints") as e:
        check()
    assert str(tmp_path / "run") in str(e.value) and "NANOCHAT_BASE_DIR" in str(e.value)
    ckpt.check_room_for_checkpoints(tmp_path / "run", 1, *small(1), saves=0, keep_last=2)  # saves nothing: no check


@pytest.mark.parametrize("saves, keep_last, held", [(3, 2, 2), (3, 1, 2), (3, 5, 3), (3, None, 3), (2, 5, 2)])
def test_run_whose_disk_cannot_hold_its_checkpoints_at_once_is_warned(tmp_path, monkeypatch, saves, keep_last, held):
    """At a save the newest checkpoint stays beside the one being written: two at once even with keep_last=1."""
    logged = []
    monkeypatch.setattr(ckpt, "log0", logged.append)
    for fits in (held - 1, held):
        logged.clear()
        with_free(monkeypatch, tmp_path, fits * 76 + ckpt.DISK_MARGIN)
        ckpt.check_room_for_checkpoints(tmp_path, 1, *small(1), saves=saves, keep_last=keep_last)
        assert bool(logged) == (fits < held), (fits, logged)
        if logged:
            assert f"holds up to {held} at once" in logged[0] and f"room for {fits} checkpoint" in logged[0]


@pytest.mark.parametrize("keep_last", [2, None])
def test_older_checkpoints_the_next_save_may_delete_count_as_room(tmp_path, monkeypatch, keep_last):
    """Resumed from step 2 with step 1 beside it: keep_last=2 lets the next save delete step 1 first (never the
    newest), so its files count; without keep_last nothing goes."""
    for s in (1, 2):
        save_checkpoint(tmp_path, s, *small(s), {})
    with_free(monkeypatch, tmp_path, 76 + ckpt.DISK_MARGIN - 1)
    check = lambda: ckpt.check_room_for_checkpoints(tmp_path, 3, *small(3), saves=1, keep_last=keep_last)
    if keep_last:
        check()
    else:
        with pytest.raises(OSError, match="No space for this run's checkpoints"):
            check()
    assert latest_step(tmp_path) == 2 and len(list(tmp_path.glob("step_*"))) == 2  # a check deletes nothing


def test_failed_rename_of_same_step_restores_it(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 3, *small(3), {"x": "old"})
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(Path(src).name)
        if Path(src).name.startswith(".tmp_step_"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path, 3, *small(4), {"x": "new"})
    monkeypatch.undo()
    assert any(c.startswith(".tmp_step_") for c in calls)
    assert latest_step(tmp_path) == 3 and load_checkpoint(tmp_path)[2]["x"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]


def test_resave_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, *small(3), {"x": "old"})
    save_checkpoint(tmp_path, 3, *small(4), {"x": "new"})
    m, _, meta = load_checkpoint(tmp_path)
    assert meta["x"] == "new" and m["w"][0, 0] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]


def test_keep_last(tmp_path):
    for s in range(1, 6):
        save_checkpoint(tmp_path, s * 10, *small(s), {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000040", "step_000050"]


KILL_CHILD = """
import sys, torch
from nanochat.checkpoint import save_checkpoint
out = sys.argv[1]
step = 0
while True:
    step += 1
    w = torch.full((50_000_000,), float(step))  # 200 MB
    print(f"saving {step}", flush=True)
    save_checkpoint(out, step, {"w": w}, {"v": torch.full((1000,), float(step))}, {"x": step}, keep_last=2)
"""


def _partly_written_tmp_file(out: Path) -> bool:
    try:
        return any(f.stat().st_size > 0 for d in out.glob(".tmp_step_*") for f in d.iterdir())
    except FileNotFoundError:  # renamed into place between the listing and the stat
        return False


def test_kill_9_mid_save_leaves_previous_loadable(tmp_path):
    out = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        for line in proc.stdout:  # "saving 2" = step 1 is complete and step 2 is being written
            if line.strip() == "saving 2" or time.time() > deadline:
                break
        while time.time() < deadline and not _partly_written_tmp_file(out):
            time.sleep(0.001)  # kill as soon as a save has bytes on disk: always mid-save, even on a busy machine
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stale = [p.name for p in out.iterdir() if p.name.startswith(".tmp_step_")]
    assert stale, "the kill should land in the middle of a save (saves run back to back)"
    last = latest_step(out)
    assert last is not None and last >= 1
    for step in ckpt._complete_steps(out):  # every visible step is whole, none torn
        m, o, meta = load_checkpoint(out, step=step)
        assert meta["x"] == step and m["w"].numel() == 50_000_000
        assert bool((m["w"] == step).all()) and bool((o["v"] == step).all())
    # the next save from a live process sweeps the dead process's temporary dir
    save_checkpoint(out, 999, *small(9), {})
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    # the payload is real: plain pickle would run it
    pickle.loads(pickle.dumps(Exploit(str(tmp_path / "proof")))).close()
    assert (tmp_path / "proof").exists()

    d = tmp_path / "ckpt"
    save_checkpoint(d, 1, *small(1), {})
    torch.save({"state": Exploit(str(marker))}, d / "step_000001" / "optim_rank0.pt")
    with pytest.raises(ValueError, match="optim_rank0.pt is corrupted"):  # the checksum notices first
        load_checkpoint(d)
    _rerecord_checksum(d / "step_000001" / "optim_rank0.pt")  # as someone who also edits meta.json would
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(d)
    assert not marker.exists()


def _rerecord_checksum(path: Path) -> None:
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["checksums"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))


def _save_worker(rank, world_size, out):
    model_state = {"w": torch.arange(6.0)} if rank == 0 else {}
    save_checkpoint(out, 4, model_state, {"rank": rank, "t": torch.full((2,), float(rank))}, {"ws": world_size},
                    rank=rank, world_size=world_size)


def test_two_ranks_save_their_optimizer_shards(tmp_path):
    spawn_gloo(_save_worker, 2, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "step_000004").iterdir()) == \
        ["meta.json", "model.safetensors", "optim_rank0.pt", "optim_rank1.pt"]
    for r in (0, 1):
        m, o, meta = load_checkpoint(tmp_path, rank=r)
        assert o["rank"] == r and torch.equal(o["t"], torch.full((2,), float(r)))
        assert torch.equal(m["w"], torch.arange(6.0)) and meta["ws"] == 2
    with pytest.raises(FileNotFoundError, match="world size"):
        load_checkpoint(tmp_path, rank=2)


def _room_worker(rank, world_size, out, free):
    real = shutil.disk_usage(out)
    ckpt.shutil.disk_usage = lambda path: real._replace(free=free)
    model_state = {"w": torch.arange(6.0)} if rank == 0 else {}
    try:
        ckpt.check_room_for_checkpoints(out, 1, model_state, {"t": torch.zeros(2)}, saves=1, keep_last=2,
                                        rank=rank, world_size=world_size)
        outcome = "ok"
    except OSError as e:
        outcome = str(e)
    (Path(out) / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("short_by", [1, 0])
def test_every_rank_is_refused_when_the_checkpoint_of_all_ranks_does_not_fit(tmp_path, short_by):
    """One checkpoint: rank 0's model (24 bytes) and both ranks' optimizer shards (8 each): 40 bytes, not rank 0's
    32. Rank 0 decides; the others raise too instead of waiting at their next collective."""
    spawn_gloo(_room_worker, 2, str(tmp_path), 40 + ckpt.DISK_MARGIN - short_by)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert ("No space for this run's checkpoints" in outcomes[0]) == bool(short_by), outcomes


def test_load_model(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    from nanochat.tokenizer import Tokenizer
    loaded_from = []

    class FakeTokenizer:
        def get_vocab_size(self):
            return 50  # tiny_gpt's vocab

    tok_stub = FakeTokenizer()
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, d: loaded_from.append(str(d)) or tok_stub))
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    model, cfg, _ = trained_state(2)
    old_dir = tmp_path / "checkpoints" / "base" / "d1"
    save_checkpoint(old_dir, 1, {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, None,
                    meta_for(cfg, 1, tokenizer_dir=str(tok_dir)))
    os.utime(old_dir, (1, 1))  # make "d1" the older tag
    new_dir = tmp_path / "checkpoints" / "base" / "d2"
    run_choices = replace(cfg, attn_backend="sdpa", recompute="block")  # a run's choices, not the weights'
    save_checkpoint(new_dir, 2, model.state_dict(), None, meta_for(run_choices, 2, tokenizer_dir=str(tok_dir)))

    loaded, tok, meta = load_model("base")
    assert tok is tok_stub and loaded_from == [str(tok_dir)] and meta["step"] == 2 and not loaded.training
    assert (loaded.config.attn_backend, loaded.config.recompute) == ("auto", "none")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.equal(model.eval()(idx), loaded(idx))  # rotary buffers were filled too
    assert load_model("base", tag="d1")[2]["step"] == 1
    with pytest.raises(FileNotFoundError, match="tags there"):
        load_model("base", tag="d9")
    with pytest.raises(FileNotFoundError, match="scripts.chat_sft"):
        load_model("sft")


def test_load_model_by_path_travels(tmp_path, monkeypatch):
    """A step dir saved with its tokenizer loads by path from anywhere, renamed, after the original tokenizer
    dir is gone; a run dir means its latest step (or --step); a path without a tokenizer is refused."""
    from nanochat.model.gpt import GPT, GPTConfig
    from tests.helpers_chat import byte_tokenizer

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))  # no default tokenizer to fall back to
    tokenizer = byte_tokenizer()
    tok_dir = tmp_path / "tok"
    tokenizer.save(tok_dir)
    cfg = GPTConfig(sequence_len=16, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1,
                    n_embd=32, head_dim=16)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    run_dir = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(run_dir, step, model.state_dict(), None, meta_for(cfg, step, tokenizer_dir=str(tok_dir)),
                        tokenizer_dir=tok_dir)
    assert load_model(model_dir=run_dir)[2]["step"] == 2
    assert load_model(model_dir=run_dir, step=1)[2]["step"] == 1
    with pytest.raises(FileNotFoundError, match=r"available steps: \[1, 2\]"):
        load_model(model_dir=run_dir, step=3)
    with pytest.raises(ValueError, match="pass its run directory"):
        load_model(model_dir=run_dir / "step_000002", step=1)

    moved = tmp_path / "usb" / "my_model"
    moved.parent.mkdir()
    (run_dir / "step_000002").rename(moved)
    import shutil
    shutil.rmtree(tok_dir)
    loaded, tok, meta = load_model(model_dir=moved)
    assert meta["step"] == 2 and tok.encode("hi") == tokenizer.encode("hi")
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.equal(model.eval()(idx), loaded(idx))

    shutil.rmtree(moved / "tokenizer")
    with pytest.raises(FileNotFoundError, match="Copy the model's tokenizer directory"):
        load_model(model_dir=moved)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_model(model_dir=tmp_path / "usb")


def test_load_model_refuses_another_vocab(tmp_path, monkeypatch):
    from tests.helpers_chat import byte_tokenizer

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    byte_tokenizer().save(tmp_path / "tok")  # 265 tokens; tiny_gpt has 50
    model, cfg = tiny_gpt()
    save_checkpoint(tmp_path / "run", 1, model.state_dict(), None, meta_for(cfg, 1), tokenizer_dir=tmp_path / "tok")
    with pytest.raises(ValueError, match="has 265 tokens but the model"):
        load_model(model_dir=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.tiktoken"):
        save_checkpoint(tmp_path / "run", 2, model.state_dict(), None, meta_for(cfg, 2), tokenizer_dir=tmp_path)
    assert latest_step(tmp_path / "run") == 1  # the failed save left nothing behind


# ---- another run's steps, damaged files, the tokenizer (issue 27) ----------------------------------------

def test_fresh_run_into_an_old_tag_is_refused_or_overwrites(tmp_path):
    """An earlier run left steps 100 and 200: a fresh run there would save 10, 20, ... and keep_last=2 used to
    delete them at once (keeping the old 100 and 200), so loading returned the old model."""
    for s in (100, 200):
        save_checkpoint(tmp_path, s, *small(1), {}, keep_last=2)
    with pytest.raises(FileExistsError, match=r"steps \[100, 200\].*--resume_from_step 200.*--model_tag.*--overwrite"):
        ckpt.claim_checkpoint_dir(tmp_path, resume_from_step=-1, overwrite=False)
    assert ckpt._complete_steps(tmp_path) == [100, 200]  # refusing deleted nothing
    ckpt.claim_checkpoint_dir(tmp_path, resume_from_step=200, overwrite=False)  # continuing it is fine
    ckpt.claim_checkpoint_dir(tmp_path, resume_from_step=-1, overwrite=True)
    assert ckpt._complete_steps(tmp_path) == []
    for s in (10, 20, 30):
        save_checkpoint(tmp_path, s, *small(s), {}, keep_last=2)
    m, _, meta = load_checkpoint(tmp_path)
    assert ckpt._complete_steps(tmp_path) == [20, 30] and meta["step"] == 30 and m["w"][0, 0] == 30


def test_resume_below_later_steps_is_refused_or_overwrites(tmp_path):
    for s in (6, 12):
        save_checkpoint(tmp_path, s, *small(s), {})
    with pytest.raises(FileExistsError, match=r"steps \[12\].*resumed from step 6"):
        ckpt.claim_checkpoint_dir(tmp_path, resume_from_step=6, overwrite=False)
    ckpt.claim_checkpoint_dir(tmp_path, resume_from_step=6, overwrite=True)
    assert ckpt._complete_steps(tmp_path) == [6]


def test_keep_last_never_deletes_the_step_it_just_saved(tmp_path):
    for s in (100, 200):
        save_checkpoint(tmp_path, s, *small(1), {})
    save_checkpoint(tmp_path, 10, *small(10), {}, keep_last=2)
    assert ckpt._complete_steps(tmp_path) == [10, 100, 200]  # others' steps are left alone, ours too
    m, _, _ = load_checkpoint(tmp_path, step=10)
    assert m["w"][0, 0] == 10


def _damage(path: Path, offset_from_end: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) - offset_from_end
    data[start:start + length] = b"\xff" * length  # 0xffff... floats are NaN
    path.write_bytes(bytes(data))


def test_corrupted_model_file_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    model, cfg = tiny_gpt()
    run_dir = tmp_path / "base" / "checkpoints" / "base" / "d2"
    save_checkpoint(run_dir, 1, model.state_dict(), {"v": torch.ones(3)}, meta_for(cfg, 1))
    weights = run_dir / "step_000001" / "model.safetensors"
    _damage(weights, offset_from_end=4096, length=4088)  # inside the data section: safetensors loads it as NaNs
    for load in (lambda: load_checkpoint(run_dir), lambda: load_model("base"), lambda: load_model(model_dir=run_dir)):
        with pytest.raises(ValueError, match=r"model.safetensors is corrupted.*Copy it again"):
            load()
    weights.write_bytes(b"\x00" * 8)  # truncated: named too
    with pytest.raises(ValueError, match=r"model.safetensors is corrupted"):
        load_checkpoint(run_dir)
    (run_dir / "step_000001" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta.json is unreadable.*Copy it again"):
        load_checkpoint(run_dir)


def test_corrupted_optimizer_file_is_refused_by_name(tmp_path):
    save_checkpoint(tmp_path, 1, *small(1), {})
    _damage(tmp_path / "step_000001" / "optim_rank0.pt", offset_from_end=600, length=8)
    with pytest.raises(ValueError, match=r"optim_rank0.pt is corrupted"):
        load_checkpoint(tmp_path)
    load_checkpoint(tmp_path, load_optimizer=False)  # the model alone is intact


def test_checkpoint_without_checksums_loads_with_one_warning(tmp_path, monkeypatch):
    """Checkpoints saved before checksums existed stay loadable."""
    logged = []
    monkeypatch.setattr(ckpt, "log0", logged.append)
    save_checkpoint(tmp_path, 1, *small(1), {"x": 1})
    meta_path = tmp_path / "step_000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert set(meta["checksums"]) == {"model.safetensors", "optim_rank0.pt"}
    del meta["checksums"]
    meta_path.write_text(json.dumps(meta))
    for _ in range(2):
        m, o, meta = load_checkpoint(tmp_path)
    assert meta == {"x": 1, "step": 1} and m["w"][0, 0] == 1
    assert [line for line in logged if "no checksums" in line] == \
        [f"warning: {tmp_path / 'step_000001'} has no checksums (saved before nanochat recorded them): "
         "loading it unverified"]


def _tiny_model_for(tokenizer):
    from nanochat.model.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=16, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=1,
                    n_embd=32, head_dim=16)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model, cfg


def test_base_dir_copied_elsewhere_keeps_its_tokenizer(tmp_path, monkeypatch):
    """meta.json names the tokenizer relative to the base dir: a copied base dir loads its own copy."""
    from tests.helpers_chat import byte_tokenizer
    tokenizer = byte_tokenizer()
    old = tmp_path / "old_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(old))
    tokenizer.save(old / "tokenizer_cpu")  # a run's own tokenizer dir, not the default one
    model, cfg = _tiny_model_for(tokenizer)
    save_checkpoint(old / "checkpoints" / "base" / "d1", 1, model.state_dict(), None,
                    meta_for(cfg, 1, tokenizer_dir=str(old / "tokenizer_cpu")))
    saved = json.loads((old / "checkpoints" / "base" / "d1" / "step_000001" / "meta.json").read_text())
    assert saved["tokenizer_dir"] == "tokenizer_cpu" and len(saved["tokenizer_sha256"]) == 64
    new = tmp_path / "new_base"
    shutil.copytree(old, new)
    shutil.rmtree(old)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(new))
    _, tok, meta = load_model("base")
    assert tok.directory == new / "tokenizer_cpu" and meta["tokenizer_dir"] == str(new / "tokenizer_cpu")


def test_missing_or_different_tokenizer_fails_clearly(tmp_path, monkeypatch):
    from nanochat.tokenizer import Tokenizer
    from tests.helpers_chat import byte_tokenizer
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    tokenizer = byte_tokenizer()
    tokenizer.save(base / "tok_a")
    model, cfg = _tiny_model_for(tokenizer)
    save_checkpoint(base / "checkpoints" / "base" / "d1", 1, model.state_dict(), None,
                    meta_for(cfg, 1, tokenizer_dir=str(base / "tok_a")))
    shutil.rmtree(base / "tok_a")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer for the model.*tok_a.*Copy the model's tokenizer"):
        load_model("base")
    # the default dir holds a tokenizer of the same size but another vocabulary ('a' and 'b' swapped):
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"a"], ranks[b"b"] = ranks[b"b"], ranks[b"a"]
    Tokenizer(ranks).save(base / "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer in .*tokenizer is not the one the model .* was trained with"):
        load_model("base")

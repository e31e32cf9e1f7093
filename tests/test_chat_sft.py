"""SFT: padding/masking collation, the resumable loader, and scripts.chat_sft end to end on a tiny model.

The tiny run: a random 2-layer GPT over a 512-token tokenizer, saved as a base checkpoint in a
temporary NANOCHAT_BASE_DIR, and a temporary data root shaped like ../shared/data (sft/ and
eval/gsm8k/) holding a few hundred short made-up conversations.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat.data.sft import SFTLoader, collate
from tests.helpers_chat import tiny_model, tiny_tokenizer

TAG = "tiny"
WORDS = ["apple", "river", "stone", "cloud", "light", "green", "table", "house", "music", "bread", "horse", "glass"]


def write_tiny_data(root: Path, seed: int = 0) -> Path:
    """A data root with the layout the SFT/RL tasks read: sft/gpteacher/*.json,
    sft/fastchat_dummy_conversation.json, eval/gsm8k/{train,test}.jsonl."""
    rng = random.Random(seed)
    (root / "sft" / "gpteacher").mkdir(parents=True)
    (root / "eval" / "gsm8k").mkdir(parents=True)
    rows = []
    for _ in range(100):  # every 50th row is held out for validation
        w = rng.sample(WORDS, 2)
        rows.append({"instruction": f"Repeat the words {w[0]} and {w[1]}.", "input": "",
                     "response": f"{w[0]} {w[1]} {w[0]} {w[1]}"})
    (root / "sft" / "gpteacher" / "tiny.json").write_text(json.dumps(rows))
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
             for i, w in enumerate(WORDS)]
    (root / "sft" / "fastchat_dummy_conversation.json").write_text(json.dumps(convs))
    for split, n in (("train", 8), ("test", 4)):
        with open(root / "eval" / "gsm8k" / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                a, b = rng.randint(2, 30), rng.randint(2, 30)
                f.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
                                    "answer": f"He has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}) + "\n")
    return root


def write_tiny_base(base_dir: Path) -> None:
    """Tokenizer + a random tiny GPT saved as checkpoints/base/tiny/step_000000, as base_train saves it."""
    from nanochat.checkpoint import save_checkpoint

    tokenizer = tiny_tokenizer()
    tokenizer.save(base_dir / "tokenizer")
    model = tiny_model(sequence_len=256)
    meta = {"step": 0, "model_config": asdict(model.config), "train_config": {"model_tag": TAG},
            "loader_state": {}, "tokenizer_dir": str(base_dir / "tokenizer")}
    save_checkpoint(base_dir / "checkpoints" / "base" / TAG, 0, model.state_dict(), None, meta)


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_chat_template")
    write_tiny_data(root / "data")
    write_tiny_base(root / "base")
    return root


@pytest.fixture
def tiny_run(tiny_template, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(base_dir, data_root): a private copy of the tiny base run, set as NANOCHAT_BASE_DIR."""
    base = tmp_path / "base"
    shutil.copytree(tiny_template / "base", base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_REPORT_DIR", raising=False)
    return base, tiny_template / "data"


# ---------------------------------------------------------------- collation


def reference_collate(rows, pad_id):
    """Plain-Python statement of the rule, position by position."""
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = [[pad_id] * T for _ in rows]
    targets = [[-1] * T for _ in rows]
    for b, (ids, mask) in enumerate(rows):
        for t in range(len(ids) - 1):
            inputs[b][t] = ids[t]
            targets[b][t] = ids[t + 1] if mask[t + 1] == 1 else -1
    return torch.tensor(inputs), torch.tensor(targets)


def test_collate_matches_reference_on_random_rows():
    gen = random.Random(1)
    for _ in range(20):
        rows = []
        for _ in range(gen.randint(1, 5)):
            n = gen.randint(2, 30)
            rows.append(([gen.randrange(100) for _ in range(n)], [gen.randint(0, 1) for _ in range(n)]))
        x, y = collate(rows, pad_id=7)
        rx, ry = reference_collate(rows, 7)
        assert x.dtype == y.dtype == torch.long
        assert torch.equal(x, rx) and torch.equal(y, ry)
        for b, (ids, mask) in enumerate(rows):  # the invariants, stated directly
            n = len(ids) - 1
            assert torch.equal(x[b, :n], torch.tensor(ids[:-1]))                 # inputs are ids
            valid = torch.tensor(mask[1:]) == 1
            assert torch.equal(y[b, :n][valid], torch.tensor(ids[1:])[valid])    # targets shifted by one
            assert (y[b, :n][~valid] == -1).all() and (y[b, n:] == -1).all()    # -1 on mask 0 and padding
            assert (x[b, n:] == 7).all()


def test_collate_rejects_bad_rows():
    with pytest.raises(ValueError, match="align"):
        collate([([1, 2, 3], [0, 1])], pad_id=0)
    with pytest.raises(ValueError, match="at least 2"):
        collate([([1], [1])], pad_id=0)


def test_rendered_conversation_trains_only_assistant_tokens():
    from nanochat.conversation import render_conversation

    tok = tiny_tokenizer()
    conv = {"messages": [{"role": "user", "content": "Say apple."}, {"role": "assistant", "content": "apple"}]}
    ids, mask = render_conversation(tok, conv)
    x, y = collate([(ids, mask)], pad_id=tok.get_bos_token_id())
    trained = [int(t) for t in y[0] if t >= 0]
    assert tok.decode(trained) == "apple<|assistant_end|>"


# ---------------------------------------------------------------- loader


class ListTask:
    def __init__(self, n):
        self.convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                      for i in range(n)]

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        return self.convs[i]


def test_loader_epochs_ranks_and_resume():
    tok, task = tiny_tokenizer(), ListTask(23)
    one = SFTLoader(tok, task, batch_size=4, max_seq_len=64)
    first_epoch = [i for _ in range(one.batches_per_epoch) for i in one.next_indices()]
    assert one.batches_per_epoch == 5 and len(set(first_epoch)) == 20  # no repeats; the 3 left over skipped
    assert first_epoch != sorted(first_epoch)                           # shuffled
    second = one.next_indices()
    assert one.epoch == 1 and second != first_epoch[:4]                 # a new epoch, a new shuffle

    # two ranks of batch 2 split exactly what one rank of batch 4 takes
    r0 = SFTLoader(tok, task, batch_size=2, max_seq_len=64, rank=0, world_size=2)
    r1 = SFTLoader(tok, task, batch_size=2, max_seq_len=64, rank=1, world_size=2)
    both = [i for _ in range(5) for i in r0.next_indices() + r1.next_indices()]
    assert both == first_epoch

    # resuming from a state gives the same batches as continuing
    a = SFTLoader(tok, task, batch_size=3, max_seq_len=64, seed=5)
    for _ in range(9):
        next(a)
    b = SFTLoader(tok, task, batch_size=3, max_seq_len=64, seed=5, state=json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SFTLoader(tok, ListTask(3), batch_size=4, max_seq_len=64)


# ---------------------------------------------------------------- the script

SFT_FLAGS = ["--model_tag", TAG, "--device_type", "cpu", "--device_batch_size", "4", "--total_batch_size", "8",
             "--eval_every", "0", "--eval_examples", "8"]


def test_chat_sft_lowers_loss_and_saves_loadable_checkpoint(tiny_run):
    from nanochat.checkpoint import load_model
    from scripts import chat_sft

    base, data = tiny_run
    result = chat_sft.main(SFT_FLAGS + ["--data_root", str(data), "--num_iterations", "10", "--init_lr_frac", "0.5"])
    losses = result["losses"]
    assert result["steps"] == 10 and len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert result["val_loss"] < losses[0]
    step_dir = base / "checkpoints" / "sft" / TAG / "step_000010"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert {"step", "model_config", "train_config", "loader_state", "tokenizer_dir"} <= set(meta)
    assert meta["step"] == 10 and meta["loader_state"]["cursor"] > 0
    model, tok, _ = load_model("sft", "cpu", TAG)
    assert model.config.vocab_size == tok.get_vocab_size()
    report = json.loads((base / "report" / "chat_sft.json").read_text())
    assert report["data"]["steps"] == 10


def tensorboard_scalars(directory: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def moved_model(base: Path, phase: str = "base", step: int = 0) -> Path:
    """The tiny run's checkpoint, moved out of the base dir with its tokenizer; the base dir's tokenizer is
    deleted, so only the moved copy can serve."""
    moved = base.parent / "elsewhere" / f"{phase}_model"
    shutil.copytree(base / "checkpoints" / phase / TAG / f"step_{step:06d}", moved)
    shutil.copytree(base / "tokenizer", moved / "tokenizer")
    shutil.rmtree(base / "tokenizer")
    return moved


def test_chat_sft_from_a_model_dir_logs_to_tensorboard(tiny_run):
    from nanochat.checkpoint import load_model
    from scripts import chat_sft

    base, data = tiny_run
    moved = moved_model(base)
    tb = base.parent / "tb"
    result = chat_sft.main(SFT_FLAGS + ["--model", str(moved), "--data_root", str(data), "--num_iterations", "2",
                                        "--tensorboard", str(tb)])
    step_dir = base / "checkpoints" / "sft" / TAG / "step_000002"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert result["steps"] == 2 and meta["source"] == {"path": str(moved), "step": 0}
    assert load_model(model_dir=step_dir)[2]["step"] == 2  # the SFT checkpoint carries the tokenizer on
    scalars = tensorboard_scalars(tb)
    assert len(scalars["sft/loss"]) == 2 and scalars["sft/loss"] == pytest.approx(result["losses"])
    assert len(scalars["sft/val_loss"]) == 1
    assert json.loads((base / "report" / "chat_sft.json").read_text())["data"]["precision"] == "fp32"


def test_chat_sft_resume_continues_exactly(tiny_run):
    from scripts import chat_sft

    _, data = tiny_run
    flags = SFT_FLAGS + ["--data_root", str(data), "--num_iterations", "6", "--init_lr_frac", "0.3"]
    full = chat_sft.main(flags + ["--save_every", "3"])
    with pytest.raises(FileExistsError, match="--overwrite"):  # a fresh run next to those steps (issue 27)
        chat_sft.main(flags)
    resumed = chat_sft.main(flags + ["--resume_from_step", "3", "--overwrite"])  # redo step 6
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 3
    for a, b in zip(full["losses"][3:], resumed["losses"]):
        assert abs(a - b) <= 1e-5, (full["losses"], resumed["losses"])


def test_chat_sft_on_a_disk_too_small_for_its_checkpoint_stops_after_its_first_step(tiny_run, monkeypatch):
    import nanochat.checkpoint as ckpt
    from scripts import chat_sft

    base, data = tiny_run
    real = ckpt.shutil.disk_usage(base)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: real._replace(free=ckpt.DISK_MARGIN))
    with pytest.raises(OSError, match=f"No space for this run's checkpoints: .* in {base}/checkpoints/sft/{TAG}"):
        chat_sft.main(SFT_FLAGS + ["--data_root", str(data), "--num_iterations", "6"])


def test_chat_sft_clear_errors(tiny_run):
    from scripts import chat_sft

    _, data = tiny_run
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        chat_sft.main(["--model_tag", TAG, "--device_type", "cpu", "--device_batch_size", "3",
                       "--total_batch_size", "8", "--data_root", str(data)])
    with pytest.raises(FileNotFoundError, match="no checkpoint with tag"):
        chat_sft.main(["--model_tag", "nope", "--device_type", "cpu", "--data_root", str(data)])


# ---------------------------------------------------------------- the shared fine-tuning start


def test_output_tag_prefers_flag_then_source_then_depth():
    from nanochat.finetune import output_tag

    assert output_tag("mine", {"model_tag": "src", "train_config": {"model_tag": "tc"}}, 4) == "mine"
    assert output_tag("", {"model_tag": "src", "train_config": {"model_tag": "tc"}}, 4) == "src"
    assert output_tag("", {"train_config": {"model_tag": "tc"}}, 4) == "tc"
    assert output_tag("", {"train_config": {}}, 4) == "d4" and output_tag("", {}, 12) == "d12"


def test_sft_and_rl_share_their_flags_and_keep_nanochats_rates():
    """Both stages declare their common flags once (FineTuneFlags), at nanochat's rates rather than the
    pretraining recipe's; RL starts from SFT with a larger fraction of them."""
    from nanochat.build import BuildConfig
    from nanochat.finetune import FineTuneFlags
    from scripts.chat_rl import RLConfig
    from scripts.chat_sft import SFTConfig

    rates = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay")
    sft, rl = SFTConfig(), RLConfig()
    assert isinstance(sft, FineTuneFlags) and isinstance(rl, FineTuneFlags)
    assert [getattr(sft, r) for r in rates] == [getattr(rl, r) for r in rates] == [0.02, 0.2, 0.004, 0.5, 0.0]
    assert [getattr(BuildConfig(), r) for r in rates] == [0.02, 0.3, 0.008, 0.5, 0.28]  # the recipe's
    assert (sft.source, sft.init_lr_frac, rl.source, rl.init_lr_frac) == ("base", 0.02, "sft", 0.05)


def test_start_finetune_scales_lrs_keeps_tag_and_resumes(tiny_run):
    from nanochat.finetune import start_finetune
    from scripts.chat_sft import SFTConfig

    base, _ = tiny_run
    cfg = SFTConfig(model_tag="", device_type="cpu", init_lr_frac=0.25, matrix_lr=0.04)
    run = start_finetune(cfg, "sft", torch.device("cpu"))
    assert run.tag == TAG and run.model.training and run.step == 0 and run.loader_state is None
    assert run.checkpoint_dir == base / "checkpoints" / "sft" / TAG
    assert run.tokenizer_dir == run.source_meta["tokenizer_dir"]  # the source's tokenizer, wherever it is
    lrs = {g["kind"]: g["initial_lr"] for g in run.optimizer.param_groups}
    assert lrs["matrix"] == pytest.approx(0.04 * 0.25)

    with torch.no_grad():
        next(run.model.parameters()).add_(1.0)
    run.save(7, loader_state={"epoch": 0, "cursor": 8}, val_loss=1.5)
    meta = json.loads((run.checkpoint_dir / "step_000007" / "meta.json").read_text())
    assert meta["model_tag"] == TAG and meta["source"] == {"phase": "base", "step": 0} and meta["val_loss"] == 1.5
    assert meta["train_config"]["init_lr_frac"] == 0.25

    resumed = start_finetune(SFTConfig(model_tag=TAG, device_type="cpu", resume_from_step=7), "sft",
                             torch.device("cpu"))
    assert resumed.step == 7 and resumed.loader_state == {"epoch": 0, "cursor": 8}
    for a, b in zip(run.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)

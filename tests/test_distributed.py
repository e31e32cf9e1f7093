"""Two gloo processes under torchrun train exactly like one process with the same global batch; a resume at
the same world size continues exactly; --shard_optimizer changes nothing but where the optimizer state lives.

Same global batch, same samples: PackedLoader gives rank r of W the row groups g with g % W == r and packs
them on its own, so one plain process reads a different (equally valid) sample order. The one-process
reference therefore reads with `RankInterleavedLoader`: its grad_accum = 2 micro-batches of each step are
rank 0's and rank 1's batches of that step. Then the two computations agree to float rounding: one process
accumulates grad(loss/2) over the two micro-batches, two ranks all-reduce (SUM, then / 2) grad(loss); halving
is exact in binary floating point, so the gradients, the updates and the logged losses match.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_base_train import isolate, make_assets, read_log_rows, tiny_flags

from nanochat.checkpoint import latest_step
from nanochat.data.packing import PackedLoader
from scripts import base_train

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS, SAVE_AT = 20, 10
# device_batch_size 4 x 64 tokens x 2 ranks: one micro-batch per rank, two in the one-process reference
FLAGS = dict(total_batch_size=512, num_iterations=STEPS, save_every=SAVE_AT, eval_every=SAVE_AT, sample_every=SAVE_AT)
TOL = 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("dist_assets"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_runs")


def torchrun(work: Path, name: str, argv: list[str]) -> dict:
    """`torchrun --standalone --nproc_per_node=2 -m scripts.base_train argv` on gloo, one thread per process.
    Returns rank 0's per-step log rows, its val rows, and each rank's stdout."""
    logs, report = work / "logs" / name, work / "report" / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(work / "base"),
           "NANOCHAT_REPORT_DIR": str(report),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "--log-dir", str(logs), "--redirects", "1", "-m", "scripts.base_train", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    stdout = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\n{stdout}"
    rows = read_log_rows(report)
    return {"steps": [r for r in rows if "loss" in r], "val": [r for r in rows if "val_bpb" in r], "stdout": stdout}


@pytest.fixture(scope="module")
def runs(assets, work):
    """The 2-process runs, each made once and only when a test asks for it."""
    tok_dir, data_dir = assets
    made: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in made:
            shard = name.startswith("sharded")
            argv = tiny_flags(tok_dir, data_dir, model_tag="sharded" if shard else "replicated",
                              shard_optimizer=str(shard).lower(), **FLAGS)
            if name.endswith("resumed"):
                get(name.split("_")[0])  # the uninterrupted run saved the step to resume from
                argv += [f"--resume_from_step={SAVE_AT}", "--overwrite=true"]  # redo the steps past it
            made[name] = torchrun(work, name, argv)
        return made[name]

    return get


class RankInterleavedLoader:
    """One process standing in for WORLD ranks: yields rank 0's next batch, then rank 1's, and so on, so a
    step's WORLD micro-batches are exactly the batches the ranks of a WORLD-process run get at that step."""

    def __init__(self, tokenizer, data_dir, split, batch_size, seq_len, device, rank=0, world_size=1, state=None,
                 split_long_docs=True):
        assert (rank, world_size, state) == (0, 1, None), "the reference runs as one fresh process"
        self.loaders = [PackedLoader(tokenizer, data_dir, split, batch_size, seq_len, device, rank=r,
                                     world_size=WORLD, split_long_docs=split_long_docs) for r in range(WORLD)]
        self.calls = 0
        self.cropped_fraction = 0.0

    @property
    def data_epoch(self):
        return max(loader.data_epoch for loader in self.loaders)

    def __iter__(self):
        return self

    def __next__(self):
        loader = self.loaders[self.calls % WORLD]
        self.calls += 1
        return next(loader)

    def close(self):
        for loader in self.loaders:
            loader.close()


def one_process(work, name: str, argv: list[str]) -> list[dict]:
    """base_train in this process (one thread), fed the ranks' batches of each step; its log rows."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, work / f"base_{name}")
        mp.setenv("NANOCHAT_REPORT_DIR", str(work / "report" / name))
        mp.setattr(base_train, "PackedLoader", RankInterleavedLoader)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            base_train.main(argv)
        finally:
            torch.set_num_threads(threads)
    return read_log_rows(work / "report" / name)


@pytest.fixture(scope="module")
def reference(assets, work):
    """One process, grad_accum = 2, fed the ranks' batches; per-step and val log rows. It does not sample,
    the 2-process runs do: equal losses also show that sampling on rank 0 leaves training alone."""
    tok_dir, data_dir = assets
    rows = one_process(work, "reference",
                       tiny_flags(tok_dir, data_dir, **{**FLAGS, "save_every": 0, "sample_every": 0}))
    return {"steps": [r for r in rows if "loss" in r], "val": [r for r in rows if "val_bpb" in r]}


def assert_same_steps(a: list[dict], b: list[dict], what: str) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b], what
    worst = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    assert worst <= TOL, f"{what}: losses differ by up to {worst:.3g} (> {TOL})"
    assert [r["lrm"] for r in a] == [r["lrm"] for r in b], what


def test_two_processes_match_one_process_with_the_same_global_batch(runs, reference):
    two = runs("replicated")
    assert [r["step"] for r in two["steps"]] == list(range(1, STEPS + 1))
    assert_same_steps(two["steps"], reference["steps"], "2 ranks vs 1 process")
    assert two["steps"][-1]["loss"] < two["steps"][0]["loss"] - 0.5  # it trained
    # evaluation: each rank scores its half of the val batches, the sums are all-reduced
    assert [r["step"] for r in two["val"]] == [0, SAVE_AT, STEPS]
    for a, b in zip(two["val"], reference["val"]):
        assert a["val_bpb"] == pytest.approx(b["val_bpb"], rel=1e-6)


def test_rank_zero_alone_logs_and_writes_the_model(runs, work):
    two = runs("replicated")
    assert "step 00020/20 | loss" in two["stdout"][0] and '"world_size": 2' in two["stdout"][0]
    assert two["stdout"][0].count("sample: ") == 2 * 3  # at steps 10 and 20, 3 prompts (rank 0 only)
    assert "step " not in two["stdout"][1] and "sample" not in two["stdout"][1] and "{" not in two["stdout"][1]
    step_dir = work / "base" / "checkpoints" / "base" / "replicated" / f"step_{SAVE_AT:06d}"
    # replicated optimizer: every rank holds the same state, so only rank 0's copy is written
    assert sorted(p.name for p in step_dir.iterdir()) == ["meta.json", "model.safetensors", "optim_rank0.pt", "tokenizer"]


def test_sharded_optimizer_matches_replicated_and_saves_every_shard(runs, work):
    assert_same_steps(runs("sharded")["steps"], runs("replicated")["steps"], "--shard_optimizer vs replicated")
    ckpt_dir = work / "base" / "checkpoints" / "base" / "sharded"
    assert latest_step(ckpt_dir) == STEPS
    shards = [torch.load(ckpt_dir / f"step_{SAVE_AT:06d}" / f"optim_rank{r}.pt", weights_only=True)
              for r in range(WORLD)]
    assert all(s["sharded"] and s["world_size"] == WORLD for s in shards)
    counts = [len(s["muon"]["state"]) + len(s["adamw"]["state"]) for s in shards]
    assert all(c > 0 for c in counts)  # each rank owns (and saved) a share of the parameters


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_resume_at_the_same_world_size_continues_exactly(runs, mode):
    full, resumed = runs(mode), runs(f"{mode}_resumed")
    assert_same_steps(resumed["steps"], full["steps"][SAVE_AT:], f"{mode}: resumed at {SAVE_AT} vs uninterrupted")
    assert resumed["val"][-1]["val_bpb"] == pytest.approx(full["val"][-1]["val_bpb"], rel=1e-6)


def test_batch_schedule_two_processes_match_one_process(assets, work):
    """--batch_schedule 512@0.5 (1024 tokens after): each rank takes 1 micro-batch a step, then 2, and the run
    matches one process that takes the ranks' batches of each step (2, then 4 micro-batches)."""
    tok_dir, data_dir = assets
    flags = dict(total_batch_size=1024, batch_schedule="512@0.5", num_iterations=6, save_every=0, sample_every=0)
    two = torchrun(work, "scheduled", tiny_flags(tok_dir, data_dir, model_tag="scheduled", **flags))
    one = [r for r in one_process(work, "scheduled_reference", tiny_flags(tok_dir, data_dir, **flags)) if "loss" in r]
    assert [r["batch"] for r in two["steps"]] == [512] * 3 + [1024] * 3
    assert_same_steps(two["steps"], one, "--batch_schedule: 2 ranks vs 1 process")
    assert '"tokens": 4608' in two["stdout"][0]


def test_resume_at_another_world_size_is_refused_clearly(runs, assets, work):
    tok_dir, data_dir = assets
    runs("replicated"), runs("sharded")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, work / "base")
        mp.setenv("NANOCHAT_REPORT_DIR", str(work / "report" / "refused"))
        # from the latest step: an earlier one would be refused first, for the later steps next to it
        argv = tiny_flags(tok_dir, data_dir, **{**FLAGS, "sample_every": 0}, resume_from_step=STEPS)
        with pytest.raises(ValueError, match="sharded optimizer state.*same --shard_optimizer"):
            base_train.main(argv + ["--model_tag=sharded"])
        with pytest.raises(ValueError, match="holds 2 ranks but this run has world_size=1"):
            base_train.main(argv + ["--model_tag=replicated"])

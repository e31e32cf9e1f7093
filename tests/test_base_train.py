"""scripts.base_train on the CPU: the documented command parses, a short run learns and prints its JSON
line, a resume continues exactly (also past a torn save), a batch schedule takes each step's micro-batches (also
on resume), bad input fails with a clear error.

Runs call `main(argv)` in-process on a tiny model (2 layers, width 64) over a tiny real-text data dir;
per-step losses come from <report>/train_log.jsonl, which base_train appends on rank 0.
"""
import dataclasses
import math
import json
import statistics
import subprocess
import sys
import types

import pytest
import torch
from helpers_base_train import isolate, make_assets, read_train_log, tiny_flags
from safetensors.torch import load_file

import nanochat.checkpoint as ckpt
from nanochat import build as build_mod
from nanochat.checkpoint import latest_step, load_checkpoint
from nanochat.flags import parse_flags
from scripts import base_train
from scripts.base_train import TrainConfig, resolve_defaults

RESULT_KEYS = {"val_bpb", "median_tok_per_s", "mfu", "peak_memory_gib", "compile_seconds", "total_seconds"}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("base_train_assets"))


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh base dir per test and one torch thread (fast and deterministic on a shared 2-core machine)."""
    isolate(monkeypatch, tmp_path / "base")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def run(monkeypatch, report_dir, argv):
    """main(argv) with its own report dir: (result dict, per-step log rows)."""
    monkeypatch.setenv("NANOCHAT_REPORT_DIR", str(report_dir))
    result = base_train.main(argv)
    return result, read_train_log(report_dir)


# ------------------------------------------------------------------------------------------------- flags

def test_depth_sets_batch_horizon_and_scales():
    """d12 is the reference (2^19 tokens, factors 1); d20's horizon D gives 2^19 (D/D12)^0.383 rounded to a power
    of two, LRs x sqrt(B / 2^19) (below 2^19 x (B / 2^19)^-0.25: a smaller batch gets larger rates) and weight
    decay x sqrt(B / 2^19) D12 / D; a CPU run keeps factors of 1."""
    def derive(depth, device, **kw):
        cfg = resolve_defaults(parse_flags(TrainConfig, [f"--depth={depth}", *kw.get("argv", [])]), device, 1)
        return cfg, base_train.derive_schedule(cfg, 32768, 1, device != "cuda")

    d12, s12 = derive(12, "cuda")
    assert d12.total_batch_size == 2 ** 19 and s12["lr_scale"] == s12["wd_scale"] == 1.0
    # 12 layers of q, k, v, o (768 x 768) and the MLP (2 x 768 x 3072), 6 value-embedding gates (6 x 12), lm_head
    assert s12["horizon_tokens"] == 12 * (12 * 12 * 768 * 768 + 6 * 6 * 12 + 32768 * 768)
    assert d12.num_iterations == round(s12["horizon_tokens"] / 2 ** 19)
    d20, s20 = derive(20, "cuda")
    ratio = s20["horizon_tokens"] / s12["horizon_tokens"]
    assert d20.total_batch_size == 2 ** round(math.log2(2 ** 19 * ratio ** 0.383)) == 2 ** 20
    assert s20["lr_scale"] == pytest.approx(2 ** 0.5) and s20["wd_scale"] == pytest.approx(2 ** 0.5 / ratio)
    given, s_given = derive(20, "cuda", argv=["--total_batch_size=262144", "--num_iterations=7",
                                              "--batch_lr_scale=0.9"])
    assert (given.total_batch_size, given.num_iterations, s_given["lr_scale"]) == (262144, 7, 0.9)
    small, s_small = derive(12, "cuda", argv=["--total_batch_size=131072"])
    assert s_small["lr_scale"] == pytest.approx(2 ** 0.5) and s_small["wd_scale"] == pytest.approx(0.5)
    _, s_smaller = derive(12, "cuda", argv=["--total_batch_size=65536"])
    assert s_smaller["lr_scale"] == pytest.approx(2 ** 0.75)
    cpu, s_cpu = derive(4, "cpu")
    assert cpu.total_batch_size == 512 and s_cpu["lr_scale"] == s_cpu["wd_scale"] == 1.0
    # LR warmup: none at the reference batch and above, and on CPU; SMALL_BATCH_WARMUP steps below; a given one kept
    assert d12.warmup_steps == d20.warmup_steps == cpu.warmup_steps == 0
    assert given.warmup_steps == base_train.SMALL_BATCH_WARMUP == 40
    assert derive(12, "cuda", argv=["--total_batch_size=262144", "--warmup_steps=3"])[0].warmup_steps == 3
    assert derive(12, "cuda", argv=["--total_batch_size=1048576"])[0].warmup_steps == 0


def test_documented_command_parses_with_both_spellings():
    snake = parse_flags(TrainConfig, ["--depth=20", "--num_iterations=10", "--warmup_steps=2"])
    kebab = parse_flags(TrainConfig, ["--depth", "20", "--num-iterations", "10", "--warmup-steps=2"])
    assert snake == kebab
    assert (snake.depth, snake.num_iterations, snake.warmup_steps) == (20, 10, 2)
    gpu = resolve_defaults(dataclasses.replace(snake), "cuda", world_size=1)
    assert (gpu.max_seq_len, gpu.device_batch_size, gpu.total_batch_size, gpu.compile, gpu.model_tag) == \
        (2048, 32, None, True, "d20")  # the batch comes from the depth: derive_schedule
    cpu = resolve_defaults(dataclasses.replace(snake), "cpu", world_size=2)
    assert (cpu.max_seq_len, cpu.device_batch_size, cpu.total_batch_size, cpu.compile) == (512, 1, 1024, False)
    assert (gpu.eval_tokens, cpu.eval_tokens) == (10 * 524288, 8 * 512 * 2)  # a CPU evaluates 8 rows per rank
    # every other flag too: a non-default value in each spelling gives the same config
    argv_snake, argv_kebab = [], []
    for f in dataclasses.fields(TrainConfig):
        value = {"int": "7", "float": "0.25", "str": "x", "bool": "true"}.get(type(f.default).__name__)
        if f.name in ("n_kv_head", "max_seq_len", "device_batch_size", "total_batch_size", "keep_last",
                      "eval_tokens", "short_window", "warmup_steps"):
            value = "3"
        if f.name in ("muon_momentum_final", "batch_lr_scale", "weight_decay_scale"):
            value = "0.5"
        if f.name in ("compile", "muon_compile", "compile_eval"):
            value = "false"
        if f.name == "fp8_skip":  # the one list flag
            value = "*.c_q,*.c_k"
        assert value is not None, f"test does not know a value for --{f.name}"
        argv_snake.append(f"--{f.name}={value}")
        argv_kebab += [f"--{f.name.replace('_', '-')}", value]
    assert parse_flags(TrainConfig, argv_snake) == parse_flags(TrainConfig, argv_kebab)


def test_cpu_defaults_line_names_only_the_defaults_filled_in(monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(base_train, "log0", logged.append)
    given = parse_flags(TrainConfig, ["--max_seq_len=128", "--device_batch_size=2", "--total_batch_size=512",
                                      "--eval_tokens=4096"])
    resolve_defaults(given, "cpu", world_size=1)
    assert not [m for m in logged if "defaults" in m]  # the user gave every one: nothing to report
    cfg = resolve_defaults(parse_flags(TrainConfig, ["--max_seq_len=128"]), "cpu", world_size=1)
    assert (cfg.max_seq_len, cfg.device_batch_size, cfg.total_batch_size) == (128, 1, 128)
    assert logged == ["cpu defaults: device_batch_size=1 total_batch_size=128 eval_tokens=1024 "
                      "(pass flags to override)"]


# ------------------------------------------------------------------------------------------------- training

def test_short_run_lowers_loss_and_prints_json_last(assets, env, monkeypatch, capsys):
    tok_dir, data_dir = assets
    argv = tiny_flags(tok_dir, data_dir, num_iterations=30, eval_every=30, save_every=-1, sample_every=30)
    result, rows = run(monkeypatch, env / "report", argv)
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall: first 5 mean {first:.3f}, last 5 mean {last:.3f}"
    assert 5.5 < losses[0] < 6.8  # ~ln(512) = 6.24 at initialization
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[-1])
    assert RESULT_KEYS <= set(printed)
    assert printed["mfu"] is None and printed["peak_memory_gib"] == 0.0 and printed["steps"] == 30
    assert 0 < printed["val_bpb"] < 10 and printed["median_tok_per_s"] > 0 and printed["data_passes"] >= 1
    assert printed["val_bpb"] == pytest.approx(result["val_bpb"])
    assert any(line.startswith("step 00030/30 | loss") for line in lines)
    assert sum(line.startswith("sample: '<|bos|>The capital of France is") for line in lines) == 1
    # the end-of-run checkpoint loads back into the model that produced it
    ckpt_dir = env / "base" / "checkpoints" / "base" / "d2"
    assert latest_step(ckpt_dir) == 30
    _, _, meta = load_checkpoint(ckpt_dir, load_optimizer=False)
    assert meta["val_bpb"] == pytest.approx(result["val_bpb"]) and meta["train_config"]["num_iterations"] == 30


def test_graph_breaks_of_the_compiled_model_are_said_and_reported(assets, env, monkeypatch, capsys):
    """A compiled run names each graph break after its first step and counts them in its result (None uncompiled)."""
    tok_dir, data_dir = assets
    monkeypatch.setattr(build_mod, "compile_model", lambda model, mode: model)  # Inductor on the CPU: minutes
    monkeypatch.setattr(base_train, "graph_breaks", lambda: {"Dynamic shape operator Explanation: cu_seqlens": 11})
    result, _ = run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=2, compile="true"))
    out = "".join(capsys.readouterr())  # log0 writes to stderr
    assert out.count("warning: the compiled model broke its graph 11x") == 1 and "cu_seqlens" in out
    assert result["graph_breaks"] == 11
    result, _ = run(monkeypatch, env / "report2", tiny_flags(tok_dir, data_dir, num_iterations=2))
    assert result["graph_breaks"] is None and "broke its graph" not in "".join(capsys.readouterr())


@pytest.mark.parametrize("compile_eval, pick, through_training_model", [
    (False, "fa4", False), (True, "flex", True), (None, "fa4", True), (None, "flex", False)])
def test_evaluations_run_through_the_training_model_with_compile_eval(assets, env, monkeypatch, compile_eval, pick,
                                                                       through_training_model):
    """--compile_eval true validates through the training model (the compiled one on CUDA), at the training batch's
    shape; false through the eager model, the training model seeing only training steps. Unset, it is on where the
    training model is not the eager one and no layer's attention runs flex in it (`pick`: every layer's)."""
    tok_dir, data_dir = assets
    monkeypatch.setattr(base_train, "layer_backends", lambda windows, *args: {pick})
    calls: list[tuple[bool, str, tuple]] = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y, loss_reduction="mean"):
            calls.append((torch.is_grad_enabled(), loss_reduction, tuple(x.shape)))
            return self.inner(x, y, loss_reduction=loss_reduction)

    real_build = base_train.build

    def recording_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        return built._replace(train_model=Recorder(built.train_model))

    monkeypatch.setattr(base_train, "build", recording_build)
    run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=4, eval_every=2, save_every=-1,
                                                compile_eval=compile_eval))
    training = [c for c in calls if c[0]]
    evaluations = [c for c in calls if not c[0]]
    assert len(training) == 4, calls  # 4 steps of one micro-batch (256 tokens of 4 x 64)
    assert len(evaluations) == (3 * 2 if through_training_model else 0), calls  # steps 0, 2, 4: 512 tokens each
    assert {c[1] for c in evaluations} <= {"none"} and {c[2] for c in calls} == {(4, 64)}, calls


def test_time_budget_ends_the_run_with_a_line_that_says_so(assets, env, monkeypatch, capsys):
    tok_dir, data_dir = assets
    clock = iter(range(0, 10**6, 2))  # every perf_counter() call: 2 more seconds, so each step takes 2 s
    monkeypatch.setattr(base_train.time, "perf_counter", lambda: next(clock))
    result, rows = run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=400, max_seconds=9))
    assert result["steps"] == len(rows) == 5  # 2 s a step: the budget is spent after step 5 (10 s >= 9 s)
    out = capsys.readouterr().out
    assert "time budget of 9 s spent after step 5 of 400: evaluating and saving this step (--max_seconds)" in out


def test_repeated_data_is_said_once_per_pass(assets, env, monkeypatch, capsys, tmp_path):
    """A data dir of 6 short documents repeats at once (the packer's buffer of 1000 documents holds ~170 passes of
    them): base_train says so whenever a step trains on a newer pass, and its result counts the passes begun."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers_base_train import real_texts
    tok_dir, _ = assets
    small = tmp_path / "small"
    small.mkdir()
    texts = [t[:300] for t in real_texts(9)]
    for i in range(3):  # 2 training shards of 3 documents, then the validation shard
        pq.write_table(pa.table({"text": texts[3 * i:3 * i + 3]}), small / f"shard_{i:05d}.parquet")
    result, _ = run(monkeypatch, env / "report", tiny_flags(tok_dir, small, num_iterations=6))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: step ")]
    passes = [int(line.split(" of pass ")[1].split()[0]) for line in said]
    assert said and said[0].startswith("data: step 1 trained on documents of pass ")
    assert passes == sorted(set(passes)) and passes[-1] == result["data_passes"] > 2
    assert said[0].endswith("more shards in --data_dir or fewer --num_iterations keep a run to one pass")


def test_resume_continues_exactly(assets, env, monkeypatch):
    tok_dir, data_dir = assets
    flags = dict(num_iterations=12, save_every=6, eval_every=6)
    _, full = run(monkeypatch, env / "report_a", tiny_flags(tok_dir, data_dir, **flags))
    ckpt_dir = env / "base" / "checkpoints" / "base" / "d2"
    assert latest_step(ckpt_dir) == 12 and (ckpt_dir / "step_000006").is_dir()
    step12 = load_file(str(ckpt_dir / "step_000012" / "model.safetensors"))
    _, resumed = run(monkeypatch, env / "report_b", tiny_flags(tok_dir, data_dir, resume_from_step=6, overwrite=True,
                                                               **flags))  # step 12 is redone: replace it
    assert [r["step"] for r in resumed] == list(range(7, 13))
    for a, b in zip(full[6:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, f"step {a['step']}: {a['loss']} vs {b['loss']} after resume"
        assert a["lrm"] == b["lrm"]
    again = load_file(str(ckpt_dir / "step_000012" / "model.safetensors"))
    assert max((step12[k] - again[k]).abs().max().item() for k in step12) <= 1e-5


def test_attn_gate_run_trains_the_gates_and_saves_them(assets, env, monkeypatch):
    """--attn_gate true: the zero-initialized gates get gradients once c_proj is nonzero (step 2 on) and Muon moves
    them; the checkpoint carries the option and the gate weights."""
    tok_dir, data_dir = assets
    _, rows = run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=3, save_every=-1,
                                                          attn_gate="true"))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    ckpt_dir = env / "base" / "checkpoints" / "base" / "d2"
    state = load_file(str(ckpt_dir / "step_000003" / "model.safetensors"))
    gates = [state[f"blocks.{i}.attn.attn_gate_linear.weight"] for i in range(2)]
    assert all(g.shape == (2, 12) and torch.isfinite(g).all() and g.abs().max() > 0 for g in gates)  # 2 heads
    _, _, meta = load_checkpoint(ckpt_dir, load_optimizer=False)
    assert meta["model_config"]["attn_gate"] is True


def test_bigram_embeds_run_trains_the_table_and_saves_it(assets, env, monkeypatch):
    """--bigram_embeds true: the zero-initialized table learns from the first step (its per-layer lambdas start at
    0.1), the checkpoint carries the option, every row of the table and the lambdas."""
    tok_dir, data_dir = assets
    _, rows = run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=2, save_every=-1,
                                                          bigram_embeds="true"))
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    ckpt_dir = env / "base" / "checkpoints" / "base" / "d2"
    state = load_file(str(ckpt_dir / "step_000002" / "model.safetensors"))
    _, _, meta = load_checkpoint(ckpt_dir, load_optimizer=False)
    assert meta["model_config"]["bigram_embeds"] is True
    vocab = -(-meta["model_config"]["vocab_size"] // 64) * 64
    table, lambdas = state["bigram_embed.weight"], state["bigram_lambdas"]
    assert table.shape == (5 * vocab, 64) and torch.isfinite(table).all() and table.abs().max() > 0
    assert lambdas.shape == (2,) and not torch.equal(lambdas, torch.full((2,), 0.1))  # moved from step 2 on


def test_resume_after_a_torn_save(assets, env, monkeypatch):
    """A save killed mid-write leaves a temporary dir and no step dir: the last complete step still
    resumes exactly, and the next save sweeps the debris away."""
    tok_dir, data_dir = assets
    flags = dict(num_iterations=8, save_every=4)
    _, full = run(monkeypatch, env / "report_a", tiny_flags(tok_dir, data_dir, **flags))
    ckpt_dir = env / "base" / "checkpoints" / "base" / "d2"
    # turn the step-8 save into a torn one of a process that died (kill -9 before the rename)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = ckpt_dir / f".tmp_step_000008_{dead.pid}"
    (ckpt_dir / "step_000008").rename(torn)
    (torn / "meta.json").unlink()
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[:len(data) // 3])
    assert latest_step(ckpt_dir) == 4
    _, resumed = run(monkeypatch, env / "report_b", tiny_flags(tok_dir, data_dir, resume_from_step=4, **flags))
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(full[4:], resumed)) <= 1e-5
    assert latest_step(ckpt_dir) == 8 and not torn.exists()
    load_checkpoint(ckpt_dir, 8)


# ------------------------------------------------------------------------------------------------- batch schedule

def test_batch_schedule_parses_and_names_each_mistake():
    parse = base_train.parse_batch_schedule
    assert parse("", 1024, 256) == [] and parse(" ", 1024, 256) == []
    assert parse("256@0.25, 512@0.5", 1024, 256) == [(256, 0.25), (512, 0.5)]
    for spec, match in [
        ("256", r"entry '256' is not BATCH@FRACTION.*131072@0.25,262144@0.5"),
        ("256@x", r"entry '256@x' is not BATCH@FRACTION"),
        ("a@0.5", r"entry 'a@0.5' is not BATCH@FRACTION"),
        ("300@0.5", r"batch 300 must be a positive multiple of device_batch_size x max_seq_len x world_size = 256"),
        ("0@0.5", r"batch 0 must be a positive multiple"),
        ("1024@0.5", r"batch 1024 must be below --total_batch_size=1024.*raise --total_batch_size"),
        ("256@0", r"fraction 0 \(of batch 256\) must lie strictly between 0 and 1"),
        ("256@1", r"fraction 1 \(of batch 256\) must lie strictly between 0 and 1"),
        ("256@nan", r"fraction nan"),
        ("512@0.25,256@0.5", r"batches and fractions must both strictly increase"),
        ("256@0.25,512@0.25", r"batches and fractions must both strictly increase"),
        ("256@0.25,256@0.5", r"batches and fractions must both strictly increase"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse(spec, 1024, 256)


def test_batch_at_switches_when_the_progress_reaches_each_fraction():
    schedule = [(256, 0.25), (512, 0.5)]
    at = [base_train.batch_at(p, schedule, 1024) for p in (0.0, 0.2499, 0.25, 0.4999, 0.5, 0.99, 1.0)]
    assert at == [256, 256, 512, 512, 1024, 1024, 1024]
    assert base_train.batch_at(0.0, [], 1024) == 1024  # no schedule: always the full batch
    assert base_train.mean_batch(schedule, 1024) == 256 * 0.25 + 512 * 0.25 + 1024 * 0.5 == 704
    assert base_train.mean_batch([], 1024) == 1024


def test_batch_schedule_is_checked_at_start_and_sets_the_warmup_by_its_first_batch(assets, env):
    def derive(*argv):
        cfg = resolve_defaults(parse_flags(TrainConfig, ["--depth=12", *argv]), "cuda", 1)
        return cfg, base_train.derive_schedule(cfg, 32768, 1, False)

    cfg, schedule = derive("--batch_schedule=131072@0.25,262144@0.5")
    assert schedule["batch_schedule"] == [(131072, 0.25), (262144, 0.5)] and cfg.total_batch_size == 2 ** 19
    assert schedule["lr_scale"] == 1.0  # the rates at the full batch are unchanged; the loop scales each step's
    # no --num_iterations: the horizon's tokens at the schedule's mean batch (2^19 x (0.25/4 + 0.25/2 + 0.5))
    assert cfg.num_iterations == round(schedule["horizon_tokens"] / (2 ** 19 * 0.6875))
    # the first steps train like a run at their batch (2^17 < 2^19): the warmup of a small batch; a given one kept
    assert cfg.warmup_steps == base_train.SMALL_BATCH_WARMUP and derive()[0].warmup_steps == 0
    assert derive("--batch_schedule=131072@0.25", "--warmup_steps=5")[0].warmup_steps == 5
    assert derive("--total_batch_size=1048576", "--batch_schedule=524288@0.5")[0].warmup_steps == 0
    tok_dir, data_dir = assets  # a bad schedule stops the run before any training
    with pytest.raises(ValueError, match=r"batch 300 must be a positive multiple .* = 256"):
        base_train.main(tiny_flags(tok_dir, data_dir, total_batch_size=1024, batch_schedule="300@0.5"))


@pytest.fixture
def count_micro_batches(monkeypatch):
    """Counts the training micro-batches that base_train draws (its PackedLoader, wrapped)."""
    drawn = {"train": 0}

    class Counting(base_train.PackedLoader):
        def __next__(self):
            if self.split == "train":
                drawn["train"] += 1
            return super().__next__()

    monkeypatch.setattr(base_train, "PackedLoader", Counting)
    return drawn


def test_batch_schedule_run_takes_each_steps_micro_batches_and_logs_its_tokens(assets, env, monkeypatch, capsys,
                                                                               count_micro_batches):
    """8 steps of 256@0.25,512@0.5 then 1024 tokens (256 per micro-batch): 1, 1, 2, 2, 4, 4, 4, 4 micro-batches;
    each step's LRs x the batch rule's (its batch / 1024)^-0.25, all below 2^19 (no warmup, no warmdown: the
    multiplier is that factor alone)."""
    tok_dir, data_dir = assets
    logged: list[str] = []
    monkeypatch.setattr(base_train, "log0", logged.append)
    result, rows = run(monkeypatch, env / "report", tiny_flags(
        tok_dir, data_dir, num_iterations=8, total_batch_size=1024, batch_schedule="256@0.25,512@0.5",
        warmdown_ratio=0.0))
    batches = [256, 256, 512, 512, 1024, 1024, 1024, 1024]
    assert count_micro_batches["train"] == sum(batches) // 256 == 22
    assert [r["batch"] for r in rows] == batches and result["tokens"] == sum(batches)
    assert [r["lrm"] for r in rows] == pytest.approx([(b / 1024) ** -0.25 for b in batches], abs=1e-12)
    for r in rows:  # tok/s of the step's own tokens
        assert r["tok_per_s"] * r["step_ms"] / 1000 == pytest.approx(r["batch"], rel=1e-9)
    assert result["median_tok_per_s"] == pytest.approx(statistics.median(r["tok_per_s"] for r in rows))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[-1] for line in lines if line.startswith("step 0")] == [f"batch {b:,}" for b in batches]
    assert ("batch schedule: 256 tokens (grad accum 1) below progress 0.25, 512 tokens (grad accum 2) below "
            "progress 0.5, then 1,024 (grad accum 4); each step's LRs x the batch rule's factor for its batch / for "
            "1,024 (--batch_schedule)") in logged


def test_batch_lr_factor_follows_the_rule_on_both_sides_of_the_reference_batch():
    factor = base_train.batch_lr_factor
    assert factor(2 ** 19) == 1 and factor(2 ** 21) == pytest.approx(2) and factor(2 ** 17) == pytest.approx(2 ** 0.5)
    assert factor(2 ** 18) / factor(2 ** 20) == pytest.approx(2 ** -0.25)  # a schedule's 2^18 step in a 2^20 run


def test_without_a_schedule_every_step_takes_grad_accum_micro_batches(assets, env, monkeypatch, capsys,
                                                                       count_micro_batches):
    tok_dir, data_dir = assets
    result, rows = run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=3,
                                                               total_batch_size=1024, warmdown_ratio=0.0))
    assert count_micro_batches["train"] == 3 * 4 and result["tokens"] == 3 * 1024
    assert [r["batch"] for r in rows] == [1024] * 3 and [r["lrm"] for r in rows] == [1.0] * 3
    assert " | batch " not in capsys.readouterr().out  # the step lines of a run without a schedule are unchanged


def test_resume_in_the_small_batch_phase_continues_exactly(assets, env, monkeypatch):
    """Steps 0-5 of 256 tokens, 6-8 of 512, 9-11 of 1024; resumed at step 3, the run takes the same batches,
    rates and data as the uninterrupted one, and counts the tokens of the steps before the resume too."""
    tok_dir, data_dir = assets
    flags = dict(num_iterations=12, save_every=3, keep_last="none", total_batch_size=1024,
                 batch_schedule="256@0.5,512@0.75")
    full_result, full = run(monkeypatch, env / "report_a", tiny_flags(tok_dir, data_dir, **flags))
    ckpt_dir = env / "base" / "checkpoints" / "base" / "d2"
    step12 = load_file(str(ckpt_dir / "step_000012" / "model.safetensors"))
    result, resumed = run(monkeypatch, env / "report_b", tiny_flags(tok_dir, data_dir, resume_from_step=3,
                                                                    overwrite=True, **flags))
    assert [r["step"] for r in resumed] == list(range(4, 13))
    assert [r["batch"] for r in full] == [256] * 6 + [512] * 3 + [1024] * 3
    for a, b in zip(full[3:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, f"step {a['step']}: {a['loss']} vs {b['loss']} after resume"
        assert (a["lrm"], a["batch"]) == (b["lrm"], b["batch"])
    assert result["tokens"] == full_result["tokens"] == 6 * 256 + 3 * 512 + 3 * 1024
    again = load_file(str(ckpt_dir / "step_000012" / "model.safetensors"))
    assert max((step12[k] - again[k]).abs().max().item() for k in step12) <= 1e-5


# ------------------------------------------------------------------------------------------------- bad input

def test_missing_tokenizer_names_tok_train(assets, env):
    _, data_dir = assets
    with pytest.raises(FileNotFoundError, match="tok_train"):
        base_train.main(tiny_flags(env / "nowhere", data_dir))


def test_missing_data_dir_says_how_to_get_shards(assets, env):
    tok_dir, _ = assets
    with pytest.raises(FileNotFoundError, match=r"does not exist.*nanochat\.data\.download"):
        base_train.main(tiny_flags(tok_dir, env / "no_data"))
    (env / "one_shard").mkdir()
    (env / "one_shard" / "a.txt").write_text("just one file\n")
    with pytest.raises(ValueError, match="at least one more"):
        base_train.main(tiny_flags(tok_dir, env / "one_shard"))


def test_total_batch_size_must_be_a_multiple(assets, env):
    tok_dir, data_dir = assets
    with pytest.raises(ValueError, match=r"total_batch_size=300 must be a multiple of .* = 256"):
        base_train.main(tiny_flags(tok_dir, data_dir, total_batch_size=300))


def test_fresh_run_into_a_tag_with_checkpoints_is_refused(assets, env, monkeypatch):
    """A fresh run next to an earlier run's steps would have its own deleted by keep_last (issue 27)."""
    tok_dir, data_dir = assets
    run(monkeypatch, env / "report_a", tiny_flags(tok_dir, data_dir, num_iterations=4, save_every=2))
    with pytest.raises(FileExistsError, match=r"steps \[2, 4\].*--resume_from_step 4.*--overwrite"):
        base_train.main(tiny_flags(tok_dir, data_dir, num_iterations=2))
    run(monkeypatch, env / "report_b", tiny_flags(tok_dir, data_dir, num_iterations=2, save_every=2, overwrite=True))
    assert latest_step(env / "base" / "checkpoints" / "base" / "d2") == 2


def test_disk_too_small_for_a_checkpoint_stops_the_run_after_its_first_step(assets, env, monkeypatch):
    """Not at its first save, after the whole run: the check needs the optimizer state, which exists after step 1."""
    tok_dir, data_dir = assets
    real = ckpt.shutil.disk_usage(env)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: real._replace(free=ckpt.DISK_MARGIN))
    monkeypatch.setenv("NANOCHAT_REPORT_DIR", str(env / "report"))
    with pytest.raises(OSError, match=r"No space for this run's checkpoints: one needs ~0.0 GiB"):
        base_train.main(tiny_flags(tok_dir, data_dir, num_iterations=8, save_every=-1))
    assert not (env / "report" / "train_log.jsonl").exists()  # refused before its first step was logged
    base_train.main(tiny_flags(tok_dir, data_dir, num_iterations=2, save_every=0, overwrite=True))  # saves nothing


def test_resume_of_a_missing_step_lists_the_saved_ones(assets, env, monkeypatch):
    tok_dir, data_dir = assets
    run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=2, save_every=1))
    with pytest.raises(FileNotFoundError, match=r"step 5 .*available steps: \[1, 2\]"):
        base_train.main(tiny_flags(tok_dir, data_dir, num_iterations=6, resume_from_step=5))


# ------------------------------------------------------------------------------------------------- wandb

def test_run_without_wandb_says_pip_install(assets, env, monkeypatch):
    tok_dir, data_dir = assets
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match="pip install wandb"):
        base_train.main(tiny_flags(tok_dir, data_dir, run="tiny"))


def test_run_logs_to_wandb(assets, env, monkeypatch):
    logged, runs = [], []

    class FakeRun:
        summary: dict = {}

        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            runs.append("finished")

    def init(project, name, config, job_type):
        runs.append((project, name, config["depth"], job_type))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    tok_dir, data_dir = assets
    run(monkeypatch, env / "report", tiny_flags(tok_dir, data_dir, num_iterations=3, eval_every=3, run="tiny"))
    assert runs == [("nanochat", "tiny", 2, "base"), "finished"]
    assert [s for s, d in logged if "base/loss" in d] == [1, 2, 3]  # nanochat.tracking's keys: <stage>/<metric>
    assert [s for s, d in logged if "base/val_bpb" in d] == [0, 3]
    assert FakeRun.summary["steps"] == 3

"""benchmarks.race: the smoke race end to end on the CPU, and its log parsing, timing and target arithmetic, the
resumption of a racer cut off mid-run, and racers side by side on several GPUs (--gpus)."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from benchmarks import race, race_data
from benchmarks.race_data import check_peer, split_text
from nanochat.data.shards import DocumentStream, list_shards, resolve_data_dir
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

GPU_NAME = "NVIDIA H100 80GB HBM3"


def has_shards() -> bool:
    try:
        return bool(list_shards(resolve_data_dir()))
    except FileNotFoundError:
        return False


# the smoke race cuts its tiny data out of real pretraining shards (the user's data dir or ../shared/data/pretrain)
needs_shards = pytest.mark.skipif(not has_shards(), reason="no pretraining shards: download some "
                                  "(`python -m nanochat.data.download -n 1`) or clone next to ../shared/data")

PEER_LINES = [  # the public nanochat's own output format (scripts/base_train.py at 92d63d4)
    f"GPU: {GPU_NAME} | Peak FLOPS (BF16): 9.89e+14",
    "Step 00000 | Validation bpb: 3.300000",
    "step 00000/00003 (0.00%) | loss: 10.397 | lrm: 1.00 | dt: 45000.00ms | tok/sec: 11,650 | bf16_mfu: 1.20 | "
    "epoch: 0 pq: 0 rg: 0 | total time: 0.00m",
    "step 00001/00003 (33.33%) | loss: 9.100 | lrm: 1.00 | dt: 1000.00ms | tok/sec: 524,288 | bf16_mfu: 40.00 | "
    "epoch: 0 pq: 0 rg: 0 | total time: 0.00m",
    "Step 00002 | Validation bpb: 2.000000",
    "step 00002/00003 (66.67%) | loss: 8.000 | lrm: 1.00 | dt: 1200.00ms | tok/sec: 436,906 | bf16_mfu: 42.00 | "
    "epoch: 0 pq: 0 rg: 0 | total time: 0.00m",
    "Step 00003 | Validation bpb: 1.500000",
    "Peak memory usage: 2048.00MiB",
]
OUR_LINES = [
    "step 00000 | val bpb 3.3000",
    "step 00001/00003 | loss 10.3970 | lrm 1.000 | 45000 ms | 11,650 tok/s | MFU 1.2% | mem 2.00 GiB",
    "step 00002/00003 | loss 9.1000 | lrm 1.000 | 1000 ms | 524,288 tok/s | MFU 40.0% | mem 2.00 GiB",
    "step 00002 | val bpb 2.0000 | 4.8 s",
    "step 00003/00003 | loss 8.0000 | lrm 1.000 | 1200 ms | 436,906 tok/s | MFU 42.0% | mem 2.00 GiB",
    "step 00003 | val bpb 1.5000",
    json.dumps({"val_bpb": 1.5, "peak_memory_gib": 2.0, "device": GPU_NAME, "graph_breaks": 0}),
]


@pytest.mark.parametrize("kind,lines", [("nanochat", PEER_LINES), ("ours", OUR_LINES)])
def test_both_trainers_logs_give_the_same_curve(kind, lines):
    stats = race.parse_log(kind, lines)
    assert stats["step_seconds"] == [45.0, 1.0, 1.2] and stats["mfu"] == [1.2, 40.0, 42.0]
    assert stats["peak_memory_gib"] == 2.0 and stats["device"] == GPU_NAME
    assert stats["graph_breaks"] == (0 if kind == "ours" else None)  # the peer does not say
    kept, compile_seconds = race.training_seconds(stats["step_seconds"])
    assert kept == [1.2, 1.0, 1.2] and compile_seconds == pytest.approx(43.8)  # the compile step counts as the median
    points = race.curve(stats["evals"], kept)
    assert points == [(0, 0.0, 3.3), (2, 2.2, 2.0), (3, pytest.approx(3.4), 1.5)]
    assert stats["step_tokens"] == [None] * 3  # the race's batch


def test_a_batch_schedules_steps_count_their_own_tokens(tmp_path, monkeypatch):
    """Under --batch_schedule our step lines end with their batch: the racer's tokens, tok/s and epochs use it."""
    racer, out = race.Racer("r", "ours", ["--batch_schedule=256@0.34,512@0.67"]), tmp_path / "out"
    cfg = race.RaceConfig(out=str(out), steps=3, eval_points=3, total_batch_size=1024)
    lines = ["step 00000 | val bpb 3.3000"]
    for done, (ms, batch) in enumerate(((45000, 256), (1000, 512), (1000, 1024)), start=1):
        lines.append(f"step {done:05d}/00003 | loss 9.0000 | lrm 1.000 | {ms} ms | {batch:,} tok/s | MFU 1.0% | "
                     f"mem 2.00 GiB | batch {batch:,}")
        lines.append(f"step {done:05d} | val bpb {3.0 - done / 2:.4f}")

    def run_logged(argv, env, cwd, log, mirror=None):
        for path in (log, mirror):
            path.write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(race, "run_logged", run_logged)
    monkeypatch.setattr(race, "final_bpb", lambda *a: {"bpb": 1.4})
    result = race.run_racer(cfg, racer, out, out / "work", data_tokens=3584)
    assert result["tokens"] == 256 + 512 + 1024 and result["epochs"] == pytest.approx(0.5)
    assert result["tok_per_s"] == pytest.approx(512.0)  # the median of 256, 512, 1024 per second (compile: median)
    again = race.run_racer(cfg, racer, out, out / "work", data_tokens=1792)  # finished: reused, its tokens kept
    assert again["epochs"] == pytest.approx(1.0)


def test_a_racer_with_its_own_steps_trains_them(tmp_path, monkeypatch):
    """`kind@STEPS` overrides the race's --steps: the trainer is told that horizon, the result records it, and a
    stored result of the race's horizon does not stand in for it."""
    out, argvs = tmp_path / "out", []
    cfg = race.RaceConfig(out=str(out), steps=4, eval_points=2, total_batch_size=1024)

    def run_logged(argv, env, cwd, log, mirror=None):
        argvs.append(argv)
        steps = int(next(a for a in argv if a.startswith("--num_iterations=")).split("=")[1])
        lines = [f"step {done:05d}/{steps:05d} | loss 9.0 | lrm 1.0 | 1000 ms | 1,024 tok/s | MFU 1.0% | "
                 f"mem 2.00 GiB" for done in range(1, steps + 1)] + [f"step {steps:05d} | val bpb 1.5000"]
        for path in (log, mirror):
            path.write_text("\n".join(lines) + "\n")

    monkeypatch.setattr(race, "run_logged", run_logged)
    monkeypatch.setattr(race, "final_bpb", lambda *a: {"bpb": 1.5})
    whole = race.run_racer(cfg, race.Racer("r", "ours", []), out, out / "work")
    short = race.run_racer(cfg, race.Racer("r", "ours", [], steps=3), out, out / "work")
    assert (whole["steps"], short["steps"]) == (4, 3) and len(argvs) == 2
    assert "--eval_every=1" in argvs[1] and short["settings"]["steps"] == 3


def test_time_to_reach_interpolates_between_evaluations():
    points = [(0, 0.0, 3.0), (10, 10.0, 2.0), (20, 20.0, 1.0)]
    assert race.time_to_reach(points, 1.5) == pytest.approx(15.0)
    assert race.time_to_reach(points, 2.0) == pytest.approx(10.0)
    assert race.time_to_reach(points, 3.5) == 0.0
    assert race.time_to_reach(points, 0.9) is None
    target, rows = race.summarize([
        {"name": "a", "tok_per_s": 1.0, "final_bpb": 1.0, "final_bpb_own": 1.0, "curve": points},
        {"name": "b", "tok_per_s": 1.0, "final_bpb": 1.5, "final_bpb_own": 1.5,
         "curve": [(0, 0.0, 3.0), (10, 30.0, 1.5)]}], "")
    assert target == 1.5 and [r["time_to_target_s"] for r in rows] == [15.0, 30.0]
    assert [r["ratio_to_first"] for r in rows] == [1.0, 2.0]


def test_racer_specs_and_peer_errors(tmp_path):
    racers = race.parse_racers("ours; sssl=ours:--window_pattern SSSL --value_embeds true", with_peer=False)
    assert [(r.name, r.kind, r.flags) for r in racers] == [
        ("ours", "ours", []), ("sssl", "ours", ["--window_pattern", "SSSL", "--value_embeds", "true"])]
    short = race.parse_racers("short=ours@300:--unet_skips false", with_peer=False)[0]
    assert (short.name, short.kind, short.steps, short.flags) == ("short", "ours", 300, ["--unet_skips", "false"])
    for bad in ("x=ours@0:", "x=ours@ten:"):
        with pytest.raises(SystemExit, match="whole number above 0"):
            race.parse_racers(bad, with_peer=False)
    with pytest.raises(SystemExit, match="needs --peer"):
        race.parse_racers("nanochat", with_peer=False)
    with pytest.raises(SystemExit, match="kind 'theirs'"):
        race.parse_racers("x=theirs:", with_peer=True)
    with pytest.raises(SystemExit, match="unique"):
        race.parse_racers("ours; ours", with_peer=False)
    with pytest.raises(SystemExit, match="git clone https://github.com/karpathy/nanochat"):
        check_peer(tmp_path)


def test_peer_env_names_absolute_paths(tmp_path, monkeypatch):
    """The peer runs in its checkout: a relative base dir (race_data's default --out .race) must not name a folder
    there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(race_data.importlib.util, "find_spec", lambda name: None)  # no wandb: its stub on the path
    env = race_data.peer_env(tmp_path / "peer", race_data.Path(".race/peer_tok_base"))
    assert env["NANOCHAT_BASE_DIR"] == str(tmp_path / ".race" / "peer_tok_base")
    assert str(tmp_path / ".race" / "peer_tok_base" / "stubs") in env["PYTHONPATH"].split(os.pathsep)


def test_split_text_joins_back_and_cuts_at_lines():
    text = "First line of an article.\nSecond one, a bit longer. With two sentences.\n" * 5 + "x" * 130
    pieces = split_text(text, 100)
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:5])


# Tokenizers whose counts a hand can check: the 256 bytes and one merge, "ab"; both split words as the trainers do.
RANKS = {**{bytes([i]): i for i in range(256)}, b"ab": 256}
DOCS = [["abab", "ab cd"], ["x"]]  # training shard 0 (2 row groups), 1; then the validation shard
# per document its BOS and its tokens: "ab","ab"; "ab"," ","c","d"; "x"
HAND_COUNT = {"shard_00000.parquet": (1 + 2) + (1 + 4), "shard_00001.parquet": 1 + 1}


def make_race_dir(root, docs=DOCS, ranks=RANKS):
    """A race dir: its data (training shards of `docs`, a validation shard), both kinds of tokenizer of `ranks`."""
    data = root / "data"
    data.mkdir(parents=True)
    for i, texts in enumerate(docs + [["validation text"]]):
        pq.write_table(pa.table({"text": texts}), data / f"shard_{i:05d}.parquet", row_group_size=1)
    Tokenizer(ranks).save(root / "tokenizer_ours")
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}  # the peer's layout: after the merges
    enc = tiktoken.Encoding(name="peer", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    (root / "tokenizer_nanochat").mkdir()
    (root / "tokenizer_nanochat" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))  # as its RustBPETokenizer.save
    made_from = {p.name: p.name for p in sorted(data.glob("*.parquet"))}
    return data, race_data.claim_out(data, made_from, 6000)


def test_manifest_counts_each_document_and_its_bos_per_tokenizer(tmp_path, monkeypatch):
    data, manifest = make_race_dir(tmp_path)
    tokenizers = {kind: tmp_path / f"tokenizer_{kind}" for kind in race.KINDS}
    manifest = race_data.update_manifest(data, manifest, tokenizers, threads=2)
    assert json.loads((data / race_data.MANIFEST).read_text()) == manifest
    assert manifest["validation"] == "shard_00002.parquet"
    assert [manifest["shards"][n]["documents"] for n in sorted(manifest["shards"])] == [2, 1, 1]
    for kind in race.KINDS:
        assert manifest["tokenizers"][kind]["train_tokens"] == HAND_COUNT  # the validation shard left out
    assert race_data.train_tokens(tmp_path, list(race.KINDS)) == ({"ours": 10, "nanochat": 10}, [])

    # the same shards and tokenizers: the counts are kept, not made again
    monkeypatch.setattr(race_data, "count_tokens", lambda *a: pytest.fail("counted again"))
    assert race_data.update_manifest(data, manifest, tokenizers, threads=2) == manifest
    # another tokenizer, or a shard of another size: counted again (that one tokenizer / every tokenizer)
    counted = []
    monkeypatch.setattr(race_data, "count_tokens", lambda paths, counter: counted.append(len(paths)) or {"x": 1})
    Tokenizer({bytes([i]): i for i in range(256)}).save(tmp_path / "tokenizer_ours")
    race_data.update_manifest(data, manifest, tokenizers, threads=2)
    assert counted == [2]
    pq.write_table(pa.table({"text": ["x", "y"]}), data / "shard_00001.parquet")
    race_data.update_manifest(data, manifest, tokenizers, threads=2)
    assert counted == [2, 2, 2]


def test_race_data_refuses_a_folder_made_from_other_shards(tmp_path):
    data, manifest = make_race_dir(tmp_path)
    with pytest.raises(SystemExit, match="was made from --src shards .* delete .* to make it anew"):
        race_data.claim_out(data, {**manifest["made_from"], "shard_00003.parquet": "shard_00009.parquet"}, 6000)
    with pytest.raises(SystemExit, match="--max_doc_chars 6000; this run asks for .* --max_doc_chars 100"):
        race_data.claim_out(data, manifest["made_from"], 100)
    assert race_data.claim_out(data, manifest["made_from"], 6000) == manifest
    (data / race_data.MANIFEST).unlink()  # an older race_data's folder: taken when it holds this run's names only
    with pytest.raises(SystemExit, match="no tokens.json .* this run would write .*shard_00003"):
        race_data.claim_out(data, {f"shard_{i:05d}.parquet": "s" for i in range(4)}, 6000)
    assert race_data.claim_out(data, manifest["made_from"], 6000)["shards"] == {}


def test_train_tokens_of_the_shards_there_and_what_it_cannot_count(tmp_path):
    data, manifest = make_race_dir(tmp_path)
    (data / race_data.MANIFEST).unlink()
    tokens, notes = race_data.train_tokens(tmp_path, ["ours"])
    assert tokens == {} and len(notes) == 1 and "no " in notes[0] and "epochs unknown" in notes[0]
    manifest = race_data.update_manifest(data, race_data.claim_out(data, manifest["made_from"], 6000),
                                         {"ours": tmp_path / "tokenizer_ours"}, threads=1)
    tokens, notes = race_data.train_tokens(tmp_path, ["ours", "nanochat"])
    assert tokens == {"ours": 10} and "counts no tokens of tokenizer_nanochat" in notes[0]
    (data / "shard_00001.parquet").unlink()  # a carry not staged: the trainers read shard 0 only
    tokens, notes = race_data.train_tokens(tmp_path, ["ours"])
    assert tokens == {"ours": HAND_COUNT["shard_00000.parquet"]} and "['shard_00001.parquet']" in notes[0]
    Tokenizer({bytes([i]): i for i in range(256)}).save(tmp_path / "tokenizer_ours")
    tokens, notes = race_data.train_tokens(tmp_path, ["ours"])
    assert tokens == {} and "is not the tokenizer" in notes[-1]
    pq.write_table(pa.table({"text": ["x"]}), data / "shard_00007.parquet")  # left from an older race
    tokens, notes = race_data.train_tokens(tmp_path, ["ours"])
    assert tokens == {} and "does not describe shard_00007.parquet" in notes[0]


def test_check_staged_names_each_missing_shard_and_its_carry(tmp_path):
    data, manifest = make_race_dir(tmp_path)
    race_data.update_manifest(data, manifest, {"ours": tmp_path / "tokenizer_ours"}, threads=1)
    race_data.check_staged(tmp_path)
    (tmp_path / race_data.CARRIES).write_text("shard_00000.parquet .race_a\nshard_00001.parquet .race_b\n")
    (data / "shard_00001.parquet").unlink()
    with pytest.raises(SystemExit, match=r"missing shard_00001.parquet \(carry .race_b\); stage those carries"):
        race_data.check_staged(tmp_path)
    (data / "shard_00000.parquet").rename(data / "shard_00009.parquet")
    with pytest.raises(SystemExit, match=r"missing shard_00000.parquet \(carry .race_a\); missing shard_00001.parquet "
                                         r"\(carry .race_b\); shard_00009.parquet \(\d+ bytes\) is not a shard"):
        race_data.check_staged(tmp_path)
    (data / race_data.MANIFEST).unlink()
    with pytest.raises(SystemExit, match="no .*tokens.json: stage a .race_a"):
        race_data.check_staged(tmp_path)


def test_epochs_and_the_warning_past_one(capsys):
    assert race.epochs_of(400 * 524288, 44_560_000) == pytest.approx(209_715_200 / 44_560_000)  # 4.706
    assert race.epochs_of(400 * 524288, None) is None
    race.say_epochs("ours", None, 400, 524288, 44_560_000)
    said = capsys.readouterr().out
    assert said.startswith("[race] ours: 400 steps x 524,288 = 209.7M tokens = 4.71 epochs of the race data "
                           "(44.6M tokens)\n")
    assert "[race] WARNING: ours trains 4.71 epochs" in said and "memorizes" in said
    assert "one epoch is 84 steps of 524,288 tokens" in said and "--train_shards" in said
    race.say_epochs("ours", 1, 80, 524288, 44_560_000)  # 41.9M tokens: 0.94 epochs
    said = capsys.readouterr().out
    assert "[race] ours (GPU 1): 80 steps x 524,288 = 41.9M tokens = 0.94 epochs" in said and "WARNING" not in said
    race.say_epochs("ours", None, 80, 524288, None)
    assert "= — epochs of the race data (its token count is unknown)" in capsys.readouterr().out


def test_lowest_bpb_and_a_rise_after_it():
    """A racer that overfits (down to 1.26 at step 200, then up to 1.49) and one that does not: each one's lowest
    bpb and its step, a note for the first only; the target keeps its first crossing."""
    rising = [(0, 0.0, 3.0), (100, 100.0, 1.5), (200, 200.0, 1.26), (300, 300.0, 1.35), (400, 400.0, 1.49)]
    steady = [(0, 0.0, 3.0), (100, 100.0, 1.6), (200, 200.0, 1.42), (300, 300.0, 1.415), (400, 400.0, 1.42)]
    results = [{"name": "ours", "tok_per_s": 1.0, "final_bpb": 1.47, "final_bpb_own": 1.49, "curve": rising,
                "epochs": 4.71},
               {"name": "nanochat", "tok_per_s": 1.0, "final_bpb": 1.41, "final_bpb_own": 1.42, "curve": steady}]
    target, rows = race.summarize(results, "")
    assert target == 1.49  # the worst final: ours, which passed it on the way down (1.5 -> 1.26), at its first crossing
    assert rows[0]["time_to_target_s"] == pytest.approx(100.0 + 100.0 * (1.5 - 1.49) / (1.5 - 1.26))
    assert (rows[0]["min_bpb"], rows[0]["min_bpb_step"]) == (1.26, 200)
    assert rows[0]["rise_after_min"] == pytest.approx(0.23) and rows[0]["epochs"] == 4.71
    assert (rows[1]["min_bpb"], rows[1]["min_bpb_step"], rows[1]["epochs"]) == (1.415, 300, None)
    notes = race.rise_notes(rows)
    assert notes == ["[race] ours: val bpb rose 0.230 after step 200 (1.2600 -> 1.4900 at its last evaluation): "
                     "overfitting?; it trained 4.71 epochs of the race data"]
    results = [{**r, "mfu": None, "peak_memory_gib": None, "train_seconds": 400.0} for r in results]
    lines = race.table(rows, results).splitlines()
    assert "| epochs |" in lines[0] and "| min bpb @ step |" in lines[0]
    assert " | 4.71 | " in lines[2] and " | 1.2600 @ 200 | " in lines[2] and " | — | 1.4100 | " in lines[3]
    assert race.graph_break_notes(results) == []
    results[0]["graph_breaks"] = 19
    assert race.graph_break_notes(results) == [
        "[race] ours: its compiled model broke its graph 19x, so its step ran partly outside the compiled graph (the "
        "reasons: 'broke its graph' in its train.log)"]


@pytest.mark.slow
@needs_shards
def test_smoke_race_writes_its_files(tmp_path, monkeypatch):
    """The two tiny racers side by side on "GPUs" 0 and 1 (on the CPU: each process's CUDA_VISIBLE_DEVICES is set
    and unused): they train at the same time, and each one's training and final bpb see only its GPU."""
    monkeypatch.setattr(race.torch.cuda, "device_count", lambda: 0)  # a CPU machine, also where CI has a GPU
    real, launched = subprocess.Popen, []

    def popen(argv, **kwargs):
        launched.append((argv, (kwargs.get("env") or os.environ).get("CUDA_VISIBLE_DEVICES")))
        return real(argv, **kwargs)

    monkeypatch.setattr(race.subprocess, "Popen", popen)
    summary = race.main(["--smoke", f"--out={tmp_path}", "--gpus=0,1"])
    assert [r["name"] for r in summary["racers"]] == ["ours", "lr2"]
    for r in summary["racers"]:
        assert len(r["curve"]) >= 11 and r["steps"] == 20
        assert r["curve"][-1][2] < r["curve"][0][2]  # it learned
        assert abs(r["own_minus_ours"]) < 0.5
        assert r["device"] == "cpu"  # as its trainer named it
        runs = [gpu for argv, gpu in launched
                if f"--model_tag={r['name']}" in argv or argv[-1].endswith(f"/{r['name']}")]
        assert runs == [str(r["gpu"])] * 2  # its training, its final bpb
    assert sorted(r["gpu"] for r in summary["racers"]) == [0, 1]
    spans = []
    for name in ("ours", "lr2"):
        work = tmp_path / "work" / name
        spans.append((json.loads((work / "attempts.json").read_text())["attempts"][0]["started"],
                      (work / "train.log").stat().st_mtime))
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # side by side
    assert summary["racers"][0]["final_bpb"] != summary["racers"][1]["final_bpb"]
    assert (tmp_path / "race.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "race.json").read_text())["target_bpb"] == summary["target_bpb"]
    assert (tmp_path / "ours" / "train.log").is_file() and (tmp_path / "work" / "ours" / "result.json").is_file()
    manifest = json.loads((tmp_path / "smoke_data" / "data" / race_data.MANIFEST).read_text())
    data_tokens = sum(manifest["tokenizers"]["ours"]["train_tokens"].values())
    assert sorted(manifest["tokenizers"]["ours"]["train_tokens"]) == ["shard_00000.parquet", "shard_00001.parquet"]
    for r, row in zip(summary["racers"], summary["table"]):
        assert r["data_tokens"] == data_tokens and r["epochs"] == pytest.approx(20 * 512 / data_tokens)
        assert row["epochs"] == r["epochs"] and 0 < r["epochs"] < 1
        assert row["min_bpb"] == min(p[2] for p in r["curve"])


def test_racers_share_the_gpus_one_each():
    """Two GPUs, three racers: two at once, each on a GPU no other running racer holds, the third on the first GPU
    freed; outcomes in the racers' order; a failing racer is reported and the others go on."""
    racers = [race.Racer(name, "ours", []) for name in ("a", "b", "c")]
    both = threading.Barrier(2, timeout=10)  # a and b must run at once: one after another would break it
    lock, running, most, used = threading.Lock(), {}, [0], {}

    def run_one(racer, gpu):
        with lock:
            assert gpu not in running.values()
            running[racer.name], used[racer.name] = gpu, gpu
            most[0] = max(most[0], len(running))
        try:
            if racer.name != "c":
                both.wait()
            time.sleep(0.05)
            if racer.name == "b":
                raise SystemExit("['scripts.base_train'] failed (exit 1); its log: /out/work/b/train.log")
            return {"name": racer.name, "gpu": gpu}
        finally:
            with lock:
                del running[racer.name]

    done = []
    outcomes = race.run_queue(racers, [0, 1], run_one, lambda so_far: done.append(len(so_far)))
    assert most[0] == 2 and used["a"] != used["b"] and used["c"] in (0, 1)
    assert outcomes[0] == {"name": "a", "gpu": used["a"]} and outcomes[2] == {"name": "c", "gpu": used["c"]}
    assert isinstance(outcomes[1], race.Failure) and outcomes[1].gpu == used["b"]
    assert "its log: /out/work/b/train.log" in outcomes[1].message()
    assert done == [1, 2, 3]  # race.json after each racer

    # no --gpus: one after another, here, on the default device
    serial = race.run_queue(racers, [None], lambda r, gpu: (gpu, threading.current_thread()), lambda so_far: None)
    assert serial == [(None, threading.main_thread())] * 3


def test_each_racers_processes_see_only_its_gpu(tmp_path, monkeypatch):
    """Its training, its --seconds probe and its final bpb: CUDA_VISIBLE_DEVICES names its GPU; --device_type and
    everything else as without --gpus."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "race" / "data").mkdir(parents=True)
    (tmp_path / "race" / "data" / "shard_00000.parquet").touch()
    cfg = race.RaceConfig(race_dir=str(tmp_path / "race"), peer=str(tmp_path / "peer"), device_type="cuda")
    for kind in race.KINDS:
        racer = race.Racer("r", kind, [])
        argv, env, cwd = race.command(cfg, racer, 10, 5, tmp_path / kind, gpu=3)
        default = race.command(cfg, racer, 10, 5, tmp_path / kind)
        assert env["CUDA_VISIBLE_DEVICES"] == "3" and "CUDA_VISIBLE_DEVICES" not in default[1]
        assert (argv, {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}, cwd) == default
        assert any(a in argv for a in ("--device_type=cuda", "--device-type=cuda"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # the race's own GPUs: GPU 1 is the machine's 5
    racer = race.Racer("r", "ours", [])
    assert race.command(cfg, racer, 10, 5, tmp_path, gpu=1)[1]["CUDA_VISIBLE_DEVICES"] == "5"
    seen = []

    def run_logged(argv, env, cwd, log, mirror=None):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        return OUR_LINES

    monkeypatch.setattr(race, "run_logged", run_logged)
    race.probe_steps(cfg, racer, tmp_path, gpu=2)
    race.final_bpb(cfg, racer, tmp_path, 2)
    assert seen == ["6", "6"]


def test_gpus_flag(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(race.torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match="--gpus all: no CUDA device .* leave --gpus out"):
        race.parse_gpus("all")
    assert race.parse_gpus("") == [None] and race.parse_gpus("0,1") == [0, 1]  # no CUDA: taken as given (CPU racers)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    with pytest.raises(SystemExit, match="GPU 2 is not among CUDA_VISIBLE_DEVICES='6,7'"):
        race.parse_gpus("0,2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(race.torch.cuda, "device_count", lambda: 4)
    assert race.parse_gpus("all") == [0, 1, 2, 3]
    for spec, said in (("0,4", "shows 4 CUDA devices"), ("1,1", "each GPU once"), ("0,x", "indices such as")):
        with pytest.raises(SystemExit, match=said):
            race.parse_gpus(spec)


@pytest.mark.parametrize("stopped", [False, True])
def test_a_failed_racer_is_reported_after_the_others(tmp_path, monkeypatch, capsys, stopped):
    """The race goes on past a failed racer: the table of the others (each with its GPU), race.json with the
    failure, its error and logs printed, and a non-zero exit. One stopped after evaluations (StoppedRacer) keeps a
    row: its time to the target along its curve so far (3.0 -> 2.1 over 8 s crosses the worst final, 2.2, at
    8 x 0.8 / 0.9 s), no final bpb."""
    for d in ("data", "tokenizer_ours"):
        (tmp_path / "race" / d).mkdir(parents=True)
    monkeypatch.setattr(race.torch.cuda, "device_count", lambda: 0)
    partial = {"name": "bad", "tok_per_s": 1.0, "mfu": None, "peak_memory_gib": None, "train_seconds": 8.0,
               "steps": 20, "steps_done": 8, "curve": [(0, 0.0, 3.0), (8, 8.0, 2.1)]}

    def run_racer(cfg, racer, out, work, gpu, data_tokens=None):
        if racer.name == "bad":
            message = f"['scripts.base_train'] failed (exit 1); its log: {work / 'bad' / 'train.log'}"
            raise race.StoppedRacer(message, {**partial, "gpu": gpu}) if stopped else SystemExit(message)
        bpb = 2.0 if racer.name == "a" else 2.2
        return {"name": racer.name, "tok_per_s": 1.0, "mfu": None, "peak_memory_gib": None, "train_seconds": 10.0,
                "final_bpb": bpb, "final_bpb_own": bpb, "own_minus_ours": 0.0, "gpu": gpu,
                "curve": [(0, 0.0, 3.0), (10, 10.0, bpb)]}

    monkeypatch.setattr(race, "run_racer", run_racer)
    monkeypatch.setattr(race, "plot", lambda *a: None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="1 of 3 racers failed: bad"):
        race.main([f"--race_dir={tmp_path / 'race'}", f"--out={out}", "--racers=a=ours:; bad=ours:; b=ours:",
                   "--gpus=0,1"])
    said = capsys.readouterr().out
    assert "[race] warning: racers side by side share this host's CPU" in said
    assert said.count("tokens.json") == 1 and "epochs unknown" in said  # no manifest: said once, not a failure
    assert said.count("= — epochs of the race data") == 3
    assert f"its log: {out / 'work' / 'bad' / 'train.log'}" in said and "[race] bad (GPU " in said
    table = [line for line in said.splitlines() if " | " in line and "GPU" in line]
    assert [line.split(" (GPU")[0] for line in table] == (["a", "bad", "b"] if stopped else ["a", "b"])
    written = json.loads((out / "race.json").read_text())
    assert [r["name"] for r in written["racers"]] == ["a", "b"] and written["failed"][0]["name"] == "bad"
    if stopped:
        # no final bpb (ours, own); lowest 2.1 at step 8; 7.1 s to the target, 8.0 s for racer a's curve
        assert table[1].endswith("(stopped at step 8 of 20) | 1 | — | — | 8.0 | — | — | — | 2.1000 @ 8 | 7.1 | "
                                 "0.889")
        row = [r for r in written["table"] if r["racer"] == "bad"][0]
        assert row["time_to_target_s"] == pytest.approx(8 * 0.8 / 0.9) and row["final_bpb"] is None
        assert written["failed"][0]["partial"]["steps_done"] == 8 and written["target_bpb"] == 2.2
    assert json.loads(said.strip().splitlines()[-1])["failed"] == ["bad"]


def test_finished_racers_are_not_run_again(tmp_path, monkeypatch):
    """A race cut off (a GPU call's time limit) goes on: racers whose result has the same settings are reused,
    a racer whose settings changed runs again."""
    racer = race.Racer("ours", "ours", [])
    cfg = race.RaceConfig(out=str(tmp_path), steps=3)
    work = tmp_path / "work" / "ours"
    work.mkdir(parents=True)
    (work / "result.json").write_text(json.dumps({"name": "ours", "steps": 3,
                                                  "settings": race.racer_settings(cfg, racer)}))
    monkeypatch.setattr(race, "run_logged", lambda *a, **k: pytest.fail("a finished racer ran again"))
    assert race.run_racer(cfg, racer, tmp_path, tmp_path / "work")["name"] == "ours"
    with pytest.raises(BaseException, match="ran again"):
        race.run_racer(race.RaceConfig(out=str(tmp_path), steps=4), racer, tmp_path, tmp_path / "work")


def test_our_racers_settings_name_the_flash_attention_4_they_ran_with(monkeypatch):
    """Staging FA4 on a warm machine changes our racers' attention kernels (auto picks it): a result from before
    must not stand in. The peer's code never uses FA4: its settings do not depend on it."""
    cfg = race.RaceConfig(steps=3)
    ours, peer = race.Racer("ours", "ours", []), race.Racer("nanochat", "nanochat", [])
    monkeypatch.setattr(race, "installed_version", lambda package: None)
    before = race.racer_settings(cfg, ours), race.racer_settings(cfg, peer)
    monkeypatch.setattr(race, "installed_version", lambda package: {"flash-attn-4": "4.0.0b36"}.get(package))
    assert (before[0]["flash_attn_4"], race.racer_settings(cfg, ours)["flash_attn_4"]) == (None, "4.0.0b36")
    assert race.racer_settings(cfg, peer) == before[1] and "flash_attn_4" not in before[1]


# Each trainer's lines: (steps done, ms) after a training step, (step, bpb) of an evaluation, peak memory GiB.
FORMATS = {
    "ours": (lambda done, ms: f"step {done:05d}/00006 | loss 4.0000 | lrm 1.000 | {ms} ms | 1,000 tok/s | MFU 40.0% | "
                              "mem 2.00 GiB",
             lambda step, bpb: f"step {step:05d} | val bpb {bpb:.4f}",
             lambda gib: json.dumps({"val_bpb": 1.5, "peak_memory_gib": gib, "graph_breaks": 11})),
    "nanochat": (lambda done, ms: f"step {done - 1:05d}/00006 (0.00%) | loss: 4.000 | lrm: 1.00 | dt: {ms}.00ms | "
                                  "tok/sec: 1,000 | bf16_mfu: 40.00 | epoch: 0 pq: 0 rg: 0 | total time: 0.00m",
                 lambda step, bpb: f"Step {step:05d} | Validation bpb: {bpb:.6f}",
                 lambda gib: f"Peak memory usage: {gib * 1024:.2f}MiB"),
}


def attempt_logs(kind: str) -> tuple[list[str], list[str]]:
    """A 6-step run cut off after step 5, its checkpoint at step 4, and the attempt resumed from step 4 (the peer
    evaluates the step it resumed from again; its first step compiles again)."""
    step, evaluation, memory = FORMATS[kind]
    first = [evaluation(0, 3.3), step(1, 45000), step(2, 1000), evaluation(2, 2.0), step(3, 1200), step(4, 1000),
             evaluation(4, 1.8), step(5, 7700)]
    second = [evaluation(4, 1.8)] if kind == "nanochat" else []
    second += [step(5, 30000), step(6, 1200), evaluation(6, 1.5), memory(2.5)]
    return first, second


@pytest.mark.parametrize("kind", ["ours", "nanochat"])
def test_attempts_merge_into_one_curve(kind):
    """Each step and evaluation once, from the attempt that ran it last; the resumed compile counts as the median."""
    first, second = attempt_logs(kind)
    merged = race.merge_attempts(kind, [(-1, first), (4, second)])
    assert merged["step_seconds"] == [45.0, 1.0, 1.2, 1.0, 30.0, 1.2]  # not step 5's 7.7 s of the first attempt
    assert merged["evals"] == [(0, 3.3), (2, 2.0), (4, 1.8), (6, 1.5)]
    assert len(merged["mfu"]) == 6 and merged["peak_memory_gib"] == 2.5 and merged["last_step"] == 6
    assert merged["graph_breaks"] == (11 if kind == "ours" else None)
    kept, compile_seconds = race.training_seconds(merged["step_seconds"])
    assert kept == [1.2, 1.0, 1.2, 1.0, 1.2, 1.2] and compile_seconds == pytest.approx(72.6)
    assert race.curve(merged["evals"], kept)[-1] == (6, pytest.approx(6.8), 1.5)
    cut_again = [FORMATS[kind][0](5, 30000)]  # an attempt cut off before its first checkpoint: superseded
    assert race.merge_attempts(kind, [(-1, first), (4, cut_again), (4, second)]) == merged
    assert race.merge_attempts(kind, [(-1, first)])["last_step"] == 5


def fake_checkpoint(kind: str, base, step: int, complete: bool = True) -> None:
    """The files each trainer writes for a checkpoint; an incomplete one as a save cut off midway leaves it."""
    if kind == "ours":  # written whole by a rename: cut off, only its temporary dir is there
        d = base / "checkpoints" / "base" / "r" / (f"step_{step:06d}" if complete else f".tmp_step_{step:06d}_1")
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
        torch.save({}, d / "model.safetensors")
        return
    d = base / "base_checkpoints" / "r"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"meta_{step:06d}.json").write_text("{}")
    for name in (f"model_{step:06d}.pt", f"optim_{step:06d}_rank0.pt"):
        torch.save({"w": torch.zeros(1000)}, d / name)
    if not complete:
        data = (d / f"optim_{step:06d}_rank0.pt").read_bytes()
        (d / f"optim_{step:06d}_rank0.pt").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["ours", "nanochat"])
def test_a_racer_cut_off_resumes_from_its_newest_checkpoint(tmp_path, monkeypatch, capsys, kind):
    racer, out = race.Racer("r", kind, []), tmp_path / "out"
    cfg = race.RaceConfig(out=str(out), steps=6, eval_points=3, save_every=2, peer=str(tmp_path / "peer"))
    work = out / "work" / "r"
    work.mkdir(parents=True)
    first, second = attempt_logs(kind)
    (work / "train.log").write_text("\n".join(first) + "\n")
    # started 61 s before now: a file's mtime comes from the kernel's coarse clock, up to a tick behind time.time(),
    # so each attempt's wall (its log's mtime - its start) can read a few ms short
    attempt = {"log": "train.log", "resume_from": -1, "started": time.time() - 61}
    record = {"settings": race.racer_settings(cfg, racer), "steps": 6, "eval_every": 2, "attempts": [attempt]}
    (work / "attempts.json").write_text(json.dumps(record))
    for step, complete in ((2, True), (4, True), (6, False)):
        fake_checkpoint(kind, work / "base", step, complete)
    runs = []

    def run_logged(argv, env, cwd, log, mirror=None):
        runs.append(argv)
        for path in (log, mirror):
            path.write_text("\n".join(second) + "\n")

    monkeypatch.setattr(race, "run_logged", run_logged)
    monkeypatch.setattr(race, "final_bpb", lambda *a: {"bpb": 1.4})
    result = race.run_racer(cfg, racer, out, out / "work")
    flags = ["--save_every=2", "--resume_from_step=4"] if kind == "ours" else ["--save-every=2", "--resume-from-step=4"]
    assert len(runs) == 1 and flags[0] in runs[0] and runs[0][-1] == flags[1]
    assert ("--keep_last=1" in runs[0]) == (kind == "ours")  # our trainer keeps only what a resume needs
    assert "[race] r: resuming from step 4 (attempt 2)" in capsys.readouterr().out
    assert [p[0] for p in result["curve"]] == [0, 2, 4, 6] and result["attempts"] == 2
    assert result["train_seconds"] == pytest.approx(6.8) and result["wall_seconds"] >= 60
    assert sorted(p.name for p in (out / "r").iterdir()) == ["train.attempt2.log", "train.log"]  # every attempt's
    assert race.newest_checkpoint(kind, work / "base", "r") is None  # deleted once the result was stored

    # killed after the final checkpoint (during the final bpb): not trained again; --keep_checkpoints keeps it
    (work / "result.json").unlink()
    fake_checkpoint(kind, work / "base", 6)
    kept = replace(cfg, keep_checkpoints=True)
    assert race.run_racer(kept, racer, out, out / "work")["curve"] == result["curve"] and len(runs) == 1
    assert "attempt 2 trained all 6 steps: on to the final bpb" in capsys.readouterr().out
    assert race.newest_checkpoint(kind, work / "base", "r") == 6

    # reasons to start over, each said
    settings = race.racer_settings(cfg, racer)
    assert race.earlier_run(racer, work, settings) == (json.loads((work / "attempts.json").read_text()), 6)
    assert race.earlier_run(racer, work, {**settings, "steps": 8}) == (None, -1)
    (work / "train.attempt2.log").write_text("")  # its lines lost
    assert race.earlier_run(racer, work, settings) == (None, -1)
    for d in (work / "base").glob("*checkpoints"):
        shutil.rmtree(d)
    assert race.earlier_run(racer, work, settings) == (None, -1)
    said = capsys.readouterr().out
    assert "an earlier attempt had other settings: starting over" in said
    assert "stop at step 4, before the checkpoint of step 6: starting over" in said
    assert "attempt 2 left no complete checkpoint" in said


@pytest.mark.parametrize("kind", ["ours", "nanochat"])
def test_a_trainer_that_fails_midway_leaves_its_curve_so_far(tmp_path, monkeypatch, kind):
    """S25's fp8 racer: its trainer failed at step 5 (a full disk), after evaluations at 2 and 4."""
    racer, out = race.Racer("r", kind, []), tmp_path / "out"
    cfg = race.RaceConfig(out=str(out), steps=6, eval_points=3, peer=str(tmp_path / "peer"))
    first, _ = attempt_logs(kind)

    def run_logged(argv, env, cwd, log, mirror=None):
        for path in (log, mirror):
            path.write_text("\n".join(first) + "\n")
        raise SystemExit(f"['scripts.base_train'] failed (exit 1); its log: {log}")

    monkeypatch.setattr(race, "run_logged", run_logged)
    with pytest.raises(race.StoppedRacer, match="failed \\(exit 1\\)") as e:
        race.run_racer(cfg, racer, out, out / "work")
    partial = e.value.partial
    assert partial["steps"] == 6 and partial["steps_done"] == 5 and partial["name"] == "r"
    # steps of 45 (compile), 1.0, 1.2, 1.0 and 7.7 s: the first and last count as the median, 1.2
    assert partial["curve"] == [(0, 0.0, 3.3), (2, pytest.approx(2.2), 2.0), (4, pytest.approx(4.4), 1.8)]
    first[:] = first[:2]  # started over, it fails after step 0's evaluation and one step: nothing to measure yet
    (out / "work" / "r" / "attempts.json").unlink()
    with pytest.raises(race.StoppedRacer) as e:
        race.run_racer(cfg, racer, out, out / "work")
    assert e.value.partial is None


class CutOff(Exception):
    """The call's time limit, as a test sees it: the racer's trainer killed, the race stopped."""


def cut_off_after(monkeypatch, tag: str, done: int) -> None:
    """Kill racer `tag`'s trainer once it has printed its step line for `done` steps, and stop the race."""
    real = subprocess.Popen

    def popen(argv, **kwargs):
        proc = real(argv, **kwargs)
        if "scripts.base_train" in argv and ({f"--model_tag={tag}", f"--model-tag={tag}"} & set(argv)):
            lines, marks = proc.stdout, (f"step {done:05d}/", f"step {done - 1:05d}/")  # ours, the peer
            kind_mark = marks[0] if f"--model_tag={tag}" in argv else marks[1]

            def cut():
                for line in lines:
                    yield line
                    if line.startswith(kind_mark):
                        proc.kill()
                        proc.wait()
                        raise CutOff(f"{tag} cut off after step {done}")
            proc.stdout = cut()
        return proc

    monkeypatch.setattr(race.subprocess, "Popen", popen)


PEER = os.environ.get("PEER", "")  # a checkout of karpathy/nanochat at 92d63d4 with its needs: runs the peer too


@pytest.mark.slow
@needs_shards
@pytest.mark.parametrize("kind", ["ours", pytest.param("nanochat", marks=pytest.mark.skipif(
    not PEER, reason="set PEER to a karpathy/nanochat checkout to race the peer on the CPU"))])
def test_a_cut_off_racer_resumes_and_ends_where_an_uncut_one_does(tmp_path, monkeypatch, capsys, kind):
    """Two racers of the same settings, the second cut off at step 12 (its checkpoint: step 10), then the race run
    again: the second resumes and its curve and final bpb match the first's."""
    args = ["--smoke", f"--out={tmp_path}", "--save_every=5", f"--racers=full={kind}; cut={kind}"]
    args += [f"--peer={PEER}"] if kind == "nanochat" else []
    with monkeypatch.context() as m:
        cut_off_after(m, "cut", done=12)
        with pytest.raises(CutOff):
            race.main(args)
    summary = race.main(args)
    said = capsys.readouterr().out
    assert "[race] full: finished earlier" in said and "[race] cut: resuming from step 10 (attempt 2)" in said
    full, cut = summary["racers"]
    assert full["attempts"] == 1 and cut["attempts"] == 2
    assert [p[0] for p in cut["curve"]] == [p[0] for p in full["curve"]] == list(range(0, 21, 2))
    # ours resumes exactly (weights, optimizer state, data position, schedule): on the CPU, without compilation, the
    # same bits so far; 1e-6 leaves room for float sums whose order may vary between runs. The peer's loader resumes
    # at the next row group (its "approximate resume"), other documents after step 10: close (0.004 seen), not equal
    tolerance = 1e-6 if kind == "ours" else 0.01
    assert [p[2] for p in cut["curve"]] == pytest.approx([p[2] for p in full["curve"]], abs=tolerance)
    assert cut["final_bpb"] == pytest.approx(full["final_bpb"], abs=tolerance)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["train.attempt2.log", "train.log"]


@needs_shards
@pytest.mark.skipif(not PEER, reason="set PEER to a karpathy/nanochat checkout to count through its own tokenizer")
def test_the_peers_own_tokenizer_reads_as_many_tokens_as_the_manifest_counts(tmp_path):
    """The manifest counts the peer's tokens through its unpickled tiktoken Encoding; its trainer's loader reads them
    through RustBPETokenizer.from_directory and encode(docs, prepend=bos): the same numbers on real text."""
    stream = iter(DocumentStream(list_shards(resolve_data_dir())[:1], loop=False))
    docs = [[next(stream)[:5000] for _ in range(40)], [next(stream)[:5000] for _ in range(30)]]
    ranks = Tokenizer.train_from_iterator(docs[0], vocab_size=600).mergeable_ranks()
    data, manifest = make_race_dir(tmp_path, docs, ranks)
    counted = race_data.update_manifest(data, manifest, {"nanochat": tmp_path / "tokenizer_nanochat"}, threads=2)
    script = ("import json, sys; import pyarrow.parquet as pq; from nanochat.tokenizer import RustBPETokenizer\n"
              "tok = RustBPETokenizer.from_directory(sys.argv[1])\n"
              "print(json.dumps({p: sum(map(len, tok.encode(pq.read_table(p).column('text').to_pylist(), "
              "prepend=tok.get_bos_token_id()))) for p in sys.argv[2:]}))")
    shards = sorted(str(p) for p in data.glob("*.parquet"))[:-1]
    peer = race_data.check_peer(PEER)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tokenizer_nanochat"), *shards], cwd=peer,
                         env=race_data.peer_env(peer, tmp_path / "peer_base"), capture_output=True, text=True,
                         check=True)
    theirs = {os.path.basename(p): n for p, n in json.loads(out.stdout.splitlines()[-1]).items()}
    assert counted["tokenizers"]["nanochat"]["train_tokens"] == theirs and min(theirs.values()) > 5000

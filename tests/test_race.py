"""benchmarks.race: the smoke race end to end on the CPU, and its log parsing, timing and target arithmetic."""
import json

import pytest

from benchmarks import race
from benchmarks.race_data import check_peer, split_text

PEER_LINES = [  # the public nanochat's own output format (scripts/base_train.py at 92d63d4)
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
    "step 00002 | val bpb 2.0000",
    "step 00003/00003 | loss 8.0000 | lrm 1.000 | 1200 ms | 436,906 tok/s | MFU 42.0% | mem 2.00 GiB",
    "step 00003 | val bpb 1.5000",
    json.dumps({"val_bpb": 1.5, "peak_memory_gib": 2.0}),
]


@pytest.mark.parametrize("kind,lines", [("nanochat", PEER_LINES), ("ours", OUR_LINES)])
def test_both_trainers_logs_give_the_same_curve(kind, lines):
    stats = race.parse_log(kind, lines)
    assert stats["step_seconds"] == [45.0, 1.0, 1.2] and stats["mfu"] == [1.2, 40.0, 42.0]
    assert stats["peak_memory_gib"] == 2.0
    kept, compile_seconds = race.training_seconds(stats["step_seconds"])
    assert kept == [1.2, 1.0, 1.2] and compile_seconds == pytest.approx(43.8)  # the compile step counts as the median
    points = race.curve(stats["evals"], kept)
    assert points == [(0, 0.0, 3.3), (2, 2.2, 2.0), (3, pytest.approx(3.4), 1.5)]


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
    with pytest.raises(SystemExit, match="needs --peer"):
        race.parse_racers("nanochat", with_peer=False)
    with pytest.raises(SystemExit, match="kind 'theirs'"):
        race.parse_racers("x=theirs:", with_peer=True)
    with pytest.raises(SystemExit, match="unique"):
        race.parse_racers("ours; ours", with_peer=False)
    with pytest.raises(SystemExit, match="git clone https://github.com/karpathy/nanochat"):
        check_peer(tmp_path)


def test_split_text_joins_back_and_cuts_at_lines():
    text = "First line of an article.\nSecond one, a bit longer. With two sentences.\n" * 5 + "x" * 130
    pieces = split_text(text, 100)
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:5])


@pytest.mark.slow
def test_smoke_race_writes_its_files(tmp_path):
    summary = race.main(["--smoke", f"--out={tmp_path}"])
    assert [r["name"] for r in summary["racers"]] == ["ours", "lr2"]
    for r in summary["racers"]:
        assert len(r["curve"]) >= 11 and r["steps"] == 20
        assert r["curve"][-1][2] < r["curve"][0][2]  # it learned
        assert abs(r["own_minus_ours"]) < 0.5
    assert summary["racers"][0]["final_bpb"] != summary["racers"][1]["final_bpb"]
    assert (tmp_path / "race.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "race.json").read_text())["target_bpb"] == summary["target_bpb"]
    assert (tmp_path / "ours" / "train.log").is_file() and (tmp_path / "work" / "ours" / "result.json").is_file()


def test_finished_racers_are_not_run_again(tmp_path, monkeypatch):
    """A race cut off (a GPU call's time limit) goes on: racers whose result has the same settings are reused,
    a racer whose settings changed runs again."""
    racer = race.Racer("ours", "ours", [])
    cfg = race.RaceConfig(out=str(tmp_path), steps=3)
    work = tmp_path / "work" / "ours"
    work.mkdir(parents=True)
    (work / "result.json").write_text(json.dumps({"name": "ours", "settings": race.racer_settings(cfg, racer)}))
    monkeypatch.setattr(race, "run_logged", lambda *a, **k: pytest.fail("a finished racer ran again"))
    assert race.run_racer(cfg, racer, tmp_path, tmp_path / "work")["name"] == "ours"
    with pytest.raises(BaseException, match="ran again"):
        race.run_racer(race.RaceConfig(out=str(tmp_path), steps=4), racer, tmp_path, tmp_path / "work")

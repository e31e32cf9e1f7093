"""nanochat.tracking: one log call reaches the report's training log, TensorBoard (real event files, read
back) and wandb (a stand-in module records the calls); a missing package stops the run with the fix."""
from __future__ import annotations

import json
import sys
import types

import pytest

from nanochat.tracking import Tracker


@pytest.fixture()
def report_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_REPORT_DIR", str(tmp_path / "report"))
    return tmp_path / "report"


def fake_wandb(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    class Run:
        summary: dict = {}

        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish", dict(self.summary)))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def test_training_log_and_tensorboard(report_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker("sft", config={"lr": 0.1}, tensorboard_dir=str(tmp_path / "tb"))
    for step in (1, 2, 3):
        tracker.log(step, loss=4.0 - step, lrm=1.0)
    tracker.finish({"val_loss": 0.5})

    rows = [json.loads(line) for line in (report_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["loss"]) for r in rows] == [("sft", 1, 3.0), ("sft", 2, 2.0), ("sft", 3, 1.0)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"sft/loss", "sft/lrm"}
    assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_wandb_gets_keyed_metrics_and_summary(report_dir, monkeypatch):
    calls = fake_wandb(monkeypatch)
    tracker = Tracker("rl", config={"lr": 0.1}, run="my-run")
    tracker.log(5, reward=0.25)
    tracker.finish({"steps": 5, "mean_reward": 0.25, "device": "cpu", "val": float("nan")})
    assert calls[0] == ("init", {"project": "nanochat", "name": "my-run", "config": {"lr": 0.1}, "job_type": "rl"})
    assert calls[1] == ("log", {"rl/reward": 0.25}, 5)
    assert calls[2] == ("finish", {"steps": 5, "mean_reward": 0.25})


def test_only_rank_zero_writes(report_dir, monkeypatch):
    calls = fake_wandb(monkeypatch)
    monkeypatch.setattr("nanochat.tracking.get_rank", lambda: 1)
    monkeypatch.setattr("nanochat.report.get_rank", lambda: 1)
    tracker = Tracker("sft", run="my-run")
    tracker.log(1, loss=1.0)
    tracker.finish({})
    assert calls == [] and not (report_dir / "train_log.jsonl").exists()


@pytest.mark.parametrize("package,kwargs,fix", [("wandb", {"run": "x"}, "pip install wandb"),
                                                ("tensorboard", {"tensorboard_dir": "tb"}, "pip install tensorboard")])
def test_missing_package_names_the_flag_and_the_fix(report_dir, monkeypatch, package, kwargs, fix):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(RuntimeError, match=fix) as err:
        Tracker("base", **kwargs)
    assert ("--run" if package == "wandb" else "--tensorboard") in str(err.value)

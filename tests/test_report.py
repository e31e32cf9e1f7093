"""Report card assembly from synthetic sections and a synthetic training log."""
from __future__ import annotations

import json

import pytest

from nanochat import report


@pytest.fixture()
def report_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOCHAT_REPORT_DIR", raising=False)
    return tmp_path / "report"


def test_sections_table_png_and_cost(report_dir):
    report.write_section("base_train", {"phase": "base", "wall_time_s": 7200, "num_gpus": 8,
                                        "config": {"depth": 20}, "metrics": {}})
    report.write_section("base_eval", {"metrics": {"CORE": 0.2219}, "wall_time_s": 360, "num_gpus": 8})
    report.write_section("chat_eval_sft", {"metrics": {"ARC-Easy": 0.3876, "MMLU": 0.3151, "GSM8K": 0.0455,
                                                       "ChatCORE": 0.0884}})
    report.write_section("chat_eval_rl", {"metrics": {"GSM8K": 0.0758}, "wall_time_s": 1800, "num_gpus": 8})
    for step in range(0, 100, 10):
        report.log_metrics("base", step, loss=4.0 - step / 50, lr=0.02)
        report.log_metrics("sft", step, loss=2.0 - step / 200)
    report.log_metrics("base", 100, val_bpb=0.95)

    section = json.loads((report_dir / "base_eval.json").read_text())
    assert section["data"]["metrics"]["CORE"] == 0.2219
    assert {"gpu", "torch", "git_commit", "timestamp"} <= set(section["environment"])

    path = report.assemble()
    text = path.read_text()
    assert "| Metric | BASE | SFT | RL |" in text
    assert "| CORE | 0.2219 | - | - |" in text
    assert "| GSM8K | - | 0.0455 | 0.0758 |" in text
    assert "| ChatCORE | - | 0.0884 | - |" in text and "| HumanEval | - | - | - |" in text
    hours = (7200 + 360 + 1800) / 3600
    assert f"GPU hours: {hours * 8:.2f}" in text and f"wall time: {hours:.2f} h" in text
    png = report_dir / "loss_curves.png"
    assert "![loss curves](loss_curves.png)" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert report.reset() >= 6
    assert not list(report_dir.glob("*.json")) and not (report_dir / "train_log.jsonl").exists()
    assert "| CORE | - | - | - |" in report.assemble().read_text()


def test_main_cli(report_dir, capsys):
    report.write_section("sft_eval", {"phase": "sft", "metrics": {"MMLU": 0.3}})
    report.main([])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["metrics"]["MMLU"] == {"sft": 0.3}
    report.main(["reset"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["removed"] >= 1
    with pytest.raises(SystemExit):
        report.main(["bogus"])


def test_bad_section_names(report_dir):
    with pytest.raises(ValueError):
        report.write_section("../escape", {})
    with pytest.raises(TypeError):
        report.write_section("ok", [1, 2])


def test_cpu_runs_cost_no_gpu_hours(report_dir, monkeypatch):
    monkeypatch.setattr(report, "environment", lambda: {"gpu": "cpu", "gpu_count": 0, "torch": "x",
                                                          "git_commit": "x", "timestamp": "x"})
    report.write_section("base_train", {"phase": "base", "total_seconds": 3600, "world_size": 1, "metrics": {}})
    text = report.assemble().read_text()
    assert "GPU hours: 0.00" in text and "wall time: 1.00 h" in text


def test_val_bpb_row_and_precision_line(report_dir):
    report.write_section("base_train", {"val_bpb": 1.234, "precision": "fp8", "metrics": {}})  # base_train's layout
    report.write_section("chat_sft", {"phase": "sft", "val_bpb": float("nan"), "precision": "bf16"})
    report.write_section("chat_eval_sft", {"metrics": {"MMLU": 0.3}, "precision": "bf16"})
    text = report.assemble().read_text()
    assert "| val bpb | 1.2340 | - | - |" in text  # NaN (never evaluated) stays out
    assert "- precision: fp8 (base_train); bf16 (chat_sft, chat_eval_sft)" in text
    report.write_section("base_eval", {"metrics": {"CORE": 0.1, "val_bpb": 1.1}})  # later sections win
    assert "| val bpb | 1.1000 | - | - |" in report.assemble().read_text()


def test_each_stage_has_its_own_axes(report_dir):
    for step in range(0, 400, 50):
        report.log_metrics("base", step, loss=9.0 - step / 100, lrm=1.0)
    report.log_metrics("base", 400, val_bpb=1.6)
    for step in range(10):
        report.log_metrics("sft", step, loss=1.5 - step / 100, val_loss=1.4)
    series = report.curve_series(report_dir / "train_log.jsonl")
    assert set(series) == {"base", "sft"} and set(series["base"]) == {"loss", "val_bpb"}  # lrm is no curve
    fig = report.curves_figure(series)
    assert [ax.get_title() for ax in fig.axes] == ["base", "sft"]
    assert len(fig.axes[1].get_lines()) == 2 and fig.axes[1].get_xlim()[1] < 20  # sft's steps, not base's

"""The report card: every stage writes a section, `python -m nanochat.report` assembles report.md.

    from nanochat.report import write_section, log_metrics
    log_metrics("base", step, loss=2.91, val_bpb=0.98)          # training loops, appended per log step
    write_section("base_eval", {"phase": "base", "metrics": {"CORE": 0.22}, "wall_time_s": 812, "num_gpus": 8})

Sections are JSON files `<base>/report/<name>.json` holding the stage's data plus the environment
(GPU, torch, git commit, time). A section's "phase" ("base" | "sft" | "rl"; else taken from the
name's prefix) and its "metrics" (and a top-level "val_bpb") fill the BASE / SFT / RL columns of the table;
"precision" says what it ran at; "wall_time_s" (or "total_seconds") times "num_gpus" (or "world_size") adds up
to the GPU hours of the cost line. `train_log.jsonl` feeds the loss curves, one plot per stage.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

from nanochat.common import get_base_dir, get_rank

TABLE_ROWS = ("val_bpb", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")
ROW_LABELS = {"val_bpb": "val bpb"}
TOP_LEVEL_METRICS = ("val_bpb",)  # read from a section's top level too (base_train reports it there)
PHASES = ("base", "sft", "rl")
TRAIN_LOG = "train_log.jsonl"
CURVES_PNG = "loss_curves.png"


def report_dir() -> Path:
    path = Path(os.environ.get("NANOCHAT_REPORT_DIR") or get_base_dir() / "report")
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Where a stage ran: GPU names and count, torch/python versions, git commit, time."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "hostname": platform.node(),
            "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": gpus[0] if gpus else "none", "gpu_count": len(gpus), "git_commit": git_commit()}


def write_section(name: str, data: dict) -> Path | None:
    """Write (or overwrite) one stage's section; a no-op on ranks other than 0."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"section name {name!r} must be a plain file name like 'base_eval'")
    if not isinstance(data, dict):
        raise TypeError(f"section data must be a dict, got {type(data).__name__}")
    if get_rank() != 0:
        return None
    path = report_dir() / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"name": name, "data": data, "environment": environment()}, indent=2, default=str))
    os.replace(tmp, path)
    return path


def log_metrics(stage: str, step: int, **metrics) -> None:
    """Append one line of training metrics (rank 0 only) for the loss curves."""
    if get_rank() != 0:
        return
    row = {"stage": stage, "step": int(step), "time": dt.datetime.now().isoformat(timespec="seconds"), **metrics}
    with open(report_dir() / TRAIN_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_sections(directory: Path) -> list[dict]:
    sections = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            sections.append(json.loads(path.read_text()))
        except ValueError as e:
            raise ValueError(f"report section {path} is not valid JSON ({e}); delete it or rerun its stage") from e
    return sections


def section_phase(section: dict) -> str | None:
    phase = section["data"].get("phase")
    if phase in PHASES:
        return phase
    name = section["name"]
    for candidate in PHASES:
        if name.startswith(candidate + "_") or name == candidate or name.endswith("_" + candidate):
            return candidate
    return None


def metrics_table(sections: list[dict]) -> dict[str, dict[str, float]]:
    """{row: {phase: value}}; later sections overwrite earlier ones; NaN (not evaluated) is left out."""
    table: dict[str, dict[str, float]] = {row: {} for row in TABLE_ROWS}
    for section in sections:
        phase = section_phase(section)
        data = section["data"]
        values = {**{k: data[k] for k in TOP_LEVEL_METRICS if k in data}, **(data.get("metrics") or {})}
        for key, value in values.items():
            if phase and key in table and isinstance(value, (int, float)) and math.isfinite(value):
                table[key][phase] = float(value)
    return table


def precisions(sections: list[dict]) -> dict[str, list[str]]:
    """{precision: [section names]} of the sections that report the precision they ran at."""
    out: dict[str, list[str]] = {}
    for section in sections:
        precision = section["data"].get("precision")
        if precision:
            out.setdefault(str(precision), []).append(section["name"])
    return out


def gpu_hours(sections: list[dict]) -> tuple[float, float]:
    """(total wall hours, GPU hours) over the sections that report wall_time_s."""
    wall = gpu = 0.0
    for section in sections:
        data = section["data"]
        seconds = data.get("wall_time_s", data.get("total_seconds"))
        if isinstance(seconds, (int, float)):
            on_gpu = bool(section["environment"].get("gpu_count"))  # a CPU run costs no GPU hours
            count = data.get("num_gpus") or ((data.get("world_size") or 1) if on_gpu else 0)
            wall += seconds / 3600
            gpu += seconds / 3600 * count
    return wall, gpu


def curve_series(log_path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{stage: {metric: [(step, value), ...]}} of the loss and bpb metrics in the training log."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for line in log_path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for key, value in row.items():
            if key in ("stage", "step", "time") or not isinstance(value, (int, float)):
                continue
            if "loss" in key or "bpb" in key:
                series.setdefault(row["stage"], {}).setdefault(key, []).append((row["step"], value))
    return series


def curves_figure(series: dict[str, dict[str, list[tuple[int, float]]]]):
    """One axes per stage, side by side: base pretraining and SFT run for different numbers of steps at
    different loss levels, so on shared axes one squashes the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in PHASES if s in series] + sorted(set(series) - set(PHASES))
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for key, points in sorted(series[stage].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("loss / bpb")
    fig.tight_layout()
    return fig


def plot_curves(log_path: Path, out_path: Path) -> Path | None:
    """The loss curves PNG (see curves_figure); None when there is no log or nothing to plot."""
    if not log_path.is_file():
        return None
    series = curve_series(log_path)
    if not series:
        return None
    import matplotlib.pyplot as plt

    fig = curves_figure(series)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def assemble(directory: Path | None = None) -> Path:
    """Write report.md (and loss_curves.png) from the sections in the report dir."""
    directory = Path(directory) if directory else report_dir()
    sections = read_sections(directory)
    lines = ["# nanochat report card", ""]
    env = sections[-1]["environment"] if sections else environment()
    lines += [f"- generated: {dt.datetime.now().isoformat(timespec='seconds')}",
              f"- git commit: {env.get('git_commit')}",
              f"- GPU: {env.get('gpu')} x {env.get('gpu_count')}",
              f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), Python {env.get('python')}"]
    ran_at = precisions(sections)
    lines += ["- precision: " + ("; ".join(f"{p} ({', '.join(names)})" for p, names in ran_at.items())
                                 if ran_at else "not recorded by any stage"), ""]
    table = metrics_table(sections)
    lines += ["## Metrics", "", "| Metric | BASE | SFT | RL |", "| --- | --- | --- | --- |"]
    for row in TABLE_ROWS:
        cells = [_fmt(table[row][p]) if p in table[row] else "-" for p in PHASES]
        lines.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells) + " |")
    wall, gpu = gpu_hours(sections)
    lines += ["", "## Cost", "", f"- wall time: {wall:.2f} h", f"- GPU hours: {gpu:.2f}", ""]
    png = plot_curves(directory / TRAIN_LOG, directory / CURVES_PNG)
    if png:
        lines += ["## Loss curves", "", f"![loss curves]({png.name})", ""]
    for section in sections:
        lines += [f"## {section['name']}", "", f"_{section['environment'].get('timestamp')}_", ""]
        for key, value in section["data"].items():
            if isinstance(value, dict):
                lines.append(f"- {key}:")
                lines += [f"  - {k}: {_fmt(v)}" for k, v in value.items()]
            else:
                lines.append(f"- {key}: {_fmt(value)}")
        lines.append("")
    out = directory / "report.md"
    out.write_text("\n".join(lines))
    return out


def reset(directory: Path | None = None) -> int:
    """Delete the sections, the training log and the assembled report; returns the files removed."""
    directory = Path(directory) if directory else report_dir()
    removed = 0
    for path in list(directory.glob("*.json")) + [directory / n for n in (TRAIN_LOG, CURVES_PNG, "report.md")]:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m nanochat.report [generate|reset]  (generate: assemble report.md, the default)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if argv and argv[0] not in ("reset", "generate"):
        raise SystemExit(f"{usage}; got {argv[0]!r}")
    if argv and argv[0] == "reset":
        print(json.dumps({"reset": True, "removed": reset(), "dir": str(report_dir())}))
        return
    path = assemble()
    print(path.read_text())
    table = metrics_table(read_sections(path.parent))
    print(json.dumps({"report": str(path), "metrics": table}))


if __name__ == "__main__":
    main()

"""Benchmark matrix: architecture x loss kernel x attention x precision x shape -> tok/s, memory, MFU, audit.

    python -m scripts.bench --depth 20 --device_batch_size 8,32 --max_seq_len 1024,2048 \\
        --kernel torch,liger,cce,triton --attn auto --precision bf16,fp8

Each combination runs in its own subprocess (`scripts.profile_kernels` in timing mode: real compiled
training steps, forward + backward + optimizer, then a profiled step), so an OOM or a crash marks that
row and the table goes on. Every row carries the kernel audit: which attention, loss and matmul kernels
ran, the share of quantize/transpose kernels, and a flag when the expected kernels did not run.
Outputs: a markdown table (printed and saved), JSON, and a PNG bar chart under --out_dir.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from nanochat.build import BuildConfig
from nanochat.common import get_base_dir
from nanochat.flags import parse_flags, redeclare, to_argv
from nanochat.runtime import setup_torch_env
from scripts.profile_kernels import ProfileConfig


AXES = ("arch", "kernel", "attn", "precision", "depth", "device_batch_size", "max_seq_len", "window_pattern",
        "recompute", "compile_mode", "inductor", "muon_compile",
        "fp8_recipe")  # the flags that take a list: a row per combination


@dataclass
class BenchConfig(BuildConfig):
    """Every flag of nanochat.build.BuildConfig reaches each row's scripts.profile_kernels; those in AXES are
    lists here, and the rows are their combinations."""
    arch: list[str] = redeclare(BuildConfig, "arch", ["gpt"])
    kernel: list[str] = redeclare(BuildConfig, "kernel", ["torch"])
    attn: list[str] = redeclare(BuildConfig, "attn", ["auto"])
    precision: list[str] = redeclare(BuildConfig, "precision", ["bf16"])
    depth: list[int] = redeclare(BuildConfig, "depth", [20])
    device_batch_size: list[int] = field(default_factory=lambda: [32], metadata={"help": "rows per micro-batch"})
    max_seq_len: list[int] = redeclare(BuildConfig, "max_seq_len", [2048], "context lengths")
    window_pattern: list[str] = redeclare(BuildConfig, "window_pattern", ["L"])
    recompute: list[str] = redeclare(BuildConfig, "recompute", ["none"])
    compile_mode: list[str] = redeclare(BuildConfig, "compile_mode", ["default"])
    inductor: list[str] = field(default_factory=lambda: ["default"], metadata={
        "help": "torch._inductor.config settings per row, KEY=VALUE;KEY=VALUE (default: none), e.g. "
                "default,triton.prefer_nd_tiling=True"})
    muon_compile: list[bool | None] = redeclare(BuildConfig, "muon_compile", [None], "torch.compile Muon's update: "
                                                 "true, false or none (on for CUDA), e.g. true,false for both rows")
    fp8_recipe: list[str] = redeclare(BuildConfig, "fp8_recipe", ["tensorwise"])
    total_batch_size: int = field(default=-1, metadata={"help": "tokens per optimizer step (-1: one micro-batch)"})
    vocab_size: int = field(default=32768, metadata={"help": "vocabulary size of the synthetic model"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (compilation, autotuning)"})
    steps: int = field(default=10, metadata={"help": "timed steps per row (median reported)"})
    baseline: int = field(default=0, metadata={"help": "row index that speedups are relative to"})
    timeout: int = field(default=900, metadata={"help": "seconds per row before it is marked as a timeout"})
    out_dir: str = field(default="", metadata={"help": "where the results go (default <base_dir>/bench/<timestamp>)"})
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    doc_len: int = redeclare(ProfileConfig, "doc_len", 0)


def row_argv(cfg: BenchConfig, combo: dict) -> list[str]:
    """scripts.profile_kernels' flags for one row: the combination, BuildConfig's other flags as given here,
    and timing mode (`steps` timed steps, one profiled step, the expected kernels checked)."""
    tokens = combo["device_batch_size"] * combo["max_seq_len"]
    accum = max(1, cfg.total_batch_size // tokens) if cfg.total_batch_size > 0 else 1
    combo = {"fp8_recipe": cfg.fp8_recipe[0], **combo}
    shared = [f.name for f in fields(BuildConfig) if f.name not in AXES]
    return [f"--{k}={v}" for k, v in combo.items()] + to_argv(cfg, shared) + [
        f"--vocab_size={cfg.vocab_size}", f"--warmup={cfg.warmup}", f"--timed_steps={cfg.steps}",
        f"--grad_accum={accum}", f"--device_type={cfg.device_type}", f"--doc_len={cfg.doc_len}", "--steps=1",
        "--expect_auto"]


def failure_reason(stderr: str, returncode: int) -> str:
    """A one-line reason for a crashed row: OOM, else the last exception line, else the exit code."""
    lines = stderr.strip().splitlines()
    if any("OutOfMemory" in ln or "out of memory" in ln for ln in lines):
        return "OOM"
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return (errors or lines or [f"exit {returncode}"])[-1].strip()[:160]


def run_row(cfg: BenchConfig, combo: dict, log_path: Path) -> dict:
    """One combination in a fresh process; its last stdout line is the JSON result, its log is kept."""
    cmd = [sys.executable, "-m", "scripts.profile_kernels", *row_argv(cfg, combo)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout)
    except subprocess.TimeoutExpired as exc:
        log_path.write_text(f"$ {' '.join(cmd)}\n{exc.stdout or ''}\n{exc.stderr or ''}")
        return {**combo, "status": f"timeout after {cfg.timeout}s"}
    wall = time.time() - t0
    log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return {**combo, "status": failure_reason(proc.stderr, proc.returncode), "wall_s": wall}
    result = json.loads(lines[-1])
    status = "ok" if not result.get("expect_failures") else "FLAGGED: " + "; ".join(result["expect_failures"])[:200]
    return {**combo, **result.get("timing", {}), "groups": result.get("groups", {}), "top": result.get("top", []),
            "kernels_ran": result.get("kernels_ran", {}), "status": status, "wall_s": wall}


def state_and_rest(mem: dict | None) -> str:
    """Peak memory split into what training state holds (weights, grads, optimizer) and the rest."""
    if not mem:
        return "-"
    return f"{mem['weights'] + mem['grads'] + mem['optimizer']:.1f} / {mem['rest']:.1f}"


def compile_label(row: dict) -> str:
    """The compile mode, plus the row's inductor settings and Muon's update (compiled or eager) when it sets them."""
    extra = row.get("inductor", "default")
    muon = muon_label(row)
    return row["compile_mode"] + ("" if extra == "default" else f" + {extra}") + ("" if not muon else f" + {muon}")


def muon_label(row: dict) -> str:
    """How the row ran Muon's update when set (--muon_compile true or false), else "" (the default: compiled on
    CUDA)."""
    return {True: "muon compiled", False: "muon eager"}.get(row.get("muon_compile"), "")


def precision_label(row: dict) -> str:
    """The precision, and for fp8 its recipe."""
    return row["precision"] + (f" {row['fp8_recipe']}" if row["precision"] == "fp8" else "")


def bench_combos(axes: dict[str, list]) -> list[dict]:
    """Every combination of the axes, in order; the fp8 recipe varies only in fp8 rows."""
    combos = []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        if combo["precision"] != "fp8":
            combo["fp8_recipe"] = axes["fp8_recipe"][0]
        if combo not in combos:
            combos.append(combo)
    return combos


def format_table(rows: list[dict], baseline: int) -> str:
    base = rows[baseline].get("tok_per_s") if 0 <= baseline < len(rows) else None
    head = ("| arch | kernel | attn | prec | depth | B | T | win | recompute | compile | tok/s | step ms | peak GiB "
            "| state / rest GiB | MFU | vs base | compile s | attention ran | loss ran | matmul ran | quant % | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tps = r.get("tok_per_s")
        ran = r.get("kernels_ran", {})
        cells = [r["arch"], r["kernel"], r["attn"], precision_label(r), r["depth"], r["device_batch_size"],
                 r["max_seq_len"], r["window_pattern"], r["recompute"], compile_label(r),
                 f"{tps:,.0f}" if tps else "-", f"{r['step_ms']:.1f}" if tps else "-",
                 f"{r['peak_memory_gib']:.2f}" if tps else "-", state_and_rest(r.get("memory_gib")),
                 f"{100 * r['mfu']:.1f}%" if tps and r.get("mfu") else "n/a",
                 f"{tps / base:.2f}x" if tps and base else "-",
                 f"{r['compile_seconds']:.0f}" if tps else "-",
                 ran.get("attention", "-"), ran.get("loss", "-"), ran.get("matmul", "-"),
                 f"{100 * r['groups'].get('quantize/transpose', 0):.1f}" if r.get("groups") else "-",
                 r["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['arch']}/{r['kernel']}/{r['attn']}/{precision_label(r)}\nd{r['depth']} B{r['device_batch_size']} "
              f"T{r['max_seq_len']} {r['window_pattern']}" + ("" if r["recompute"] == "none" else f" {r['recompute']}")
              + ("" if r["compile_mode"] == "default" else " autotune")
              + ("" if r.get("inductor", "default") == "default" else f"\n{r['inductor']}")
              + ("" if not muon_label(r) else f"\n{muon_label(r)}") for r in rows]
    values = [r.get("tok_per_s") or 0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    bars = ax.bar(range(len(rows)), values, color=["tab:blue" if r["status"] == "ok" else "tab:red" for r in rows])
    for bar, r in zip(bars, rows):
        if r.get("peak_memory_gib"):
            ax.annotate(f"{r['peak_memory_gib']:.1f} GiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("tokens / s (median)")
    ax.set_title("nanochat training throughput (red: failed or flagged)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(BenchConfig, argv, description=__doc__.split("\n")[0])
    env = setup_torch_env()  # children inherit the persistent compile cache
    out_dir = Path(cfg.out_dir) if cfg.out_dir else get_base_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    combos = bench_combos({axis: getattr(cfg, axis) for axis in AXES})
    rows = []
    for i, combo in enumerate(combos):
        print(f"[{i + 1}/{len(combos)}] {combo}", flush=True)
        row = run_row(cfg, combo, out_dir / f"row{i}.log")
        print(f"    -> {row.get('tok_per_s', 0) or 0:,.0f} tok/s, {row['status']}", flush=True)
        rows.append(row)
    table = format_table(rows, cfg.baseline)
    (out_dir / "bench.md").write_text(table + "\n")
    result = {"config": asdict(cfg), "env": env, "rows": rows, "out_dir": str(out_dir)}
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1))
    try:
        plot(rows, out_dir / "bench.png")
    except ImportError:
        print("bench: matplotlib missing, no PNG (pip install 'nanochat[plot]')")
    print(table)
    print(json.dumps({"out_dir": str(out_dir), "rows": [
        {k: r.get(k) for k in ("kernel", "attn", "precision", "fp8_recipe", "device_batch_size", "max_seq_len",
                               "window_pattern", "recompute", "compile_mode", "inductor", "muon_compile", "tok_per_s",
                               "peak_memory_gib", "mfu", "status")}
        for r in rows]}))
    return result


if __name__ == "__main__":
    main()

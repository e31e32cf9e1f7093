"""The end-to-end shell runs: syntax, the stage-skipping helpers, and that every python command the
runs issue parses through its script's flags (a shim `python`/`torchrun` records the commands; no
training happens)."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.flags import build_parser

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["runs/lib.sh", "runs/cpu.sh", "runs/speedrun.sh", "benchmarks/h200_speedrun.sh", "benchmarks/h200.sh",
           "benchmarks/prepare_carry.sh", "benchmarks/regression_gpu.sh", "benchmarks/run_part.sh"]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
    out = subprocess.run([BASH, "-n", str(REPO / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def lib(snippet: str, report_dir: Path) -> subprocess.CompletedProcess:
    """Run `snippet` in bash after sourcing runs/lib.sh."""
    return subprocess.run([BASH, "-c", f"source runs/lib.sh; {snippet}"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "REPORT_DIR": str(report_dir)})


def make_step(ckpt: Path, step: int, complete: bool = True) -> Path:
    d = ckpt / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


def write_section(report: Path, name: str, tag: str) -> None:
    report.mkdir(parents=True, exist_ok=True)
    (report / f"{name}.json").write_text(json.dumps({"name": name, "data": {"config": {"model_tag": tag}}}, indent=2))


def test_latest_step_ignores_incomplete_and_temporary_dirs(tmp_path):
    ckpt, report = tmp_path / "ckpt", tmp_path / "report"
    assert lib(f"latest_step {ckpt}", report).stdout == ""  # missing dir
    ckpt.mkdir()
    assert lib(f"latest_step {ckpt}", report).stdout == ""  # empty dir
    make_step(ckpt, 9)
    make_step(ckpt, 120)
    make_step(ckpt, 300, complete=False)                    # no meta.json: a save that never finished
    make_step(ckpt, 500).rename(ckpt / "step_final")         # not a step number
    (ckpt / ".tmp_step_000400_123").mkdir()                 # a save in progress
    (ckpt / ".tmp_step_000400_123" / "meta.json").write_text("{}")
    assert lib(f"latest_step {ckpt}", report).stdout.strip() == "120"
    assert lib(f"resume_flag {ckpt}", report).stdout.strip() == "--resume_from_step=120"
    assert lib(f"resume_flag {tmp_path / 'none'}", report).stdout.strip() == ""


def test_stage_done_needs_checkpoint_and_section_for_the_tag(tmp_path):
    ckpt, report = tmp_path / "ckpt", tmp_path / "report"
    check = f"stage_done {ckpt} base_train cpu_d4 && echo yes || echo no"
    assert lib(check, report).stdout.strip() == "no"
    make_step(ckpt, 5, complete=False)
    write_section(report, "base_train", "cpu_d4")
    assert lib(check, report).stdout.strip() == "no"        # section, but no complete checkpoint
    make_step(ckpt, 10)
    assert lib(check, report).stdout.strip() == "yes"
    write_section(report, "base_train", "other_tag")         # the section of another run
    assert lib(check, report).stdout.strip() == "no"
    (report / "base_train.json").unlink()                    # a run that stopped after a periodic save
    assert lib(check, report).stdout.strip() == "no"
    write_section(report, "base_eval", "cpu_d4")
    assert lib("section_done base_eval cpu_d4 && echo yes", report).stdout.strip() == "yes"
    assert lib("section_done base_eval cpu_d4x || echo no", report).stdout.strip() == "no"


def test_tokenizer_done(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    assert lib(f"tokenizer_done {tok} && echo yes || echo no", tmp_path).stdout.strip() == "no"
    (tok / "tokenizer.tiktoken").write_text("")
    assert lib(f"tokenizer_done {tok} && echo yes || echo no", tmp_path).stdout.strip() == "yes"


def test_pick_data_dir_order(tmp_path):
    """$DATA_DIR, else the shared dev shards (unless refused), else <base>/base_data once it holds n shards."""
    base = tmp_path / "base"
    (base / "base_data").mkdir(parents=True)
    for i in range(2):
        (base / "base_data" / f"shard_{i:05d}.parquet").write_bytes(b"x")
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}

    def pick(args: str, **extra: str) -> str:
        return subprocess.run([BASH, "-c", f"source runs/lib.sh; pick_data_dir {args}"], cwd=REPO,
                              capture_output=True, text=True, env={**env, **extra}).stdout.strip()

    assert pick(f"{base} 2 0") == f"{base}/base_data"          # no download: the 2 shards are there
    assert pick(f"{base} 2 0", DATA_DIR="/some/dir") == "/some/dir"
    if (REPO.parent / "shared" / "data" / "pretrain").is_dir():
        assert pick(f"{base} 2") == "../shared/data/pretrain"


# --- the commands the runs issue parse through the scripts' flag dataclasses -----------------------

SHIM = """#!/usr/bin/env bash
# records its argv (as JSON) instead of running; the report stage gets an empty report.md
"{real}" -c 'import json, sys; open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + "\\n")' "$SHIM_LOG" "$(basename "$0")" "$@"
if [ "${{1:-}} ${{2:-}}" = "-m nanochat.report" ]; then mkdir -p "$NANOCHAT_REPORT_DIR"; : > "$NANOCHAT_REPORT_DIR/report.md"; fi
exit 0
"""


CONFIG_CLASSES = {
    "scripts.tok_train": "TrainConfig", "scripts.base_train": "TrainConfig", "scripts.base_eval": "BaseEvalConfig",
    "scripts.chat_sft": "SFTConfig", "scripts.chat_eval": "ChatEvalConfig", "scripts.chat_rl": "RLConfig",
    "scripts.bench": "BenchConfig", "scripts.infer_bench": "BenchConfig", "scripts.chat_web": "WebConfig",
    "benchmarks.bench_loss": "BenchConfig", "benchmarks.bench_attention": "BenchConfig",
    "benchmarks.check_kernels": "CheckConfig", "benchmarks.web_load": "LoadConfig",
    "benchmarks.check_train_grads": "CheckConfig", "benchmarks.bench_decode_attention": "BenchConfig",
    "scripts.profile_kernels": "ProfileConfig", "benchmarks.gpu_clocks": "ClockConfig",
    "benchmarks.bench_fp8_cast": "CastConfig", "benchmarks.bench_decode_matmul": "MatmulConfig",
}
NOT_OURS = {"nanochat.report", "nanochat.data.download", "pytest", "pip"}  # no flags dataclass to check against


def config_class(module: str):
    return getattr(importlib.import_module(module), CONFIG_CLASSES[module])


def record_commands(tmp_path: Path, script: str, env: dict, args: tuple[str, ...] = ()) -> list[list[str]]:
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("python", "python3", "torchrun", "curl", "nvidia-smi"):
        (shims / name).write_text(SHIM.format(real=sys.executable))
        (shims / name).chmod(0o755)
    (tmp_path / "data").mkdir()
    for sub in ("eval/core", "sft"):
        (tmp_path / "evaldata" / sub).mkdir(parents=True)
    log = tmp_path / "commands.jsonl"
    full_env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SHIM_LOG": str(log),
                "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "DATA_DIR": str(tmp_path / "data"),
                "NANOCHAT_EVAL_DATA": str(tmp_path / "evaldata"), "RL": "1", **env}
    for key in ("PYTHON", "NANOCHAT_REPORT_DIR", "TAG", "NPROC", "STOP_AFTER", "LOG_DIR"):
        if key not in env:
            full_env.pop(key, None)  # the caller's own settings would change what the run does
    out = subprocess.run([BASH, script, *args], cwd=REPO, capture_output=True, text=True, env=full_env, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def check_commands(commands: list[list[str]]) -> set[str]:
    """Parse every recorded `-m scripts.X` command through X's flags; returns the modules seen."""
    seen = set()
    for argv in commands:
        if "-m" not in argv:  # `python3 -c ...` and heredoc snippets
            continue
        i = argv.index("-m")
        module, args = argv[i + 1], argv[i + 2:]
        seen.add(module)
        if "--" in args:  # a wrapper (benchmarks.gpu_clocks -- CMD): its own flags, then the wrapped command
            seen |= check_commands([args[args.index("--") + 1:]])
            args = args[:args.index("--")]
        if module in NOT_OURS:
            continue
        aliases = getattr(importlib.import_module(module), "FLAG_ALIASES", None)
        try:
            build_parser(config_class(module), aliases=aliases).parse_args(args)
        except SystemExit as e:  # argparse reports the bad flag on stderr and exits
            raise AssertionError(f"{module} rejects {args}") from e
    return seen


ALL_STAGES = {"scripts.tok_train", "scripts.base_train", "scripts.base_eval", "scripts.chat_sft",
              "scripts.chat_eval", "scripts.chat_rl", "nanochat.report"}


def test_cpu_run_commands_parse(tmp_path):
    commands = record_commands(tmp_path, "runs/cpu.sh", {})
    assert check_commands(commands) == ALL_STAGES
    train = next(c for c in commands if "scripts.base_train" in c)
    assert "--resume_from_step" not in " ".join(train)  # nothing to resume in a fresh base dir


@pytest.mark.parametrize("preset", ["h200_10min", "d20"])
def test_speedrun_commands_parse(tmp_path, preset):
    commands = record_commands(tmp_path, "runs/speedrun.sh", {"PRESET": preset, "NPROC": "8"})
    assert check_commands(commands) == ALL_STAGES
    train = next(c for c in commands if "scripts.base_train" in c)
    assert train[0] == "torchrun" and "--nproc_per_node=8" in train
    if preset == "h200_10min":
        assert "--max_seconds" in train and "12" == train[train.index("--depth") + 1]


H200_PARTS = {
    "kernels": {"pytest", "benchmarks.check_kernels", "benchmarks.bench_attention", "benchmarks.bench_loss"},
    "attention": {"benchmarks.bench_attention"},
    "loss_inputs": {"benchmarks.bench_loss"},
    "decode": {"scripts.infer_bench"},
    "decode_tune": {"pytest", "benchmarks.bench_decode_attention", "scripts.infer_bench"},
    "decode_shared": {"pytest", "scripts.infer_bench"},
    "decode_matmul": {"pytest", "benchmarks.bench_decode_matmul"},
    "decode_dot": {"pytest", "benchmarks.bench_decode_attention", "scripts.infer_bench"},
    "te": {"scripts.bench"},
    "fp8_rowwise": {"scripts.bench"},
    "fp8_tests": {"pytest"},
    "fp8_triton": {"benchmarks.bench_fp8_cast", "scripts.bench"},
    "sssl": {"scripts.bench"},
    "step": {"scripts.bench"},
    "step_kernels": {"scripts.bench"},
    "autotune": {"scripts.bench"},
    "memory": {"scripts.bench"},
    "pointwise": {"scripts.bench"},
    "fp8_fast": {"scripts.bench"},
    "fp8_skip": {"scripts.bench"},
    "fp8_study": {"scripts.profile_kernels", "scripts.bench"},
    "tuning": {"scripts.bench"},
    "sssl_tuned": {"scripts.bench"},
    "clocks": {"benchmarks.gpu_clocks", "scripts.bench"},
    "fp8": {"scripts.bench"},
    "fp8_loss24": {"scripts.base_train"},
    "fp8_loss20": {"scripts.base_train"},
    "stable_losses": {"scripts.base_train"},
    "parity": {"scripts.base_train"},
    "parity_large": {"scripts.base_train"},
    "grads": {"benchmarks.check_train_grads"},
    "web": {"pytest", "scripts.base_train", "scripts.chat_web", "benchmarks.web_load"},
    "infer": {"scripts.infer_bench", "scripts.base_train", "scripts.chat_web", "benchmarks.web_load"},
}


@pytest.mark.parametrize("part", H200_PARTS)
def test_h200_parts_commands_parse(tmp_path, part):
    """Every command a GPU call would run parses through its script's flags: a typo costs no device time."""
    commands = record_commands(tmp_path, "benchmarks/h200.sh", {"OUT": str(tmp_path / "out")}, (part,))
    assert check_commands(commands) - {"pip"} == H200_PARTS[part]


def test_speedrun_rejects_unknown_preset(tmp_path):
    out = subprocess.run([BASH, "runs/speedrun.sh"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PRESET": "d99", "NANOCHAT_BASE_DIR": str(tmp_path)})
    assert out.returncode == 2 and "PRESET must be" in out.stderr


def test_spent_fraction_of_the_time_budget():
    """base_train --max_seconds: the fraction drives the LR schedule and the stop (0 = no budget)."""
    import torch
    from scripts.base_train import spent_fraction
    cpu = torch.device("cpu")
    assert spent_fraction(123.0, 0.0, cpu, False) == 0.0
    assert spent_fraction(30.0, 120.0, cpu, False) == pytest.approx(0.25)
    assert spent_fraction(130.0, 120.0, cpu, False) >= 1.0

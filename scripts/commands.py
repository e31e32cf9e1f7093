"""The console commands that `pip install` puts on the PATH, one per stage: `nanochat-sft --num_iterations 10`
is `python -m scripts.chat_sft --num_iterations 10`.

Every command of pyproject's [project.scripts] points at `main` below, which runs the stage named by the
command it was started as. A stage's main() returns its figures (a dict, for tests and callers), which the
console wrapper would hand to sys.exit as a failure status; `main` returns None instead, so a finished
stage exits 0.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "nanochat-dataset": "nanochat.data.download",    # download pretraining shards
    "nanochat-tok-train": "scripts.tok_train",       # train the tokenizer
    "nanochat-tok-eval": "scripts.tok_eval",         # evaluate it
    "nanochat-train": "scripts.base_train",          # pretrain
    "nanochat-base-eval": "scripts.base_eval",       # CORE, val bpb, samples
    "nanochat-sft": "scripts.chat_sft",              # chat fine-tuning
    "nanochat-rl": "scripts.chat_rl",                # reinforcement learning (GSM8K)
    "nanochat-eval": "scripts.chat_eval",            # chat evaluation (ChatCORE)
    "nanochat-report": "nanochat.report",            # the report card
    "nanochat-chat": "scripts.chat_cli",             # chat in the terminal
    "nanochat-web": "scripts.chat_web",              # chat in the browser, OpenAI-compatible API
    "nanochat-export": "scripts.export_hf",          # Hugging Face transformers export
    "nanochat-bench": "scripts.bench",               # training benchmark matrix
    "nanochat-infer-bench": "scripts.infer_bench",   # inference benchmark
    "nanochat-profile": "scripts.profile_kernels",   # kernel audit
}


def command_name(argv0: str) -> str:
    """The command a process was started as: the file name of argv[0], without Windows' .exe / -script.py."""
    name = Path(argv0).name
    for suffix in (".exe", "-script.py"):
        name = name.removesuffix(suffix)
    return name


def main() -> None:
    name = command_name(sys.argv[0])
    if name not in COMMANDS:
        raise SystemExit(f"scripts.commands runs a nanochat console command, one of {', '.join(COMMANDS)}; "
                         f"it was started as {name!r}. Run a stage with `python -m scripts.<stage>` instead.")
    importlib.import_module(COMMANDS[name]).main(sys.argv[1:])

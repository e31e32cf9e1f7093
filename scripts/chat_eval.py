"""Evaluate a chat checkpoint on ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval; report ChatCORE.

    python -m scripts.chat_eval -i sft                     # every task
    python -m scripts.chat_eval -i sft -a GSM8K --max_problems=100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -i rl -a GSM8K,HumanEval -n 4 -t 0.7

Short flags (as nanochat's): -i source, -a tasks, -b batch_size, -n num_samples, -t temperature,
-m max_new_tokens, -k top_k, -x max_problems, -g model_tag, -s step. --model DIR loads a checkpoint directory.
Writes the "chat_eval_<source>" report section; the last stdout line is one JSON object.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from nanochat.checkpoint import ModelChoice, load_model
from nanochat.common import autocast_precision, compute_cleanup, compute_init, device_name, log0
from nanochat.eval.chat_eval import CHAT_TASKS, evaluate_chat
from nanochat.flags import parse_flags

FLAG_ALIASES = {"-i": "source", "-a": "task_name", "-b": "batch_size", "-n": "num_samples", "-t": "temperature",
                "-m": "max_new_tokens", "-k": "top_k", "-x": "max_problems", "-g": "model_tag", "-s": "step"}


@dataclass
class ChatEvalConfig(ModelChoice):
    """Evaluate a chat model (ChatCORE)."""
    source: str = field(default="sft", metadata={"help": "checkpoint phase: base, sft or rl (also names the "
                                                         "report section, with --model too)"})
    task_name: str = field(default="all", metadata={"help": f"comma list of {', '.join(CHAT_TASKS)}, or all"})
    max_problems: int = field(default=-1, metadata={"help": "problems per task (-1 = all)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass (categorical tasks)"})
    num_samples: int = field(default=1, metadata={"help": "samples per problem (pass@k) for generative tasks"})
    max_new_tokens: int = field(default=512, metadata={"help": "longest answer to a generative task, in tokens"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature for generative tasks; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens"})
    data_root: str | None = field(default=None, metadata={"help": "eval data folder (default ../shared/data)"})
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(ChatEvalConfig, argv, aliases=FLAG_ALIASES)
    names = list(CHAT_TASKS) if cfg.task_name == "all" else [n.strip() for n in cfg.task_name.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHAT_TASKS]
    if unknown or not names:
        raise SystemExit(f"-a/--task_name: unknown {unknown}; choose from {', '.join(CHAT_TASKS)} (or all)")
    if cfg.source not in ("base", "sft", "rl"):
        raise SystemExit(f"-i/--source must be base, sft or rl; got {cfg.source!r}")
    _, rank, _, world_size, device = compute_init(cfg.device_type)
    model, tokenizer, meta = load_model(cfg.source, device, cfg.model_tag, cfg.step, model_dir=cfg.model or None)
    t0 = time.time()
    out = evaluate_chat(model, tokenizer, names, device, batch_size=cfg.batch_size, max_problems=cfg.max_problems,
                        num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, data_root=cfg.data_root, log=log0)
    result = {"source": cfg.source, "step": meta.get("step"), "device": device_name(device),
              **{name: r["accuracy"] for name, r in out["tasks"].items()},
              "ChatCORE": out["chatcore"], "wall_time_s": time.time() - t0}
    if rank == 0:
        from nanochat.report import write_section
        metrics = {name: r["accuracy"] for name, r in out["tasks"].items()}
        if set(names) == set(CHAT_TASKS):
            metrics["ChatCORE"] = out["chatcore"]  # only the full suite is comparable across runs
        write_section(f"chat_eval_{cfg.source}", {"phase": cfg.source, "config": asdict(cfg), "metrics": metrics,
                                                  "tasks": out["tasks"], "wall_time_s": result["wall_time_s"],
                                                  "precision": autocast_precision(device),
                                                  "num_gpus": world_size if device.type == "cuda" else 0})
        print(json.dumps(result), flush=True)
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()

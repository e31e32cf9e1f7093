"""Evaluate a base checkpoint: CORE (+ HellaSwag), validation bits per byte, and a few samples.

    python -m scripts.base_eval                              # latest base checkpoint, everything
    python -m scripts.base_eval --max_per_task=500 --eval=core
    python -m scripts.base_eval --model path/to/step_004000 # a checkpoint directory from anywhere
    torchrun --nproc_per_node=8 -m scripts.base_eval         # ranks split the items / batches

Writes the "base_eval" report section; the last stdout line is one JSON object.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from nanochat.checkpoint import MODEL_DIR_HELP, load_model
from nanochat.common import autocast_precision, compute_cleanup, compute_init, device_name, log0, print0
from nanochat.flags import parse_flags
from nanochat.progress import progress_bar

SAMPLE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")
EVALS = ("core", "bpb", "sample")


@dataclass
class BaseEvalConfig:
    """Evaluate a base checkpoint (CORE, val bpb, samples)."""
    model_tag: str | None = field(default=None, metadata={"help": "checkpoint tag (default: the newest)"})
    step: int | None = field(default=None, metadata={"help": "checkpoint step (default: the latest)"})
    model: str = field(default="", metadata={"help": MODEL_DIR_HELP})
    eval: str = field(default="core,bpb,sample", metadata={"help": f"comma list of {EVALS}"})
    max_per_task: int = field(default=-1, metadata={"help": "items per CORE task (-1 = all)"})
    core_tasks: str = field(default="all", metadata={"help": "comma list of CORE task labels, or all"})
    batch_size: int = field(default=8, metadata={"help": "sequences per CORE forward pass"})
    device_batch_size: int = field(default=16, metadata={"help": "rows per bpb batch"})
    bpb_tokens: int = field(default=10 * 524288, metadata={"help": "validation tokens for bpb (over all ranks)"})
    data_dir: str | None = field(default=None, metadata={"help": "pretraining shards (val = last shard)"})
    data_root: str | None = field(default=None, metadata={"help": "eval data folder (default ../shared/data)"})
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(BaseEvalConfig, argv)
    evals = [e.strip() for e in cfg.eval.split(",") if e.strip()]
    unknown = set(evals) - set(EVALS)
    if unknown:
        raise SystemExit(f"--eval: unknown {sorted(unknown)}; choose from {EVALS}")
    _, rank, _, world_size, device = compute_init(cfg.device_type)
    model, tokenizer, meta = load_model("base", device, cfg.model_tag, cfg.step, model_dir=cfg.model or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    result: dict = {"step": meta.get("step"), "device": device_name(device), "world_size": world_size}
    t0 = time.time()

    if "core" in evals:
        from nanochat.eval.core_eval import evaluate_core
        from nanochat.tasks.core_tasks import load_core_tasks
        tasks = load_core_tasks(cfg.data_root)
        if cfg.core_tasks != "all":
            wanted = [t.strip() for t in cfg.core_tasks.split(",") if t.strip()]
            missing = sorted(set(wanted) - {t.label for t in tasks})
            if missing:
                raise SystemExit(f"--core_tasks: unknown {missing}; known: {', '.join(t.label for t in tasks)}")
            tasks = [t for t in tasks if t.label in wanted]
        with autocast:
            core = evaluate_core(model, tokenizer, device, max_per_task=cfg.max_per_task, batch_size=cfg.batch_size,
                                 tasks=tasks, log=log0, desc="CORE")
        result["core"] = core["core"]
        result["core_tasks"] = {k: round(v["centered"], 4) for k, v in core["tasks"].items()}
        if "hellaswag" in core:
            result["hellaswag"] = core["hellaswag"]["accuracy"]

    if "bpb" in evals:
        from nanochat.data.packing import PackedLoader
        from nanochat.data.shards import resolve_data_dir
        from nanochat.eval.bpb import evaluate_bpb
        seq_len = model.config.sequence_len
        loader = PackedLoader(tokenizer, resolve_data_dir(cfg.data_dir), "val", cfg.device_batch_size, seq_len,
                              device, rank=rank, world_size=world_size)
        steps = max(1, cfg.bpb_tokens // (cfg.device_batch_size * seq_len * world_size))
        with autocast:
            batches = progress_bar(loader, total=steps, desc="val bpb", unit="batch")
            result["val_bpb"] = evaluate_bpb(model, batches, steps, tokenizer.token_bytes(device))
            batches.close()
        loader.close()
        log0(f"val bpb {result['val_bpb']:.4f} over {steps} steps")

    if "sample" in evals and rank == 0:
        from nanochat.inference.engine import Engine
        engine = Engine(model, tokenizer)
        samples = []
        for prompt in progress_bar(SAMPLE_PROMPTS, desc="samples", unit="prompt"):
            tokens = tokenizer.encode(prompt, prepend="<|bos|>")
            with autocast:
                seqs, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0.0)
            samples.append(tokenizer.decode(seqs[0][1:]))
            print0(f"sample: {samples[-1]!r}")
        result["samples"] = samples

    result["wall_time_s"] = time.time() - t0
    if rank == 0:
        from nanochat.report import write_section
        metrics = {name: result[key] for key, name in (("core", "CORE"), ("val_bpb", "val_bpb")) if key in result}
        write_section("base_eval", {"phase": "base", "config": asdict(cfg), "metrics": metrics,
                                    "precision": autocast_precision(device),
                                    "num_gpus": world_size if device.type == "cuda" else 0, **result})
        if "core_tasks" in result:
            print0("\n".join(f"{k:<34} {v:+.4f}" for k, v in result["core_tasks"].items()))
        print(json.dumps(result), flush=True)
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()

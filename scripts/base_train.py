"""Pretrain a GPT on text shards.

    python -m scripts.base_train --depth=20 --num_iterations=10 --warmup_steps=2
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=20 [--shard_optimizer]

The script owns the loop and wires the parts together: tokenizer -> packed loader -> GPT (with the chosen
loss/attention kernels) -> Muon+AdamW -> atomic checkpoints. Every log line has step, loss, lr, step ms,
tok/s, MFU and peak memory; the last line is one JSON object with the run's figures.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from nanochat import kernels
from nanochat.checkpoint import load_checkpoint, run_checkpoint_dir, save_checkpoint
from nanochat.common import (
    compute_cleanup, compute_init, device_name, log0, peak_flops, peak_memory_gib, print0,
    synchronize,
)
from nanochat.data.packing import PackedLoader
from nanochat.data.shards import list_shards, resolve_data_dir, split_shards
from nanochat.eval.bpb import evaluate_bpb
from nanochat.flags import parse_flags
from nanochat.gpt import config_from_depth, model_class
from nanochat.optim import build_optimizer, lr_multiplier, muon_momentum
from nanochat.precision import FP8_RECIPES_HELP, apply_precision, cache_low_precision_weights, check_precision
from nanochat.runtime import check_recompute, compile_model, default_compile, setup_torch_env
from nanochat.tokenizer import get_tokenizer, resolve_tokenizer_dir


@dataclass
class TrainConfig:
    # model
    arch: str = field(default="gpt", metadata={"help": "gpt (ours) or te (Transformer Engine layers; no sampling)"})
    depth: int = field(default=20, metadata={"help": "number of layers; width = depth * aspect_ratio"})
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int | None = field(default=None, metadata={"help": "context length (default 2048; 512 on CPU)"})
    window_pattern: str = field(default="L", metadata={"help": "per-layer windows, e.g. SSSL (S = half context)"})
    n_kv_head: int | None = field(default=None, metadata={"help": "key/value heads for GQA (default: n_head)"})
    value_embeds: bool = False
    recompute: str = field(default="none", metadata={"help": "activation recompute: none, pointwise (compiled), mlp or block (memory for compute)"})
    # batch and horizon
    device_batch_size: int | None = field(default=None, metadata={"help": "rows per device per micro-step (default 32; 1 on CPU)"})
    total_batch_size: int | None = field(default=None, metadata={"help": "tokens per optimizer step (default 524288; one micro-batch on CPU)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1 = from target_param_data_ratio"})
    max_seconds: float = field(default=0.0, metadata={"help": "time budget for the training steps (evals excluded): "
                                                      "the LR schedule follows the larger of the step and time "
                                                      "fractions, training stops when it is spent; 0 = off"})
    target_param_data_ratio: float = 20.0
    # optimizer and schedule
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    shard_optimizer: bool = field(default=False, metadata={"help": "ZeRO-1: each rank keeps only its share of the optimizer state"})
    warmup_steps: int = 0
    warmdown_ratio: float = 0.4
    final_lr_frac: float = 0.0
    # evaluation, sampling, checkpoints
    eval_every: int = 250
    eval_tokens: int | None = field(default=None, metadata={"help": "validation tokens per bpb evaluation (default 10 x 524288; 8 rows on CPU)"})
    sample_every: int = field(default=2000, metadata={"help": "sampling period in steps (and at the end); 0 = never"})
    save_every: int = field(default=-1, metadata={"help": "checkpoint period in steps; -1 = only at the end, 0 = never"})
    keep_last: int | None = 2
    resume_from_step: int = field(default=-1, metadata={"help": "resume from this saved step; -1 = fresh run"})
    model_tag: str = field(default="", metadata={"help": "checkpoint folder name (default d<depth>)"})
    # data and runtime
    data_dir: str = field(default="", metadata={"help": "shards folder (default: base dir, then ../shared/data/pretrain)"})
    tokenizer_dir: str = ""
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model (default: on for CUDA)"})
    compile_mode: str = field(default="default", metadata={"help": "default or max-autotune-no-cudagraphs"})
    kernel: str = field(default="current", metadata={"help": "loss backend: " + ",".join(kernels.LOSS_BACKENDS)})
    attn: str = field(default="auto", metadata={"help": "attention backend: auto, fa3, cudnn, flex, sdpa"})
    precision: str = field(default="bf16", metadata={"help": "bf16, fp8 (torchao, Hopper+) or nvfp4 (--arch te, Blackwell)"})
    fp8_recipe: str = field(default="tensorwise", metadata={"help": "fp8 recipe: " + FP8_RECIPES_HELP})
    fp8_min_dim: int = field(default=1024, metadata={"help": "fp8 only for linears whose smaller dim is >= this"})
    fp8_lm_head: bool = field(default=False, metadata={"help": "fp8 for the lm_head too (if the model runs it as a module)"})
    fp8_fast_accum: bool = field(default=False, metadata={"help": "fp8: fast accumulation in the backward GEMMs too (faster, less precise)"})
    fp8_skip: list[str] = field(default_factory=list, metadata={"help": "fp8: layer name patterns kept in bf16, e.g. *.attn.c_proj"})
    seed: int = 42
    run: str = field(default="", metadata={"help": "wandb run name; empty = no wandb (needs `pip install wandb`)"})


def resolve_defaults(cfg: TrainConfig, device_type: str, world_size: int) -> TrainConfig:
    """Fill the device-dependent defaults: a laptop CPU gets a batch it can run. Off CUDA, logs the
    batch-shape defaults it filled in (not those the user passed), since they differ from a GPU run's."""
    on_cpu = device_type != "cuda"
    filled = []
    if cfg.max_seq_len is None:
        cfg.max_seq_len = 512 if on_cpu else 2048
        filled.append("max_seq_len")
    if cfg.device_batch_size is None:
        cfg.device_batch_size = 1 if on_cpu else 32
        filled.append("device_batch_size")
    if cfg.total_batch_size is None:
        cfg.total_batch_size = cfg.device_batch_size * cfg.max_seq_len * world_size if on_cpu else 524288
        filled.append("total_batch_size")
    if cfg.eval_tokens is None:  # a GPU evaluates 5M tokens in seconds; a CPU takes minutes for 8 rows
        cfg.eval_tokens = 8 * cfg.device_batch_size * cfg.max_seq_len * world_size if on_cpu else 10 * 524288
        filled.append("eval_tokens")
    if cfg.compile is None:
        cfg.compile = default_compile(device_type, cfg.arch)
    check_recompute(cfg.recompute, cfg.compile)
    if not cfg.model_tag:
        cfg.model_tag = f"d{cfg.depth}"
    if on_cpu and filled:
        log0(f"{device_type} defaults: {' '.join(f'{k}={getattr(cfg, k)}' for k in filled)} (pass flags to override)")
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(TrainConfig, argv, description=__doc__.split("\n")[0])
    setup_torch_env()
    is_ddp, rank, _, world_size, device = compute_init(cfg.device_type)
    cfg = resolve_defaults(cfg, device.type, world_size)
    check_precision(cfg.precision, device, cfg.fp8_recipe)  # before tokenizer and data: fail fast
    master = rank == 0
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    wandb_run = init_wandb(cfg, master)

    # tokenizer and data (a missing or broken data dir fails here, before the model is built)
    tokenizer = get_tokenizer(cfg.tokenizer_dir or None)
    data_dir = resolve_data_dir(cfg.data_dir or None)
    shards = list_shards(data_dir)
    train_shards = split_shards(shards, "train")
    log0(f"data: {len(train_shards)} training shard(s) and validation shard {shards[-1].name} in {data_dir}")
    token_bytes = tokenizer.token_bytes(device=device)
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len
    if cfg.total_batch_size % (tokens_per_micro * world_size) != 0:
        raise ValueError(f"--total_batch_size={cfg.total_batch_size} must be a multiple of device_batch_size * "
                         f"max_seq_len * world_size = {tokens_per_micro * world_size}")
    grad_accum = cfg.total_batch_size // (tokens_per_micro * world_size)

    # model: built on meta, materialized on the device, then initialized
    model_config = config_from_depth(
        cfg.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=cfg.max_seq_len,
        aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim, window_pattern=cfg.window_pattern,
        value_embeds=cfg.value_embeds, attn_backend=cfg.attn, recompute=cfg.recompute,
        **({"n_kv_head": cfg.n_kv_head} if cfg.n_kv_head else {}),
    )
    with torch.device("meta"):
        model = model_class(cfg.arch)(model_config)
    model.to_empty(device=device)
    model.init_weights()
    kernels.set_kernel_backend(cfg.kernel)
    apply_precision(model, cfg.precision, device, fp8_recipe=cfg.fp8_recipe, fp8_min_dim=cfg.fp8_min_dim,
                    fp8_lm_head=cfg.fp8_lm_head, fp8_fast_accum=cfg.fp8_fast_accum,
                    fp8_skip=cfg.fp8_skip)  # before torch.compile
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    num_iterations = cfg.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, round(cfg.target_param_data_ratio * num_params / cfg.total_batch_size))
    log0(f"model {asdict(model_config)}")
    log0(f"params {num_params:,} | FLOPs/token {flops_per_token:.3e} | grad accum {grad_accum} | "
         f"{num_iterations} steps of {cfg.total_batch_size:,} tokens | device {device_name(device)} x{world_size}")

    optimizer = build_optimizer(model, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr,
                                weight_decay=cfg.weight_decay, shard=cfg.shard_optimizer)
    cache_low_precision_weights(model, optimizer, cfg.precision)
    sharded = optimizer.owners is not None  # shard_optimizer with world_size > 1
    checkpoint_dir = run_checkpoint_dir("base", cfg.model_tag)
    step = 0
    loader_state = None
    val_bpb = float("nan")
    if cfg.resume_from_step >= 0:
        # a replicated optimizer state is saved once (rank 0's copy); a sharded one per rank
        model_state, optim_state, meta = load_checkpoint(checkpoint_dir, cfg.resume_from_step, device,
                                                         rank=rank if sharded else 0)
        if bool(optim_state.get("sharded")) != sharded:
            raise ValueError(f"checkpoint step {cfg.resume_from_step} holds a "
                             f"{'sharded' if optim_state.get('sharded') else 'replicated'} optimizer state, this run's "
                             f"is {'sharded' if sharded else 'replicated'}: resume with the same --shard_optimizer "
                             f"setting and number of processes")
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        step, loader_state = meta["step"], meta["loader_state"]
        val_bpb = meta.get("val_bpb", val_bpb)
        log0(f"resumed from {checkpoint_dir} step {step}")
    resumed_at = step if cfg.resume_from_step >= 0 else None
    train_loader = PackedLoader(tokenizer, data_dir, "train", cfg.device_batch_size, cfg.max_seq_len, device,
                                rank=rank, world_size=world_size, state=loader_state)

    orig_model = model  # uncompiled: for eval with other shapes, sampling and saving
    if cfg.compile:
        model = compile_model(model, cfg.compile_mode)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    if peak is None:
        log0(f"MFU n/a: no peak-FLOPS entry for {device_name(device)!r} (nanochat.common.PEAK_BF16_FLOPS)")

    def evaluate() -> float:
        val_loader = PackedLoader(tokenizer, data_dir, "val", cfg.device_batch_size, cfg.max_seq_len, device,
                                  rank=rank, world_size=world_size)
        steps = max(1, cfg.eval_tokens // (tokens_per_micro * world_size))
        orig_model.eval()
        with autocast:
            bpb = evaluate_bpb(orig_model, val_loader, steps, token_bytes)
        val_loader.close()
        orig_model.train()
        return bpb

    def sample() -> None:
        from nanochat.engine import Engine
        engine = Engine(orig_model, tokenizer)
        for prompt in ("The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be"):
            tokens = tokenizer.encode(prompt, prepend="<|bos|>")
            with autocast:
                out, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
            print0(f"sample: {tokenizer.decode(out[0])!r}")

    def save(at_step: int) -> None:  # a collective: every rank calls it
        loader_state = train_loader.state_dict()
        if world_size > 1:  # each rank reads its own row groups: keep every rank's position
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, loader_state)
            loader_state = {"ranks": gathered}
        meta = {"step": at_step, "model_config": asdict(model_config), "train_config": asdict(cfg),
                "loader_state": loader_state, "tokenizer_dir": str(resolve_tokenizer_dir(cfg.tokenizer_dir)),
                "val_bpb": val_bpb}
        optim_state = optimizer.state_dict() if master or sharded else None  # replicated: rank 0's copy suffices
        save_checkpoint(checkpoint_dir, at_step, orig_model.state_dict(), optim_state, meta,
                        rank=rank, world_size=world_size, keep_last=cfg.keep_last)

    from tqdm import tqdm
    from nanochat.report import log_metrics
    step_times: list[float] = []
    losses: list[float] = []
    compile_seconds = 0.0
    train_seconds = 0.0  # time in training steps (compile included), for --max_seconds
    bar = tqdm(total=num_iterations, initial=step, disable=not master, file=sys.stderr, dynamic_ncols=True,
               desc="base_train")
    train_iter = iter(train_loader)
    while True:
        time_frac = spent_fraction(train_seconds, cfg.max_seconds, device, is_ddp)
        last = step == num_iterations or time_frac >= 1.0
        periodic = step != resumed_at or last  # the step resumed from was evaluated, sampled and saved already
        if periodic and cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            val_bpb = evaluate()  # every rank evaluates its share; evaluate_bpb all-reduces the sums
            if master:
                tqdm.write(f"step {step:05d} | val bpb {val_bpb:.4f}")
            log_metrics("base", step, val_bpb=val_bpb)
            if wandb_run is not None:
                wandb_run.log({"val/bpb": val_bpb}, step=step)
        if master and periodic and cfg.arch == "gpt" and cfg.sample_every > 0 and (
                last or (step > 0 and step % cfg.sample_every == 0)):
            sample()
        if periodic and step > 0 and cfg.save_every != 0 and (last or (cfg.save_every > 0
                                                                       and step % cfg.save_every == 0)):
            save(step)
        if last:
            break

        synchronize(device)
        t0 = time.perf_counter()
        lrm = lr_multiplier(max(step, int(time_frac * num_iterations)), num_iterations, cfg.warmup_steps,
                            cfg.warmdown_ratio, cfg.final_lr_frac)
        optimizer.set_lr_multiplier(lrm)
        optimizer.set_muon_momentum(muon_momentum(step))
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(train_iter)
            with autocast:
                loss = model(x, y)
            loss_sum += loss.detach()
            (loss / grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum
        if is_ddp:  # SUM then divide: gloo in older torch has no ReduceOp.AVG
            torch.distributed.all_reduce(train_loss)
            train_loss /= world_size
        train_loss = train_loss.item()  # one sync per step, for the log line
        synchronize(device)
        dt = time.perf_counter() - t0
        train_seconds += dt
        step += 1
        if step == 1 and cfg.compile:  # the first step carries the compilation: kept out of the median
            compile_seconds = dt
        else:
            step_times.append(dt)
        losses.append(train_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"loss became {train_loss} at step {step}; lower the learning rates "
                                     f"(--matrix_lr, --embedding_lr) or check the data")
        tok_per_s = cfg.total_batch_size / dt
        mfu = f"{100 * flops_per_token * tok_per_s / (peak * world_size):.1f}%" if peak else "n/a"
        if master:
            tqdm.write(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
                       f"{1000 * dt:.0f} ms | {tok_per_s:,.0f} tok/s | MFU {mfu} | mem {peak_memory_gib(device):.2f} GiB")
            log_metrics("base", step, loss=train_loss, lrm=lrm, step_ms=1000 * dt, tok_per_s=tok_per_s)
            if wandb_run is not None:
                wandb_run.log({"train/loss": train_loss, "train/lrm": lrm, "train/tok_per_s": tok_per_s}, step=step)
        bar.update(1)
    bar.close()

    median_dt = statistics.median(step_times) if step_times else float("nan")
    median_tok_s = cfg.total_batch_size / median_dt if step_times else float("nan")
    result = {
        "val_bpb": val_bpb, "final_loss": losses[-1] if losses else None, "steps": step,
        "median_tok_per_s": median_tok_s, "median_step_ms": 1000 * median_dt,
        "mfu": flops_per_token * median_tok_s / (peak * world_size) if peak else None,
        "peak_memory_gib": peak_memory_gib(device), "compile_seconds": compile_seconds,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start, "num_params": num_params, "device": device_name(device),
        "world_size": world_size, "kernel": cfg.kernel, "attn": cfg.attn,
        "precision": cfg.precision if device.type == "cuda" else "fp32",  # autocast is on for CUDA only
        "cropped_fraction": train_loader.cropped_fraction, "checkpoint_dir": str(checkpoint_dir),
    }
    if master:
        from nanochat.report import write_section
        write_section("base_train", {"config": asdict(cfg), **result})
        print(json.dumps(result), flush=True)
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
        wandb_run.finish()
    train_loader.close()
    compute_cleanup()
    return result


def spent_fraction(seconds: float, budget: float, device: torch.device, is_ddp: bool) -> float:
    """Fraction of the --max_seconds budget spent (0.0 without a budget). Rank 0's clock decides, so every
    rank applies the same learning rate and stops at the same step.

    Why the schedule follows time: a run cut off by the clock with a step-based schedule would stop
    before its warmdown, at full learning rate (a worse loss). Following max(step, time) fractions
    makes the warmdown end when the budget does, whichever limit binds first; the price is that the
    step count depends on the machine's speed (not reproducible step for step), and a resumed run
    counts its budget anew from the resumed step.
    """
    if budget <= 0:
        return 0.0
    frac = torch.tensor([seconds / budget], dtype=torch.float64, device=device)
    if is_ddp:
        torch.distributed.broadcast(frac, 0)
    return frac.item()


def init_wandb(cfg: TrainConfig, master: bool):
    """The wandb run for --run=<name> on rank 0 (None elsewhere, or without --run). Every rank checks that
    wandb is installed, so a missing package stops all of them at once, before any work."""
    if not cfg.run:
        return None
    try:
        import wandb
    except ImportError as err:
        raise RuntimeError(f"--run={cfg.run} logs to Weights & Biases, which is not installed: `pip install wandb` "
                           "(then `wandb login`), or leave --run out") from err
    return wandb.init(project="nanochat", name=cfg.run, config=asdict(cfg)) if master else None


if __name__ == "__main__":
    main()

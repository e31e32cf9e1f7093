"""Pretrain a GPT on text shards.

    python -m scripts.base_train --depth=20 --num_iterations=10 --warmup_steps=2
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=20 [--shard_optimizer]

The script owns the loop and wires the parts together: tokenizer -> packed loader -> GPT (with the chosen
loss/attention kernels) -> Muon+AdamW -> atomic checkpoints. Every log line has step, loss, lr, step ms,
tok/s, MFU and peak memory; the last line is one JSON object with the run's figures.

Depth is the one dial (`derive_schedule`, printed at start): width = depth x aspect_ratio; the horizon is
target_param_data_ratio x (block matrices + lm_head) tokens; the batch is 2^19 tokens at d12 scaled by
(horizon / d12's horizon)^0.383 to a power of two; every learning rate x sqrt(batch / 2^19) from 2^19 up and
x (batch / 2^19)^-0.25 below; Muon's weight decay x sqrt(batch / 2^19) x d12's horizon / horizon; AdamW rates
x (width / 768)^-0.5 above width 768 (nanochat.optim); no LR warmup at 2^19 tokens and above, 40 steps below.
`--batch_schedule` grows the batch over the run (off by default): small batches early, total_batch_size later, each
step's LRs scaled by the same batch rule relative to total_batch_size.
Each derived value can be set by its own flag instead. The model and optimizer defaults are the recipe
measured in BENCHMARKS.md ("recipe"); each has a flag, so older settings stay one flag away.
"""
from __future__ import annotations

import gc
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from nanochat.build import BuildConfig, build
from nanochat.checkpoint import (check_room_for_checkpoints, claim_checkpoint_dir, load_checkpoint, planned_saves,
                                 run_checkpoint_dir, save_checkpoint)
from nanochat.common import (
    compute_cleanup, compute_init, device_name, log0, peak_flops, peak_memory_gib, print0,
    synchronize,
)
from nanochat.data.packing import PackedLoader
from nanochat.data.shards import list_shards, resolve_data_dir, split_shards
from nanochat.eval.bpb import evaluate_bpb
from nanochat.flags import parse_flags
from nanochat.kernels.attention import layer_backends
from nanochat.model.gpt import GPT
from nanochat.optim import lr_multiplier, muon_momentum, weight_decay_multiplier
from nanochat.precision import check_precision
from nanochat.runtime import graph_breaks, setup_torch_env
from nanochat.progress import progress_bar
from nanochat.tokenizer import get_tokenizer, resolve_tokenizer_dir
from nanochat.tracking import RUN_HELP, TENSORBOARD_HELP, Tracker


@dataclass
class TrainConfig(BuildConfig):
    # batch and horizon
    device_batch_size: int | None = field(default=None, metadata={"help": "rows per device per micro-step (default 32; 1 on CPU)"})
    total_batch_size: int | None = field(default=None, metadata={"help": "tokens per optimizer step (default: from the "
                                                                 "horizon, 524288 at d12; one micro-batch on CPU)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1 = from target_param_data_ratio"})
    max_seconds: float = field(default=0.0, metadata={"help": "time budget for the training steps (evals excluded): "
                                                      "the LR schedule follows the larger of the step and time "
                                                      "fractions, training stops when it is spent; 0 = off"})
    target_param_data_ratio: float = field(default=12.0, metadata={"help": "horizon: tokens per block-matrix and "
                                                                   "lm_head parameter"})
    batch_schedule: str = field(default="", metadata={"help": "grow the batch over the run: "
                                                              "BATCH@FRACTION,... trains BATCH tokens per step while the "
                                                              "progress (the LR schedule's: the larger of the step and "
                                                              "time fractions) is below FRACTION, then total_batch_size; "
                                                              "each step's LRs x the batch rule's factor for its batch "
                                                              "/ for total_batch_size ((its batch / total_batch_size)"
                                                              "^-0.25 when both are below 2^19); "
                                                              "e.g. 131072@0.25,262144@0.5; empty = off"})
    split_long_docs: bool = field(default=True, metadata={"help": "split documents longer than a row into pieces "
                                                          "(else crop them to one row)"})
    # schedule (the learning rates and weight decay it scales: BuildConfig's, at the d12 reference batch)
    wd_schedule: str = field(default="cosine", metadata={"help": "Muon's weight decay over the run: cosine (to 0) or constant"})
    muon_momentum_warmup: int = field(default=400, metadata={"help": "steps of Muon momentum 0.85 -> its peak"})
    muon_momentum_peak: float = field(default=0.97, metadata={"help": "Muon momentum after its warmup"})
    muon_momentum_final: float | None = field(default=0.90, metadata={"help": "Muon momentum at the end of the LR "
                                                                      "warmdown (none = stay at the peak)"})
    batch_lr_scale: float | None = field(default=None, metadata={"help": "learning-rate factor (default "
                                                                 "(total_batch_size / 2^19)^0.5 from 2^19 up, "
                                                                 "^-0.25 below: x1.41 at 2^17)"})
    weight_decay_scale: float | None = field(default=None, metadata={"help": "weight-decay factor (default "
                                                                     "sqrt(batch / 2^19) x d12 horizon / horizon)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "steps of linear LR warmup (default: none when "
                                                           "the first step's batch is 2^19 tokens or more, 40 "
                                                           "below; none on CPU)"})
    warmdown_ratio: float = field(default=0.65, metadata={"help": "fraction of the steps the LR decays over, at the end"})
    final_lr_frac: float = field(default=0.05, metadata={"help": "the LR at the end, as a fraction of its peak"})
    # evaluation, sampling, checkpoints
    eval_every: int = field(default=250, metadata={"help": "validation bpb period in steps (and at the end); <= 0 = never"})
    eval_tokens: int | None = field(default=None, metadata={"help": "validation tokens per bpb evaluation (default 10 x 524288; 8 rows on CPU)"})
    compile_eval: bool | None = field(default=None, metadata={"help": "validate through the compiled training model "
                                                               "(one forward-only graph more: 1.7 s per 2^21 tokens "
                                                               "at d12 against eager's ~5 s); default: on where the "
                                                               "step is compiled and no layer runs flex in it (flex's "
                                                               "documents hit an illegal memory access there, S20)"})
    sample_every: int = field(default=2000, metadata={"help": "sampling period in steps (and at the end); 0 = never"})
    save_every: int = field(default=-1, metadata={"help": "checkpoint period in steps; -1 = only at the end, 0 = never"})
    keep_last: int | None = field(default=2, metadata={"help": "checkpoints kept (the newest); none = all"})
    resume_from_step: int = field(default=-1, metadata={"help": "resume from this saved step; -1 = fresh run"})
    overwrite: bool = field(default=False, metadata={"help": "delete this tag's checkpoints that are not this run's "
                                                     "(all for a fresh run, those past --resume_from_step else)"})
    model_tag: str = field(default="", metadata={"help": "checkpoint folder name (default d<depth>)"})
    # data and runtime
    data_dir: str = field(default="", metadata={"help": "shards folder (default: base dir, then ../shared/data/pretrain)"})
    tokenizer_dir: str = field(default="", metadata={"help": "the tokenizer to train with (default <base dir>/tokenizer)"})
    device_type: str = field(default="auto", metadata={"help": "cuda, mps, cpu or auto"})
    seed: int = field(default=42, metadata={"help": "seed of the initial weights"})
    run: str = field(default="", metadata={"help": RUN_HELP})
    tensorboard: str = field(default="", metadata={"help": TENSORBOARD_HELP})


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
    if cfg.total_batch_size is None and on_cpu:  # on CUDA derive_schedule sizes it from the horizon
        cfg.total_batch_size = cfg.device_batch_size * cfg.max_seq_len * world_size
        filled.append("total_batch_size")
    if cfg.eval_tokens is None:  # a GPU evaluates 5M tokens in seconds; a CPU takes minutes for 8 rows
        cfg.eval_tokens = 8 * cfg.device_batch_size * cfg.max_seq_len * world_size if on_cpu else 10 * 524288
        filled.append("eval_tokens")
    cfg.resolve_compile(device_type)
    if not cfg.model_tag:
        cfg.model_tag = f"d{cfg.depth}"
    if on_cpu and filled:
        log0(f"{device_type} defaults: {' '.join(f'{k}={getattr(cfg, k)}' for k in filled)} (pass flags to override)")
    return cfg


B_REF, DEPTH_REF = 2 ** 19, 12  # the batch tuned at the reference depth; other depths scale from it
SMALL_BATCH_LR_EXPONENT = -0.25  # LRs x (B / B_REF)^this below B_REF (BENCHMARKS.md, race S23)
SMALL_BATCH_WARMUP = 40  # LR warmup steps below B_REF (BENCHMARKS.md, race "On text seen once (S16)")


def horizon_tokens(cfg: TrainConfig, vocab_size: int, depth: int) -> int:
    """target_param_data_ratio x the parameters a horizon scales with (block matrices + lm_head)."""
    with torch.device("meta"):
        model = GPT(replace(cfg, doc_mask=False).model_config(vocab_size, depth))  # masking changes no parameter
    return round(cfg.target_param_data_ratio * model.scaling_params())


def derive_schedule(cfg: TrainConfig, vocab_size: int, world_size: int, on_cpu: bool) -> dict:
    """Fill total_batch_size and num_iterations from the depth (unless given) and return the learning-rate
    and weight-decay factors. The batch follows the horizon D as B_REF x (D / D_ref)^0.383 (D_ref: the same
    recipe's d12 horizon), rounded to a power of two; LRs scale with sqrt(B / B_REF) above B_REF and grow as
    (B / B_REF)^SMALL_BATCH_LR_EXPONENT below it, the sqrt rule inverted: in the d12 race at 2^17 the sqrt
    rule's x0.5 ended 0.018 bpb behind x1.0 (S22), x1.41 0.042 ahead of x1.0 and level with x2 (S23), while at
    2^19 x1.41 ended 0.004 behind x1.0 (BENCHMARKS.md). Muon's weight decay scales with sqrt(B / B_REF) x
    D_ref / D, which keeps its per-epoch effect. A CPU run's laptop batch is no point on that curve: there both
    factors default to 1. Also parses --batch_schedule (returned as "batch_schedule") and
    returns the tokens of one micro-step across ranks ("micro_batch").
    LR warmup defaults to none when the first step's batch (the schedule's first, else B) is B_REF or more,
    where starting at the full rate trained faster, and to SMALL_BATCH_WARMUP steps below, where the noisier
    first steps at the full rate left a lasting loss (a schedule's first steps train like a run at that batch)."""
    tokens, ref = horizon_tokens(cfg, vocab_size, cfg.depth), horizon_tokens(cfg, vocab_size, DEPTH_REF)
    micro_batch = cfg.device_batch_size * cfg.max_seq_len * world_size  # tokens of one micro-step, all ranks
    if cfg.total_batch_size is None:
        predicted = B_REF * (tokens / ref) ** 0.383
        cfg.total_batch_size = max(2 ** round(math.log2(predicted)), micro_batch)
    batch_schedule = parse_batch_schedule(cfg.batch_schedule, cfg.total_batch_size, micro_batch)
    if cfg.num_iterations <= 0:  # the steps that train the horizon's tokens, at the schedule's mean batch
        cfg.num_iterations = max(1, round(tokens / mean_batch(batch_schedule, cfg.total_batch_size)))
    batch_ratio = cfg.total_batch_size / B_REF
    lr_scale = cfg.batch_lr_scale if cfg.batch_lr_scale is not None else 1.0 if on_cpu else \
        batch_lr_factor(cfg.total_batch_size)
    wd_scale = cfg.weight_decay_scale if cfg.weight_decay_scale is not None else \
        1.0 if on_cpu else batch_ratio ** 0.5 * ref / tokens
    first_batch = batch_schedule[0][0] if batch_schedule else cfg.total_batch_size
    if cfg.warmup_steps is None:
        cfg.warmup_steps = 0 if on_cpu or first_batch >= B_REF else SMALL_BATCH_WARMUP
    return {"horizon_tokens": tokens, "d12_horizon_tokens": ref, "lr_scale": lr_scale, "wd_scale": wd_scale,
            "batch_schedule": batch_schedule, "micro_batch": micro_batch}


def batch_lr_factor(batch: int) -> float:
    """The LR multiplier the batch rule gives `batch` tokens a step, relative to B_REF's: sqrt from B_REF up,
    ^SMALL_BATCH_LR_EXPONENT below. A --batch_schedule step takes factor(its batch) / factor(total_batch_size)."""
    ratio = batch / B_REF
    return ratio ** (0.5 if ratio >= 1 else SMALL_BATCH_LR_EXPONENT)


def parse_batch_schedule(spec: str, total_batch_size: int, micro_batch: int) -> list[tuple[int, float]]:
    """--batch_schedule "BATCH@FRACTION,..." as [(batch, fraction), ...] (empty: [], every step total_batch_size).

    Why grow the batch: small batches learn more per token early, large ones run more efficiently later (and
    on more GPUs). On one H100, d12, the same 52M tokens seen once, 400 steps of 2^17 tokens reached val bpb
    1.27 and 100 steps of 2^19 only 1.54, in about the same time. Batches must grow, stay below
    total_batch_size (the batch after the last fraction) and fill whole micro-steps of micro_batch tokens
    (device_batch_size x max_seq_len x world_size); fractions must grow within (0, 1)."""
    example = "e.g. --batch_schedule=131072@0.25,262144@0.5"
    schedule = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        batch, _, fraction = entry.partition("@")
        try:
            schedule.append((int(batch), float(fraction)))
        except ValueError:
            raise ValueError(f"--batch_schedule entry {entry!r} is not BATCH@FRACTION (tokens per step @ progress "
                             f"below which they apply): write it as {example}") from None
    for i, (batch, fraction) in enumerate(schedule):
        if batch <= 0 or batch % micro_batch != 0:
            raise ValueError(f"--batch_schedule batch {batch} must be a positive multiple of device_batch_size x "
                             f"max_seq_len x world_size = {micro_batch}: round it to one")
        if batch >= total_batch_size:
            raise ValueError(f"--batch_schedule batch {batch} must be below --total_batch_size={total_batch_size}, "
                             f"the batch after the schedule: lower it or raise --total_batch_size")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"--batch_schedule fraction {fraction:g} (of batch {batch}) must lie strictly between "
                             f"0 and 1: it is the progress of the run below which its batch applies")
        if i > 0 and (batch <= schedule[i - 1][0] or fraction <= schedule[i - 1][1]):
            raise ValueError(f"--batch_schedule {spec!r}: batches and fractions must both strictly increase, "
                             f"entry by entry ({example})")
    return schedule


def mean_batch(schedule: list[tuple[int, float]], total_batch_size: int) -> float:
    """Tokens per step over a whole run of the schedule: each batch weighted by the fraction of steps it gets."""
    mean, start = 0.0, 0.0
    for batch, fraction in schedule:
        mean, start = mean + batch * (fraction - start), fraction
    return mean + total_batch_size * (1.0 - start)


def batch_at(progress: float, schedule: list[tuple[int, float]], total_batch_size: int) -> int:
    """Tokens of the step at `progress` (the LR schedule's fraction of the run done): the batch of the first
    fraction it is below, else total_batch_size. It depends on the step (and time spent) alone, so a resumed
    run takes the same batches as an uninterrupted one, and every rank the same number of micro-steps."""
    for batch, fraction in schedule:
        if progress < fraction:
            return batch
    return total_batch_size


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(TrainConfig, argv, description=__doc__.split("\n")[0])
    setup_torch_env()
    is_ddp, rank, _, world_size, device = compute_init(cfg.device_type)
    cfg = resolve_defaults(cfg, device.type, world_size)
    check_precision(cfg.precision, device, cfg.fp8_recipe)  # before tokenizer and data: fail fast
    master = rank == 0
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    tracker = Tracker("base", config=asdict(cfg), run=cfg.run, tensorboard_dir=cfg.tensorboard)

    # tokenizer and data (a missing or broken data dir fails here, before the model is built)
    tokenizer = get_tokenizer(cfg.tokenizer_dir or None)
    data_dir = resolve_data_dir(cfg.data_dir or None)
    shards = list_shards(data_dir)
    train_shards = split_shards(shards, "train")
    log0(f"data: {len(train_shards)} training shard(s) and validation shard {shards[-1].name} in {data_dir}")
    token_bytes = tokenizer.token_bytes(device=device)
    schedule = derive_schedule(cfg, tokenizer.get_vocab_size(), world_size, device.type != "cuda")
    micro_batch = schedule["micro_batch"]
    if cfg.total_batch_size % micro_batch != 0:
        raise ValueError(f"--total_batch_size={cfg.total_batch_size} must be a multiple of device_batch_size * "
                         f"max_seq_len * world_size = {micro_batch}")
    grad_accum = cfg.total_batch_size // micro_batch  # at the full batch
    batch_schedule = schedule["batch_schedule"]

    # model and optimizer (nanochat.build: meta device, init, kernels, precision, optimizer, compile)
    lr_scale, wd_scale = schedule["lr_scale"], schedule["wd_scale"]
    orig_model, model, optimizer = build(cfg, device, tokenizer.get_vocab_size(), lr_scale=lr_scale,
                                         wd_scale=wd_scale,  # orig_model: uncompiled, for eval, sampling, saving
                                         bos_id=tokenizer.get_bos_token_id())
    model_config = orig_model.config
    if cfg.compile_eval is None:
        cfg.compile_eval = model is not orig_model and "flex" not in layer_backends(
            model_config.layer_windows(), device, model_config.attn_backend, model_config.doc_mask)
    log0(f"evaluation through the {'compiled' if cfg.compile_eval else 'eager'} model (--compile_eval)")
    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops()
    num_iterations = cfg.num_iterations
    rates = cfg.optimizer_options(lr_scale, wd_scale)
    log0(f"model {asdict(model_config)}")
    log0(f"params {num_params:,} | FLOPs/token {flops_per_token:.3e} | grad accum {grad_accum} | "
         f"{num_iterations} steps of {cfg.total_batch_size:,} tokens | device {device_name(device)} x{world_size}")
    log0(f"depth {cfg.depth}: width {model_config.n_embd} | horizon {schedule['horizon_tokens']:,} tokens "
         f"(d{DEPTH_REF}: {schedule['d12_horizon_tokens']:,}) | batch {cfg.total_batch_size:,} | LRs x{lr_scale:.3f} "
         f"(matrix {rates['matrix_lr']:.4g}, embedding {rates['embedding_lr']:.4g}, unembedding "
         f"{rates['unembedding_lr']:.4g}, scalar {rates['scalar_lr']:.4g}) | weight decay {rates['weight_decay']:.4g} | "
         f"warmup {cfg.warmup_steps} steps")
    if batch_schedule:
        phases = ", ".join(f"{b:,} tokens (grad accum {b // micro_batch}) below progress {f:g}"
                           for b, f in batch_schedule)
        log0(f"batch schedule: {phases}, then {cfg.total_batch_size:,} (grad accum {grad_accum}); each step's LRs "
             f"x the batch rule's factor for its batch / for {cfg.total_batch_size:,} (--batch_schedule)")
    sharded = optimizer.owners is not None  # shard_optimizer with world_size > 1
    checkpoint_dir = run_checkpoint_dir("base", cfg.model_tag)
    claim_checkpoint_dir(checkpoint_dir, cfg.resume_from_step, cfg.overwrite, rank)  # not next to another run's
    step = 0
    tokens_trained = 0  # so far (steps differ in size under a batch schedule)
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
        orig_model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        step, loader_state = meta["step"], meta["loader_state"]
        # checkpoints from before --batch_schedule hold no count: each of their steps had total_batch_size tokens
        tokens_trained = meta.get("tokens", step * meta["train_config"]["total_batch_size"])
        val_bpb = meta.get("val_bpb", val_bpb)
        log0(f"resumed from {checkpoint_dir} step {step}")
    resumed_at = step if cfg.resume_from_step >= 0 else None
    train_loader = PackedLoader(tokenizer, data_dir, "train", cfg.device_batch_size, cfg.max_seq_len, device,
                                rank=rank, world_size=world_size, state=loader_state,
                                split_long_docs=cfg.split_long_docs)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    if peak is None:
        log0(f"MFU n/a: no peak-FLOPS entry for {device_name(device)!r} (nanochat.common.PEAK_BF16_FLOPS)")

    def evaluate() -> float:
        val_loader = PackedLoader(tokenizer, data_dir, "val", cfg.device_batch_size, cfg.max_seq_len, device,
                                  rank=rank, world_size=world_size, split_long_docs=cfg.split_long_docs)
        steps = max(1, cfg.eval_tokens // micro_batch)
        orig_model.eval()
        with autocast:
            bpb = evaluate_bpb(model if cfg.compile_eval else orig_model, val_loader, steps, token_bytes)
        val_loader.close()
        orig_model.train()
        return bpb

    def sample() -> None:
        from nanochat.inference.engine import Engine
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
                "val_bpb": val_bpb, "tokens": tokens_trained}
        save_checkpoint(checkpoint_dir, at_step, *states(), meta, rank=rank, world_size=world_size,
                        keep_last=cfg.keep_last, tokenizer_dir=resolve_tokenizer_dir(cfg.tokenizer_dir))

    def states() -> tuple[dict, dict | None]:  # what a checkpoint holds: replicated, rank 0's optimizer copy suffices
        return orig_model.state_dict(), optimizer.state_dict() if master or sharded else None

    first_step = step
    saves = planned_saves(first_step, num_iterations, cfg.save_every)

    from tqdm import tqdm
    step_times: list[float] = []
    step_tok_s: list[float] = []  # per step: steps differ in size under a batch schedule
    losses: list[float] = []
    compile_seconds = 0.0
    train_seconds = 0.0  # time in training steps (compile included), for --max_seconds
    if cfg.max_seconds > 0:  # whichever ends first: a budgeted run's bar counts its seconds
        bar = progress_bar(total=cfg.max_seconds, desc="base_train", unit="s")
    else:
        bar = progress_bar(total=num_iterations, initial=step, desc="base_train", unit="step")
    train_iter = iter(train_loader)
    data_epoch = train_loader.data_epoch
    while True:
        time_frac = spent_fraction(train_seconds, cfg.max_seconds, device, is_ddp)
        last = step == num_iterations or time_frac >= 1.0
        if last and step < num_iterations and master:
            tqdm.write(f"time budget of {cfg.max_seconds:.0f} s spent after step {step} of {num_iterations}: "
                       f"evaluating and saving this step (--max_seconds)")
        periodic = step != resumed_at or last  # the step resumed from was evaluated, sampled and saved already
        if periodic and cfg.eval_every > 0 and (last or step % cfg.eval_every == 0):
            eval_start = time.perf_counter()
            val_bpb = evaluate()  # every rank evaluates its share; evaluate_bpb all-reduces the sums
            if master:
                tqdm.write(f"step {step:05d} | val bpb {val_bpb:.4f} | {time.perf_counter() - eval_start:.1f} s")
            tracker.log(step, val_bpb=val_bpb)
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
        progress = max(step, int(time_frac * num_iterations))
        batch = batch_at(progress / num_iterations, batch_schedule, cfg.total_batch_size)
        step_accum = batch // micro_batch
        lrm = lr_multiplier(progress, num_iterations, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
        lrm *= batch_lr_factor(batch) / batch_lr_factor(cfg.total_batch_size)  # the batch rule, relative (logged)
        optimizer.set_lr_multiplier(lrm)
        optimizer.set_muon_momentum(muon_momentum(step, cfg.muon_momentum_warmup, end=cfg.muon_momentum_peak,
                                                  num_iterations=num_iterations, warmdown_ratio=cfg.warmdown_ratio,
                                                  final=cfg.muon_momentum_final))
        optimizer.set_weight_decay_multiplier(weight_decay_multiplier(progress, num_iterations, cfg.wd_schedule))
        loss_sum = torch.zeros((), device=device)
        for _ in range(step_accum):
            x, y = next(train_iter)
            with autocast:
                loss = model(x, y)
            loss_sum += loss.detach()
            (loss / step_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss_sum / step_accum
        if is_ddp:  # SUM then divide: gloo in older torch has no ReduceOp.AVG
            torch.distributed.all_reduce(train_loss)
            train_loss /= world_size
        train_loss = train_loss.item()  # one sync per step, for the log line
        synchronize(device)
        dt = time.perf_counter() - t0
        train_seconds += dt
        step += 1
        tokens_trained += batch
        if step == first_step + 1:  # the optimizer state exists now: a disk too small fails here, not at a save
            check_room_for_checkpoints(checkpoint_dir, step, *states(), saves, cfg.keep_last, rank, world_size)
        tok_per_s = batch / dt
        if step == 1 and cfg.compile:  # the first step carries the compilation: kept out of the medians
            compile_seconds = dt
            for reason, n in graph_breaks().items():
                log0(f"warning: the compiled model broke its graph {n}x (the step runs partly outside one compiled "
                     f"graph, slower): {reason[:300]}")
        else:
            step_times.append(dt)
            step_tok_s.append(tok_per_s)
        if step == 1 or step % GC_EVERY == 0:
            collect_garbage_by_hand()
        losses.append(train_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"loss became {train_loss} at step {step}; lower the learning rates "
                                     f"(--matrix_lr, --embedding_lr) or check the data")
        mfu = f"{100 * flops_per_token * tok_per_s / (peak * world_size):.1f}%" if peak else "n/a"
        if master:
            scheduled = f" | batch {batch:,}" if batch_schedule else ""
            tqdm.write(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
                       f"{1000 * dt:.0f} ms | {tok_per_s:,.0f} tok/s | MFU {mfu} | mem {peak_memory_gib(device):.2f} GiB"
                       f"{scheduled}")
        tracker.log(step, loss=train_loss, lrm=lrm, step_ms=1000 * dt, tok_per_s=tok_per_s, batch=batch)
        if train_loader.data_epoch > data_epoch:
            data_epoch = train_loader.data_epoch
            if master:
                tqdm.write(f"data: step {step} trained on documents of pass {data_epoch + 1} over the training "
                           f"shards: the model sees its documents again (validation bpb may stop falling, or rise); "
                           f"more shards in --data_dir or fewer --num_iterations keep a run to one pass")
        bar.update(min(dt, cfg.max_seconds - bar.n) if cfg.max_seconds > 0 else 1)
    bar.close()
    gc.unfreeze()
    gc.enable()

    median_dt = statistics.median(step_times) if step_times else float("nan")
    median_tok_s = statistics.median(step_tok_s) if step_tok_s else float("nan")
    result = {
        "val_bpb": val_bpb, "final_loss": losses[-1] if losses else None, "steps": step, "tokens": tokens_trained,
        "median_tok_per_s": median_tok_s, "median_step_ms": 1000 * median_dt,
        "mfu": flops_per_token * median_tok_s / (peak * world_size) if peak else None,
        "peak_memory_gib": peak_memory_gib(device), "compile_seconds": compile_seconds,
        "graph_breaks": sum(graph_breaks().values()) if cfg.compile else None, "train_seconds": train_seconds,
        "total_seconds": time.time() - t_start, "num_params": num_params, "device": device_name(device),
        "world_size": world_size, "kernel": cfg.kernel, "attn": cfg.attn,
        "precision": cfg.precision if device.type == "cuda" else "fp32",  # autocast is on for CUDA only
        "cropped_fraction": train_loader.cropped_fraction, "data_passes": train_loader.data_epoch + 1,
        "checkpoint_dir": str(checkpoint_dir),
    }
    if master:
        from nanochat.report import write_section
        write_section("base_train", {"config": asdict(cfg), **result})
        print(json.dumps(result), flush=True)
    tracker.finish(result)
    train_loader.close()
    compute_cleanup()
    return result


GC_EVERY = 1000  # steps between garbage collections once the automatic collector is off


def collect_garbage_by_hand() -> None:
    """Collect now, freeze what survives (the model, compiled code) out of later scans, and turn the automatic
    collector off (main turns it back on at the end). In the d12 race on the H100 about one step in ten took
    150-550 ms more than the median (~3% of the training time), while the peer's loop, which turns the collector
    off the same way, had none (BENCHMARKS.md). The loop calls this every GC_EVERY steps: cycles still get freed."""
    gc.collect()
    gc.freeze()
    gc.disable()


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


if __name__ == "__main__":
    main()

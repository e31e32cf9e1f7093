"""Supervised fine-tuning: teach a pretrained GPT the chat format on a mixture of conversations.

    python -m scripts.chat_sft                                   # newest base checkpoint, 1 epoch
    python -m scripts.chat_sft --model_tag=d20 --smoltalk=hub    # + 10k SmolTalk conversations (download)
    torchrun --nproc_per_node=8 -m scripts.chat_sft
    python -m scripts.chat_sft --model path/to/step_004000 --run sft-1   # any checkpoint dir; wandb run sft-1

Data: the local SFT sets (GPTeacher + FastChat under <data_root>/sft), GSM8K train with its
calculator annotations as tool calls, and optionally SmolTalk. One conversation per row, rows padded
to the longest in the micro-batch; the loss covers the assistant's tokens only, averaged over all
trained tokens of the optimizer step. LR: nanochat.finetune's rates times --init_lr_frac, decaying linearly to 0.
Checkpoints go to <base>/checkpoints/sft/<tag>/step_<n>; the last line is one JSON object.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from nanochat import kernels
from nanochat.checkpoint import claim_checkpoint_dir
from nanochat.common import compute_cleanup, compute_init, device_name, log0, peak_memory_gib
from nanochat.conversation import render_conversation
from nanochat.data.sft import SFTLoader, collate
from nanochat.finetune import FineTuneFlags, start_finetune
from nanochat.flags import parse_flags
from nanochat.optim import lr_multiplier
from nanochat.progress import progress_bar
from nanochat.runtime import setup_torch_env
from nanochat.tasks.base import Task
from nanochat.tasks.mixture import sft_mixture
from nanochat.tracking import Tracker


@dataclass
class SFTConfig(FineTuneFlags):
    # data
    data_root: str = field(default="", metadata={"help": "folder holding sft/ and eval/ (default ../shared/data)"})
    smoltalk: str = field(default="", metadata={"help": "SmolTalk: '' = off, 'hub' = download, or a parquet path"})
    smoltalk_examples: int = field(default=10_000, metadata={"help": "SmolTalk conversations to mix in; -1 = all"})
    max_seq_len: int | None = field(default=None, metadata={"help": "tokens per conversation (default: model context)"})
    # batch and horizon
    device_batch_size: int = field(default=4, metadata={"help": "conversations per device per micro-step"})
    total_batch_size: int = field(default=32, metadata={"help": "conversations per optimizer step (grad accum)"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the training data (unless num_iterations)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1 = from num_epochs"})
    # evaluation and checkpoints
    eval_every: int = field(default=100, metadata={"help": "validation loss period in steps; <= 0 = only at the end"})
    eval_examples: int = field(default=400, metadata={"help": "held-out conversations per validation; 0 = none"})
    save_every: int = field(default=-1, metadata={"help": "checkpoint period in steps; -1 = only at the end"})
    # runtime
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (dynamic shapes)"})


@torch.no_grad()
def validation_loss(model, tokenizer, task: Task, num_examples: int, batch_size: int, max_seq_len: int,
                    device, autocast, rank: int = 0, world_size: int = 1) -> float:
    """Mean loss per trained token over the first `num_examples` conversations of `task`."""
    indices = list(range(min(num_examples, len(task))))[rank::world_size]
    pad = tokenizer.get_bos_token_id()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    for i in range(0, len(indices), batch_size):
        rows = [render_conversation(tokenizer, task[j], max_tokens=max_seq_len + 1) for j in indices[i:i + batch_size]]
        x, y = collate(rows, pad, device)
        with autocast:
            totals[0] += model(x, y, loss_reduction="sum").double()
        totals[1] += (y >= 0).sum()
    if world_size > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(SFTConfig, argv, description=__doc__.split("\n")[0])
    if cfg.total_batch_size < 1 or cfg.device_batch_size < 1 or cfg.init_lr_frac <= 0:
        raise ValueError("--total_batch_size and --device_batch_size must be >= 1 and --init_lr_frac > 0")
    setup_torch_env()
    is_ddp, rank, _, world_size, device = compute_init(cfg.device_type)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    tracker = Tracker("sft", config=asdict(cfg), run=cfg.run, tensorboard_dir=cfg.tensorboard)
    t_start = time.time()
    if cfg.total_batch_size % (cfg.device_batch_size * world_size) != 0:
        raise ValueError(f"--total_batch_size={cfg.total_batch_size} must be a multiple of device_batch_size x "
                         f"world size = {cfg.device_batch_size * world_size}")
    grad_accum = cfg.total_batch_size // (cfg.device_batch_size * world_size)

    run = start_finetune(cfg, "sft", device, rank)
    claim_checkpoint_dir(run.checkpoint_dir, cfg.resume_from_step, cfg.overwrite, rank)  # not next to another run's
    model, tokenizer, optimizer, tag = run.model, run.tokenizer, run.optimizer, run.tag
    step = run.step
    max_seq_len = cfg.max_seq_len or model.config.sequence_len
    kernels.set_kernel_backend(cfg.kernel)
    log0(f"SFT from {cfg.source}/{tag} step {run.source_meta['step']} | params {model.num_params():,} | "
         f"max_seq_len {max_seq_len} | device {device_name(device)} x{world_size}")

    data_root = cfg.data_root or None
    train_task = sft_mixture("train", data_root, cfg.smoltalk, cfg.smoltalk_examples, cfg.seed)
    val_task = sft_mixture("val", data_root, cfg.smoltalk, cfg.smoltalk_examples, cfg.seed)
    steps_per_epoch = len(train_task) // cfg.total_batch_size
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else cfg.num_epochs * steps_per_epoch
    if num_iterations < 1:
        raise ValueError(f"{len(train_task)} training conversations make no step of --total_batch_size="
                         f"{cfg.total_batch_size}; lower it or pass --num_iterations")
    log0(f"train {len(train_task):,} conversations | val {len(val_task):,} | {num_iterations} steps of "
         f"{cfg.total_batch_size} conversations | grad accum {grad_accum}")

    loader = SFTLoader(tokenizer, train_task, cfg.device_batch_size, max_seq_len, device, rank=rank,
                       world_size=world_size, seed=cfg.seed, state=run.loader_state)

    orig_model = model
    if cfg.compile:
        model = torch.compile(model, dynamic=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def evaluate() -> float:
        orig_model.eval()
        loss = validation_loss(orig_model, tokenizer, val_task, cfg.eval_examples, cfg.device_batch_size,
                               max_seq_len, device, autocast, rank, world_size)
        orig_model.train()
        return loss

    from tqdm import tqdm
    val_loss = float("nan")
    losses: list[float] = []
    bar = progress_bar(total=num_iterations, initial=step, desc="chat_sft", unit="step")
    while True:
        last = step == num_iterations
        if cfg.eval_examples > 0 and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            val_loss = evaluate()
            tqdm.write(f"step {step:05d} | val loss {val_loss:.4f}") if master else None
            tracker.log(step, val_loss=val_loss)
        if step > 0 and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            run.save(step, rank, world_size, loader_state=loader.state_dict(), val_loss=val_loss)
        if last:
            break

        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_iterations, 0, 1.0, 0.0)  # linear decay to 0 over the run
        optimizer.set_lr_multiplier(lrm)
        # all micro-batches first: the loss is a mean over every trained token of the step (all ranks)
        batches = [next(loader) for _ in range(grad_accum)]
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, trained tokens
        stats[1] = sum(int((y >= 0).sum()) for _, y in batches)
        if is_ddp:
            dist.all_reduce(stats)
        # the optimizer averages gradients over ranks, so each rank divides by its share of the tokens
        denom = stats[1].clamp(min=1).item() / world_size
        for x, y in batches:
            with autocast:
                loss_sum = model(x, y, loss_reduction="sum")
            (loss_sum / denom).backward()
            stats[0] += loss_sum.detach().double()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if is_ddp:
            dist.all_reduce(stats[:1])
        train_loss = (stats[0] / (denom * world_size)).item()
        dt = time.perf_counter() - t0
        step += 1
        if step == run.step + 1:  # the optimizer state exists now
            run.check_room(step, num_iterations, cfg.save_every, rank, world_size)
        losses.append(train_loss)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"loss became {train_loss} at step {step}; lower --init_lr_frac")
        if master:
            tqdm.write(f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} | lrm {lrm:.3f} | "
                       f"epoch {loader.progress:.2f} | {int(stats[1])} tok | {1000 * dt:.0f} ms | "
                       f"mem {peak_memory_gib(device):.2f} GiB")
            tracker.log(step, loss=train_loss, lrm=lrm, step_ms=1000 * dt)
        bar.update(1)
    bar.close()

    result = {
        "train_loss": losses[-1] if losses else None, "val_loss": val_loss, "steps": step,
        "total_seconds": time.time() - t_start, "train_conversations": len(train_task),
        "peak_memory_gib": peak_memory_gib(device), "device": device_name(device), "world_size": world_size,
        "checkpoint_dir": str(run.checkpoint_dir), "losses": losses,
    }
    summary = {k: v for k, v in result.items() if k != "losses"}
    tracker.finish(summary)
    run.finish("chat_sft", summary, device, world_size)
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()

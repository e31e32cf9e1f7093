"""Reinforcement learning on GSM8K: on-policy policy gradient from an SFT checkpoint.

    python -m scripts.chat_rl                                   # newest SFT checkpoint, 1 epoch of GSM8K train
    torchrun --nproc_per_node=8 -m scripts.chat_rl --model_tag=d20
    python -m scripts.chat_rl --model path/to/sft/step_000800 --tensorboard runs/tb   # any checkpoint dir

Each step takes --examples_per_step questions; for each, the Engine samples a group of --num_samples
answers (calculator on). Reward: 1 when the final answer is right (GSM8K's own grader), else 0.
Advantage: reward minus the group's mean (no std division, so an all-right or all-wrong group
contributes nothing). Loss: -sum(advantage * log p(token)) over the tokens the model sampled (not the
prompt, not the calculator's forced output), divided by the number of such tokens in the step.
pass@1 and pass@k (k = --num_samples) on GSM8K test every --eval_every steps. Checkpoints go to
<base>/checkpoints/rl/<tag>/step_<n>; the last line is one JSON object.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from nanochat import kernels
from nanochat.checkpoint import claim_checkpoint_dir
from nanochat.common import compute_cleanup, compute_init, device_name, log0, peak_memory_gib
from nanochat.conversation import render_for_completion
from nanochat.data.sft import collate
from nanochat.finetune import FineTuneFlags, start_finetune
from nanochat.flags import parse_flags, redeclare
from nanochat.inference.engine import Engine
from nanochat.optim import lr_multiplier
from nanochat.progress import progress_bar
from nanochat.runtime import setup_torch_env
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tracking import Tracker


@dataclass
class RLConfig(FineTuneFlags):
    source: str = redeclare(FineTuneFlags, "source", "sft")
    init_lr_frac: float = redeclare(FineTuneFlags, "init_lr_frac", 0.05)
    data_root: str = field(default="", metadata={"help": "folder holding eval/gsm8k (default ../shared/data)"})
    # sampling
    num_samples: int = field(default=16, metadata={"help": "samples per question (the group); also k of pass@k"})
    examples_per_step: int = field(default=16, metadata={"help": "questions per optimizer step, over all ranks"})
    device_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward pass"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest sampled answer, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts and pass@k"})
    top_k: int | None = field(default=50, metadata={"help": "sample among the k likeliest tokens; none = all"})
    # horizon
    num_epochs: int = field(default=1, metadata={"help": "passes over the training data (unless num_iterations)"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1 = from num_epochs"})
    # evaluation and checkpoints
    eval_every: int = field(default=60, metadata={"help": "pass@k period in steps; <= 0 = only at the end"})
    eval_examples: int = field(default=400, metadata={"help": "GSM8K test questions per evaluation; 0 = none"})
    save_every: int = field(default=60, metadata={"help": "checkpoint period in steps; -1 = only at the end"})


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Reward minus the group mean. No division by the std: it would blow up nearly-uniform groups."""
    return rewards - rewards.mean()


def policy_gradient_loss(model, inputs: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                         num_tokens: float) -> torch.Tensor:
    """-sum(advantage_row * log p(target)) over targets != -1, divided by `num_tokens`.

    `num_tokens` is the count of sampled tokens of the whole step (not of this micro-batch), so
    every sampled token weighs the same however the step is split into forward passes.
    """
    logp = -model(inputs, targets, loss_reduction="none")  # [B, T]
    logp = logp * (targets >= 0)                             # ignored targets contribute exactly 0
    return -(logp * advantages[:, None].to(logp.dtype)).sum() / num_tokens


def sample_group(engine: Engine, tokenizer, prompt: list[int], num_samples: int, max_tokens: int,
                 temperature: float, top_k: int | None, seed: int) -> tuple[list[tuple[list[int], list[int]]], list[str]]:
    """`num_samples` answers to `prompt`: (ids, mask) rows (prompt 0, sampled 1, forced tool output 0,
    the sampled stop token kept with mask 1 so the model learns to stop) and the decoded replies."""
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    rows = [(list(prompt), [0] * len(prompt)) for _ in range(num_samples)]
    done = [False] * num_samples
    for column, masks in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                         temperature=temperature, top_k=top_k, seed=seed):
        for i, (token, mask) in enumerate(zip(column, masks)):
            if not done[i]:
                rows[i][0].append(token)
                rows[i][1].append(mask)
                done[i] = token in stop
    replies = [tokenizer.decode([t for t in ids[len(prompt):] if t not in stop]) for ids, _ in rows]
    return rows, replies


def evaluate_pass_at_k(engine: Engine, tokenizer, task, num_examples: int, k: int, max_tokens: int,
                       temperature: float, top_k: int | None, device, rank: int = 0, world_size: int = 1) -> dict:
    """pass@1 (mean fraction of right samples) and pass@k (any of k right) over the first
    `num_examples` questions; fixed seeds per question, so evaluations at different steps compare."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # sum of fraction right, any right, questions
    questions = range(rank, min(num_examples, len(task)), world_size)
    for i in progress_bar(questions, desc=f"GSM8K pass@{k}", unit="question"):
        conv = task[i]
        _, replies = sample_group(engine, tokenizer, render_for_completion(tokenizer, conv), k, max_tokens,
                                  temperature, top_k, seed=1_000_000 + i)
        right = [task.evaluate(conv, r) for r in replies]
        totals += torch.tensor([sum(right) / k, float(any(right)), 1.0], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    n = max(totals[2].item(), 1.0)
    return {"pass@1": totals[0].item() / n, f"pass@{k}": totals[1].item() / n, "n": int(totals[2].item())}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(RLConfig, argv, description=__doc__.split("\n")[0])
    if cfg.num_samples < 1 or cfg.device_batch_size < 1 or cfg.init_lr_frac <= 0:
        raise ValueError("--num_samples and --device_batch_size must be >= 1 and --init_lr_frac > 0")
    setup_torch_env()
    is_ddp, rank, _, world_size, device = compute_init(cfg.device_type)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    tracker = Tracker("rl", config=asdict(cfg), run=cfg.run, tensorboard_dir=cfg.tensorboard)
    t_start = time.time()
    if cfg.examples_per_step < 1 or cfg.examples_per_step % world_size != 0:
        raise ValueError(f"--examples_per_step={cfg.examples_per_step} must be a positive multiple of the "
                         f"world size {world_size}")
    local_examples = cfg.examples_per_step // world_size

    run = start_finetune(cfg, "rl", device, rank)
    claim_checkpoint_dir(run.checkpoint_dir, cfg.resume_from_step, cfg.overwrite, rank)  # not next to another run's
    model, tokenizer, optimizer, tag = run.model, run.tokenizer, run.optimizer, run.tag
    step = run.step  # on resume, the question order and sampling seeds follow from the step
    kernels.set_kernel_backend(cfg.kernel)
    engine = Engine(model, tokenizer)

    data_root = cfg.data_root or None
    train_task, test_task = GSM8K("train", data_root=data_root), GSM8K("test", data_root=data_root)
    order = list(range(len(train_task)))
    random.Random(cfg.seed).shuffle(order)
    steps_per_epoch = len(train_task) // cfg.examples_per_step
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else cfg.num_epochs * steps_per_epoch
    if num_iterations < 1:
        raise ValueError(f"{len(train_task)} GSM8K questions make no step of --examples_per_step="
                         f"{cfg.examples_per_step}; lower it or pass --num_iterations")
    log0(f"RL from {cfg.source}/{tag} step {run.source_meta['step']} | {num_iterations} steps x "
         f"{cfg.examples_per_step} questions x {cfg.num_samples} samples | device {device_name(device)} x{world_size}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad = tokenizer.get_bos_token_id()

    def evaluate() -> dict:
        model.eval()
        with autocast:
            out = evaluate_pass_at_k(engine, tokenizer, test_task, cfg.eval_examples, cfg.num_samples,
                                     cfg.max_new_tokens, cfg.temperature, cfg.top_k, device, rank, world_size)
        model.train()
        return out

    from tqdm import tqdm
    evals: dict = {}
    history: list[dict] = []
    bar = progress_bar(total=num_iterations, initial=step, desc="chat_rl", unit="step")
    while True:
        last = step == num_iterations
        if cfg.eval_examples > 0 and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            evals = evaluate()
            tqdm.write(f"step {step:05d} | GSM8K test " + " | ".join(f"{k} {v}" for k, v in evals.items())) \
                if master else None
            tracker.log(step, **{k: v for k, v in evals.items() if k != "n"})
        if step > 0 and (last or (cfg.save_every > 0 and step % cfg.save_every == 0)):
            run.save(step, rank, world_size, loader_state={"questions_seen": step * cfg.examples_per_step},
                     eval=evals)
        if last:
            break

        t0 = time.perf_counter()
        # 1. sample every group of this rank's questions with the current policy
        model.eval()
        groups = []
        reward_sum = 0.0
        for j in range(local_examples):
            g = step * cfg.examples_per_step + rank * local_examples + j
            conv = train_task[order[g % len(order)]]
            prompt = render_for_completion(tokenizer, conv)
            with autocast:
                rows, replies = sample_group(engine, tokenizer, prompt, cfg.num_samples, cfg.max_new_tokens,
                                             cfg.temperature, cfg.top_k, seed=cfg.seed * 1_000_003 + g)
            rewards = torch.tensor([float(train_task.evaluate(conv, r)) for r in replies])
            groups.append((rows, group_advantages(rewards)))
            reward_sum += rewards.sum().item()
        model.train()
        # 2. one gradient step over all sampled tokens of the step (all ranks)
        stats = torch.tensor([sum(sum(m[1:]) for rows, _ in groups for _, m in rows), reward_sum, 0.0],
                             dtype=torch.float64, device=device)  # sampled tokens, reward sum, loss sum
        if is_ddp:
            dist.all_reduce(stats)
        denom = stats[0].clamp(min=1).item() / world_size  # the optimizer averages gradients over ranks
        lrm = lr_multiplier(step, num_iterations, 0, 1.0, 0.0)
        optimizer.set_lr_multiplier(lrm)
        loss_sum = 0.0
        for rows, advantages in groups:
            for i in range(0, len(rows), cfg.device_batch_size):
                x, y = collate(rows[i:i + cfg.device_batch_size], pad, device)
                with autocast:
                    loss = policy_gradient_loss(model, x, y, advantages[i:i + cfg.device_batch_size].to(device), denom)
                loss.backward()
                loss_sum += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if is_ddp:
            loss_t = torch.tensor([loss_sum], dtype=torch.float64, device=device)
            dist.all_reduce(loss_t)
            loss_sum = loss_t.item() / world_size
        dt = time.perf_counter() - t0
        step += 1
        if step == run.step + 1:  # the optimizer state exists now
            run.check_room(step, num_iterations, cfg.save_every, rank, world_size)
        mean_reward = stats[1].item() / (cfg.examples_per_step * cfg.num_samples)
        mean_tokens = stats[0].item() / (cfg.examples_per_step * cfg.num_samples)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"loss became {loss_sum} at step {step}; lower --init_lr_frac")
        history.append({"step": step, "reward": mean_reward, "loss": loss_sum})
        if master:
            tqdm.write(f"step {step:05d}/{num_iterations} | reward {mean_reward:.3f} | loss {loss_sum:+.4f} | "
                       f"lrm {lrm:.3f} | {mean_tokens:.0f} tok/sample | {dt:.1f} s | mem {peak_memory_gib(device):.2f} GiB")
            tracker.log(step, reward=mean_reward, pg_loss=loss_sum, lrm=lrm, step_s=dt)
        bar.update(1)
    bar.close()

    result = {
        "steps": step, "mean_reward": history[-1]["reward"] if history else None,
        "final_loss": history[-1]["loss"] if history else None, **evals,
        "total_seconds": time.time() - t_start, "peak_memory_gib": peak_memory_gib(device),
        "device": device_name(device), "world_size": world_size, "checkpoint_dir": str(run.checkpoint_dir),
        "history": history,
    }
    summary = {k: v for k, v in result.items() if k != "history"}
    tracker.finish(summary)
    run.finish("chat_rl", summary, device, world_size)
    compute_cleanup()
    return result


if __name__ == "__main__":
    main()

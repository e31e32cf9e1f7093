"""Chat evaluations: ARC-Easy/Challenge, MMLU (categorical), GSM8K and HumanEval (generative).

Categorical tasks need no sampling: the prompt is rendered up to <|assistant_start|>, one forward
pass gives the next-token logits, and among the answer letters' tokens the largest wins. Prompts
of several problems share a forward pass (right-padded; each row is read at its own last token).
Generative tasks sample replies with the Engine (the calculator tool on) and let the task judge
them; with several samples a problem counts as solved if any sample is right (pass@k).

ChatCORE = mean over tasks of the accuracy centered on the task's chance level.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from nanochat.common import autocast_for
from nanochat.eval import rank_share, sum_over_ranks
from nanochat.progress import progress_bar
from nanochat.tasks.base import Task, centered

CHAT_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}


def load_task(name: str, data_root=None) -> Task:
    from nanochat.tasks.arc import ARC
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.tasks.humaneval import HumanEval
    from nanochat.tasks.mmlu import MMLU

    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(name, data_root=data_root)
    if name == "MMLU":
        return MMLU("test", data_root=data_root)
    if name == "GSM8K":
        return GSM8K("test", data_root=data_root)
    if name == "HumanEval":
        return HumanEval(data_root=data_root)
    raise ValueError(f"unknown chat task {name!r}; choose from {', '.join(CHAT_TASKS)}")


def _indices(task: Task, max_problems: int) -> list[int]:
    """This rank's share of the task's first `max_problems` problems (all when <= 0)."""
    n = len(task) if max_problems <= 0 else min(max_problems, len(task))
    return rank_share(list(range(n)))


@torch.no_grad()
def run_categorical(model, tokenizer, task: Task, device, batch_size: int = 8, max_problems: int = -1,
                    model_fn: Callable | None = None, desc: str | None = None) -> dict:
    """Accuracy of a categorical task from the answer letters' logits at the prompt's end (`desc`: show a
    progress bar over this rank's problems)."""
    from nanochat.conversation import render_for_completion

    model_fn = model_fn or model
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    pad = tokenizer.get_bos_token_id()
    letter_ids: dict[str, int] = {}
    correct = total = 0
    todo = _indices(task, max_problems)
    bar = progress_bar(total=len(todo), desc=desc, unit="problem", disable=None if desc else True)
    for start in range(0, len(todo), batch_size):
        convs = [task[i] for i in todo[start:start + batch_size]]
        prompts = [render_for_completion(tokenizer, c) for c in convs]
        if max_len:  # keep the end: the question's last lines and <|assistant_start|> matter most
            prompts = [p[-max_len:] for p in prompts]
        width = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), width), pad, dtype=torch.long)
        for r, p in enumerate(prompts):
            batch[r, :len(p)] = torch.tensor(p, dtype=torch.long)
        with autocast_for(device):
            logits = model_fn(batch.to(device))
        for r, (conv, prompt) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens; categorical scoring "
                                         f"needs one token per letter")
                    letter_ids[letter] = ids[0]
            scores = logits[r, len(prompt) - 1, [letter_ids[x] for x in letters]]
            answer = letters[int(scores.argmax())]
            correct += task.evaluate(conv, answer)
            total += 1
        bar.update(len(convs))
    bar.close()
    correct, total = sum_over_ranks(correct, total, device)
    return {"accuracy": correct / max(total, 1), "n": total}


def run_generative(engine, tokenizer, task: Task, device, num_samples: int = 1, max_new_tokens: int = 512,
                   temperature: float = 0.0, top_k: int | None = 50, max_problems: int = -1,
                   log: Callable[[str], None] | None = None, desc: str | None = None) -> dict:
    """pass@num_samples of a generative task, sampling with the Engine (`desc`: show a progress bar over
    this rank's problems)."""
    from nanochat.conversation import render_for_completion

    correct = total = too_long = 0
    context = getattr(getattr(engine, "config", None), "sequence_len", None)
    todo = _indices(task, max_problems)
    bar = progress_bar(total=len(todo), desc=desc, unit="problem", disable=None if desc else True)
    for i in todo:
        conv = task[i]
        prompt = render_for_completion(tokenizer, conv)
        if context is not None and len(prompt) >= context:
            too_long += 1  # no room to answer: counts as unsolved
            total += 1
            bar.update(1)
            continue
        seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=42 + i)
        replies = [tokenizer.decode(s[len(prompt):]) for s in seqs]
        correct += int(any(task.evaluate(conv, reply) for reply in replies))
        total += 1
        bar.set_postfix_str(f"{correct} solved", refresh=False)
        bar.update(1)
    bar.close()
    if too_long and log:
        log(f"  {too_long} prompts did not fit the model's context ({context} tokens) and count as unsolved")
    correct, total = sum_over_ranks(correct, total, device)
    return {"accuracy": correct / max(total, 1), "n": total}


def chat_core(accuracies: dict[str, float]) -> float:
    """Mean centered accuracy over the evaluated tasks."""
    if not accuracies:
        raise ValueError("ChatCORE needs at least one task result")
    return sum(centered(acc, BASELINES[name]) for name, acc in accuracies.items()) / len(accuracies)


def evaluate_chat(model, tokenizer, task_names: list[str], device, batch_size: int = 8, max_problems: int = -1,
                  num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0,
                  top_k: int | None = 50, data_root=None, log: Callable[[str], None] | None = None) -> dict:
    """{"tasks": {name: {accuracy, centered, n}}, "chatcore": mean centered}."""
    from nanochat.inference.engine import Engine

    engine = None
    results = {}
    for name in task_names:
        task = load_task(name, data_root)
        if task.eval_type == "categorical":
            res = run_categorical(model, tokenizer, task, device, batch_size, max_problems, desc=name)
        else:
            engine = engine or Engine(model, tokenizer)
            res = run_generative(engine, tokenizer, task, device, num_samples, max_new_tokens, temperature,
                                 top_k, max_problems, log, desc=name)
        res["centered"] = centered(res["accuracy"], BASELINES[name])
        results[name] = res
        if log:
            log(f"{name:<14} accuracy {res['accuracy']:.4f}  centered {res['centered']:+.4f}  (n={res['n']})")
    return {"tasks": results, "chatcore": chat_core({k: v["accuracy"] for k, v in results.items()})}

"""CORE: in-context evaluation of a base model (DCLM's CORE metric).

Every item becomes one or more (context, continuation) pairs, each prefixed by a few solved
examples of the same task:
  multiple_choice  one pair per choice; the choice with the lowest loss wins
  schema           one pair per context option, all with the same continuation; lowest loss wins
  language_modeling one pair; correct when greedy decoding reproduces every continuation token
Losses are averaged over the continuation's tokens (mean, not sum, as nanochat does), so longer
choices are not penalized for their length.

Tokenization: context and continuation are encoded separately and concatenated, with the
context's trailing spaces moved onto the continuation ("Answer:" + " Paris"), so the scored
tokens are exactly the continuation's and look like ordinary running text.

The model enters as `model_fn(ids [B, T]) -> logits [B, T, V]`, so tests can pass oracles.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanochat.eval import rank_share, sum_over_ranks
from nanochat.progress import progress_bar
from nanochat.tasks.base import centered
from nanochat.tasks.core_tasks import CoreTask, load_core_tasks

FEWSHOT_SEED = 1234   # few-shot examples for item i are drawn with Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337    # --max_per_task keeps the first N items of this shuffle
ModelFn = Callable[[torch.Tensor], torch.Tensor]


def sample_fewshot(items: list[dict], index: int, k: int) -> list[dict]:
    """k examples other than item `index`, the same on every run and every rank."""
    k = min(k, len(items) - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + index).sample(range(len(items) - 1), k)
    return [items[j + (j >= index)] for j in picks]


def build_pairs(item: dict, meta: dict, fewshot: list[dict]) -> list[tuple[str, str]]:
    """(context, continuation) strings for each option of `item`."""
    delim, task_type = meta["continuation_delimiter"], meta["task_type"]
    if task_type == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [(f"{prefix}{item['query']}{delim}", choice) for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [(f"{prefix}{ctx}{delim}", item["continuation"]) for ctx in item["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(f"{ex['context']}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [(f"{prefix}{item['context']}{delim}", item["continuation"])]
    raise ValueError(f"unknown CORE task type {task_type!r}")


def tokenize_pair(tokenizer, context: str, continuation: str, max_seq_len: int | None = None) -> tuple[list[int], int]:
    """Token ids of BOS + context + continuation, and the index where the continuation starts.

    Sequences longer than `max_seq_len` lose tokens from the left (the oldest few-shot text)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped, prepend=tokenizer.get_bos_token_id())
    cont = tokenizer.encode(continuation)
    if not cont:
        raise ValueError(f"empty continuation after context {context[-60:]!r}")
    ids = ctx + cont
    if max_seq_len is not None and len(ids) > max_seq_len:
        if len(cont) >= max_seq_len:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_seq_len={max_seq_len}")
        ids = ids[len(ids) - max_seq_len:]
    return ids, len(ids) - len(cont)


@torch.no_grad()
def score_rows(model_fn: ModelFn, rows: list[tuple[list[int], int]], device, pad_id: int) -> list[tuple[float, bool]]:
    """(mean continuation loss, greedy-matches-continuation) for each (ids, cont_start) row, one batch."""
    width = max(len(ids) for ids, _ in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        batch[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    logits = model_fn(batch.to(device))
    out = []
    for r, (ids, start) in enumerate(rows):
        pred = logits[r, start - 1:len(ids) - 1].float()
        target = batch[r, start:len(ids)].to(pred.device)
        loss = F.cross_entropy(pred, target).item()
        out.append((loss, bool((pred.argmax(-1) == target).all().item())))
    return out


def item_correct(meta: dict, item: dict, scores: list[tuple[float, bool]]) -> bool:
    if meta["task_type"] == "language_modeling":
        return scores[0][1]
    losses = [loss for loss, _ in scores]
    return losses.index(min(losses)) == int(item["gold"])


def task_order(num_items: int, max_per_task: int = -1) -> list[int]:
    """The items a CORE task evaluates, in order: the first `max_per_task` of a fixed shuffle (all when <= 0)."""
    order = list(range(num_items))
    random.Random(SUBSET_SEED).shuffle(order)
    return order[:max_per_task] if max_per_task > 0 else order


def evaluate_task(model_fn: ModelFn, tokenizer, task_items: list[dict], task_meta: dict, device="cpu",
                  batch_size: int = 8, max_per_task: int = -1, max_seq_len: int | None = None,
                  progress: Callable[[int], object] | None = None) -> dict:
    """Accuracy of one CORE task. Rows of several items share a forward pass (up to `batch_size`
    rows; an item's options always stay together). Under torch.distributed, ranks split the items.
    `progress(n)` is called with the number of items each forward pass scored (a bar's update)."""
    order = task_order(len(task_items), max_per_task)
    pad_id = tokenizer.get_bos_token_id()
    correct = total = 0
    pending: list[tuple[int, list[tuple[list[int], int]]]] = []

    def flush():
        nonlocal correct, total
        rows = [row for _, item_rows in pending for row in item_rows]
        scores = score_rows(model_fn, rows, device, pad_id)
        pos = 0
        for idx, item_rows in pending:
            correct += item_correct(task_meta, task_items[idx], scores[pos:pos + len(item_rows)])
            total += 1
            pos += len(item_rows)
        if progress is not None:
            progress(len(pending))
        pending.clear()

    for idx in rank_share(order):
        fewshot = sample_fewshot(task_items, idx, task_meta["num_fewshot"])
        pairs = build_pairs(task_items[idx], task_meta, fewshot)
        item_rows = [tokenize_pair(tokenizer, c, x, max_seq_len) for c, x in pairs]
        if pending and sum(len(r) for _, r in pending) + len(item_rows) > batch_size:
            flush()
        pending.append((idx, item_rows))
    if pending:
        flush()
    correct, total = sum_over_ranks(correct, total, device)
    return {"accuracy": correct / max(total, 1), "n": total}


def evaluate_core(model, tokenizer, device="cpu", max_per_task: int = -1, batch_size: int = 8,
                  data_root=None, tasks: list[CoreTask] | None = None, model_fn: ModelFn | None = None,
                  max_seq_len: int | None = None, log: Callable[[str], None] | None = None,
                  desc: str | None = None) -> dict:
    """CORE of a model: {"tasks": {label: {accuracy, centered, random_baseline, n}}, "core": mean centered}.

    HellaSwag counts in the mean because tasks_v0.3.yaml lists it; it is also repeated at the top
    level under "hellaswag" so it can be reported on its own. `desc`: one progress bar over every
    task's items (this rank's share).
    """
    tasks = tasks if tasks is not None else load_core_tasks(data_root)
    if model_fn is None:
        model_fn = model
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "sequence_len", None)
    total = sum(len(rank_share(task_order(len(task.items), max_per_task))) for task in tasks)
    bar = progress_bar(total=total, desc=desc, unit="item", disable=None if desc else True)
    results = {}
    for task in tasks:
        res = evaluate_task(model_fn, tokenizer, task.items, task.meta, device, batch_size, max_per_task, max_seq_len,
                            progress=bar.update)
        res["centered"] = centered(res["accuracy"], task.random_baseline)
        res["random_baseline"] = task.random_baseline
        results[task.label] = res
        if log:
            log(f"{task.label:<34} acc {res['accuracy']:.4f}  centered {res['centered']:+.4f}  (n={res['n']})")
    bar.close()
    out = {"tasks": results, "core": sum(r["centered"] for r in results.values()) / max(len(results), 1)}
    if "hellaswag" in results:
        out["hellaswag"] = {k: results["hellaswag"][k] for k in ("accuracy", "centered")}
    return out

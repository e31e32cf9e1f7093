"""Combining tasks: a deterministic shuffled mixture, and the SFT mixture built from it."""
from __future__ import annotations

import random

from nanochat.tasks.base import Task


class TaskMixture(Task):
    """A deterministic shuffle of several tasks' examples.

    Each entry is a task (all of its examples) or `(task, n)`: n examples, cycling through the
    task when n exceeds its length (oversampling) and taking its first n otherwise. The order
    depends only on `seed`, so a resumed run sees the same stream.
    """

    def __init__(self, tasks: list[Task | tuple[Task, int]], seed: int = 42, **kw):
        super().__init__(**kw)
        self.tasks: list[Task] = []
        self.index: list[tuple[int, int]] = []
        for t_idx, entry in enumerate(tasks):
            task, n = entry if isinstance(entry, tuple) else (entry, len(entry))
            if len(task) == 0 or n < 0:
                raise ValueError(f"mixture entry {t_idx} ({type(task).__name__}): need a non-empty task and n >= 0")
            self.tasks.append(task)
            self.index += [(t_idx, i % len(task)) for i in range(n)]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t_idx, i = self.index[index]
        return self.tasks[t_idx][i]


def sft_mixture(split: str = "train", data_root=None, smoltalk: str = "", smoltalk_examples: int = 10_000,
                seed: int = 42) -> TaskMixture:
    """The SFT mixture of `split` ("train" or "val"): the local GPTeacher + FastChat sets, GSM8K with
    its calculator annotations as tool calls, and SmolTalk when `smoltalk` is "hub" (download it) or
    a parquet path. Training takes up to `smoltalk_examples` SmolTalk conversations (-1 = all);
    validation uses the local held-out slices and the GSM8K and SmolTalk test splits in full.
    Empty parts (a tiny local set's held-out slice) are left out rather than failing the mixture."""
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.tasks.sft_local import local_sft_tasks
    from nanochat.tasks.smoltalk import SmolTalk

    other_split = "train" if split == "train" else "test"  # GSM8K and SmolTalk have no "val"
    tasks: list[Task | tuple[Task, int]] = [*local_sft_tasks(split, data_root), GSM8K(other_split, data_root=data_root)]
    if smoltalk:
        chats = SmolTalk(other_split, path=None if smoltalk == "hub" else smoltalk)
        capped = split == "train" and smoltalk_examples >= 0
        tasks.append((chats, min(len(chats), smoltalk_examples) if capped else len(chats)))
    tasks = [t for t in tasks if len(t[0] if isinstance(t, tuple) else t) > 0]
    if not tasks:
        raise ValueError(f"the SFT {split} mixture is empty: check --data_root ({data_root or 'default'})")
    return TaskMixture(tasks, seed=seed)

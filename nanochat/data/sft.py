"""Conversation batches for supervised fine-tuning (and the RL policy-gradient step).

Pretraining packs documents into full rows; chat data is different: each conversation is one row,
rows are padded to the longest in the batch, and only the assistant's tokens are trained on. That
is what `collate` does. `SFTLoader` walks a task (usually a `TaskMixture`) in a per-epoch shuffled
order that depends only on the seed and the epoch, split across ranks, and its two-number state
(`epoch`, `cursor`) resumes the stream exactly where a checkpoint left it.
"""
from __future__ import annotations

import random

import torch

from nanochat.conversation import render_conversation


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) rows -> inputs, targets: int64 [B, T] with T = the longest row minus one.

    inputs[b, t] = ids[t] and targets[b, t] = ids[t + 1] when mask[t + 1] == 1, else -1 (the loss's
    ignore index). Padding past a row's end: inputs `pad_id` (causal attention keeps it from
    reaching real positions), targets -1.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    for i, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"row {i}: {len(ids)} ids but {len(mask)} mask entries; they must align")
        if len(ids) < 2:
            raise ValueError(f"row {i} has {len(ids)} token(s); a training row needs at least 2")
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        n = len(ids) - 1
        inputs[b, :n] = ids_t[:-1]
        targets[b, :n] = torch.where(keep, ids_t[1:], -1)
    return inputs.to(device), targets.to(device)


class SFTLoader:
    """Endless (inputs, targets) micro-batches of `batch_size` conversations from `task`.

    Epoch e visits every example once, in a shuffle seeded by (seed, e); each global batch is
    `batch_size * world_size` consecutive examples of that order, and rank r takes its r-th slice.
    The tail of an epoch that does not fill a global batch is skipped. Conversations are rendered
    with `max_seq_len + 1` tokens at most, so rows are at most `max_seq_len` long after the shift.
    """

    def __init__(self, tokenizer, task, batch_size: int, max_seq_len: int, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, seed: int = 42, state: dict | None = None):
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_seq_len ({max_seq_len}) must be >= 1")
        self.tokenizer, self.task = tokenizer, task
        self.batch_size, self.max_seq_len, self.device = batch_size, max_seq_len, device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(task) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the task has {len(task)} conversations, fewer than one global batch of "
                             f"{self.global_batch} (device_batch_size x world size): lower --device_batch_size")
        self.pad_id = tokenizer.get_bos_token_id()
        self.epoch, self.cursor = 0, 0
        if state is not None:
            self.load_state_dict(state)
        self._order_epoch, self._order = -1, []

    def order(self, epoch: int) -> list[int]:
        """The example order of `epoch` (cached for the current one)."""
        if epoch != self._order_epoch:
            self._order = list(range(len(self.task)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)  # str seeds are stable across processes
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"epoch", "cursor"} <= set(state):
            raise ValueError(f"not an SFTLoader state (need 'epoch' and 'cursor'): {state!r:.200}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.cursor / (self.batches_per_epoch * self.global_batch)

    def __iter__(self) -> "SFTLoader":
        return self

    def next_indices(self) -> list[int]:
        """Task indices of this rank's next micro-batch; advances the stream."""
        if self.cursor + self.global_batch > len(self.task):
            self.epoch, self.cursor = self.epoch + 1, 0
        start = self.cursor + self.rank * self.batch_size
        self.cursor += self.global_batch
        return self.order(self.epoch)[start:start + self.batch_size]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [render_conversation(self.tokenizer, self.task[i], max_tokens=self.max_seq_len + 1)
                for i in self.next_indices()]
        return collate(rows, self.pad_id, self.device)

"""Evaluators (CORE, ChatCORE, bits per byte). Under torch.distributed each rank scores a strided
share of the items and the counts are summed over ranks; the two helpers below do that for all."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_share(indices: list[int]) -> list[int]:
    """The items of `indices` this rank scores (every world_size-th, from its rank)."""
    if not dist.is_initialized():
        return indices
    return indices[dist.get_rank()::dist.get_world_size()]


def sum_over_ranks(correct: int, total: int, device) -> tuple[int, int]:
    """(correct, total) summed over every rank; unchanged in a single process."""
    if dist.is_initialized():
        counts = torch.tensor([correct, total], dtype=torch.long, device=device)
        dist.all_reduce(counts)
        correct, total = counts.tolist()
    return correct, total

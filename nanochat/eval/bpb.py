"""Validation bits per byte: a loss figure that does not depend on the tokenizer's vocabulary.

Summed next-token losses (nats) / ln 2 / number of UTF-8 bytes those target tokens stand for.
Special tokens have 0 bytes in `token_bytes` and are left out of both sums, as are ignored
targets (< 0). Under torch.distributed both sums are reduced over ranks.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` (inputs, targets) batches; `model(x, y, loss_reduction="none")`
    must return per-token losses [B, T]."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    it = iter(batches)
    nats = nbytes = None
    for _ in range(steps):
        x, y = next(it)
        loss = model(x, y, loss_reduction="none").float().reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        per_token_bytes = torch.where(valid, token_bytes.to(y.device)[y.clamp(min=0)], 0)
        counted = per_token_bytes > 0
        step_nats = (loss * counted).sum()
        step_bytes = per_token_bytes.sum()
        nats = step_nats if nats is None else nats + step_nats
        nbytes = step_bytes if nbytes is None else nbytes + step_bytes
    totals = torch.stack([nats.double(), nbytes.double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    total_nats, total_bytes = totals.tolist()
    if total_bytes == 0:
        raise ValueError("the batches held no target bytes (only special or ignored tokens)")
    return total_nats / (math.log(2) * total_bytes)

"""`torch`: plain PyTorch, the reference loss backend, and the loss semantics every backend shares.

It materializes the logits; torch.compile fuses softcap + CE around the matmul. The helpers below define
what the other backends must match: the softcap, the "mean" over non-ignored targets and the dtype a
fused loss runs its matmuls in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.registry import Backend


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a fused loss runs its matmuls in: autocast's if on, else the lower precision of the
    two inputs (an fp32 master weight meets bf16 activations)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype if hidden.dtype == torch.float32 else hidden.dtype


def mean_over_valid(total: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The registry's "mean": sum / max(count of non-ignored targets, 1). With every target ignored it is 0
    with zero gradients (PyTorch's mean gives nan); the count stays on the device, so there is no host
    sync and torch.compile fuses it."""
    return total / (targets != ignore_index).sum().clamp(min=1)


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -1,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy on materialized logits, in fp32, with the same softcap/ignore semantics."""
    logits = apply_softcap(logits.reshape(-1, logits.size(-1)).float(), softcap)
    targets = targets.reshape(-1)
    if reduction != "mean":
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return mean_over_valid(total, targets, ignore_index)


class TorchLoss(Backend):
    name, summary = "torch", "plain PyTorch, logits materialized"

    def fused_linear_cross_entropy(self, hidden, weight, targets, *, ignore_index=-1, softcap=None,
                                   reduction="mean"):
        return cross_entropy(hidden @ weight.t(), targets, ignore_index=ignore_index, softcap=softcap,
                             reduction=reduction)

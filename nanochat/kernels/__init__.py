"""Swappable kernels: the loss (fused linear + cross-entropy) and attention backends.

    from nanochat import kernels
    kernels.set_kernel_backend("cce")
    loss = kernels.fused_linear_cross_entropy(hidden, lm_head_weight, targets, softcap=15.0)

A loss backend is one module in this package, `loss_<name>.py`, with one class (nanochat.registry.Backend:
`is_available() -> (bool, reason)`, `supports(dtype, device)`) whose method
    fused_linear_cross_entropy(hidden [N, C], weight [V, C], targets [N], *, ignore_index, softcap, reduction)
computes the loss, and one line in LOSS_BACKENDS below. Semantics are the same everywhere (`loss_torch.py`
is the reference): logits = hidden @ weight.T, optionally softcapped as softcap * tanh(logits / softcap);
targets equal to ignore_index are skipped; "mean" divides by the number of non-ignored tokens (a batch with
none gives 0 with zero gradients, not PyTorch's nan), "sum" sums, "none" returns per-token losses (0 where
ignored); losses are fp32. `weight` holds only real vocab rows: callers slice off padding rows (a free,
contiguous view).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.common import log0
from nanochat.kernels.loss_cce import CCELoss
from nanochat.kernels.loss_liger import LigerLoss
from nanochat.kernels.loss_torch import TorchLoss, apply_softcap, cross_entropy  # noqa: F401 -- the public API
from nanochat.kernels.loss_triton import TritonLoss
from nanochat.registry import Backend, BackendUnavailable, Registry  # noqa: F401 -- BackendUnavailable: public

LOSS_BACKENDS = Registry("loss backend", "--kernel", [TorchLoss(), LigerLoss(), CCELoss(), TritonLoss()],
                         aliases={"current": "torch"})

_backend: Backend = LOSS_BACKENDS["torch"]
_logged = False


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered loss backend -> (available, reason it is not, or 'ok')."""
    return LOSS_BACKENDS.available()


def set_kernel_backend(name: str) -> None:
    """Select the loss backend by name (`current`: the old name of `torch`). Raises ValueError for unknown
    names and BackendUnavailable (naming the pip extra) when its package or hardware is missing."""
    global _backend, _logged
    _backend, _logged = LOSS_BACKENDS.require(name), True
    log0(f"loss kernel backend: {_backend.name}")


def get_kernel_backend() -> str:
    return _backend.name


def _active() -> Backend:
    """The selected backend. Logs once in eager mode; under torch.compile it is a plain global read (no
    logging), so the loss never breaks the graph."""
    global _logged
    if not _logged and not torch.compiler.is_compiling():
        log0(f"loss kernel backend: {_backend.name}")
        _logged = True
    return _backend


def fused_linear_cross_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -1,
    softcap: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """CE(softcap(hidden @ W.T), targets) through the selected backend; see the module docstring."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    return _active().fused_linear_cross_entropy(
        hidden, lm_head_weight, targets.reshape(-1),
        ignore_index=ignore_index, softcap=softcap, reduction=reduction,
    )


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (PyTorch's fused op; compiles to one kernel)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)

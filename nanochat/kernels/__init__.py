"""Swappable kernels: the loss (fused linear + cross-entropy) and attention backends.

    from nanochat import kernels
    kernels.set_kernel_backend("cce")
    loss = kernels.fused_linear_cross_entropy(hidden, lm_head_weight, targets, softcap=15.0)

A loss backend is one module in this package exposing
    is_available() -> (bool, reason)
    fused_linear_cross_entropy(hidden [N, C], weight [V, C], targets [N], *, ignore_index, softcap, reduction)
and one line in LOSS_BACKENDS below. Semantics are the same everywhere: logits = hidden @ weight.T,
optionally softcapped as softcap * tanh(logits / softcap); targets equal to ignore_index are skipped;
"mean" divides by the number of non-ignored tokens (a batch with none gives 0 with zero gradients, not
PyTorch's nan), "sum" sums, "none" returns per-token losses (0 where ignored); losses are fp32.
`weight` holds only real vocab rows: callers slice off padding rows (a free, contiguous view).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
import torch.nn.functional as F

from nanochat.common import log0

# name -> module implementing the backend. Adding a backend: one file, one line here.
LOSS_BACKENDS: dict[str, str] = {
    "current": "nanochat.kernels.loss_current",
    "liger": "nanochat.kernels.loss_liger",
    "cce": "nanochat.kernels.loss_cce",
    "triton": "nanochat.kernels.loss_triton",
}

_backend_name = "current"  # its module, _backend_module, is loaded at the end of this file
_logged = False


class BackendUnavailable(RuntimeError):
    """A known backend whose package or hardware is missing; the message names the fix."""


def _load(name: str) -> ModuleType:
    if name not in LOSS_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of: {', '.join(LOSS_BACKENDS)}")
    return importlib.import_module(LOSS_BACKENDS[name])


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered loss backend -> (available, reason it is not, or 'ok')."""
    result = {}
    for name in LOSS_BACKENDS:
        try:
            result[name] = _load(name).is_available()
        except Exception as exc:  # an import error is a reason, not a crash
            result[name] = (False, f"{type(exc).__name__}: {exc}")
    return result


def set_kernel_backend(name: str) -> None:
    """Select the loss backend by name. Raises ValueError for unknown names and
    BackendUnavailable (naming the pip extra) when its package or hardware is missing."""
    global _backend_name, _backend_module, _logged
    module = _load(name)
    ok, reason = module.is_available()
    if not ok:
        raise BackendUnavailable(f"kernel backend {name!r} is unavailable: {reason}")
    _backend_name, _backend_module, _logged = name, module, True
    log0(f"loss kernel backend: {name}")


def get_kernel_backend() -> str:
    return _backend_name


def _active() -> ModuleType:
    """The selected backend module. Logs once in eager mode; under torch.compile it is a plain global
    read (no import, no logging), so the loss never breaks the graph."""
    global _logged
    if not _logged and not torch.compiler.is_compiling():
        log0(f"loss kernel backend: {_backend_name}")
        _logged = True
    return _backend_module


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


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a fused loss runs its matmuls in: autocast's if on, else the lower precision of the
    two inputs (an fp32 master weight meets bf16 activations). Shared by every backend."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype if hidden.dtype == torch.float32 else hidden.dtype


def gpu_package_status(module: str, package: str) -> tuple[bool, str]:
    """is_available() of a backend built on a pip package of CUDA-only Triton kernels (liger, cce):
    the package must import and a GPU must be visible; the reason names the pip extra."""
    hint = "pip install 'nanochat[gpu]'"
    if importlib.util.find_spec(module) is None:
        return False, f"{package} is not installed: {hint}"
    if not torch.cuda.is_available():
        return False, f"{package}'s Triton kernels need a CUDA GPU and none is visible (on a GPU machine: {hint})"
    return True, "ok"


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


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (PyTorch's fused op; compiles to one kernel)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


# The default backend is imported here, where the helpers it uses exist, and not on the first loss call
# (which may be inside a compiled graph).
_backend_module: ModuleType = _load(_backend_name)

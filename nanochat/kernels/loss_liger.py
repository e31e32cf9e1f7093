"""`liger`: liger-kernel's fused linear cross-entropy (Triton, CUDA only).

Liger walks the tokens in chunks of about N*C/V rows: one cuBLAS matmul makes a chunk of bf16 logits, one
Triton kernel (`liger_cross_entropy_kernel`) turns them into the loss and, in place, the logit gradient,
and two more matmuls fold that into dhidden and dW. The gradients are therefore computed in the forward
pass and held until backward (no logits are kept). Two properties worth knowing:
- dW is accumulated across chunks in the weight's dtype (bf16 for a bf16 weight): cheaper in memory than an
  fp32 accumulator, at about 5e-3 relative error on dW at the full shape;
- it reads the number of non-ignored targets on the host (`.item()`), so it syncs once per call and
  torch.compile graph-breaks around it.
With reduction="mean" and every target ignored it returns 0 with zero gradients (ignored rows are skipped
entirely), which is the registry's definition.
"""
from __future__ import annotations

import torch

from nanochat.kernels.loss_torch import compute_dtype
from nanochat.registry import Backend, package_status


class LigerLoss(Backend):
    name, summary = "liger", "liger-kernel, CUDA"

    def is_available(self) -> tuple[bool, str]:
        return package_status("liger_kernel", "liger-kernel", "pip install 'nanochat[gpu]'", cuda=True)

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cuda"

    @torch.compiler.disable  # its autograd.Function syncs with the host and launches raw Triton kernels: run it eagerly
    def fused_linear_cross_entropy(self, hidden, weight, targets, *, ignore_index=-1, softcap=None, reduction="mean"):
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        dtype = compute_dtype(hidden, weight)
        # Liger multiplies hidden and weight directly: they must share a dtype (casts are differentiable).
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        # Positional arguments, stable across liger versions: input, weight, target, bias, ce_weight,
        # ignore_index, lse_square_scale, label_smoothing, reduction, softcap.
        out = LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets, None, None, ignore_index, 0.0, 0.0, reduction, softcap)
        # Newer versions return (loss, z_loss, token_accuracy, ...); older ones the loss alone.
        return out[0] if isinstance(out, tuple) else out

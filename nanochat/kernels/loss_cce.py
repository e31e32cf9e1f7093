"""`cce`: Apple's Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`, Triton, CUDA only).

CCE never writes logits to memory: a forward kernel (`_cce_lse_forward_kernel`) computes each token's
log-sum-exp tile by tile, a second one (`_indexed_neg_dot_forward_kernel`) the target logit, and the backward
kernel (`_cce_backward_kernel`) recomputes the logits to form dhidden and dW. Facts that shape this wrapper:
- its backward needs bf16/fp16 hidden states (fp32 raises), so fp32 inputs are refused here with the fix;
- its backward skips vocab blocks whose softmax is below bf16 resolution (filter_eps, the library default):
  an approximation far under bf16 noise, and part of why it is fast;
- its backward sums dhidden in the input dtype: each vocab block's partial product is rounded to bf16 and
  lock-added into a bf16 buffer (`cce_backward.py` in 25.1.1: `de = torch.zeros_like(e)`, `tl_lock_add`),
  512 roundings per element at V=65536. That, not this wrapper, is the ~2e-2 relative dhidden error the GPU
  check (`benchmarks/check_kernels.py`, tolerance 1e-2) reports for cce alone; 25.1.1 is the newest
  release on the index and has no fp32-accumulation option;
- "mean" is computed as sum / max(count, 1): the library's own mean divides by zero (a Python
  ZeroDivisionError in backward) when every target is ignored; the registry defines that case as 0 with zero
  gradients. The count costs one small reduction; CCE already syncs once to gather the valid rows.
"""
from __future__ import annotations

import torch

from nanochat.kernels.loss_torch import compute_dtype, mean_over_valid
from nanochat.registry import Backend, package_status


class CCELoss(Backend):
    name, summary = "cce", "Apple's Cut Cross-Entropy, CUDA, bf16/fp16"

    def is_available(self) -> tuple[bool, str]:
        return package_status("cut_cross_entropy", "cut-cross-entropy", "pip install 'nanochat[gpu]'", cuda=True)

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)

    @torch.compiler.disable  # its autograd.Function syncs with the host and launches raw Triton kernels: run it eagerly
    def fused_linear_cross_entropy(self, hidden, weight, targets, *, ignore_index=-1, softcap=None, reduction="mean"):
        from cut_cross_entropy import linear_cross_entropy

        dtype = compute_dtype(hidden, weight)
        if not self.supports(dtype, hidden.device):
            raise ValueError(f"the cce loss backend needs bf16/fp16 inputs on CUDA, got {dtype} on {hidden.device}: "
                             "run the model on the GPU under torch.autocast(dtype=torch.bfloat16) or choose --kernel torch")
        # The backward kernel allocates dW like the weight and asserts equal strides: keep it dense.
        hidden, weight = hidden.to(dtype), weight.to(dtype).contiguous()
        if reduction != "mean":
            return linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                        reduction=reduction)
        total = linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                     reduction="sum")
        return mean_over_valid(total, targets, ignore_index)

"""Our fp8 training layers (`--fp8_recipe triton`): torchao's tensorwise math, our cast kernels.

Per linear y = x Wᵀ, three fp8 GEMMs (torch._scaled_mm, cuBLASLt):
    forward   y  = x8 · W8ᵀ          x, W in e4m3
    backward  dx = g8 · W8           g = dy in e5m2 (gradients need range more than precision)
              dW = g8ᵀ · x8          in fp32, straight into the fp32 master weight's gradient
Each activation and gradient is cast once, into both layouts at one go (kernels/fp8_cast.py; q, k and v
each cast the same normed input, and torch.compile's common-subexpression pass makes that one cast). The
forward saves the transposed fp8 copy of x for dW (1 byte per element) instead of x in bf16, so the
backward never casts activations again. Weights are small and cast with torch ops (Inductor fuses them).

The MLP runs as one function: relu(h)² goes straight from h into fp8 (its bf16 copy is never
written) and its transposed fp8 copy is what the backward keeps for c_proj's dW.

`convert_to_fp8_triton` swaps classes in place: the modules keep their very same Parameters, so the
state_dict, Muon's groups and checkpoints are those of the bf16 model.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import MLP
from nanochat.kernels.fp8_cast import cast_transpose

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def cast_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] (fp32 master) -> (e4m3 W [out, in], e4m3 Wᵀ [in, out] contiguous, 1 / scale)."""
    scale = (torch.finfo(E4M3).max / w.detach().abs().amax().double().clamp(min=1e-12)).float()
    w8 = (w.detach().float() * scale).clamp(-torch.finfo(E4M3).max, torch.finfo(E4M3).max).to(E4M3)
    return w8, w8.t().contiguous(), scale.reciprocal()


def _mm(a: torch.Tensor, b_t: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, out_dtype: torch.dtype,
        fast_accum: bool) -> torch.Tensor:
    """a [M, K] row-major times b [K, N] given as b_t [N, K] row-major (the column-major b cuBLASLt wants)."""
    return torch._scaled_mm(a, b_t.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as contiguous bf16 rows [M, K]."""
    return x.reshape(-1, x.size(-1)).to(torch.bfloat16).contiguous()


def _grad_rows(dy: torch.Tensor) -> torch.Tensor:
    """dy as rows; their count is dW's inner dimension, which the fp8 GEMM needs to be a multiple of 16."""
    rows = _as_rows(dy)
    if rows.size(0) % 16:
        raise ValueError(f"fp8 training needs the number of tokens per micro-batch (batch x sequence) to be a "
                         f"multiple of 16, got {rows.size(0)}; change --device_batch_size or --max_seq_len")
    return rows


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, fast_accum_backward: bool):
        rows = _as_rows(x)
        x8, x8_t, x_inv = cast_transpose(rows, E4M3)
        w8, w8_t, w_inv = cast_weight(weight)
        y = _mm(x8, w8, x_inv, w_inv, torch.bfloat16, True)
        ctx.save_for_backward(x8_t, x_inv, w8_t, w_inv)
        ctx.fast_accum, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = fast_accum_backward, x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x8_t, x_inv, w8_t, w_inv = ctx.saved_tensors
        g8, g8_t, g_inv = cast_transpose(_grad_rows(dy), E5M2)
        dx = _mm(g8, w8_t, g_inv, w_inv, torch.bfloat16, ctx.fast_accum)
        dw = _mm(g8_t, x8_t, g_inv, x_inv, torch.float32, ctx.fast_accum)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), dw.to(ctx.w_dtype), None


class _Fp8ReluSquaredMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_fc, w_proj, fast_accum_backward: bool):
        rows = _as_rows(x)
        x8, x8_t, x_inv = cast_transpose(rows, E4M3)
        fc8, fc8_t, fc_inv = cast_weight(w_fc)
        proj8, proj8_t, proj_inv = cast_weight(w_proj)
        h = _mm(x8, fc8, x_inv, fc_inv, torch.bfloat16, True)
        a8, a8_t, a_inv = cast_transpose(h, E4M3, relu2=True)
        y = _mm(a8, proj8, a_inv, proj_inv, torch.bfloat16, True)
        ctx.save_for_backward(x8_t, x_inv, h, a8_t, a_inv, fc8_t, fc_inv, proj8_t, proj_inv)
        ctx.fast_accum, ctx.x_shape, ctx.x_dtype = fast_accum_backward, x.shape, x.dtype
        ctx.w_dtypes = (w_fc.dtype, w_proj.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x8_t, x_inv, h, a8_t, a_inv, fc8_t, fc_inv, proj8_t, proj_inv = ctx.saved_tensors
        g8, g8_t, g_inv = cast_transpose(_grad_rows(dy), E5M2)
        da = _mm(g8, proj8_t, g_inv, proj_inv, torch.bfloat16, ctx.fast_accum)
        d_proj = _mm(g8_t, a8_t, g_inv, a_inv, torch.float32, ctx.fast_accum)
        dh = (2 * F.relu(h.float()) * da.float()).to(torch.bfloat16)  # d relu(h)² / dh = 2 relu(h)
        dh8, dh8_t, dh_inv = cast_transpose(dh, E5M2)
        dx = _mm(dh8, fc8_t, dh_inv, fc_inv, torch.bfloat16, ctx.fast_accum)
        d_fc = _mm(dh8_t, x8_t, dh_inv, x_inv, torch.float32, ctx.fast_accum)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), d_fc.to(ctx.w_dtypes[0]), d_proj.to(ctx.w_dtypes[1]), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, fast_accum_backward: bool = False) -> torch.Tensor:
    """x Wᵀ through three fp8 GEMMs (bf16 output). The forward GEMM always uses Hopper's fast fp8
    accumulation (as torchao does); `fast_accum_backward` uses it for dx and dW too."""
    return _Fp8Linear.apply(x, weight, fast_accum_backward)


def fp8_relu_squared_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                         fast_accum_backward: bool = False) -> torch.Tensor:
    """relu(x W_fcᵀ)² W_projᵀ through six fp8 GEMMs, the hidden activation cast straight from h."""
    return _Fp8ReluSquaredMLP.apply(x, w_fc, w_proj, fast_accum_backward)


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in fp8; made by class swap, same Parameter."""
    fast_accum_backward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fast_accum_backward)


class Fp8MLP(MLP):
    """MLP whose two linears and ReLU² run as one fp8 function; made by class swap, same Parameters."""
    fast_accum_backward = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_relu_squared_mlp(x, self.c_fc.weight, self.c_proj.weight, self.fast_accum_backward)


def convert_to_fp8_triton(model: nn.Module, names: Sequence[str], fast_accum_backward: bool = False) -> None:
    """Swap the named linears (bias-free nn.Linear) for Fp8Linear, and each MLP whose c_fc and c_proj
    are both named for Fp8MLP."""
    keep = set(names)
    for fqn, module in model.named_modules():
        if fqn in keep:
            if type(module) is not nn.Linear or module.bias is not None:
                raise ValueError(f"--fp8_recipe triton converts bias-free nn.Linear layers; {fqn} is "
                                 f"{type(module).__name__} (bias: {module.bias is not None})")
            module.__class__ = Fp8Linear
            module.fast_accum_backward = fast_accum_backward
        if type(module) is MLP and f"{fqn}.c_fc" in keep and f"{fqn}.c_proj" in keep:
            module.__class__ = Fp8MLP
            module.fast_accum_backward = fast_accum_backward

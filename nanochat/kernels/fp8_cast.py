"""Tensorwise fp8 casts for training: amax, then one pass that writes both layouts.

An fp8 GEMM on Hopper reads both operands K-major, so every activation and gradient of an fp8 linear
is needed twice: row-major for one GEMM and transposed for the weight-gradient GEMM. Under torchao,
Inductor writes the transposed copy from a kernel whose stores stride across rows; on the H200 its
largest such kernel ran at 1.94 TB/s while a plain amax pass ran at 3.4 (BENCHMARKS.md, session 8).
Here one Triton program loads a [BM, BN] tile once and stores it twice, row-major and transposed
(Triton rearranges the tile between the two stores).

The math is torchao's tensorwise recipe: scale = fp8_max / max(amax, 1e-12), values saturated to
±fp8_max, and the GEMM gets 1 / scale. `relu2=True` casts relu(x)² instead of x (the MLP's hidden
activation), so that activation is never written in bf16. A custom op keeps both launches opaque to
torch.compile, which then cannot re-fuse them into slower kernels.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # torchao's floor on amax: an all-zero tensor gets a finite scale
AMAX_BLOCK = 4096
AMAX_PROGRAMS = 1024  # enough to fill an H200's 132 SMs; each program reduces a strided set of blocks
TILE = (64, 128)      # (rows, columns) per cast program


@triton.jit
def _fp8_amax_kernel(x_ptr, amax_ptr, n, RELU2: tl.constexpr, BLOCK: tl.constexpr):
    """amax_ptr[0] = max(amax_ptr[0], max |x| (or relu(x)²)) over n elements; amax_ptr starts at 0."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        if RELU2:
            x = tl.maximum(x, 0.0)
            x = x * x
        acc = tl.maximum(acc, tl.abs(x))
    tl.atomic_max(amax_ptr, tl.max(acc, axis=0))


@triton.jit
def _fp8_cast_transpose_kernel(x_ptr, amax_ptr, out_ptr, out_t_ptr, inv_scale_ptr, M, N, FP8_MAX: tl.constexpr,
                               RELU2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out [M, N] and out_t [N, M] = fp8(clamp(x * scale)), scale = FP8_MAX / max(amax, EPS)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RELU2:
        x = tl.maximum(x, 0.0)
        x = x * x
    scale = tl.fdiv(FP8_MAX, tl.maximum(tl.load(amax_ptr), EPS), ieee_rounding=True)
    y = tl.minimum(tl.maximum(x * scale, -FP8_MAX), FP8_MAX).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], y, mask=mask)
    tl.store(out_t_ptr + cols[None, :].to(tl.int64) * M + rows[:, None], y, mask=mask)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(inv_scale_ptr, tl.fdiv(1.0, scale, ieee_rounding=True))


@torch.library.custom_op("nanochat::fp8_cast_transpose", mutates_args=())
def _cast_op(x: torch.Tensor, fp8_dtype: torch.dtype, relu2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, N = x.shape
    # Triton's CPU interpreter rounds to fp8 wrongly when the mantissa carries (7.96 -> 4.0, Triton 3.9):
    # there the kernel stores the saturated fp32 values and torch rounds them, as the GPU's cvt does
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    store_dtype = torch.float32 if interpreted else fp8_dtype
    out = torch.empty(M, N, device=x.device, dtype=store_dtype)
    out_t = torch.empty(N, M, device=x.device, dtype=store_dtype)
    inv_scale = torch.empty((), device=x.device, dtype=torch.float32)
    amax = torch.zeros((), device=x.device, dtype=torch.float32)
    n = x.numel()
    amax_grid = (max(1, min(AMAX_PROGRAMS, triton.cdiv(n, AMAX_BLOCK))),)
    _fp8_amax_kernel[amax_grid](x, amax, n, RELU2=relu2, BLOCK=AMAX_BLOCK)
    bm, bn = TILE
    _fp8_cast_transpose_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, amax, out, out_t, inv_scale, M, N, FP8_MAX=torch.finfo(fp8_dtype).max, RELU2=relu2, BM=bm, BN=bn,
        num_warps=8)
    if interpreted:
        out, out_t = out.to(fp8_dtype), out_t.to(fp8_dtype)
    return out, out_t, inv_scale


@_cast_op.register_fake
def _(x, fp8_dtype, relu2):
    M, N = x.shape
    return x.new_empty(M, N, dtype=fp8_dtype), x.new_empty(N, M, dtype=fp8_dtype), x.new_empty((), dtype=torch.float32)


def cast_transpose(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                   relu2: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, N] (bf16, contiguous) -> (fp8 [M, N], the same values transposed [N, M], 1 / scale), tensorwise.
    Dequantized: out.float() * inv_scale ~= x (or relu(x)² with relu2=True)."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"cast_transpose takes a contiguous 2-D tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    return _cast_op(x, fp8_dtype, relu2)

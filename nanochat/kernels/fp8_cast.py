"""Tensorwise fp8 casts for training: one pass that writes both layouts, scaled by the current amax or
by a recorded history of amaxes (delayed scaling).

An fp8 GEMM on Hopper reads both operands K-major, so every activation and gradient of an fp8 linear
is needed twice: row-major for one GEMM and transposed for the weight-gradient GEMM. Under torchao,
Inductor writes the transposed copy from a kernel whose stores stride across rows; on the H200 its
largest such kernel ran at 1.94 TB/s while a plain amax pass ran at 3.4 (docs/log.md, session 8).
Here one Triton program loads a [BM, BN] tile once and stores it twice, row-major and transposed
(Triton rearranges the tile between the two stores).

Scaling, torchao's tensorwise math: scale = fp8_max / max(amax, 1e-12), values saturated to ±fp8_max,
and the GEMM gets 1 / scale. Two ways to get the amax:
- current (`cast_transpose(x)`): an amax pass over x, then the cast: x is read twice.
- delayed (`cast_transpose(x, state=...)`, as Transformer Engine's default recipe): the scale comes from
  the largest of the last HISTORY amaxes recorded at this call site, and the cast records x's own amax
  as it goes: x is read once. A one-program kernel first moves the previous call's amax into the
  history. Values beyond the recorded range saturate, for one call. An all-zero history (a site's
  first call) falls back to an amax pass.
`relu2=True` casts relu(x)² instead of x (the MLP's hidden activation), so that activation is never
written in bf16. Custom ops keep the launches opaque to torch.compile, which then cannot re-fuse them
into slower kernels.
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
HISTORY = 16          # delayed scaling: amaxes kept per site (a power of two: tl.arange)


def new_scaling_state(sites: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Delayed-scaling state for `sites` call sites: per row, HISTORY amaxes of earlier calls (newest
    first), then the amax of the latest call. All zero: every site starts with an amax pass."""
    return torch.zeros(sites, HISTORY + 1, device=device, dtype=torch.float32)


@triton.jit
def _fp8_push_amax_kernel(state_ptr, HISTORY: tl.constexpr):
    """One program: the latest call's amax (state_ptr[HISTORY]) becomes the newest of the history."""
    offs = tl.arange(0, HISTORY)
    older = tl.load(state_ptr + offs - 1, mask=offs > 0, other=0.0)
    tl.store(state_ptr + offs, tl.where(offs == 0, tl.load(state_ptr + HISTORY), older))
    tl.store(state_ptr + HISTORY, 0.0)


@triton.jit
def _fp8_amax_kernel(x_ptr, amax_ptr, n, RELU2: tl.constexpr, BLOCK: tl.constexpr, HISTORY: tl.constexpr):
    """amax_ptr[HISTORY] = max(itself, max |x| (or relu(x)²)) over n elements. With a history
    (amax_ptr[:HISTORY], HISTORY > 0) only while that history is all zero."""
    stop = n
    if HISTORY > 0:
        recorded = tl.max(tl.load(amax_ptr + tl.arange(0, HISTORY)), axis=0)
        stop = tl.where(recorded > 0, 0, n)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, stop, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        if RELU2:
            x = tl.maximum(x, 0.0)
            x = x * x
        acc = tl.maximum(acc, tl.abs(x))
    tl.atomic_max(amax_ptr + HISTORY, tl.max(acc, axis=0))


@triton.jit
def _fp8_cast_transpose_kernel(x_ptr, amax_ptr, out_ptr, out_t_ptr, inv_scale_ptr, M, N, FP8_MAX: tl.constexpr,
                               RELU2: tl.constexpr, HISTORY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """out [M, N] and out_t [N, M] = fp8(clamp(x * scale)), scale = FP8_MAX / max(amax, EPS). amax:
    amax_ptr[0] (HISTORY = 0), else the history's max (or, when it is all zero, the amax pass's result
    at amax_ptr[HISTORY]); then x's amax is recorded at amax_ptr[HISTORY]."""
    if HISTORY > 0:
        amax = tl.max(tl.load(amax_ptr + tl.arange(0, HISTORY)), axis=0)
        amax = tl.where(amax > 0, amax, tl.load(amax_ptr + HISTORY))
    else:
        amax = tl.load(amax_ptr)
    scale = tl.fdiv(FP8_MAX, tl.maximum(amax, EPS), ieee_rounding=True)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RELU2:
        x = tl.maximum(x, 0.0)
        x = x * x
    y = tl.minimum(tl.maximum(x * scale, -FP8_MAX), FP8_MAX).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], y, mask=mask)
    tl.store(out_t_ptr + cols[None, :].to(tl.int64) * M + rows[:, None], y, mask=mask)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(inv_scale_ptr, tl.fdiv(1.0, scale, ieee_rounding=True))
    if HISTORY > 0:  # relaxed: nothing in this launch reads it back (the bootstrap value is already final)
        tl.atomic_max(amax_ptr + HISTORY, tl.max(tl.max(tl.abs(x), axis=1), axis=0), sem="relaxed")


def _launch(x: torch.Tensor, fp8_dtype: torch.dtype, relu2: bool,
            state_row: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, N = x.shape
    # Triton's CPU interpreter rounds to fp8 wrongly when the mantissa carries (7.96 -> 4.0, Triton 3.9):
    # there the kernel stores the saturated fp32 values and torch rounds them, as the GPU's cvt does
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    store_dtype = torch.float32 if interpreted else fp8_dtype
    out = torch.empty(M, N, device=x.device, dtype=store_dtype)
    out_t = torch.empty(N, M, device=x.device, dtype=store_dtype)
    inv_scale = torch.empty((), device=x.device, dtype=torch.float32)
    history = 0 if state_row is None else HISTORY
    if state_row is None:
        amax = torch.zeros((), device=x.device, dtype=torch.float32)
    else:
        amax = state_row
        _fp8_push_amax_kernel[(1,)](amax, HISTORY=HISTORY)
    n = x.numel()
    _fp8_amax_kernel[(max(1, min(AMAX_PROGRAMS, triton.cdiv(n, AMAX_BLOCK))),)](
        x, amax, n, RELU2=relu2, BLOCK=AMAX_BLOCK, HISTORY=history)
    bm, bn = TILE
    _fp8_cast_transpose_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, amax, out, out_t, inv_scale, M, N, FP8_MAX=torch.finfo(fp8_dtype).max, RELU2=relu2, HISTORY=history,
        BM=bm, BN=bn, num_warps=8)
    if interpreted:
        out, out_t = out.to(fp8_dtype), out_t.to(fp8_dtype)
    return out, out_t, inv_scale


@torch.library.custom_op("nanochat::fp8_cast_transpose", mutates_args=())
def _cast_op(x: torch.Tensor, fp8_dtype: torch.dtype, relu2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, fp8_dtype, relu2, None)


@torch.library.custom_op("nanochat::fp8_cast_transpose_delayed", mutates_args=("state",))
def _cast_delayed_op(x: torch.Tensor, state: torch.Tensor, site: int, fp8_dtype: torch.dtype,
                     relu2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, fp8_dtype, relu2, state[site])


def _fake_outputs(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, N = x.shape
    return x.new_empty(M, N, dtype=fp8_dtype), x.new_empty(N, M, dtype=fp8_dtype), x.new_empty((), dtype=torch.float32)


_cast_op.register_fake(lambda x, fp8_dtype, relu2: _fake_outputs(x, fp8_dtype))
_cast_delayed_op.register_fake(lambda x, state, site, fp8_dtype, relu2: _fake_outputs(x, fp8_dtype))


def cast_transpose(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn, relu2: bool = False,
                   state: torch.Tensor | None = None, site: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, N] (bf16, contiguous) -> (fp8 [M, N], the same values transposed [N, M], 1 / scale), tensorwise.
    Dequantized: out.float() * inv_scale ~= x (or relu(x)² with relu2=True). With `state`
    (`new_scaling_state`), delayed scaling from row `site`, which this call updates."""
    if x.dim() != 2 or not x.is_contiguous() or x.dtype != torch.bfloat16:
        raise ValueError(f"cast_transpose takes a contiguous 2-D bf16 tensor, got {x.dtype} of shape "
                         f"{tuple(x.shape)} with strides {x.stride()} (weights: fp8_linear.cast_weight)")
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    if state is None:
        return _cast_op(x, fp8_dtype, relu2)
    if state.dtype != torch.float32 or state.dim() != 2 or state.size(1) != HISTORY + 1 or not 0 <= site < state.size(0):
        raise ValueError(f"state must come from new_scaling_state (float32 [sites, {HISTORY + 1}]) and site index "
                         f"one of its rows; got {state.dtype} {tuple(state.shape)} and site {site}")
    return _cast_delayed_op(x, state, site, fp8_dtype, relu2)

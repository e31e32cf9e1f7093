"""Triton kernels of the `triton` loss backend (modes: see loss_triton.py).

Split mode: softcap + logsumexp + loss + dlogits, one kernel per chunk. The chunk's logits come from a
cuBLAS GEMM (bf16 out, fp32 accumulate). ce_rows_kernel reads each row twice
(the second read is meant to hit L2: a row of 64K bf16 logits is 128 KiB) and overwrites it in place with
the gradient of the loss w.r.t. the raw logits, so the next two GEMMs (dhidden, dW) read it straight away.

With a softcap the capped logits are bounded by +-softcap, so exp(z - softcap) never overflows and the
row's sum needs no running max: pass 1 is a plain sum, without rescaling or per-block reductions.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jit code may read it


@triton.jit
def _tanh(x, FAST_TANH: tl.constexpr):
    if FAST_TANH:
        # one MUFU op on sm_75+ (rel. error ~2^-11, below the bf16 rounding of the logits it caps)
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    e = tl.exp2(x * (2.0 * LOG2E))  # exact-ish form the CPU interpreter can run
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def ce_rows_kernel(
    logits_ptr, stride_row,      # [n, V] logits of this chunk; overwritten with dloss/dlogits if WRITE_GRAD
    targets_ptr,                 # [n] int64
    loss_ptr,                    # [n] fp32 out: per-row loss, 0 where ignored
    scale_ptr, scale_stride,     # fp32 gradient scale: one element (stride 0) or one per row
    V, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, FAST_TANH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    safe_target = tl.minimum(tl.maximum(target, 0), V - 1)  # never read out of bounds
    cols = tl.arange(0, BLOCK_V)
    inv_softcap = 1.0 / softcap  # multiply, not divide, per element (div.full costs extra MUFU work)

    # target logit first: pass 2 overwrites the row
    x_t = tl.load(row_ptr + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = softcap * _tanh(x_t * inv_softcap, FAST_TANH)
    else:
        z_t = x_t

    # pass 1: logsumexp of the (capped) row
    if HAS_SOFTCAP:
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            z = softcap * _tanh(x * inv_softcap, FAST_TANH)
            acc += tl.where(mask, tl.exp2((z - softcap) * LOG2E), 0.0)
        lse = softcap + tl.log(tl.sum(acc, axis=0))
    else:
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(
                tl.exp2((x - m_new) * LOG2E), axis=0)
            m = m_new
        lse = m + tl.log(s)

    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))

    # pass 2: dloss/dx = (softmax(z) - onehot) * dz/dx * scale, written over the logits
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr + row * scale_stride), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x * inv_softcap, FAST_TANH)
                p = tl.exp2((softcap * t - lse) * LOG2E)
                g = (p - tl.where(offs == target, 1.0, 0.0)) * ((1.0 - t * t) * scale)
            else:
                p = tl.exp2((x - lse) * LOG2E)
                g = (p - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(x_ptr, n, scale_ptr, BLOCK: tl.constexpr):
    """x *= scale[0] in place (grads stored by the forward, scaled by the upstream gradient)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + offs, (x * tl.load(scale_ptr)).to(x_ptr.dtype.element_ty), mask=mask)


# ---- the row-factor modes: fused (logits GEMM with an exp-sum epilogue) and onepass (one exp pass) ----
#
# With a softcap s, z = s*tanh(x/s) <= s, so e = exp(z - s) is in (0, 1] and needs no running max. The GEMM
# epilogue writes E = e * (1 - t^2) (t = tanh(x/s)) in place of the logits, and per (row, column tile) the
# sum of e. Once a row's lse is known (row_stats_kernel), its logit gradient is r * E with the per-row
# factor r = exp(s - lse) * scale (and the target column patched), so
#     dh = r * (E @ W)      and      dW = E^T @ (r * h),
# two cuBLAS GEMMs whose row factor is applied to their small [n, C] operand or output, never to E.

@triton.jit
def logits_exp_kernel(
    h_ptr, w_ptr, e_ptr, psum_ptr, xt_ptr, targets_ptr,
    M, V, K, stride_hm, stride_wv, stride_em, n_tiles, softcap,
    WRITE_E: tl.constexpr, FAST_TANH: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of x = h @ W.T (fp32 accumulate), then in the epilogue: psum[row, tile] =
    sum of exp(z - s); xt[row] = x at the target column (from the one tile that holds it); if WRITE_E,
    E = exp(z - s) * (1 - t^2) with 0 at the target column (row_stats_kernel patches it)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    # the row blocks of one column tile run together: each W tile is read from HBM once (h stays in L2)
    pid_m = pid % num_m
    pid_n = pid // num_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    # 64-bit tile bases, 32-bit offsets inside a tile (V * C may exceed 2^31, one tile never does)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = row0 + rm < M
    col_ok = col0 + rn < V
    a_ptrs = h_ptr + row0.to(tl.int64) * stride_hm + rm[:, None] * stride_hm + ks[None, :]
    b_ptrs = w_ptr + col0.to(tl.int64) * stride_wv + rn[:, None] * stride_wv + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = ks[None, :] < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok, other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[:, None] & k_ok, other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 operands wrongly (3.9): give it fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    t = _tanh(acc * (1.0 / softcap), FAST_TANH)
    e = tl.where(col_ok[None, :], tl.exp2((t - 1.0) * (softcap * LOG2E)), 0.0)
    rows = row0.to(tl.int64) + rm
    tl.store(psum_ptr + rows * n_tiles + pid_n, tl.sum(e, axis=1), mask=row_ok)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    local_t = tl.where((target >= col0) & (target < col0 + BLOCK_N), target - col0, -1).to(tl.int32)
    is_target = rn[None, :] == local_t[:, None]
    tl.store(xt_ptr + rows, tl.sum(tl.where(is_target, acc, 0.0), axis=1), mask=row_ok & (local_t >= 0))
    if WRITE_E:
        g = tl.where(is_target, 0.0, e * (1.0 - t * t))
        e_ptrs = e_ptr + row0.to(tl.int64) * stride_em + col0 + rm[:, None] * stride_em + rn[None, :]
        tl.store(e_ptrs, g.to(e_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def exp_rows_kernel(
    logits_ptr, stride_row, targets_ptr, psum_ptr, xt_ptr, V, softcap,
    WRITE_E: tl.constexpr, FAST_TANH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The onepass mode's row pass over cuBLAS logits, one read per logit: psum[row] = sum of exp(z - s),
    xt[row] = the raw target logit; if WRITE_E, E = exp(z - s)(1 - t^2) over the logits, 0 at the target
    (row_stats_kernel patches it). The same outputs as logits_exp_kernel's epilogue with one column tile."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    safe_target = tl.minimum(tl.maximum(target, 0), V - 1)  # ignored rows: read, never used
    tl.store(xt_ptr + row, tl.load(row_ptr + safe_target).to(tl.float32))  # before E overwrites it
    cols = tl.arange(0, BLOCK_V)
    inv_softcap = 1.0 / softcap
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(x * inv_softcap, FAST_TANH)
        e = tl.where(mask, tl.exp2((t - 1.0) * (softcap * LOG2E)), 0.0)
        acc += e
        if WRITE_E:
            g = tl.where(offs == target, 0.0, e * (1.0 - t * t))
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)
    tl.store(psum_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def row_stats_kernel(
    psum_ptr, n_tiles, xt_ptr, targets_ptr, loss_ptr, r_ptr, e_ptr, stride_em,
    scale_ptr, scale_stride, V, ignore_index, softcap,
    WRITE_E: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per row: lse = s + log(sum psum), loss = lse - z_target; if WRITE_E also the gradient factor
    r = exp(s - lse) * scale and E[row, target] = (p_t - 1)(1 - t_t^2) / (r / scale), so that r * E is the
    whole logit gradient row (r = 0 on ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    total = tl.sum(tl.load(psum_ptr + row * n_tiles + offs, mask=offs < n_tiles, other=0.0), axis=0)
    lse = softcap + tl.log(total)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    x_t = tl.where(valid, tl.load(xt_ptr + row), 0.0)  # xt is not written for ignored rows
    t_t = _tanh(x_t * (1.0 / softcap), False)  # exact form: one element per row
    z_t = softcap * t_t
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    if WRITE_E:
        scale = tl.where(valid, tl.load(scale_ptr + row * scale_stride), 0.0)
        tl.store(r_ptr + row, tl.exp(softcap - lse) * scale)
        e_t = (tl.exp(z_t - lse) - 1.0) * (1.0 - t_t * t_t) * tl.exp(lse - softcap)  # |e_t| <= V
        safe_target = tl.minimum(tl.maximum(target, 0), V - 1)
        tl.store(e_ptr + row * stride_em + safe_target, e_t.to(e_ptr.dtype.element_ty), mask=valid)


@triton.jit
def row_scale_kernel(x_ptr, stride_x, r_ptr, out_ptr, stride_out, C, BLOCK_C: tl.constexpr):
    """out[row, :] = x[row, :] * r[row] (fp32 math, cast to out's dtype); one program per row."""
    row = tl.program_id(0).to(tl.int64)
    r = tl.load(r_ptr + row)
    for start in range(0, C, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (x * r).to(out_ptr.dtype.element_ty), mask=mask)

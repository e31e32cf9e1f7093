"""Decode attention: one new query per row over a static KV cache, as a split-K Triton kernel.

The StaticDecoder's torch path attends over the whole static cache [S, Hkv, L, D] under a mask: three
kernels (q.K, softmax, p.V) that read every position up to max_seq_len, filled or not. Here a program
owns one query head of one row and one chunk of positions, reads only the positions the row has filled
(from its window's start), and keeps a running max and sum (online softmax); a second small kernel
merges the chunks. Each filled K/V byte is read once; a custom op keeps both launches opaque to
torch.compile, so a compiled decode step captures them in its CUDA graph as they are.

The cache may be fp8 (e4m3) with one fp32 scale per (row, kv head, position) vector: half the bytes of
bf16, and bytes are what bound a batched decode step (issue 8: at batch 128 the bf16 cache is 17 of the
18 GB a d20 step reads). `quantize_fp8` makes such a cache; the kernel takes any cache dtype plus
optional scales.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn
TARGET_PROGRAMS = 2048  # enough programs to fill an H200's 132 SMs many times over (batch 128: 2 chunks per row)
# (positions per inner step, warps, pipeline stages) per (kernel, cache kind): the fastest at batch 128 in
# bench_decode_attention on the H200 (session 6, ms per layer at d20's shape): CUDA-core kernel on bf16 128/4/2
# 0.242 (128/2/2: 0.302), on fp8 128/2/2 0.134 (128/4/2: 0.144); tensor-core kernel on bf16 128/4/2 0.187, on
# fp8 128/4/3 0.154 (128/4/2: 0.168)
DEFAULT_CONFIGS = {("cuda_core", "bf16"): (128, 4, 2), ("cuda_core", "fp8"): (128, 2, 2),
                   ("dot", "bf16"): (128, 4, 2), ("dot", "fp8"): (128, 4, 3)}


def default_config(cache_dtype: torch.dtype, dot: bool) -> tuple[int, int, int]:
    """The measured-best config for this kernel and cache kind (a 16-bit cache counts as bf16)."""
    return DEFAULT_CONFIGS[("dot" if dot else "cuda_core", "fp8" if cache_dtype == torch.float8_e4m3fn else "bf16")]


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8_e4m3fn values [..., D], fp32 scales [...]) with x ~= values * scale:
    each D-vector scaled so its largest magnitude maps to 448."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


@triton.jit
def _chunk_positions(Lengths, s, j, chunk, window):
    """Positions [lo, hi) of chunk j that row s has filled and, with a window, still sees."""
    n = tl.load(Lengths + s).to(tl.int32)
    lo = j * chunk
    hi = tl.minimum(lo + chunk, n)
    if window > 0:
        lo = tl.maximum(lo, n - window)
    return lo, hi


@triton.jit
def _decode_chunks_kernel(Q, K, V, KScale, VScale, Lengths, Acc, M, Lsum,
                          sq_s, sq_h, sk_s, sk_h, sk_l, ss_s, ss_h, sa_s, sa_h, sa_j, sm_s, sm_h,
                          sm_scale, window, chunk, G: tl.constexpr, D: tl.constexpr,
                          SCALED: tl.constexpr, BLOCK: tl.constexpr):
    s, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh = h // G
    lo, hi = _chunk_positions(Lengths, s, j, chunk, window)
    d = tl.arange(0, D)
    q = tl.load(Q + s * sq_s + h * sq_h + d).to(tl.float32) * sm_scale
    m = -float("inf")
    l = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        valid = pos < hi
        offs = s * sk_s + kvh * sk_h + pos[:, None] * sk_l + d[None, :]
        k = tl.load(K + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        if SCALED:  # per-vector scales multiply the BLOCK scores and weights, not the BLOCK x D tiles
            scores = scores * tl.load(KScale + s * ss_s + kvh * ss_h + pos, mask=valid, other=0.0)
        scores = tl.where(valid, scores, -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        if SCALED:
            p = p * tl.load(VScale + s * ss_s + kvh * ss_h + pos, mask=valid, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    tl.store(Acc + s * sa_s + h * sa_h + j * sa_j + d, acc)
    tl.store(M + s * sm_s + h * sm_h + j, m)
    tl.store(Lsum + s * sm_s + h * sm_h + j, l)


@triton.jit
def _decode_chunks_dot_kernel(Q, K, V, KScale, VScale, Lengths, Acc, M, Lsum,
                              sq_s, sq_h, sk_s, sk_h, sk_l, ss_s, ss_h, sa_s, sa_h, sa_j, sm_s, sm_h,
                              sm_scale, window, chunk, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                              SCALED: tl.constexpr, BLOCK: tl.constexpr, MMA: tl.constexpr,
                              PRECISION: tl.constexpr):
    """The same chunk, for all G query heads of one kv head at once, on tensor cores: q is a [GP, D] tile
    (GP >= 16, rows past G zero), scores and p.V are tl.dot products. Each K/V tile is read once per kv
    head, not once per query head, and fp8 tiles go to the MMA as fp16 instead of through fp32 math."""
    s, kvh, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi = _chunk_positions(Lengths, s, j, chunk, window)
    d = tl.arange(0, D)
    g = tl.arange(0, GP)
    heads = kvh * G + g
    q = tl.load(Q + s * sq_s + heads[:, None] * sq_h + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = (q.to(tl.float32) * sm_scale).to(MMA)
    m = tl.full([GP], -float("inf"), dtype=tl.float32)
    l = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        valid = pos < hi
        offs = s * sk_s + kvh * sk_h + pos[:, None] * sk_l + d[None, :]
        k = tl.load(K + offs, mask=valid[:, None], other=0.0).to(MMA)
        v = tl.load(V + offs, mask=valid[:, None], other=0.0).to(MMA)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)                  # [GP, BLOCK]
        if SCALED:
            scores = scores * tl.load(KScale + s * ss_s + kvh * ss_h + pos, mask=valid, other=0.0)[None, :]
        scores = tl.where(valid[None, :], scores, -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if SCALED:
            p = p * tl.load(VScale + s * ss_s + kvh * ss_h + pos, mask=valid, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(MMA), v, input_precision=PRECISION)
        m = m_new
    head_ok = g < G
    tl.store(Acc + s * sa_s + heads[:, None] * sa_h + j * sa_j + d[None, :], acc, mask=head_ok[:, None])
    tl.store(M + s * sm_s + heads * sm_h + j, m, mask=head_ok)
    tl.store(Lsum + s * sm_s + heads * sm_h + j, l, mask=head_ok)


@triton.jit
def _combine_kernel(Acc, M, Lsum, Out, Lse, splits, sa_s, sa_h, sa_j, sm_s, sm_h, so_s, so_h, sl_s,
                    D: tl.constexpr, NS: tl.constexpr):
    s, h = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, NS)
    in_range = j < splits
    m = tl.load(M + s * sm_s + h * sm_h + j, mask=in_range, other=-float("inf"))
    l = tl.load(Lsum + s * sm_s + h * sm_h + j, mask=in_range, other=0.0)
    weight = tl.where(in_range, tl.exp(m - tl.max(m, axis=0)), 0.0)  # a chunk with no position: m = -inf, 0
    d = tl.arange(0, D)
    acc = tl.load(Acc + s * sa_s + h * sa_h + j[:, None] * sa_j + d[None, :], mask=in_range[:, None], other=0.0)
    total = tl.sum(l * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(Out + s * so_s + h * so_h + d, out.to(Out.dtype.element_ty))
    tl.store(Lse + s * sl_s + h, tl.max(m, axis=0) + tl.log(total))  # log of the softmax's denominator


def _mma_dtype(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> tl.dtype:
    """The dot kernel's 16-bit operand type. fp8 tiles go to fp16: Hopper converts e4m3 to fp16 in one
    instruction but to bf16 only through fp32. On the H200 (session 6) the kernel read an fp8 cache at
    2.0 TB/s with bf16 operands and 2.3-2.5 TB/s with fp16 ones (a bf16 cache: 4.1 TB/s). Scaled e4m3
    values (|x| <= 448), a normed q times D**-0.5 and softmax weights all sit well inside fp16's range."""
    if q_dtype == torch.float16 or cache_dtype == torch.float8_e4m3fn:
        return tl.float16
    return tl.bfloat16


@torch.library.custom_op("nanochat::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, window: int,
               k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, splits: int,
               block: int, warps: int, stages: int, dot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launches, opaque to torch.compile (captured as they are in a CUDA graph) -> (out, lse)."""
    S, H, D = q.shape
    chunk = triton.cdiv(triton.cdiv(k_cache.size(2), splits), block) * block
    splits = triton.cdiv(k_cache.size(2), chunk)
    q = q.contiguous()
    acc = torch.empty(S, H, splits, D, device=q.device, dtype=torch.float32)
    m = torch.empty(S, H, splits, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    out = torch.empty_like(q)
    lse = torch.empty(S, H, device=q.device, dtype=torch.float32)
    scaled = k_scale is not None
    ks = k_scale if scaled else m  # any fp32 pointer: not read without SCALED
    vs = v_scale if scaled else m
    args = (q, k_cache, v_cache, ks, vs, lengths, acc, m, lsum,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            ks.stride(0), ks.stride(1), acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
            D ** -0.5, window, chunk)
    G = H // k_cache.size(1)
    if dot:
        fp32 = q.dtype == torch.float32  # exact fp32 products (tests)
        _decode_chunks_dot_kernel[(S, k_cache.size(1), splits)](
            *args, G=G, GP=max(16, triton.next_power_of_2(G)), D=D, SCALED=scaled, BLOCK=block,
            MMA=tl.float32 if fp32 else _mma_dtype(q.dtype, k_cache.dtype),
            PRECISION="ieee" if fp32 else "tf32", num_warps=warps, num_stages=stages)
    else:
        _decode_chunks_kernel[(S, H, splits)](*args, G=G, D=D, SCALED=scaled, BLOCK=block,
                                              num_warps=warps, num_stages=stages)
    _combine_kernel[(S, H)](acc, m, lsum, out, lse, splits, acc.stride(0), acc.stride(1), acc.stride(2),
                            m.stride(0), m.stride(1), out.stride(0), out.stride(1), lse.stride(0),
                            D=D, NS=triton.next_power_of_2(splits))
    return out, lse


@_decode_op.register_fake
def _(q, k_cache, v_cache, lengths, window, k_scale, v_scale, splits, block, warps, stages, dot):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=torch.float32))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     window: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, splits: int | None = None,
                     config: tuple[int, int, int] | None = None, dot: bool = False,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [S, H, D] over the first lengths[s] positions of row s of the caches
    [S, Hkv, L, D] (the last `window` of them when given) -> [S, H, D] in q's dtype. With k_scale and
    v_scale [S, Hkv, L] the caches hold values / scale (e.g. `quantize_fp8`). lengths must be >= 1.
    `splits` chunks the positions (default: enough programs to fill the GPU); `config` is
    (positions per inner step, warps, pipeline stages), default `default_config`. dot=True runs the
    tensor-core kernel: one program per kv head for all its query heads, 16-bit operands
    (benchmarks/bench_decode_attention.py times both kernels). return_lse=True also returns the fp32 log of
    each softmax's denominator [S, H] (of the scaled scores), to merge with attention over other keys
    (`merge_attention`: a prompt shared by every row)."""
    S, H, D = q.shape
    L = k_cache.size(2)
    if (k_scale is None) != (v_scale is None):
        raise ValueError("pass both k_scale and v_scale, or neither")
    if D & (D - 1):
        raise ValueError(f"decode_attention needs a power-of-two head_dim, got {D}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with contiguous head_dim (one buffer per layer)")
    if k_scale is not None and (k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1):
        raise ValueError("k_scale and v_scale must share one layout, contiguous over positions")
    block, warps, stages = config or default_config(k_cache.dtype, dot)
    if dot and block < 16:
        raise ValueError(f"dot=True needs at least 16 positions per inner step (a tl.dot side), got {block}")
    if splits is None:
        programs_per_split = S * (k_cache.size(1) if dot else H)
        splits = max(1, min(triton.cdiv(L, block), triton.cdiv(TARGET_PROGRAMS, programs_per_split)))
    out, lse = _decode_op(q, k_cache, v_cache, lengths, window or 0, k_scale, v_scale, splits, block, warps,
                          stages, dot)
    return (out, lse) if return_lse else out

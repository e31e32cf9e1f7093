"""`triton`: our fused linear cross-entropy. Chunked over tokens; the [N, V] logits never exist at once.

Two chunk loops (design, measurements, predictions: docs/triton_ce_notes.md). Per chunk of `n_c` rows:

mode "fused" (needs a softcap: it bounds the logits, so no running max):
    E_c, psum = epilogue(h_c @ W.T)      Triton GEMM; epilogue: tanh, exp, row sums; writes E (bf16)
    lse, loss, r = row_stats(psum)       tiny; r = per-row gradient factor, E's target column patched
    dh[c]  = r * (E_c @ W)               cuBLAS (fp32 out) + row scale
    dW    += E_c.T @ (r * h_c)           cuBLAS addmm into the dW accumulator
  so dlogits = r * E is never formed: the logits are written once and read by the two GEMMs only.
mode "onepass" (needs a softcap): the fused mode's row-factor math on cuBLAS logits:
    logits_c = h_c @ W.T                 cuBLAS, bf16 out
    E_c, psum = exp pass(logits_c)       Triton: one read and one write per logit (split reads twice)
    then row_stats, dh and dW exactly as in "fused".
mode "split" (any softcap, any dtype):
    logits_c = h_c @ W.T                 cuBLAS, bf16 out, fp32 accumulate
    in place : softcap, logsumexp, loss, dloss/dlogits       one Triton kernel (reads twice, writes once)
    dh[c] = dlogits_c @ W ;  dW += dlogits_c.T @ h_c         cuBLAS
Three GEMMs in all (the floor), because the gradients are computed in the forward: for "mean"/"sum" the
backward only scales the stored gradients by grad_output, in place. For "none" the per-token upstream
gradient is unknown in the forward, so its backward recomputes (four GEMMs); "none" is mostly used under
no_grad (evaluation), where only GEMM 1 runs (and, fused, writes no logits at all).

No host synchronization: the count of non-ignored targets stays on the device, chunking depends only on
shapes. The work is a `torch.library` custom op, opaque to torch.compile and capturable by CUDA graphs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nanochat.kernels.loss_torch import compute_dtype
from nanochat.registry import Backend, package_status

GIB = 1024**3


@dataclass
class TritonCEConfig:
    """Tuning knobs (module-level CONFIG; benchmarks/bench_loss.py --variants sweeps them)."""
    mode: str = "split"                 # "split" | "onepass" | "fused" (the last two need a softcap, else split)
    chunk_rows: int | None = None       # rows per chunk; None = the most (multiple of 256) that fits the budget
    extra_memory_gib: float = 0.28      # chunk buffers (+ fp32 accumulator); ~64 MiB more (cuBLAS) was seen
    dw_accum: str = "native"            # "native": dW accumulated in the weight dtype; "fp32": + 2x V*C bytes
    fast_tanh: bool = True              # tanh.approx.f32 on the GPU (the interpreter always uses exp)
    block_v: int = 4096                 # split, onepass: columns per row-kernel step
    num_warps: int = 16                 # split, onepass: row-kernel warps
    gemm_block_m: int = 128             # fused: logits-GEMM tile and launch shape
    gemm_block_n: int = 256
    gemm_block_k: int = 64
    gemm_warps: int = 8
    gemm_stages: int = 3
    dh_fp32: bool = True                # fused, onepass: E @ W in fp32 before the row scale (one bf16 rounding of dh)


CONFIG = TritonCEConfig()


def _kernels():
    # imported on first use, not at import: triton.jit picks the interpreter from TRITON_INTERPRET at
    # decoration time, and the registry imports every backend just to list them
    from nanochat.kernels import triton_ce
    return triton_ce


def runs_on(device: torch.device) -> bool:
    """CUDA, or any device under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(t: torch.Tensor) -> None:
    if not runs_on(t.device):
        raise ValueError(f"the triton loss backend runs on CUDA tensors, got {t.device}; "
                         "move the model to the GPU or set TRITON_INTERPRET=1 (slow CPU interpreter)")


def _accum_dtype(weight_dtype: torch.dtype, cfg: TritonCEConfig) -> torch.dtype:
    if cfg.dw_accum not in ("fp32", "native"):
        raise ValueError(f"dw_accum must be 'fp32' or 'native', got {cfg.dw_accum!r}")
    return torch.float32 if cfg.dw_accum == "fp32" else weight_dtype


MODES = ("split", "onepass", "fused")


def _effective_mode(hidden: torch.Tensor, softcap: float | None, cfg: TritonCEConfig) -> str:
    """cfg.mode, or "split" where the row-factor modes cannot run: without a softcap (no bound on the
    logits, so no max-free exp sum) and, for "fused", in fp32 on the GPU (slow ieee-fp32 Triton dots)."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {cfg.mode!r}")
    if softcap is None or (cfg.mode == "fused" and hidden.device.type == "cuda" and hidden.dtype == torch.float32):
        return "split"
    return cfg.mode


def chunk_rows_for(n: int, v: int, c: int, dtype: torch.dtype, weight_dtype: torch.dtype,
                   cfg: TritonCEConfig = CONFIG, mode: str = "split", write_grad: bool = True) -> int:
    """Rows per chunk: cfg.chunk_rows, or the most whose buffers fit cfg.extra_memory_gib, in multiples of
    256 and equal-sized chunks (65536 x 65536 bf16, 0.28 GiB: 2048 rows). Buffers per row: the chunk's
    logits (V elements); the row-factor modes add row sums and the [n_c, C] scaled-hidden and fp32 dh
    scratch. An fp32 dW accumulator takes 4*V*C of the budget (it exists beside the final dW at the cast)."""
    if cfg.chunk_rows is not None:
        return max(1, min(cfg.chunk_rows, n))
    elt = torch.finfo(dtype).bits // 8
    n_sums = -(-v // cfg.gemm_block_n) if mode == "fused" else 1
    if not write_grad:  # no logits buffer at all when fused; the others still need one for the loss
        per_row = n_sums * 4 + 8 if mode == "fused" else v * elt
    else:
        per_row = v * elt + ((n_sums * 4 + c * (elt + 4) + 16) if mode != "split" else 0)
    budget = cfg.extra_memory_gib * GIB
    if write_grad and _accum_dtype(weight_dtype, cfg) == torch.float32:
        budget -= v * c * 4
    most = max(256, int(budget // per_row) // 256 * 256)
    if most >= n:
        return n
    per_chunk = -(-n // -(-n // most))  # ceil(n / number of chunks)
    return min(most, -(-per_chunk // 256) * 256)


def _split_loop(hidden, w, targets, scale, scale_stride, ignore_index, softcap, rows, loss_rows, dh, acc, cfg):
    k = _kernels()
    n, v = hidden.size(0), w.size(0)
    on_gpu = hidden.device.type == "cuda"
    write_grad = dh is not None or acc is not None
    buf = torch.empty(min(rows, n), v, dtype=hidden.dtype, device=hidden.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        out = buf[: e - s]
        torch.mm(hidden[s:e], w.t(), out=out)
        k.ce_rows_kernel[(e - s,)](
            out, out.stride(0), targets[s:e], loss_rows[s:e], scale[s * scale_stride:], scale_stride,
            v, ignore_index, float(softcap) if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad, FAST_TANH=cfg.fast_tanh and on_gpu,
            BLOCK_V=min(cfg.block_v, 1 << (v - 1).bit_length()), num_warps=cfg.num_warps,
        )
        if dh is not None:
            torch.mm(out, w, out=dh[s:e])
        if acc is not None:
            _accumulate(acc, out, hidden[s:e])


def _row_factor_loop(hidden, w, targets, scale, scale_stride, ignore_index, softcap, rows, loss_rows, dh, acc,
                     cfg, mode):
    """Modes "fused" and "onepass": E and its row sums come from the fused GEMM's epilogue or from one
    pass over cuBLAS logits; then the per-row factor r and the two gradient GEMMs."""
    k = _kernels()
    n, c = hidden.shape
    v = w.size(0)
    dev, dtype = hidden.device, hidden.dtype
    on_gpu = dev.type == "cuda"
    write_grad = dh is not None or acc is not None
    fused = mode == "fused"
    bm, bn = cfg.gemm_block_m, cfg.gemm_block_n
    n_sums = -(-v // bn) if fused else 1
    m_max = min(rows, n)
    psum = torch.empty(m_max, n_sums, dtype=torch.float32, device=dev)
    xt = torch.empty(m_max, dtype=torch.float32, device=dev)
    r = torch.empty(m_max, dtype=torch.float32, device=dev)
    has_big = write_grad or not fused  # onepass always needs the logits; fused only E, for the gradients
    big = torch.empty(m_max, v, dtype=dtype, device=dev) if has_big else psum  # (psum: an unused pointer)
    hs = torch.empty(m_max, c, dtype=dtype, device=dev) if acc is not None else None
    block_c = min(2048, 1 << (c - 1).bit_length())
    for s in range(0, n, rows):
        e = min(n, s + rows)
        m = e - s
        if fused:
            k.logits_exp_kernel[(-(-m // bm) * n_sums,)](
                hidden[s:e], w, big, psum, xt, targets[s:e], m, v, c, hidden.stride(0), w.stride(0),
                big.stride(0), n_sums, float(softcap),
                WRITE_E=write_grad, FAST_TANH=cfg.fast_tanh and on_gpu, EVEN_K=c % cfg.gemm_block_k == 0,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=not on_gpu,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg.gemm_block_k, num_warps=cfg.gemm_warps,
                num_stages=cfg.gemm_stages,
            )
        else:
            torch.mm(hidden[s:e], w.t(), out=big[:m])
            k.exp_rows_kernel[(m,)](
                big, big.stride(0), targets[s:e], psum, xt, v, float(softcap),
                WRITE_E=write_grad, FAST_TANH=cfg.fast_tanh and on_gpu,
                BLOCK_V=min(cfg.block_v, 1 << (v - 1).bit_length()), num_warps=cfg.num_warps,
            )
        k.row_stats_kernel[(m,)](
            psum, n_sums, xt, targets[s:e], loss_rows[s:e], r, big, big.stride(0),
            scale[s * scale_stride:], scale_stride, v, ignore_index, float(softcap),
            WRITE_E=write_grad, BLOCK_T=max(2, 1 << (n_sums - 1).bit_length()),
        )
        if not write_grad:
            continue
        e_c = big[:m]
        if dh is not None:
            if cfg.dh_fp32:  # bf16 operands, fp32 accumulate and output (the CPU has no mm out_dtype)
                tmp = torch.mm(e_c, w, out_dtype=torch.float32) if on_gpu else torch.mm(e_c.float(), w.float())
            else:
                tmp = torch.mm(e_c, w, out=dh[s:e])
            k.row_scale_kernel[(m,)](tmp, tmp.stride(0), r, dh[s:e], dh.stride(0), c, BLOCK_C=block_c)
        if acc is not None:
            k.row_scale_kernel[(m,)](hidden[s:e], hidden.stride(0), r, hs, hs.stride(0), c, BLOCK_C=block_c)
            _accumulate(acc, e_c, hs[:m])


def _accumulate(acc, dl, h_c):
    """acc += dl.T @ h_c on cuBLAS (beta = 1: C is read and written once per chunk)."""
    if acc.dtype == dl.dtype:
        torch.addmm(acc, dl.t(), h_c, out=acc)
    elif acc.device.type == "cuda":  # bf16 operands, fp32 accumulator: cuBLAS reads and writes C in fp32
        torch.addmm(acc, dl.t(), h_c, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(dl.t(), h_c).to(acc.dtype))


def _chunked(hidden, weight, targets, scale, scale_stride, ignore_index, softcap, need_dh, need_dw):
    """The chunk loop shared by the forward (scale = loss-reduction factor) and the "none" backward
    (scale = per-token upstream gradient). Returns per-row losses [N] fp32, dh [N, C] or None, dW or None."""
    cfg = CONFIG
    n, c = hidden.shape
    v = weight.shape[0]
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    mode = _effective_mode(hidden, softcap, cfg)
    rows = chunk_rows_for(n, v, c, hidden.dtype, weight.dtype, cfg, mode, need_dh or need_dw)
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    acc = torch.zeros(v, c, dtype=_accum_dtype(weight.dtype, cfg), device=hidden.device) if need_dw else None
    args = (hidden, w, targets, scale, scale_stride, ignore_index, softcap, rows, loss_rows, dh, acc, cfg)
    if mode == "split":
        _split_loop(*args)
    else:
        _row_factor_loop(*args, mode)
    dw = None
    if need_dw:  # the loop's buffers are freed by now: the cast's copy is the only extra
        dw = acc if acc.dtype == weight.dtype else acc.to(weight.dtype)
    return loss_rows, dh, dw


def _validate(hidden, weight, targets, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"expected hidden [N, C] and weight [V, C], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}; flatten the batch dims and pass lm_head.weight[:vocab_size]")
    if targets.numel() != hidden.size(0) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be N={hidden.size(0)} integers, got {tuple(targets.shape)} {targets.dtype}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError("hidden and weight must be floating point (bf16 on the GPU)")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets must share a device: {hidden.device}, {weight.device}, {targets.device}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_device(hidden)


# ---- custom ops: opaque to torch.compile, no data-dependent host code ----

@torch.library.custom_op("nanochat::fused_linear_ce", mutates_args=())
def _flce_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
             softcap: float | None, reduction: str, need_dh: bool, need_dw: bool,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (scalar, or [N] fp32 for "none") and, if asked, the gradients of the reduced loss."""
    valid = targets != ignore_index
    if reduction == "mean":
        scale = (1.0 / valid.sum().clamp(min=1).float()).reshape(1)  # all ignored: loss 0, grads 0
    else:
        scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
    grads = reduction != "none" and (need_dh or need_dw)
    loss_rows, dh, dw = _chunked(hidden, weight, targets, scale, 0, ignore_index, softcap,
                                 need_dh and grads, need_dw and grads)
    loss = loss_rows if reduction == "none" else loss_rows.sum() * scale[0]
    return loss, (dh if dh is not None else hidden.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@_flce_op.register_fake
def _(hidden, weight, targets, ignore_index, softcap, reduction, need_dh, need_dw):
    grads = reduction != "none"
    loss = hidden.new_empty(hidden.size(0) if reduction == "none" else (), dtype=torch.float32)
    dh = torch.empty_like(hidden) if (grads and need_dh) else hidden.new_empty(0)
    dw = torch.empty_like(weight) if (grads and need_dw) else weight.new_empty(0)
    return loss, dh, dw


@torch.library.custom_op("nanochat::fused_linear_ce_backward", mutates_args=())
def _flce_bwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_rows: torch.Tensor,
                 ignore_index: int, softcap: float | None, need_dh: bool, need_dw: bool,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for reduction="none": recomputes the logits, each row scaled by its upstream gradient."""
    scale = grad_rows.float().contiguous()
    _, dh, dw = _chunked(hidden, weight, targets, scale, 1, ignore_index, softcap, need_dh, need_dw)
    return (dh if dh is not None else hidden.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@_flce_bwd_op.register_fake
def _(hidden, weight, targets, grad_rows, ignore_index, softcap, need_dh, need_dw):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0))


@torch.library.custom_op("nanochat::scale_grads_", mutates_args=("dh", "dw"))
def _scale_op(dh: torch.Tensor, dw: torch.Tensor, grad_output: torch.Tensor) -> None:
    """dh *= g, dw *= g in place, in fp32 math: no second copy of the (large) stored gradients."""
    g = grad_output.float().reshape(1)
    for t in (dh, dw):
        if t.numel():
            block = 4096
            _kernels().scale_kernel[(-(-t.numel() // block),)](t, t.numel(), g, BLOCK=block)


@_scale_op.register_fake
def _(dh, dw, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, ignore_index, softcap, reduction, need_dh, need_dw = inputs
    _, dh, dw = output
    ctx.reduction, ctx.ignore_index, ctx.softcap = reduction, ignore_index, softcap
    ctx.need = (need_dh, need_dw)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets)
    else:
        ctx.save_for_backward(dh, dw)


def _backward(ctx, grad_loss, _grad_dh, _grad_dw):
    need_dh, need_dw = ctx.need
    if ctx.reduction == "none":
        hidden, weight, targets = ctx.saved_tensors
        dh, dw = torch.ops.nanochat.fused_linear_ce_backward(
            hidden, weight, targets, grad_loss, ctx.ignore_index, ctx.softcap, need_dh, need_dw)
    else:
        # the stored grads are scaled in place: one backward per forward (no retain_graph re-runs)
        dh, dw = ctx.saved_tensors
        torch.ops.nanochat.scale_grads_(dh, dw, grad_loss)
    return (dh if need_dh else None), (dw if need_dw else None), None, None, None, None, None, None


_flce_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-1, softcap=None, reduction="mean"):
    """CE(softcap(hidden @ weight.T), targets) without materializing the logits; see the module docstring."""
    _validate(hidden, weight, targets, reduction)
    # GEMM dtype as for every backend; only hidden is cast here: the weight is cast inside the op so
    # that an fp32 weight gets its fp32 dW straight from the accumulator
    hidden = hidden.to(compute_dtype(hidden, weight))
    grad_on = torch.is_grad_enabled()
    need_dh, need_dw = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    loss, _, _ = torch.ops.nanochat.fused_linear_ce(
        hidden.contiguous(), weight.contiguous(), targets.reshape(-1).long().contiguous(),
        int(ignore_index), None if softcap is None else float(softcap), reduction, need_dh, need_dw)
    return loss


class TritonLoss(Backend):
    name, summary = "triton", "ours, chunked; CUDA, or TRITON_INTERPRET=1 on the CPU"
    fused_linear_cross_entropy = staticmethod(fused_linear_cross_entropy)

    def is_available(self) -> tuple[bool, str]:
        ok, reason = package_status("triton", "triton", "pip install 'nanochat[gpu]' (or pip install triton)")
        if not ok:
            return ok, reason
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "ok (Triton CPU interpreter)"
        if not torch.cuda.is_available():
            return False, "needs a CUDA GPU (or set TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)"
        return True, "ok"

    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        return runs_on(device)

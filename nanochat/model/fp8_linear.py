"""Our fp8 training layers (`--fp8_recipe triton` and `triton_delayed`): tensorwise fp8, our cast kernels.

Per linear y = x Wᵀ, three fp8 GEMMs (torch._scaled_mm, cuBLASLt):
    forward   y  = x8 · W8ᵀ          x, W in e4m3
    backward  dx = g8 · W8           g = dy in e5m2 (gradients need range more than precision)
              dW = g8ᵀ · x8          in fp32, straight into the fp32 master weight's gradient
Each activation and gradient is cast once, into both layouts at one go (kernels/fp8_cast.py). The forward
saves the transposed fp8 copy of x for dW (1 byte per element) instead of x in bf16, so the backward
never casts activations again.

Layers, made by class swap (`convert_to_fp8_triton`): the modules keep their very same Parameters, so
the state_dict, Muon's groups and checkpoints are those of the bf16 model.
- Fp8Attention: q, k and v as one linear of the three weights stacked: one cast of the input, one GEMM
  per direction, one cast of the three gradients together.
- Fp8MLP: both linears and ReLU² as one function: relu(h)² goes straight from h into fp8 (its bf16 copy
  is never written) and its transposed fp8 copy is what the backward keeps for c_proj's dW.
- Fp8Linear: any other bias-free linear.
Scaling: current (torchao's math: an amax pass, then the cast) or delayed (`triton_delayed`: the cast
records amaxes and scales from the recent ones: one pass; the state is in non-persistent buffers).
Weights are cast inside every forward, or, after `cache_fp8_weights(model, optimizer)`, once per
optimizer step: with gradient accumulation a step runs many forwards with the same weights.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.kernels.fp8_cast import cast_transpose, new_scaling_state
from nanochat.model.gpt import MLP, CausalSelfAttention

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
Fp8Weight = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (W8 [out, in], W8ᵀ contiguous, 1 / scale)


def cast_weight(w: torch.Tensor) -> Fp8Weight:
    """W [out, in] (fp32 master) -> (e4m3 W [out, in], e4m3 Wᵀ [in, out] contiguous, 1 / scale), as torch
    ops that Inductor fuses into the compiled forward."""
    scale = (torch.finfo(E4M3).max / w.detach().abs().amax().double().clamp(min=1e-12)).float()
    w8 = (w.detach().float() * scale).clamp(-torch.finfo(E4M3).max, torch.finfo(E4M3).max).to(E4M3)
    return w8, w8.t().contiguous(), scale.reciprocal()


def _stacked(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return weights[0] if len(weights) == 1 else torch.cat(tuple(weights))


def _mm(a: torch.Tensor, b_t: torch.Tensor, a_inv: torch.Tensor, b_inv: torch.Tensor, out_dtype: torch.dtype,
        fast_accum: bool) -> torch.Tensor:
    """a [M, K] row-major times b [K, N] given as b_t [N, K] row-major (the column-major b cuBLASLt wants).
    Autocast is off: the CPU's autocast (torch 2.13) rounds an eager _scaled_mm differently from a compiled
    one (0.3% apart), and our dtypes are explicit anyway."""
    with torch.autocast(a.device.type, enabled=False):
        return torch._scaled_mm(a, b_t.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)


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
    """y = x · cat(weights)ᵀ; fwd_state / bwd_state: delayed-scaling states or None (current scaling);
    w8, w8_t, w_inv: the cached fp8 weight or None (cast here)."""

    @staticmethod
    def forward(ctx, x, fwd_state, bwd_state, w8, w8_t, w_inv, fast_accum_backward: bool, *weights):
        rows = _as_rows(x)
        x8, x8_t, x_inv = cast_transpose(rows, E4M3, state=fwd_state)
        if w8 is None:
            w8, w8_t, w_inv = cast_weight(_stacked(weights))
        y = _mm(x8, w8, x_inv, w_inv, torch.bfloat16, True)
        ctx.save_for_backward(x8_t, x_inv, w8_t, w_inv)
        ctx.bwd_state, ctx.fast_accum, ctx.x_shape, ctx.x_dtype = bwd_state, fast_accum_backward, x.shape, x.dtype
        ctx.w_rows, ctx.w_dtypes = [w.size(0) for w in weights], [w.dtype for w in weights]
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x8_t, x_inv, w8_t, w_inv = ctx.saved_tensors
        g8, g8_t, g_inv = cast_transpose(_grad_rows(dy), E5M2, state=ctx.bwd_state)
        dx = _mm(g8, w8_t, g_inv, w_inv, torch.bfloat16, ctx.fast_accum)
        dw = _mm(g8_t, x8_t, g_inv, x_inv, torch.float32, ctx.fast_accum)
        dws = [d.to(dtype) for d, dtype in zip(dw.split(ctx.w_rows), ctx.w_dtypes)]
        return (dx.view(ctx.x_shape).to(ctx.x_dtype), None, None, None, None, None, None, *dws)


class _Fp8ReluSquaredMLP(torch.autograd.Function):
    """relu(x W_fcᵀ)² W_projᵀ; states with two sites each (x and relu(h)², dy and dh), or None."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, fwd_state, bwd_state, fast_accum_backward: bool, fc8, fc8_t, fc_inv,
                proj8, proj8_t, proj_inv):
        rows = _as_rows(x)
        x8, x8_t, x_inv = cast_transpose(rows, E4M3, state=fwd_state, site=0)
        if fc8 is None:
            fc8, fc8_t, fc_inv = cast_weight(w_fc)
            proj8, proj8_t, proj_inv = cast_weight(w_proj)
        h = _mm(x8, fc8, x_inv, fc_inv, torch.bfloat16, True)
        a8, a8_t, a_inv = cast_transpose(h, E4M3, relu2=True, state=fwd_state, site=1)
        y = _mm(a8, proj8, a_inv, proj_inv, torch.bfloat16, True)
        ctx.save_for_backward(x8_t, x_inv, h, a8_t, a_inv, fc8_t, fc_inv, proj8_t, proj_inv)
        ctx.bwd_state, ctx.fast_accum, ctx.x_shape, ctx.x_dtype = bwd_state, fast_accum_backward, x.shape, x.dtype
        ctx.w_dtypes = (w_fc.dtype, w_proj.dtype)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x8_t, x_inv, h, a8_t, a_inv, fc8_t, fc_inv, proj8_t, proj_inv = ctx.saved_tensors
        g8, g8_t, g_inv = cast_transpose(_grad_rows(dy), E5M2, state=ctx.bwd_state, site=0)
        da = _mm(g8, proj8_t, g_inv, proj_inv, torch.bfloat16, ctx.fast_accum)
        d_proj = _mm(g8_t, a8_t, g_inv, a_inv, torch.float32, ctx.fast_accum)
        dh = (2 * F.relu(h.float()) * da.float()).to(torch.bfloat16)  # d relu(h)² / dh = 2 relu(h)
        dh8, dh8_t, dh_inv = cast_transpose(dh, E5M2, state=ctx.bwd_state, site=1)
        dx = _mm(dh8, fc8_t, dh_inv, fc_inv, torch.bfloat16, ctx.fast_accum)
        d_fc = _mm(dh8_t, x8_t, dh_inv, x_inv, torch.float32, ctx.fast_accum)
        return (dx.view(ctx.x_shape).to(ctx.x_dtype), d_fc.to(ctx.w_dtypes[0]), d_proj.to(ctx.w_dtypes[1]),
                None, None, None, None, None, None, None, None, None)


Scaling = tuple[torch.Tensor, torch.Tensor]  # delayed-scaling states (new_scaling_state): forward, backward


def fp8_linear(x: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], fast_accum_backward: bool = False,
               *, scaling: Scaling | None = None, cached: Fp8Weight | None = None) -> torch.Tensor:
    """x · Wᵀ through three fp8 GEMMs (bf16 output), W one weight or several stacked (q, k and v: one GEMM).
    The forward GEMM always uses Hopper's fast fp8 accumulation (as torchao does); `fast_accum_backward`
    uses it for dx and dW too. `scaling`: delayed scaling (one site each) instead of current; `cached`:
    W already in fp8 (cache_fp8_weights)."""
    weights = (weights,) if isinstance(weights, torch.Tensor) else tuple(weights)
    fwd_state, bwd_state = scaling if scaling is not None else (None, None)
    return _Fp8Linear.apply(x, fwd_state, bwd_state, *(cached or (None, None, None)), fast_accum_backward, *weights)


def fp8_relu_squared_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, fast_accum_backward: bool = False,
                         *, scaling: Scaling | None = None,
                         cached: tuple[Fp8Weight, Fp8Weight] | None = None) -> torch.Tensor:
    """relu(x W_fcᵀ)² W_projᵀ through six fp8 GEMMs, the hidden activation cast straight from h. `scaling`
    states have two sites each; `cached`: both weights already in fp8."""
    fwd_state, bwd_state = scaling if scaling is not None else (None, None)
    fc, proj = cached if cached is not None else ((None,) * 3, (None,) * 3)
    return _Fp8ReluSquaredMLP.apply(x, w_fc, w_proj, fwd_state, bwd_state, fast_accum_backward, *fc, *proj)


class Fp8Layer:
    """What our fp8 layers share: the backward's accumulation, delayed-scaling state, cached fp8 weights."""
    fast_accum_backward = False
    delayed = False
    caches_weights = False
    sites = 1  # cast sites per direction (delayed scaling)

    def weight_groups(self) -> list[tuple[nn.Parameter, ...]]:
        """The weights of each fp8 GEMM (several: stacked into one)."""
        raise NotImplementedError

    def setup_fp8(self, fast_accum_backward: bool, delayed: bool) -> None:
        self.fast_accum_backward, self.delayed = fast_accum_backward, delayed
        if delayed:
            device = self.weight_groups()[0][0].device
            self.register_buffer("fp8_forward_state", new_scaling_state(self.sites, device), persistent=False)
            self.register_buffer("fp8_backward_state", new_scaling_state(self.sites, device), persistent=False)

    def scaling(self) -> Scaling | None:
        return (self.fp8_forward_state, self.fp8_backward_state) if self.delayed else None

    def _versions(self) -> tuple[int, ...]:
        return tuple(w._version for group in self.weight_groups() for w in group)

    def cached(self, group: int) -> Fp8Weight | None:
        """Weight group `group` in fp8 when cached, else None. Eager forwards check that it is fresh."""
        if not self.caches_weights:
            return None
        if not torch.compiler.is_compiling() and self._cached_versions != self._versions():
            raise RuntimeError(f"{type(self).__name__}: a weight changed after its fp8 copy was made. "
                               "cache_fp8_weights refreshes after optimizer.step() and load_state_dict(); after "
                               "any other change call layer.refresh_fp8_weights() (or all: refresh_fp8_weights(model))")
        return tuple(getattr(self, f"fp8_weight{group}_{part}") for part in ("rows", "cols", "inv_scale"))

    @torch.no_grad()
    def refresh_fp8_weights(self) -> None:
        """Cast each weight group into its fp8 buffers (non-persistent: checkpoints stay bf16-loadable)."""
        for i, group in enumerate(self.weight_groups()):
            fresh = cast_weight(_stacked([w.detach() for w in group]))  # the same math as a forward's cast
            for part, value in zip(("rows", "cols", "inv_scale"), fresh):
                name = f"fp8_weight{i}_{part}"
                if getattr(self, name, None) is None:
                    self.register_buffer(name, value, persistent=False)
                else:
                    getattr(self, name).copy_(value)
        self.caches_weights, self._cached_versions = True, self._versions()


class Fp8Linear(Fp8Layer, nn.Linear):
    """nn.Linear (no bias) whose matmuls run in fp8; made by class swap, same Parameter."""

    def weight_groups(self) -> list[tuple[nn.Parameter, ...]]:
        return [(self.weight,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.fast_accum_backward, scaling=self.scaling(), cached=self.cached(0))


class Fp8Attention(Fp8Layer, CausalSelfAttention):
    """Attention whose q, k and v projections run as one fp8 linear; made by class swap, same Parameters."""

    def weight_groups(self) -> list[tuple[nn.Parameter, ...]]:
        return [(self.c_q.weight, self.c_k.weight, self.c_v.weight)]

    def project_own(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = fp8_linear(x, self.weight_groups()[0], self.fast_accum_backward, scaling=self.scaling(),
                         cached=self.cached(0))
        return qkv.split(self.qkv_sizes(), dim=-1)


class Fp8MLP(Fp8Layer, MLP):
    """MLP whose two linears and ReLU² run as one fp8 function; made by class swap, same Parameters."""
    sites = 2

    def weight_groups(self) -> list[tuple[nn.Parameter, ...]]:
        return [(self.c_fc.weight,), (self.c_proj.weight,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = (self.cached(0), self.cached(1)) if self.caches_weights else None
        return fp8_relu_squared_mlp(x, self.c_fc.weight, self.c_proj.weight, self.fast_accum_backward,
                                    scaling=self.scaling(), cached=cached)


def convert_to_fp8_triton(model: nn.Module, names: Sequence[str], fast_accum_backward: bool = False,
                          delayed: bool = False) -> None:
    """Swap each attention whose c_q, c_k and c_v are all named for Fp8Attention, each MLP whose c_fc and
    c_proj are both named for Fp8MLP, and the other named linears (bias-free nn.Linear) for Fp8Linear."""
    keep = set(names)
    fused: set[str] = set()  # linears run by a converted attention or MLP
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        if type(module) is CausalSelfAttention and all(f"{prefix}{n}" in keep for n in ("c_q", "c_k", "c_v")):
            module.__class__ = Fp8Attention
            fused.update((f"{prefix}c_q", f"{prefix}c_k", f"{prefix}c_v"))
        elif type(module) is MLP and all(f"{prefix}{n}" in keep for n in ("c_fc", "c_proj")):
            module.__class__ = Fp8MLP
            fused.update((f"{prefix}c_fc", f"{prefix}c_proj"))
        else:
            continue
        module.setup_fp8(fast_accum_backward, delayed)
    for fqn, module in model.named_modules():
        if fqn not in keep or fqn in fused:
            continue
        if type(module) is not nn.Linear or module.bias is not None:
            raise ValueError(f"our fp8 recipes (triton, triton_delayed) convert bias-free nn.Linear layers; {fqn} "
                             f"is {type(module).__name__} (bias: {module.bias is not None})")
        module.__class__ = Fp8Linear
        module.setup_fp8(fast_accum_backward, delayed)


def fp8_layers(model: nn.Module) -> list[Fp8Layer]:
    return [m for m in model.modules() if isinstance(m, Fp8Layer)]


def refresh_fp8_weights(model: nn.Module) -> None:
    """Re-cast the cached fp8 weights of every layer that caches them (after changing weights by hand)."""
    for layer in fp8_layers(model):
        if layer.caches_weights:
            layer.refresh_fp8_weights()


def cache_fp8_weights(model: nn.Module, optimizer) -> int:
    """Cast our fp8 layers' weights once per optimizer step instead of in every forward: now, after each
    `optimizer.step()` (a post-step hook) and after `model.load_state_dict`. Returns the number of layers.
    A weight changed any other way leaves a stale fp8 copy: eager forwards raise, compiled ones cannot
    check (call refresh_fp8_weights)."""
    layers = fp8_layers(model)
    if not layers:
        return 0

    def refresh(*_) -> None:
        for layer in layers:
            layer.refresh_fp8_weights()
    refresh()
    optimizer.register_step_post_hook(refresh)
    model.register_load_state_dict_post_hook(refresh)
    return len(layers)

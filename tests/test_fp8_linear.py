"""Our fp8 recipes (`--fp8_recipe triton` and `triton_delayed`): the cast-and-transpose kernel against a
float64 reference, delayed scaling's history, the fp8 linear and MLP functions (forward and both
gradients) against float64 math, the class swap, cached fp8 weights, and
torch.compile (Inductor-compiled training against bf16 is in tests/test_precision.py, beside torchao's
recipes). Where a GPU with fp8 tensor cores (compute capability >= 8.9) is present every test runs there;
otherwise on the CPU, the kernels in Triton's interpreter (tests/conftest.py) and torch._scaled_mm on the CPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from nanochat.kernels.fp8_cast import HISTORY, cast_transpose, new_scaling_state
from nanochat.model.fp8_linear import (Fp8Attention, Fp8Linear, Fp8MLP, cache_fp8_weights, cast_weight, fp8_linear,
                                       fp8_relu_squared_mlp, refresh_fp8_weights)
from nanochat.model.gpt import GPT, MLP, CausalSelfAttention, causal_attend, config_from_depth
from nanochat.optim import build_optimizer
from nanochat.precision import apply_precision, convert_to_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# one fp8 rounding: half the spacing of a 3-bit (e4m3) or 2-bit (e5m2) mantissa, relative to the value
HALF_STEP = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}
# below the normal range the spacing is absolute: half the smallest subnormal (in scaled units)
HALF_SUBNORMAL = {E4M3: 2.0 ** -10, E5M2: 2.0 ** -17}

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEVICE = "cuda" if FP8_GPU else "cpu"
pytestmark = pytest.mark.skipif(not FP8_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU with fp8 tensor cores, or TRITON_INTERPRET=1 on the CPU")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("fp8_dtype", [E4M3, E5M2])
@pytest.mark.parametrize("relu2", [False, True])
@pytest.mark.parametrize("shape", [(96, 80), (33, 17), (130, 260)])
def test_cast_transpose_matches_float64(fp8_dtype, relu2, shape):
    torch.manual_seed(hash((shape, relu2)) % 1000)
    x = (torch.randn(*shape, device=DEVICE) * 3).bfloat16()
    out, out_t, inv_scale = cast_transpose(x, fp8_dtype, relu2=relu2)
    assert out.dtype == out_t.dtype == fp8_dtype and out.shape == shape and out_t.shape == shape[::-1]
    assert torch.equal(out.t().contiguous().view(torch.uint8), out_t.view(torch.uint8))  # same bytes, transposed
    ref = x.double().clamp(min=0) ** 2 if relu2 else x.double()
    fp8_max = torch.finfo(fp8_dtype).max
    scale = fp8_max / ref.abs().max()
    assert inv_scale.item() == pytest.approx(1 / scale.item(), rel=1e-6)
    scaled = ref * scale
    err = (out.double() - scaled).abs()
    assert (err <= torch.maximum(scaled.abs() * HALF_STEP[fp8_dtype], torch.tensor(HALF_SUBNORMAL[fp8_dtype],
                                                                                   dtype=torch.float64,
                                                                                   device=DEVICE)) * 1.001).all()
    assert out.double().abs().max().item() == fp8_max  # the largest magnitude maps to fp8's largest value


def test_cast_transpose_equals_torch_cast_bitwise():
    """Without relu2 the kernel computes exactly x.float() * scale, saturated and rounded to nearest even."""
    x = (torch.randn(256, 384, device=DEVICE) * 5).bfloat16()
    out, out_t, _ = cast_transpose(x, E4M3)
    scale = torch.finfo(E4M3).max / x.float().abs().max()
    ref = (x.float() * scale).clamp(-448, 448).to(E4M3)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(out_t.view(torch.uint8), ref.t().contiguous().view(torch.uint8))


def test_cast_transpose_of_zeros_is_finite():
    out, out_t, inv_scale = cast_transpose(torch.zeros(32, 48, dtype=torch.bfloat16, device=DEVICE))
    assert torch.isfinite(inv_scale) and inv_scale.item() == pytest.approx(1e-12 / 448)
    assert not out.float().any() and not out_t.float().any()


def test_cast_transpose_rejects_bad_input():
    with pytest.raises(ValueError, match="contiguous 2-D"):
        cast_transpose(torch.zeros(4, 8, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous 2-D"):
        cast_transpose(torch.zeros(16, 32, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        cast_transpose(torch.zeros(16, 32, dtype=torch.bfloat16), torch.float16)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_delayed_scaling_starts_like_current_then_scales_by_the_history():
    torch.manual_seed(0)
    x = (torch.randn(300, 600, device=DEVICE) * 3).bfloat16()  # 25 tiles: each program casts several
    state = new_scaling_state(2, DEVICE)
    current = cast_transpose(x)
    first = cast_transpose(x, state=state, site=1)  # empty history: an amax pass, as current scaling
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(current[:2], first[:2]))
    assert torch.equal(current[2], first[2])
    amax = x.float().abs().max().item()
    assert state[1, HISTORY].item() == amax and not state[1, :HISTORY].any() and not state[0].any()
    # twice the values: scaled by the recorded amax, so the top half saturates at fp8_max (delayed scaling's
    # known cost, for one call), and the new amax is recorded for the next call
    second, second_t, inv_scale = cast_transpose(2 * x, state=state, site=1)
    assert inv_scale.item() == pytest.approx(amax / 448, rel=1e-6)
    scaled = (2 * x).double() * 448 / amax
    over = scaled.abs() >= 448
    assert over.any() and (second.double().abs()[over] == 448).all()
    assert ((second.double() - scaled)[~over].abs() <= scaled[~over].abs() * HALF_STEP[E4M3] + HALF_SUBNORMAL[E4M3]).all()
    assert torch.equal(_bytes(second.t().contiguous()), _bytes(second_t))
    assert state[1, HISTORY].item() == 2 * amax and state[1, :2].tolist() == [amax, 0.0]
    third = cast_transpose(x, state=state, site=1)[2]  # the history's max (2 amax) sets the scale
    assert third.item() == pytest.approx(2 * amax / 448, rel=1e-6)


def test_delayed_history_keeps_the_last_amaxes():
    state = new_scaling_state(1, DEVICE)
    for k in range(1, HISTORY + 4):
        cast_transpose(torch.full((32, 48), float(k), device=DEVICE, dtype=torch.bfloat16), torch.float8_e5m2,
                       state=state)
    assert state[0, HISTORY].item() == HISTORY + 3  # the latest call's, then the history, newest first
    assert state[0, :HISTORY].tolist() == [float(k) for k in range(HISTORY + 2, 2, -1)]


@pytest.mark.parametrize("relu2", [False, True])
def test_delayed_cast_matches_float64_under_the_recorded_scale(relu2):
    torch.manual_seed(1)
    state = new_scaling_state(1, DEVICE)
    x = (torch.randn(130, 260, device=DEVICE) * 3).bfloat16()
    cast_transpose(x * 4, state=state, relu2=relu2)  # records a larger amax: no saturation below
    out, out_t, inv_scale = cast_transpose(x, state=state, relu2=relu2)
    ref = x.double().clamp(min=0) ** 2 if relu2 else x.double()
    scaled = ref / inv_scale.double()
    err = (out.double() - scaled).abs()
    assert (err <= torch.clamp(scaled.abs() * HALF_STEP[E4M3], min=HALF_SUBNORMAL[E4M3]) * 1.001).all()
    assert torch.equal(_bytes(out.t().contiguous()), _bytes(out_t))


def test_delayed_scaling_of_zeros_keeps_bootstrapping():
    state = new_scaling_state(1, DEVICE)
    cast_transpose(torch.zeros(32, 48, dtype=torch.bfloat16, device=DEVICE), state=state)
    assert not state.any()  # nothing recorded: the next call measures again
    x = torch.randn(32, 48, device=DEVICE).bfloat16()
    assert cast_transpose(x, state=state)[2].item() == pytest.approx(x.float().abs().max().item() / 448, rel=1e-6)


def test_delayed_scaling_state_is_checked():
    x = torch.zeros(16, 32, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="new_scaling_state"):
        cast_transpose(x, state=torch.zeros(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="2-D bf16 tensor, got torch.float32"):
        cast_transpose(x.float())
    with pytest.raises(ValueError, match="site 2"):
        cast_transpose(x, state=new_scaling_state(2, DEVICE), site=2)


def test_cast_weight_matches_float64():
    torch.manual_seed(0)
    w = torch.randn(96, 64, device=DEVICE)
    w8, w8_t, inv_scale = cast_weight(w)
    assert torch.equal(w8.t().contiguous().view(torch.uint8), w8_t.view(torch.uint8))
    deq = w8.double() * inv_scale.double()
    bound = torch.clamp(w.double().abs() * HALF_STEP[E4M3], min=HALF_SUBNORMAL[E4M3] * inv_scale.item())
    assert ((deq - w.double()).abs() <= bound * 1.001).all()


def _inputs(DEVICE, n_tokens=64, k=96, n=128):
    torch.manual_seed(0)
    x = torch.randn(2, n_tokens // 2, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).requires_grad_()
    return x, w


# Normwise relative error against float64 math on the unquantized inputs. One e4m3 rounding has a relative
# error of up to 1/16 (about 1/28 on average over a uniform mantissa); sums of many products average it down.
# Measured on the CPU: forward 0.037, dx and dW 0.058 (e5m2 gradients); a wrong layout or scale gives ~1.4.
FWD_TOL, GRAD_TOL = 0.06, 0.10


# current scaling; delayed scaling from the history the same call left one call earlier; weights cast
# beforehand (cache_fp8_weights' path)
MODES = ["current", "delayed", "cached"]


def _run(mode: str, f, x: torch.Tensor, weight_groups: list[tuple[torch.Tensor, ...]], dy: torch.Tensor, **kwargs):
    """f(x, *weights, ...) forward and backward under `mode`; the delayed run's second call is the one kept."""
    if mode == "delayed":
        sites = len(weight_groups)
        kwargs["scaling"] = (new_scaling_state(sites, DEVICE), new_scaling_state(sites, DEVICE))
    if mode == "cached":
        cached = [cast_weight(torch.cat([w.detach() for w in g])) for g in weight_groups]
        kwargs["cached"] = cached[0] if len(cached) == 1 else tuple(cached)
    for _ in range(2 if mode == "delayed" else 1):
        for t in (x, *(w for g in weight_groups for w in g)):
            t.grad = None
        y = f(x, **kwargs)
        y.backward(dy)
    return y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_linear_matches_float64(fast_accum, mode):
    x, w = _inputs(DEVICE)
    dy = torch.randn(2, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    y = _run(mode, lambda x, **kw: fp8_linear(x, w, fast_accum_backward=fast_accum, **kw), x, [(w,)], dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 @ w64.t()
    y64.backward(dy.double())
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert rel_err(y, y64) < FWD_TOL
    assert rel_err(x.grad, x64.grad) < GRAD_TOL
    assert rel_err(w.grad, w64.grad) < GRAD_TOL


@pytest.mark.parametrize("mode", MODES)
def test_stacked_weights_are_one_linear_with_split_gradients(mode):
    """q, k and v as one fp8 linear: the output is x · [W_q; W_k; W_v]ᵀ, each weight gets its own gradient."""
    x, _ = _inputs(DEVICE)
    ws = [(torch.randn(n, 96, device=DEVICE) / 96 ** 0.5).requires_grad_() for n in (128, 64, 64)]
    dy = torch.randn(2, 32, 256, device=DEVICE, dtype=torch.bfloat16)
    y = _run(mode, lambda x, **kw: fp8_linear(x, ws, **kw), x, [tuple(ws)], dy)
    x64 = x.detach().double().requires_grad_()
    ws64 = [w.detach().double().requires_grad_() for w in ws]
    y64 = x64 @ torch.cat(ws64).t()
    y64.backward(dy.double())
    assert rel_err(y, y64) < FWD_TOL
    assert rel_err(x.grad, x64.grad) < GRAD_TOL
    for w, w64 in zip(ws, ws64):
        assert w.grad.shape == w.shape and rel_err(w.grad, w64.grad) < GRAD_TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_relu_squared_mlp_matches_float64(fast_accum, mode):
    x, w_fc = _inputs(DEVICE, k=96, n=384)
    w_proj = (torch.randn(96, 384, device=DEVICE) / 384 ** 0.5).requires_grad_()
    dy = torch.randn(2, 32, 96, device=DEVICE, dtype=torch.bfloat16)
    y = _run(mode, lambda x, **kw: fp8_relu_squared_mlp(x, w_fc, w_proj, fast_accum_backward=fast_accum, **kw),
             x, [(w_fc,), (w_proj,)], dy)
    x64, fc64, proj64 = (t.detach().double().requires_grad_() for t in (x, w_fc, w_proj))
    y64 = (x64 @ fc64.t()).relu().square() @ proj64.t()
    y64.backward(dy.double())
    # two fp8 GEMMs in a row, so errors add up (measured on the CPU: forward 0.057, gradients 0.074-0.090)
    assert rel_err(y, y64) < 1.5 * FWD_TOL
    for got, ref in ((x.grad, x64.grad), (w_fc.grad, fc64.grad), (w_proj.grad, proj64.grad)):
        assert rel_err(got, ref) < 1.5 * GRAD_TOL


def test_backward_needs_a_multiple_of_16_tokens():
    x, w = _inputs(DEVICE, n_tokens=24)
    y = fp8_linear(x[:, :-1], w)  # 22 tokens: the forward runs (inference at any length) ...
    with pytest.raises(ValueError, match="multiple of 16, got 22; change --device_batch_size or --max_seq_len"):
        y.sum().backward()  # ... the weight gradient's fp8 GEMM cannot


def tiny_gpt(**options) -> GPT:
    cfg = config_from_depth(2, vocab_size=512, sequence_len=64, aspect_ratio=64, head_dim=64, **options)  # width 128
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(cfg)
    model.init_weights()
    return model


def test_convert_swaps_classes_and_keeps_parameters():
    model = tiny_gpt()
    params = dict(model.named_parameters())
    names = convert_to_fp8(model, recipe="triton_delayed", min_dim=128, skip=["*.attn.c_proj"])
    assert "blocks.0.attn.c_proj" not in names and len(names) == 10
    attn = model.blocks[0].attn
    assert type(attn) is Fp8Attention and type(attn.c_q) is nn.Linear and type(attn.c_proj) is nn.Linear
    assert type(model.blocks[0].mlp) is Fp8MLP and type(model.lm_head) is nn.Linear
    assert attn.delayed and attn.fp8_forward_state.shape == (1, HISTORY + 1)
    assert model.blocks[0].mlp.fp8_backward_state.shape == (2, HISTORY + 1)
    assert dict(model.named_parameters()) == params  # the very same Parameters: state_dict and Muon unchanged
    plain = tiny_gpt()
    plain.load_state_dict(model.state_dict(), strict=True)  # the scaling state is not in the checkpoint


def test_partly_converted_attention_and_mlp_stay_unfused():
    model = tiny_gpt()
    convert_to_fp8(model, recipe="triton", min_dim=128, skip=["*.mlp.c_proj", "*.attn.c_k"])
    assert type(model.blocks[0].mlp) is MLP and type(model.blocks[0].mlp.c_fc) is Fp8Linear
    attn = model.blocks[0].attn
    assert type(attn) is CausalSelfAttention and type(attn.c_q) is Fp8Linear and type(attn.c_k) is nn.Linear


def test_fp8_attention_projects_like_three_linears():
    model = tiny_gpt()
    x = torch.randn(2, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    plain = model.blocks[0].attn.project_qkv(x.float())
    convert_to_fp8(model, recipe="triton", min_dim=128)
    attn = model.blocks[0].attn
    for got, ref in zip(attn.project_qkv(x), plain):
        assert got.shape == ref.shape and rel_err(got, ref.double()) < FWD_TOL
    fused = attn.qkv_weight()  # a decoder's own stacked weight runs as given, not in fp8,
    assert "project_qkv" not in type(attn).__dict__  # by the model's code: our fp8 layer knows nothing of it
    exact = torch.nn.functional.linear(x.float(), fused).split(attn.qkv_sizes(), dim=-1)
    assert all(torch.equal(a, b) for a, b in zip(attn.project_qkv(x.float(), fused), exact))


def test_fp8_attention_keeps_the_attention_output_gate():
    """Fp8Attention replaces the projections only: the gate (too small for fp8) still scales each head's output.
    Zero gate weights give every head 0.5, so the output is half the ungated one (exact: fp8 scales are powers
    of two apart)."""
    model = tiny_gpt(attn_gate=True)
    names = convert_to_fp8(model, recipe="triton", min_dim=128)
    attn = model.blocks[0].attn
    assert type(attn) is Fp8Attention and type(attn.attn_gate_linear) is nn.Linear
    assert not any("attn_gate" in n for n in names)
    x = torch.randn(2, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = model.cos[:, :32], model.sin[:, :32]
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        attn.c_proj.weight.normal_(std=0.05)
        gated = attn(x, cos, sin, None, causal_attend)
        attn.attn_gate_linear = None
        torch.testing.assert_close(gated, 0.5 * attn(x, cos, sin, None, causal_attend), atol=1e-3, rtol=1e-2)


def _zero_scaling_states(model: nn.Module) -> None:
    for name, buf in model.named_buffers():
        if name.endswith(("fp8_forward_state", "fp8_backward_state")):
            buf.zero_()


def _loss_and_grads(run, model, idx):
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = run(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("recipe", ["triton", "triton_delayed"])
def test_cached_weights_follow_optimizer_steps_and_loads(recipe):
    model, reference = tiny_gpt(), tiny_gpt()
    for m in (model, reference):
        convert_to_fp8(m, recipe=recipe, min_dim=128)
    opt, ref_opt = build_optimizer(model), build_optimizer(reference)
    assert cache_fp8_weights(model, opt) == 6  # per block: attention (q, k, v), its output projection, MLP
    idx = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for _ in range(2):  # cached weights after each optimizer step give what casting in the forward gives
        loss, _ = _loss_and_grads(model, model, idx)
        ref_loss, _ = _loss_and_grads(reference, reference, idx)
        assert loss == pytest.approx(ref_loss, rel=1e-3)
        for o in (opt, ref_opt):
            o.step()
    mlp = model.blocks[0].mlp
    assert torch.equal(_bytes(mlp.fp8_weight0_rows), _bytes(cast_weight(mlp.c_fc.weight)[0]))
    with torch.no_grad():
        mlp.c_fc.weight.mul_(2)  # a change no hook sees
    with pytest.raises(RuntimeError, match="refresh_fp8_weights"):
        _loss_and_grads(model, model, idx)
    refresh_fp8_weights(model)
    _loss_and_grads(model, model, idx)
    model.load_state_dict(tiny_gpt().state_dict())  # a load re-casts
    assert torch.equal(_bytes(mlp.fp8_weight0_rows), _bytes(cast_weight(mlp.c_fc.weight)[0]))
    plain = tiny_gpt()
    plain.load_state_dict(model.state_dict(), strict=True)  # the fp8 copies are not in the checkpoint


@pytest.mark.parametrize("recipe", ["triton", "triton_delayed"])
def test_compiled_model_matches_eager_and_casts_each_input_once(monkeypatch, recipe):
    """aot_eager runs AOTAutograd's joint graph (its CSE and partitioner) without Inductor's codegen, with
    our layers' weights cached: the same loss, the same casts, and the same gradients up to summation
    order (on the GPU the embedding's backward adds with atomics, and a last-bit difference upstream can
    move an fp8 rounding: 1% normwise allows that; a wrong layout or scale is off by ~100%)."""
    import nanochat.kernels.fp8_cast as fp8_cast
    casts = []
    real = fp8_cast._fp8_cast_transpose_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                casts.append(tuple(args[0].shape))
                return real[grid](*args, **kwargs)
            return launch
    model = tiny_gpt()
    with torch.no_grad():  # output projections start at zero, which would leave every weight before them no gradient
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
    convert_to_fp8(model, recipe=recipe, min_dim=128)
    cache_fp8_weights(model, build_optimizer(model))
    monkeypatch.setattr(fp8_cast, "_fp8_cast_transpose_kernel", Spy())
    idx = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        casts.clear()
        _zero_scaling_states(model)
        results.append(_loss_and_grads(run, model, idx))
        # per layer, forward: the normed input (q, k, v at once), y, the MLP input, relu(h)²;
        # backward: the gradients of q, k and v at once, of y's projection, of the MLP's output, of h
        assert len(casts) == 2 * 8
    assert results[0][0] == results[1][0]
    assert all(a.norm() > 0 and (b - a).norm() <= 1e-2 * a.norm() for a, b in zip(results[0][1], results[1][1]))


def test_fp8_linear_ignores_autocast():
    """Our GEMMs set their own dtypes: autocast must not change them (the CPU's autocast once rounded an eager
    _scaled_mm 0.3% off its compiled twin, which broke the compiled-model test above)."""
    torch.manual_seed(3)
    x = torch.randn(64, 128, device=DEVICE, requires_grad=True)
    w = torch.randn(96, 128, device=DEVICE, requires_grad=True)
    g = torch.randn(64, 96, device=DEVICE)
    results = []
    for autocast in (False, True):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            y = fp8_linear(x, w)
        y.float().backward(g)
        results.append((y.detach(), x.grad, w.grad))
        x.grad = w.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_triton_recipe_is_refused_for_transformer_engine_layers(monkeypatch):
    model = tiny_gpt()
    model.set_precision = lambda *a, **k: None  # stands in for TEGPT
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with pytest.raises(ValueError, match="Transformer Engine .* runs its own: use --fp8_recipe tensorwise"):
        apply_precision(model, "fp8", torch.device("cuda"), fp8_recipe="triton")

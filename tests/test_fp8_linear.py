"""Our fp8 recipe (`--fp8_recipe triton`): the cast-and-transpose kernel against a float64 reference, the
fp8 linear and MLP functions (forward and both gradients) against float64 math, the class swap, and
torch.compile (Inductor-compiled training against bf16 is in tests/test_precision.py, beside torchao's
recipes). Where a GPU with fp8 tensor cores (compute capability >= 8.9) is present every test runs there;
otherwise on the CPU, the kernels in Triton's interpreter (tests/conftest.py) and torch._scaled_mm on the CPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from nanochat.fp8_linear import Fp8Linear, Fp8MLP, cast_weight, fp8_linear, fp8_relu_squared_mlp
from nanochat.gpt import GPT, MLP, config_from_depth
from nanochat.kernels.fp8_cast import cast_transpose
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


def test_cast_weight_matches_float64():
    w = torch.randn(96, 64, device=DEVICE)
    w8, w8_t, inv_scale = cast_weight(w)
    assert torch.equal(w8.t().contiguous().view(torch.uint8), w8_t.view(torch.uint8))
    deq = w8.double() * inv_scale.double()
    assert ((deq - w.double()).abs() <= w.double().abs() * HALF_STEP[E4M3] + 1e-6).all()


def _inputs(DEVICE, n_tokens=64, k=96, n=128):
    torch.manual_seed(0)
    x = torch.randn(2, n_tokens // 2, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).requires_grad_()
    return x, w


# Normwise relative error against float64 math on the unquantized inputs. One e4m3 rounding has a relative
# error of up to 1/16 (about 1/28 on average over a uniform mantissa); sums of many products average it down.
# Measured on the CPU: forward 0.037, dx and dW 0.058 (e5m2 gradients); a wrong layout or scale gives ~1.4.
FWD_TOL, GRAD_TOL = 0.06, 0.10


@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_linear_matches_float64(fast_accum):
    x, w = _inputs(DEVICE)
    y = fp8_linear(x, w, fast_accum_backward=fast_accum)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = x64 @ w64.t()
    y64.backward(dy.double())
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert rel_err(y, y64) < FWD_TOL
    assert rel_err(x.grad, x64.grad) < GRAD_TOL
    assert rel_err(w.grad, w64.grad) < GRAD_TOL


@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_relu_squared_mlp_matches_float64(fast_accum):
    x, w_fc = _inputs(DEVICE, k=96, n=384)
    w_proj = (torch.randn(96, 384, device=DEVICE) / 384 ** 0.5).requires_grad_()
    y = fp8_relu_squared_mlp(x, w_fc, w_proj, fast_accum_backward=fast_accum)
    dy = torch.randn_like(y)
    y.backward(dy)
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


def tiny_gpt() -> GPT:
    cfg = config_from_depth(2, vocab_size=512, sequence_len=64, aspect_ratio=64, head_dim=64)  # width 128
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = GPT(cfg)
    model.init_weights()
    return model


def test_convert_swaps_classes_and_keeps_parameters():
    model = tiny_gpt()
    params = dict(model.named_parameters())
    names = convert_to_fp8(model, recipe="triton", min_dim=128, skip=["*.attn.c_proj"])
    assert "blocks.0.attn.c_proj" not in names and len(names) == 10
    assert type(model.blocks[0].attn.c_q) is Fp8Linear and type(model.blocks[0].attn.c_proj) is nn.Linear
    assert type(model.blocks[0].mlp) is Fp8MLP and type(model.lm_head) is nn.Linear
    assert dict(model.named_parameters()) == params  # the very same Parameters: state_dict and Muon unchanged
    plain = tiny_gpt()
    plain.load_state_dict(model.state_dict(), strict=True)


def test_an_mlp_with_one_linear_in_bf16_stays_unfused():
    model = tiny_gpt()
    convert_to_fp8(model, recipe="triton", min_dim=128, skip=["*.mlp.c_proj"])
    assert type(model.blocks[0].mlp) is MLP and type(model.blocks[0].mlp.c_fc) is Fp8Linear


def test_triton_recipe_is_refused_for_transformer_engine_layers(monkeypatch):
    model = tiny_gpt()
    model.set_precision = lambda *a, **k: None  # stands in for TEGPT
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with pytest.raises(ValueError, match="Transformer Engine .* runs its own: use --fp8_recipe tensorwise"):
        apply_precision(model, "fp8", torch.device("cuda"), fp8_recipe="triton")


def test_compiled_model_matches_eager_and_casts_a_shared_input_once(monkeypatch):
    """aot_eager runs AOTAutograd's joint graph (its CSE and partitioner) without Inductor's codegen: the
    three casts of the attention input (q, k and v read the same tensor) become one."""
    import nanochat.kernels.fp8_cast as fp8_cast
    casts = []
    real = fp8_cast._fp8_cast_transpose_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                casts.append(tuple(args[0].shape))
                return real[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(fp8_cast, "_fp8_cast_transpose_kernel", Spy())
    model = tiny_gpt()
    convert_to_fp8(model, recipe="triton", min_dim=128)
    idx = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    losses, grads = [], []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        casts.clear()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = run(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append(model.blocks[0].mlp.c_fc.weight.grad.clone())
        model.zero_grad(set_to_none=True)
        # per layer: 6 casts forward (q, k, v each cast the normed input; y; MLP input; relu(h)²), 6 backward
        assert len(casts) == (24 if run is model else 20)
    assert losses[0] == losses[1]
    assert torch.equal(grads[0], grads[1])

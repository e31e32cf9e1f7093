"""Precision: argument checks and their messages, the fp8 layer filter, the torchao swap (state_dict, Muon
groups), the Transformer Engine arch without TE, the fp8 audit patterns and the scripts' flags.
GPU-only: fp8 training steps against bf16, and TEGPT when Transformer Engine is installed."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn as nn

from nanochat import profiling
from nanochat.model import model_class
from nanochat.model.gpt import GPT, config_from_depth, rotary_tables
from nanochat.model.gpt_te import TEGPT
from nanochat.registry import BackendUnavailable
from nanochat.precision import (OUR_FP8_RECIPES, apply_precision, cache_low_precision_weights, check_precision,
                                convert_to_fp8, fp8_eligible)

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
CPU = torch.device("cpu")


def tiny_gpt(depth: int = 2, device="meta") -> GPT:
    cfg = config_from_depth(depth, vocab_size=500, sequence_len=32, aspect_ratio=64, head_dim=64)
    with torch.device(device):
        model = GPT(cfg)
    if device != "meta":
        model.init_weights()
    return model


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device with a chosen compute capability exists (only the checks run)."""
    def install(capability: tuple[int, int], name: str = "NVIDIA H200"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return install


# --- argument checks -----------------------------------------------------------------------------------------

def test_unknown_precision_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'.*bf16, fp8, nvfp4"):
        apply_precision(tiny_gpt(), "fp16", CPU)


def test_unknown_fp8_recipe_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown fp8 recipe 'blockwise'.*tensorwise, rowwise"):
        check_precision("fp8", CPU, fp8_recipe="blockwise")


def test_bf16_changes_nothing():
    model = tiny_gpt()
    assert apply_precision(model, "bf16", CPU) == 0
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_low_precision_on_cpu_names_device_and_fix(precision):
    with pytest.raises(RuntimeError) as err:
        apply_precision(tiny_gpt(), precision, CPU)
    msg = str(err.value)
    assert f"--precision {precision}" in msg and "cpu" in msg and "--precision bf16" in msg


def test_nvfp4_below_blackwell_names_the_capability(fake_gpu):
    fake_gpu((9, 0), "NVIDIA H200")
    with pytest.raises(RuntimeError) as err:
        check_precision("nvfp4", torch.device("cuda"))
    msg = str(err.value)
    assert "Blackwell" in msg and ">= 10.0" in msg and "NVIDIA H200" in msg and "9.0" in msg and "fp8" in msg


def test_fp8_needs_sm89(fake_gpu):
    fake_gpu((8, 0), "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"8\.9.*NVIDIA A100 has compute capability 8\.0"):
        check_precision("fp8", torch.device("cuda"))
    fake_gpu((9, 0))
    check_precision("fp8", torch.device("cuda"))  # Hopper passes


def test_nvfp4_on_blackwell_with_our_gpt_points_to_arch_te(fake_gpu):
    fake_gpu((10, 0), "NVIDIA B200")
    with pytest.raises(ValueError, match="--arch te"):
        apply_precision(tiny_gpt(), "nvfp4", torch.device("cuda"))


# --- the fp8 filter and the torchao swap ---------------------------------------------------------------------

def test_fp8_filter_by_min_dim_and_lm_head():
    cfg = config_from_depth(4, vocab_size=1000, sequence_len=64)  # width 256: linears 256x256, 256x1024, 1024x256
    with torch.device("meta"):
        model = GPT(cfg)
    assert fp8_eligible(model, min_dim=1024) == []  # the smaller dim is 256 everywhere
    names = fp8_eligible(model, min_dim=256)
    per_block = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert names == [f"blocks.{i}.{n}" for i in range(4) for n in per_block]
    assert fp8_eligible(model, min_dim=256, include_lm_head=True) == names + ["lm_head"]
    kept = fp8_eligible(model, min_dim=256, skip=["*.attn.c_proj", "blocks.0.*"])
    assert kept == [n for n in names if not n.endswith("attn.c_proj") and not n.startswith("blocks.0.")]
    assert len(kept) == len(names) - 3 - 6  # attn.c_proj of blocks 1-3, and all six linears of block 0
    # the small gates (12 input channels: not a multiple of 16) stay bf16 at any --fp8_min_dim
    with torch.device("meta"):
        gated = GPT(config_from_depth(4, vocab_size=1000, sequence_len=64, attn_gate=True, value_embeds=True,
                                      value_embed_gate="input"))
    assert any("attn_gate_linear" in n for n, _ in gated.named_modules())
    assert fp8_eligible(gated, min_dim=1) == fp8_eligible(model, min_dim=1) == names
    # dims must be multiples of 16: a 1000-wide layer never converts
    odd = nn.Sequential(nn.Linear(1024, 1000, bias=False), nn.Linear(1024, 2048, bias=False))
    assert fp8_eligible(odd, min_dim=1024) == ["1"]


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install torchao)")
def test_fp8_swap_keeps_parameters_state_dict_and_muon_groups():
    from torchao.float8.float8_linear import Float8Linear
    from nanochat.optim import build_optimizer
    torch.manual_seed(0)
    model = tiny_gpt(device="cpu")  # width 128
    before = {n: p for n, p in model.named_parameters()}
    groups_before = {k: [id(p) for p in v] for k, v in model.param_groups().items()}
    names = convert_to_fp8(model, recipe="rowwise", min_dim=128)
    assert len(names) == 12 and all(isinstance(model.get_submodule(n), Float8Linear) for n in names)
    assert type(model.lm_head) is nn.Linear
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # same Parameters
    assert {k: [id(p) for p in v] for k, v in model.param_groups().items()} == groups_before
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.param_groups()["matrix"])
    build_optimizer(model)  # Muon takes the Float8Linear weights as plain matrices
    # the checkpoint loads into a plain (bf16-inference) GPT: same keys, dtypes, values
    state = model.state_dict()
    plain = tiny_gpt(device="cpu")
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == \
        {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
    plain.load_state_dict(state, strict=True)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install torchao)")
@pytest.mark.parametrize("fast_accum", [False, True])
def test_fp8_fast_accum_reaches_the_backward_gemms(fast_accum):
    model = tiny_gpt(device="cpu")
    names = convert_to_fp8(model, min_dim=128, fast_accum=fast_accum)
    config = model.get_submodule(names[0]).config
    assert config.gemm_config_output.use_fast_accum  # torchao's own default, either way
    assert config.gemm_config_grad_input.use_fast_accum == fast_accum
    assert config.gemm_config_grad_weight.use_fast_accum == fast_accum


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install torchao)")
def test_fp8_lm_head_on_our_gpt_says_why_not():
    with pytest.raises(ValueError, match="fused loss kernel"):
        convert_to_fp8(tiny_gpt(), min_dim=64, include_lm_head=True)


# --- Transformer Engine arch ---------------------------------------------------------------------------------

def test_tegpt_without_te_names_package_and_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(BackendUnavailable) as err:
        model_class("te")  # --arch te fails before any model is built
    with pytest.raises(ImportError) as err_direct:
        TEGPT(config_from_depth(2, vocab_size=500, sequence_len=32))
    for msg in (str(err.value), str(err_direct.value)):
        assert "transformer_engine" in msg and "pip install" in msg and "transformer-engine" in msg


def test_tegpt_refuses_the_options_its_block_cannot_do(monkeypatch):
    import nanochat.model.gpt_te as gpt_te
    monkeypatch.setattr(gpt_te, "import_te", lambda: None)  # the check comes before any TE layer is built
    for option in ({"attn_gate": True}, {"unet_skips": True}, {"bigram_embeds": True}):
        with pytest.raises(ValueError, match=rf"without \['{next(iter(option))}'\]: pass --{next(iter(option))} False"):
            TEGPT(config_from_depth(2, vocab_size=500, sequence_len=32, **option))


def test_te_helpers_match_our_gpt():
    from nanochat.model.gpt_te import rope_freqs, te_window
    assert te_window(None) == (-1, 0) and te_window(512) == (511, 0)  # query sees itself + 511 earlier keys
    freqs = rope_freqs(16, 64)
    cos, _ = rotary_tables(16, 64)
    assert freqs.shape == (16, 1, 1, 64)
    torch.testing.assert_close(freqs[..., :32].cos().squeeze(), cos.squeeze())
    torch.testing.assert_close(freqs[..., 32:], freqs[..., :32])


# --- audit patterns and script flags -------------------------------------------------------------------------

def _summary(*names: str) -> dict:
    return profiling.summarize([(n, 100.0) for n in names])


def test_fp8_gemms_and_casts_are_grouped_and_expected():
    fp8 = _summary("nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT", "triton_red_fused_abs_amax_0",
                   "triton_poi_fused__to_copy_clamp_mul_reciprocal_1", "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT")
    assert fp8["groups"]["matmul"] == pytest.approx(0.5) and fp8["groups"]["quantize/transpose"] == pytest.approx(0.5)
    assert profiling.check_expectations(fp8, ["matmul=fp8"]) == []
    bf16 = _summary("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT")
    [failure] = profiling.check_expectations(bf16, ["matmul=fp8"])
    assert "nvjet_tst_192x192" in failure
    assert profiling.classify("triton_per_fused_clamp_div_ne_sum_0") != "quantize/transpose"  # the loss's count


def test_flags_parse_and_pass_through(monkeypatch):
    from nanochat.flags import parse_flags
    from scripts.base_train import TrainConfig
    from scripts.bench import BenchConfig, row_argv
    from scripts.profile_kernels import ProfileConfig
    train = parse_flags(TrainConfig, ["--arch=te", "--precision=fp8", "--fp8_recipe=rowwise", "--fp8_min_dim=256",
                                      "--fp8_lm_head"])
    assert (train.arch, train.precision, train.fp8_recipe, train.fp8_min_dim, train.fp8_lm_head) == \
        ("te", "fp8", "rowwise", 256, True)
    bench = parse_flags(BenchConfig, ["--precision=bf16,fp8", "--fp8_recipe=rowwise", "--fp8_min_dim=512",
                                      "--fp8_fast_accum", "--fp8_skip=*.attn.c_proj,*.c_q"])
    argv = row_argv(bench, {"arch": "gpt", "kernel": "torch", "attn": "auto", "precision": "fp8", "depth": 4,
                            "device_batch_size": 2, "max_seq_len": 64, "window_pattern": "L"})
    prof = parse_flags(ProfileConfig, argv)
    assert (prof.precision, prof.fp8_recipe, prof.fp8_min_dim, prof.fp8_lm_head, prof.fp8_fast_accum, prof.fp8_skip) == \
        ("fp8", "rowwise", 512, False, True, ["*.attn.c_proj", "*.c_q"])


def test_auto_expectations_add_fp8_gemms(monkeypatch):
    import nanochat.kernels.attention as attention
    from scripts.profile_kernels import ProfileConfig, auto_expectations
    monkeypatch.setattr(attention, "select_backend",
                        lambda w, dtype, device, backend, doc_mask, compiled: "flex" if doc_mask else "cudnn")
    model = type("M", (), {"windows": [None, 512]})()
    cuda = torch.device("cuda")
    assert auto_expectations(ProfileConfig(precision="fp8", doc_mask=False), model, cuda) == \
        ["loss=torch", "attention=cudnn", "matmul=fp8"]
    assert auto_expectations(ProfileConfig(doc_mask=False), model, cuda) == ["loss=torch", "attention=cudnn"]
    assert auto_expectations(ProfileConfig(), model, cuda) == ["loss=torch", "attention=flex"]  # documents masked
    assert auto_expectations(ProfileConfig(kernel="current"), model, cuda)[0] == "loss=torch"  # the old name
    assert auto_expectations(ProfileConfig(arch="te", precision="nvfp4"), model, cuda) == \
        ["loss=torch", "matmul=nvfp4"]
    assert auto_expectations(ProfileConfig(precision="fp8"), model, CPU) == []


# --- GPU ----------------------------------------------------------------------------------------------------

def _sm(major_minor: tuple[int, int]) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= major_minor


@pytest.mark.gpu
@pytest.mark.skipif(not _sm((8, 9)), reason="needs CUDA compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "triton", "triton_delayed"])
def test_fp8_training_tracks_bf16_and_saves_a_plain_checkpoint(recipe):
    """Five compiled optimizer steps of a d2 model, width 512, on one 512-token batch: both precisions learn,
    fp8's last loss is within 10% of bf16's drop, and its state_dict loads into a plain GPT. tensorwise and
    rowwise are torchao's; triton and triton_delayed are ours (fp8_linear), with weights cast once per optimizer
    step. Scalar rate 0.05: the default 0.5 makes this tiny run spike (on the H100 bf16 itself rose from 6.9 to
    10.9), and a spike turns rounding differences into different losses."""
    if recipe not in OUR_FP8_RECIPES and not HAS_TORCHAO:
        pytest.skip(f"the {recipe} recipe needs torchao")
    from nanochat.optim import build_optimizer
    dev = torch.device("cuda")
    cfg = config_from_depth(2, vocab_size=1024, sequence_len=128, aspect_ratio=256, head_dim=128)  # width 512
    gen = torch.Generator(device=dev).manual_seed(0)
    idx = torch.randint(0, 1024, (4, 129), device=dev, generator=gen)  # 4 x 128 tokens: fp8 GEMMs need multiples of 16
    losses = {}
    for precision in ("bf16", "fp8"):
        torch.manual_seed(0)
        with torch.device(dev):
            model = GPT(cfg)
        model.init_weights()
        n = apply_precision(model, precision, dev, fp8_recipe=recipe, fp8_min_dim=512)
        assert n == (12 if precision == "fp8" else 0)
        opt = build_optimizer(model, scalar_lr=0.05)
        cache_low_precision_weights(model, opt, precision)
        compiled = torch.compile(model, dynamic=False)
        for step in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            first = loss.item() if step == 0 else first
        losses[precision] = loss.item()
        assert losses[precision] < 0.5 * first, (precision, first, losses[precision])
        if precision == "fp8":
            plain = GPT(cfg).to(dev)
            plain.load_state_dict(model.state_dict(), strict=True)
    assert abs(losses["fp8"] - losses["bf16"]) < 0.1 * (first - losses["bf16"]), losses


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TE), reason="needs CUDA and Transformer Engine")
def test_tegpt_trains_in_bf16_and_fp8():
    from nanochat.optim import build_optimizer
    dev = torch.device("cuda")
    cfg = config_from_depth(2, vocab_size=1024, sequence_len=128, aspect_ratio=256, head_dim=128,
                            window_pattern="SL", n_kv_head=2)
    idx = torch.randint(0, 1024, (4, 129), device=dev)
    for precision in ("bf16", "fp8") if _sm((8, 9)) else ("bf16",):
        with torch.device("meta"):
            model = model_class("te")(cfg)
        model.to_empty(device=dev)
        model.init_weights()
        apply_precision(model, precision, dev)
        opt = build_optimizer(model)
        first = None
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            first = loss.item() if first is None else first
        assert loss.item() < first, (precision, first, loss.item())
        assert model.windows == [64, None] and model.estimate_flops() > 0

"""The kernel audit's grouping and expectations, on synthetic kernel-name lists (CPU, no profiler)."""
from __future__ import annotations

import json
import random

import pytest

from nanochat import profiling

FA4_FWD = ("kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensorptrbf16gmem"
           "align16oi64div81i64div8_tensorptrbf16gmemalign16oi64div81i64div8_None_None_0")
FA4_BWD = ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__tensorptrbf16gmem"
           "align16oi64div81i64div8_None_0")

# Real-looking kernel names (as CUPTI reports them) and the group each must land in.
NAMES = {
    "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >(Flash_fwd_params)": "attention",
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...> > >(...)": "attention",
    "triton_tem_fused_flex_attention_0": "attention",
    # FA4 (CuTe DSL) on sm90: forward, backward and its pre/postprocess kernels (names mangled by the DSL)
    FA4_FWD: "attention",
    FA4_BWD: "attention",
    "kernel_cutlass_kernel_flash_attncuteflash_bwd_preprocessFlashAttentionBackwardPreprocess_object_at__tensor"
    "ptrbf16gmemalign16oi64div81i64div8_0": "attention",
    "kernel_cutlass_kernel_flash_attncuteflash_bwd_postprocessFlashAttentionBackwardPostprocess_object_at__tensor"
    "ptrf32gmemalign16oi64div4i64_0": "attention",
    "triton_tem_fused_flex_attention_backward_zeros_1": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80": "attention",
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matmul",
    "nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)": "matmul",
    "triton_tem_fused_mm_3": "matmul",
    "liger_cross_entropy_kernel": "loss",
    "element_mul_kernel": "loss",
    "_cce_lse_forward_kernel": "loss",
    "_cce_backward_kernel": "loss",
    "_indexed_neg_dot_forward_kernel": "loss",
    "ce_rows_kernel": "loss",
    "void (anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>(...)": "loss",
    "void at::native::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>(...)": "loss",
    "triton_red_fused__log_softmax_tanh_0": "loss",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2": "norm/elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>(...)": "norm/elementwise",
    "triton_poi_fused_add_mul_silu_4": "norm/elementwise",
    "triton_red_fused_abs_amax_5": "quantize/transpose",
    "triton_poi_fused__to_copy_clamp_float8_6": "quantize/transpose",
    "_fp8_amax_kernel": "quantize/transpose",
    "_fp8_cast_transpose_kernel": "quantize/transpose",
    "triton_red_fused__to_copy_add_mul_pow_rsqrt_sum_transpose_3": "norm/elementwise",  # RMS-norm backward
    "triton_poi_fused__to_copy_fp8_cast_transpose_mul_relu_4": "norm/elementwise",  # ReLU² backward before our cast
    "triton_red_fused__fused_rms_norm_add_fp8_cast_transpose_view_10": "norm/elementwise",
    "triton_red_fused__to_copy_add_fp8_cast_transpose_delayed_mean_mul_pow_rsqrt_2": "norm/elementwise",
    "triton_red_fused_abs_amax_fp8_cast_transpose_2": "quantize/transpose",  # a cast of Inductor's own still counts
    "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<4>, FusedAdamMathFunctor>(...)": "optimizer",
    "triton_for_fused_7": "optimizer",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "Memcpy DtoD (Device -> Device)": "memory",
    "Memset (Device)": "memory",
    "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda(...)>(...)": "memory",
    "some_unheard_of_kernel": "other",
}


@pytest.mark.parametrize("name,group", NAMES.items())
def test_each_name_lands_in_its_group(name, group):
    assert profiling.classify(name) == group


def test_summarize_shares_and_order():
    rng = random.Random()
    events = [(name, rng.uniform(1, 100)) for name in NAMES for _ in range(rng.randint(1, 3))]
    rng.shuffle(events)
    s = profiling.summarize(events, top=5)
    total = sum(us for _, us in events)
    assert s["total_us"] == pytest.approx(total)
    assert sum(s["groups"].values()) == pytest.approx(1.0)
    assert set(s["groups"]) == set(profiling.GROUPS)
    for group in profiling.GROUPS:
        expected = sum(us for n, us in events if NAMES[n] == group)
        assert s["group_us"][group] == pytest.approx(expected)
    times = [k["us"] for k in s["kernels"]]
    assert times == sorted(times, reverse=True) and len(s["kernels"]) == len(NAMES)
    assert s["top"] == s["kernels"][:5]
    counts = {k["name"]: k["count"] for k in s["kernels"]}
    assert counts == {n: sum(1 for m, _ in events if m == n) for n in NAMES}
    json.dumps(s)  # the script prints it as JSON


def test_summarize_empty():
    s = profiling.summarize([])
    assert s["total_us"] == 0 and all(v == 0 for v in s["groups"].values()) and s["top"] == []


def _step(attention: str, loss: str) -> dict:
    return profiling.summarize([
        (attention, 300.0), (loss, 120.0), ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", 900.0),
        ("triton_poi_fused_add_mul_silu_4", 50.0),
    ])


def test_expectations_met():
    s = _step("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "liger_cross_entropy_kernel")
    assert profiling.check_expectations(s, ["attention=cudnn", "loss=liger", "matmul=nvjet", "attention=sdpa"]) == []
    assert profiling.check_expectations(s, ["loss=re:liger_.*kernel"]) == []


def test_expectations_name_what_ran_instead():
    s = _step("triton_tem_fused_flex_attention_0", "void at::native::nll_loss_forward_reduce_cuda_kernel_2d<f>()")
    failures = profiling.check_expectations(s, ["attention=cudnn", "loss=liger", "matmul=nvjet"])
    assert len(failures) == 2
    assert "attention=cudnn" in failures[0] and "flex_attention" in failures[0]
    assert "loss=liger" in failures[1] and "nll_loss" in failures[1]


def test_expectation_with_nothing_in_the_group():
    s = profiling.summarize([("nvjet_x", 1.0)])
    (failure,) = profiling.check_expectations(s, ["communication=nccl"])
    assert "no kernels at all" in failure


@pytest.mark.parametrize("spec,needle", [
    ("attention", "group=backend"),
    ("atention=cudnn", "groups:"),
    ("attention=cudann", "known: cudnn"),
])
def test_bad_expect_specs_say_how_to_fix(spec, needle):
    with pytest.raises(ValueError, match=needle):
        profiling.check_expectations(profiling.summarize([]), [spec])


def test_format_summary_mentions_top_kernel():
    s = _step("triton_tem_fused_flex_attention_0", "liger_cross_entropy_kernel")
    text = profiling.format_summary(s)
    assert "nvjet_tst_192x192" in text and "| matmul |" in text


@pytest.mark.parametrize("name, fp8", [
    ("nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT", True),        # CUDA 12 cuBLASLt, 8-bit A and B
    ("nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", True),  # CUDA 13, seen on the H200 (fp8 run)
    ("nvjet_sm90_qqtst_256x128_128x4_1x2_h_bz_coopA_TNT", True),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", False),     # the bf16 GEMM of the same run
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", False),
])
def test_fp8_matmul_expectation_tells_fp8_from_bf16_gemms(name, fp8):
    s = profiling.summarize([(name, 100.0)])
    assert (profiling.check_expectations(s, ["matmul=fp8"]) == []) == fp8


@pytest.mark.parametrize("names, expect, ok", [
    ([FA4_FWD, FA4_BWD], "attention=fa4", True),
    ([FA4_FWD, FA4_BWD], "attention=fa3", False),  # FA4's names hold flash_fwd_sm90 and flash_bwd too
    ([FA4_FWD, FA4_BWD], "attention=fa2", False),
    (["void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...> > >(...)"],
     "attention=fa4", False),
    (["void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...> > >(...)"],
     "attention=fa3", True),
    (["void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>(...)"], "attention=fa2", True),
])
def test_fa4_expectation_tells_fa4_from_fa3_and_fa2(names, expect, ok):
    s = profiling.summarize([(n, 10.0) for n in names])
    assert (profiling.check_expectations(s, [expect]) == []) == ok

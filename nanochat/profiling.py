"""Kernel audit: which kernels a training step really ran, grouped by what they do.

A throughput number says how fast; it does not say *what* ran. A fallback (SDPA's math path instead of
cuDNN, eager cross-entropy instead of Liger) can look plausible and cost 20%. The audit takes the device
kernels of a profiled step as (name, device time) pairs and
- `summarize` sorts them into groups by the regex table `GROUP_RULES` (first match wins, so the order
  matters: attention kernels from CUTLASS must be claimed before the generic matmul rule sees "cutlass");
- `check_expectations` asserts that named backends ran, e.g. "attention=cudnn": some kernel in the
  attention group matches `BACKEND_PATTERNS["attention"]["cudnn"]`. A failure names what ran instead.

The names are those of the CUDA kernels as torch.profiler (CUPTI) or nsys report them, e.g.
  cuDNN SDPA      cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0
  FA2 (SDPA)      pytorch_flash::flash_fwd_kernel<...>, flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>
  FA3             flash::FlashAttnFwdSm90<...> (inside cutlass::device_kernel<...>)
  FA4 (CuTe DSL)  kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensor...;
                  backward: ...flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90..., its pre/postprocess
                  ...flash_bwd_preprocessFlashAttentionBackwardPreprocess... (the DSL names a kernel after its
                  Python module and class)
  flex            triton_tem_fused_flex_attention_0, triton_tem_fused_flex_attention_backward_zeros_1
  cuBLAS Hopper   nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT; older: sm90_xmma_gemm_..., ampere_bf16_s16816gemm_...
  fp8 GEMM        torch._scaled_mm -> cuBLASLt nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT (qq = 8-bit A and B);
                  rowwise scales may run CUTLASS (cutlass::device_kernel<...f8f8bf16_rowwise...>);
                  NVFP4 on Blackwell: nvjet_sm100_..._Avec16UE4M3_Bvec16UE4M3_... (block-scaled)
  fp8 casts       torchao under inductor: triton_red_fused_abs_amax_..., triton_poi_fused__to_copy_clamp_mul_...;
                  ours (--fp8_recipe triton): _fp8_amax_kernel, _fp8_cast_transpose_kernel;
                  Transformer Engine: ...cast_transpose..., ...amax...
  liger           liger_cross_entropy_kernel, element_mul_kernel
  cce             _cce_lse_forward_kernel, _indexed_neg_dot_forward_kernel, _cce_backward_kernel
  ours (triton)   ce_rows_kernel (split mode: its matmuls are cuBLAS, matmul group); fused mode:
                  logits_exp_kernel (a Triton GEMM with the softmax epilogue), row_stats_kernel
  inductor        triton_{poi,red,per,for,tem}_fused_<aten ops>_<n>
On a CPU run the "kernels" are aten ops (aten::mm, ...); a few rules also match those, for smoke tests.
"""
from __future__ import annotations

import re
from collections import defaultdict

# (group, regex) in priority order; the first rule whose regex searches the kernel name wins.
GROUP_RULES: list[tuple[str, str]] = [
    ("communication", r"nccl|all_?reduce|reduce_?scatter|all_?gather|c10d::|gloo"),
    ("memory", r"^Memcpy|^Memset|memcpy|memset|CatArrayBatchedCopy|direct_copy_kernel|^aten::copy_|^aten::fill_"),
    ("optimizer", r"multi_tensor_apply|[Aa]dam|[Mm]uon|zeropower|newton_?schulz|^triton_for_fused|_foreach_|lerp"),
    ("loss", r"liger_cross_entropy|element_mul_kernel|_cce_|cce_lse|cce_backward|indexed_neg_dot|ce_rows_kernel|logits_exp_kernel|row_stats_kernel|flce|"
             r"linear_cross_entropy|nll_loss|log_softmax|cunn_SoftMax|cross_entropy"),
    ("attention", r"flash|fmha|sdpa|attention|FlashAttn|flex_attention|_efficient_attention|cudnn.*(fprop|bprop|mha)"),
    ("matmul", r"nvjet|gemm|xmma|cublas|cutlass|wgmma|s16816|s1688|^triton_tem_fused_(_scaled_)?(mm|addmm|bmm)|"
               r"^aten::(mm|addmm|bmm|matmul|linear|_scaled_mm)$|splitKreduce"),
    # fp8 casts only: torchao's saturated cast (x * scale, clamp, to fp8) fuses as _to_copy..clamp; a bare
    # "transpose" would also claim Inductor's RMS-norm backward kernels (…_rsqrt_sum_transpose_…)
    ("quantize/transpose", r"amax|abs_max|float8|fp8|fp4|e4m3|e5m2|e2m1|_scaled_|quantiz|cast_transpose|"
                           r"_to_copy\w*clamp"),
    ("norm/elementwise", r"norm|rms|elementwise|reduce_kernel|^triton_(poi|red|per)_|softmax|tanh|gelu|relu|silu|"
                         r"rotary|rope|embedding|index|gather|scatter|^aten::"),
]
GROUPS = [g for g, _ in GROUP_RULES] + ["other"]

# Kernel-name regexes that prove a backend ran, per group: `--expect group=backend`.
BACKEND_PATTERNS: dict[str, dict[str, str]] = {
    "attention": {
        "cudnn": r"cudnn",
        # (?<!cute): FA4's names contain flash_fwd_sm90 / flash_bwd too, right after its module path
        "fa3": r"FlashAttn\w*Sm90|flash::|(?<!cute)flash_fwd\w*sm90|hopper",
        "fa4": r"flash_attncute|FlashAttention(Forward|Backward)\w*Sm\d+",
        "fa2": r"pytorch_flash|flash_fwd_kernel|(?<!cute)flash_bwd",
        "flex": r"flex_attention",
        "efficient": r"fmha_cutlass|efficient_attention|mem_eff",
        "sdpa": r"flash|fmha|cudnn|efficient_attention|sdpa",
    },
    "loss": {
        "liger": r"liger_cross_entropy_kernel",
        "cce": r"_cce_lse_forward_kernel|_cce_backward_kernel",
        "triton": r"ce_rows_kernel|logits_exp_kernel",  # split mode | fused mode
        "torch": r"nll_loss|log_softmax|cunn_SoftMax",
    },
    "matmul": {
        "nvjet": r"nvjet",
        "cublas": r"nvjet|gemm|xmma|cublas|s16816",
        "cutlass": r"cutlass",
        "triton": r"^triton_tem_fused",
        # cuBLASLt's fp8 nvjet kernels: nvjet_qqtst_... or, in CUDA 13, nvjet_sm90_qrtst_... / _qqtst_...
        "fp8": r"nvjet_(sm\d+_)?q|e4m3|e5m2|f8f8|fp8|float8|_scaled_mm|qgmma",
        "nvfp4": r"e2m1|nvfp4|fp4|vec16UE4M3",
    },
    "quantize/transpose": {"fp8": r"amax|float8|fp8|e4m3|e5m2|_scaled_"},
    "communication": {"nccl": r"nccl"},
    "optimizer": {"fused": r"multi_tensor_apply|^triton_for_fused|_foreach_"},
}

_COMPILED = [(g, re.compile(rx)) for g, rx in GROUP_RULES]


# Inductor names a fused kernel after every op it touches, our fp8 cast op included when the kernel only
# produces that op's input (the RMS norm before it, ReLU²'s backward): such kernels cast nothing themselves.
_OUR_CAST_IN_INDUCTOR_NAME = re.compile(r"^(triton_(?:poi|red|per|for)_fused\w*?)_fp8_cast_transpose(?:_delayed)?(?=_)")


def classify(name: str) -> str:
    """The group of one kernel name ('other' when no rule matches)."""
    name = _OUR_CAST_IN_INDUCTOR_NAME.sub(r"\1", name)
    for group, rx in _COMPILED:
        if rx.search(name):
            return group
    return "other"


def profiler_events(prof, on_cuda: bool = True) -> list[tuple[str, float]]:
    """(name, us) per call from a finished torch.profiler run: the device-side events (kernels, memcpys,
    memsets) with their device time, or on the CPU the aten ops with their self CPU time."""
    events = []
    for e in prof.key_averages():
        if on_cuda:
            if "CUDA" not in str(getattr(e, "device_type", "")):
                continue  # CPU-side ops: their device time is that of the kernels listed separately
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            events.extend([(e.key, us / e.count)] * e.count)
    return events


def summarize(events: list[tuple[str, float]], top: int = 20) -> dict:
    """Aggregate (kernel name, device time in us) pairs.

    Returns {"total_us", "groups": {group: share of total}, "group_us": {group: us},
    "kernels": [{"name", "group", "us", "count", "share"}, ...] sorted by time, "top": the first `top`}.
    Shares are fractions of the summed kernel time (0 when nothing ran).
    """
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in events:
        by_name[name][0] += float(us)
        by_name[name][1] += 1
    total = sum(us for us, _ in by_name.values())
    kernels = sorted(
        ({"name": n, "group": classify(n), "us": us, "count": c, "share": us / total if total else 0.0}
         for n, (us, c) in by_name.items()),
        key=lambda k: -k["us"])
    group_us = {g: 0.0 for g in GROUPS}
    for k in kernels:
        group_us[k["group"]] += k["us"]
    groups = {g: (us / total if total else 0.0) for g, us in group_us.items()}
    return {"total_us": total, "groups": groups, "group_us": group_us, "kernels": kernels, "top": kernels[:top]}


def parse_expect(spec: str) -> tuple[str, str]:
    """'attention=cudnn' -> ('attention', regex). The backend may also be 're:<regex>' for any name."""
    if "=" not in spec:
        raise ValueError(f"--expect takes group=backend (e.g. attention=cudnn), got {spec!r}")
    group, backend = (s.strip() for s in spec.split("=", 1))
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r} in --expect {spec!r}; groups: {', '.join(GROUPS)}")
    if backend.startswith("re:"):
        return group, backend[3:]
    known = BACKEND_PATTERNS.get(group, {})
    if backend not in known:
        raise ValueError(f"unknown backend {backend!r} for group {group!r} in --expect {spec!r}; known: "
                         f"{', '.join(known) or 'none'} (or re:<regex> for any kernel-name pattern)")
    return group, known[backend]


def check_expectations(summary: dict, expects: list[str]) -> list[str]:
    """One failure message per 'group=backend' whose kernels did not run (empty list = all present)."""
    failures = []
    for spec in expects:
        group, pattern = parse_expect(spec)
        rx = re.compile(pattern)
        in_group = [k for k in summary["kernels"] if k["group"] == group]
        if any(rx.search(k["name"]) for k in in_group):
            continue
        ran = ", ".join(f"{k['name'][:80]} ({k['share']:.1%})" for k in in_group[:3]) or "no kernels at all"
        failures.append(f"expected {spec} (kernel names matching /{pattern}/) but none ran in {group}; "
                        f"{group} ran instead: {ran}")
    return failures


def top_kernel_per_group(summary: dict, groups: tuple[str, ...]) -> dict[str, str]:
    """The most time-consuming kernel name of each group (shortened), for one-line reports."""
    out = {}
    for g in groups:
        names = [k["name"] for k in summary["kernels"] if k["group"] == g]
        out[g] = names[0][:48] if names else "-"
    return out


def format_summary(summary: dict) -> str:
    """A short human-readable report: group shares, then the top kernels."""
    lines = [f"total kernel time {summary['total_us'] / 1e3:.2f} ms", "", "| group | share | ms |", "|---|---:|---:|"]
    for g, share in sorted(summary["groups"].items(), key=lambda kv: -kv[1]):
        if summary["group_us"][g] > 0:
            lines.append(f"| {g} | {share:.1%} | {summary['group_us'][g] / 1e3:.2f} |")
    lines += ["", "| # | kernel | group | share | ms | calls |", "|---:|---|---|---:|---:|---:|"]
    for i, k in enumerate(summary["top"], 1):
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        lines.append(f"| {i} | `{name}` | {k['group']} | {k['share']:.1%} | {k['us'] / 1e3:.2f} | {k['count']} |")
    return "\n".join(lines)

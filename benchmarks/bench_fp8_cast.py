"""Our fp8 cast-and-transpose (kernels/fp8_cast.py), current and delayed scaling, against the same math
compiled by Inductor, on the GPU.

    python -m benchmarks.bench_fp8_cast --shapes 32768x1536,32768x6144 --repeats 50

Per shape and variant (plain x in e4m3, gradients in e5m2, relu(x)² in e4m3): each produces fp8 [M, N] and
its transpose [N, M] with a tensorwise scale. Ours (current scaling) is checked bitwise against the
compiled reference (the relu² variant within one fp8 step on a few elements: relu² rounds in fp32 there
and in our kernel alike, but Inductor may fuse it differently), and delayed scaling, whose history then
holds x's own amax, bitwise against ours. Delayed scaling is timed in its steady state (a recorded
history: no amax pass; its three launches: history push, amax check, cast). Times are medians of CUDA-event timings over `repeats`
calls; TB/s counts the bytes each must move at least: the input read twice for current scaling (amax
pass, cast pass), once for delayed, and two fp8 outputs written. Last line: one JSON object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from benchmarks.bench_loss import cuda_ms
from nanochat.flags import parse_flags
from nanochat.kernels.fp8_cast import cast_transpose, new_scaling_state

VARIANTS = {"x_e4m3": (torch.float8_e4m3fn, False), "grad_e5m2": (torch.float8_e5m2, False),
            "relu2_e4m3": (torch.float8_e4m3fn, True)}


@dataclass
class CastConfig:
    shapes: list[str] = field(default_factory=lambda: ["32768x1536", "32768x6144"])
    repeats: int = 50


def reference(x: torch.Tensor, fp8_dtype: torch.dtype, relu2: bool):
    """torchao's tensorwise cast as plain torch ops (compiled below): amax, scale, saturate, both layouts."""
    v = torch.relu(x.float()).square() if relu2 else x.float()
    fp8_max = torch.finfo(fp8_dtype).max
    scale = fp8_max / v.abs().amax().clamp(min=1e-12)
    y = (v * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return y, y.t().contiguous(), scale.reciprocal()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(CastConfig, argv, description=__doc__)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_cast times GPU kernels: run it on a CUDA GPU")
    compiled = torch.compile(reference, dynamic=False)
    rows = []
    for spec in cfg.shapes:
        M, N = (int(d) for d in spec.split("x"))
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16) * 3
        for name, (fp8_dtype, relu2) in VARIANTS.items():
            ours, ref = cast_transpose(x, fp8_dtype, relu2), compiled(x, fp8_dtype, relu2)
            mismatched = sum(int((a.view(torch.uint8) != b.view(torch.uint8)).sum()) for a, b in zip(ours[:2], ref[:2]))
            if mismatched > (M * N // 10_000 if relu2 else 0):
                raise SystemExit(f"{spec} {name}: {mismatched} fp8 bytes differ from the compiled reference")
            state = new_scaling_state(1, x.device)
            cast_transpose(x, fp8_dtype, relu2, state=state)  # records x's amax: the next calls scale by it
            delayed = cast_transpose(x, fp8_dtype, relu2, state=state)
            if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(ours[:2], delayed[:2])):
                raise SystemExit(f"{spec} {name}: delayed scaling by x's own amax differs from current scaling")
            t_ours = cuda_ms(lambda: cast_transpose(x, fp8_dtype, relu2), cfg.repeats)
            t_ref = cuda_ms(lambda: compiled(x, fp8_dtype, relu2), cfg.repeats)
            t_delayed = cuda_ms(lambda: cast_transpose(x, fp8_dtype, relu2, state=state), cfg.repeats)
            two_reads, one_read = 2 * M * N * x.element_size() + 2 * M * N, M * N * x.element_size() + 2 * M * N
            rows.append({"shape": spec, "variant": name, "ours_ms": round(t_ours, 4), "inductor_ms": round(t_ref, 4),
                         "delayed_ms": round(t_delayed, 4), "speedup": round(t_ref / t_ours, 3),
                         "delayed_vs_ours": round(t_ours / t_delayed, 3), "ours_tb_s": round(two_reads / t_ours / 1e9, 2),
                         "delayed_tb_s": round(one_read / t_delayed / 1e9, 2),
                         "inductor_tb_s": round(two_reads / t_ref / 1e9, 2), "bytes_differing": mismatched})
    print(f"{'shape':>12} {'variant':>11} {'ours ms':>8} {'delayed ms':>11} {'inductor ms':>12} "
          f"{'ours vs ind':>12} {'delayed vs ours':>16} {'ours TB/s':>10} {'delayed TB/s':>13}")
    for r in rows:
        print(f"{r['shape']:>12} {r['variant']:>11} {r['ours_ms']:>8} {r['delayed_ms']:>11} "
              f"{r['inductor_ms']:>12} {r['speedup']:>12} "
              f"{r['delayed_vs_ours']:>16} {r['ours_tb_s']:>10} {r['delayed_tb_s']:>13}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))


if __name__ == "__main__":
    main()

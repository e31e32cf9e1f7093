"""The decode step's matmuls at one batch size: cuBLAS in bf16, cuBLAS with fp8 weights, Inductor's tuned GEMMs (GPU).

    source benchmarks/gpu_env.sh && python -m benchmarks.bench_decode_matmul --batch 128

A d20 decode step at batch 128 spends ~0.56 ms of its ~3.4 ms in 80 small GEMMs (docs/log.md, session 12): M = 128
rows against each layer's q/k/v, c_proj, c_fc and MLP c_proj weights, ~39 MB of bf16 per layer read at ~1.4 TB/s.
This times each shape alone (read off the model at --depth): n_layer weight copies (so no call finds its weight
in L2) multiplied in one CUDA graph, per variant:
- `bf16`: F.linear, what the decode step runs (cuBLAS);
- `fp8`: torch._scaled_mm with e4m3 weights and activations, a scale per row of each (half the weight bytes;
  the activation's cast is not timed: it would fuse into the norm before it);
- `inductor`: F.linear compiled with mode max-autotune-no-cudagraphs (Triton GEMM templates searched per shape;
  `--autotune false` skips it: its search takes tens of seconds per shape).
Per row: median µs per call over --repeats replays, the weight bytes' TB/s, and the error against an fp32
product. Last line: one JSON object.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.flags import parse_flags


@dataclass
class MatmulConfig:
    batch: int = 128
    depth: int = 20
    vocab_size: int = 32768           # infer_bench's
    repeats: int = 20
    autotune: bool = True
    variants: list[str] = field(default_factory=lambda: ["bf16", "fp8", "inductor"])


def shapes(depth: int, vocab_size: int) -> tuple[dict[str, tuple[int, int]], int]:
    """(in, out) features of each matmul of the model's decode step (q, k and v stacked, as the decoder runs
    them), and its number of layers."""
    from nanochat.model.gpt import GPT, config_from_depth

    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab_size=vocab_size, sequence_len=2048))  # no matmul depends on it
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    features = lambda lin: (lin.in_features, lin.out_features)  # noqa: E731
    qkv = (attn.c_q.in_features, sum(lin.out_features for lin in (attn.c_q, attn.c_k, attn.c_v)))
    return ({"qkv": qkv, "attn_proj": features(attn.c_proj), "mlp_fc": features(mlp.c_fc),
             "mlp_proj": features(mlp.c_proj), "lm_head": features(model.lm_head)}, model.config.n_layer)


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 values, fp32 scales [M, 1]): the fp8 KV cache's per-vector scaling, per row."""
    from nanochat.kernels.decode_attention import quantize_fp8

    values, scale = quantize_fp8(x)
    return values, scale.unsqueeze(-1)


def graph_us(calls, repeats: int) -> float:
    """Median µs per call: all calls captured in one CUDA graph, replayed `repeats` times."""
    for call in calls:
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(MatmulConfig, argv, description=__doc__.split("\n")[0])
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_matmul needs a CUDA GPU")
    torch.manual_seed(0)
    matmuls, n_layer = shapes(cfg.depth, cfg.vocab_size)
    rows = []
    for name, (n_in, n_out) in matmuls.items():
        x = torch.randn(cfg.batch, n_in, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * n_in ** -0.5 for _ in range(n_layer)]
        want = x.float() @ weights[0].float().t()
        weight_gb = n_out * n_in * 2 / 1e9
        for variant in cfg.variants:
            t0 = time.perf_counter()
            if variant == "bf16":
                calls = [lambda w=w: F.linear(x, w) for w in weights]
                gb = weight_gb
            elif variant == "fp8":
                xq, xs = rowwise_fp8(x)
                fp8 = [rowwise_fp8(w) for w in weights]
                calls = [lambda wq=wq, ws=ws: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(),
                                                               out_dtype=torch.bfloat16) for wq, ws in fp8]
                gb = weight_gb / 2
            elif variant == "inductor" and cfg.autotune:
                linear = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
                calls = [lambda w=w: linear(x, w) for w in weights]
                gb = weight_gb
            else:
                continue
            try:
                err = ((calls[0]().float() - want).norm() / want.norm()).item()  # compiles inductor's GEMM
                compile_s = time.perf_counter() - t0
                us = graph_us(calls, cfg.repeats)
                rows.append(dict(shape=name, variant=variant, us=us, tbs=gb / us * 1e3, err=err,
                                 setup_s=compile_s))
            except Exception as exc:  # a variant this machine cannot run is a row, not a stop
                rows.append(dict(shape=name, variant=variant, failed=f"{type(exc).__name__}: {str(exc)[:160]}"))
        del weights
        torch.cuda.empty_cache()
    per_step = {}
    for r in rows:
        if "us" in r:
            per_step[r["variant"]] = per_step.get(r["variant"], 0.0) + r["us"] * (1 if r["shape"] == "lm_head" else n_layer)
    print(f"\nd{cfg.depth}, batch {cfg.batch}, {n_layer} weight copies per shape\n")
    print("| shape | variant | µs per call | weight TB/s | rel. error | setup s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['shape']} | {r['variant']} | failed: {r['failed']} | | | |")
        else:
            print(f"| {r['shape']} | {r['variant']} | {r['us']:.1f} | {r['tbs']:.2f} | {r['err']:.1e} | {r['setup_s']:.1f} |")
    print("\nper decode step (each block shape x layers + lm_head), ms: "
          + ", ".join(f"{v} {t / 1e3:.3f}" for v, t in per_step.items()))
    result = {"batch": cfg.batch, "rows": rows, "step_ms": {v: round(t / 1e3, 4) for v, t in per_step.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

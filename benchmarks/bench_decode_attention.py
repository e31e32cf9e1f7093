"""Decode attention over a static KV cache at d20's shape: the torch path vs the Triton kernel's configs (GPU).

    source benchmarks/gpu_env.sh && python -m benchmarks.bench_decode_attention --batches 1,32,128
    TRITON_INTERPRET=1 python -m benchmarks.bench_decode_attention --device cpu   # a smoke run of the logic

One decode step's attention for all layers: `--layers` caches (one per layer, rotated so no call finds its
cache in L2), each [S, Hkv, L, D] with rows filled to random lengths in [prompt, L] (the benchmark's
prompt 1024 + up to 256 new tokens). Rows:
- `torch`: the StaticDecoder's masked path, `engine.masked_decode_attention` (q.K over the whole cache, masked
  softmax, p.V; bf16 only);
- `triton bf16 B/w/s/splits` and `triton fp8 ...`: `decode_attention` with each config in --configs
  (positions per inner step / warps / pipeline stages, and `/dot` for the tensor-core kernel) and each
  --splits (0 = the kernel's default).
Per row: median ms per layer over --repeats timed bursts (CUDA events around all layers), GB read per
layer (the filled positions only, plus scales for fp8; the torch path reads the whole cache), and GB/s.
Each Triton row is checked against the torch path's output (bf16: <= --tol; fp8: <= --fp8_tol,
relative Frobenius error). Prints a markdown table (fastest bf16 and fp8 config per batch marked) and
one JSON line last. Calls are queued from Python, one launch pair per layer: below ~100 us of GPU work per
call (on the H200: batch 32 and less) the host's ~80 us per call is what the rows measure, so only the
large-batch rows rank kernel configs; `--graph` replays each burst as one CUDA graph instead (the decode
step's own way), which times the kernels alone at any batch.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from nanochat.flags import parse_flags
from nanochat.inference.decoder import masked_decode_attention
from nanochat.kernels.decode_attention import decode_attention, quantize_fp8


@dataclass
class BenchConfig:
    batches: list[int] = field(default_factory=lambda: [1, 32, 128])
    heads: int = 10
    head_dim: int = 128
    max_seq_len: int = 1280
    prompt: int = 1024
    layers: int = 20
    configs: list[str] = field(default_factory=lambda: [
        "64/4/1", "128/4/2", "128/8/3", "256/8/2", "64/4/2/dot", "128/4/2/dot", "128/8/3/dot", "256/8/2/dot"],
        metadata={"help": "positions per step/warps/stages, /dot for the tensor-core kernel"})
    splits: list[int] = field(default_factory=lambda: [0, 1, 2, 4], metadata={"help": "0 = the kernel's default"})
    repeats: int = 20
    tol: float = 2e-2
    fp8_tol: float = 0.15
    device: str = field(default="cuda", metadata={"help": "cpu: a smoke run in Triton's interpreter (tiny shapes)"})
    graph: bool = field(default=False, metadata={"help": "time each burst as one CUDA graph replay (no host cost)"})


def time_layers(fn, caches, repeats: int, graph: bool = False) -> float:
    """Median ms per layer: each repeat runs fn over every layer's cache between two CUDA events (on the
    CPU: wall clock); with graph, the calls are captured once and each repeat replays them."""
    fn(*caches[0])
    burst = lambda: [fn(*cache) for cache in caches]  # noqa: E731
    if graph and caches[0][0].is_cuda:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            burst()
        burst = cuda_graph.replay
    times = []
    for _ in range(repeats):
        if caches[0][0].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            burst()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(caches))
        else:
            t0 = time.perf_counter()
            burst()
            times.append((time.perf_counter() - t0) * 1e3 / len(caches))
    return statistics.median(times)


def rel_fro(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main(argv: list[str] | None = None) -> dict:
    args = parse_flags(BenchConfig, argv, description=__doc__.split("\n")[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA GPU (or TRITON_INTERPRET=1 ... --device cpu for a smoke run)")
    dev = args.device
    # 16-bit operands: bf16 on the GPU; fp16 on the CPU, whose Triton interpreter gets bf16 dots wrong
    half = torch.bfloat16 if dev == "cuda" else torch.float16
    torch.manual_seed(0)
    H, D, L = args.heads, args.head_dim, args.max_seq_len
    configs = [(tuple(int(x) for x in c.split("/")[:3]), c.endswith("/dot")) for c in args.configs]
    rows = []
    for S in args.batches:
        lengths = torch.randint(args.prompt, L + 1, (S,), device=dev)
        filled = int(lengths.sum())
        q = torch.randn(S, H, D, device=dev, dtype=half)
        bf16 = [(torch.randn(S, H, L, D, device=dev, dtype=half),
                 torch.randn(S, H, L, D, device=dev, dtype=half)) for _ in range(args.layers)]
        fp8 = [quantize_fp8(k) + quantize_fp8(v) for k, v in bf16]
        pos, key_pos = lengths - 1, torch.arange(L, device=dev)  # the StaticDecoder's own torch path
        want = masked_decode_attention(q, *bf16[0], pos, key_pos)
        gb_full = 2 * S * H * L * D * 2 / 1e9
        gb_bf16 = 2 * filled * H * D * 2 / 1e9
        gb_fp8 = 2 * filled * H * (D + 4) / 1e9
        timed = lambda fn, caches: time_layers(fn, caches, args.repeats, args.graph)  # noqa: E731
        ms = timed(lambda k, v: masked_decode_attention(q, k, v, pos, key_pos), bf16)
        rows.append(dict(batch=S, row="torch", ms=ms, gb=gb_full, err=0.0))
        for cfg, dot in configs:
            for splits in args.splits:
                name = f"{cfg[0]}/{cfg[1]}/{cfg[2]}{'/dot' if dot else ''} splits {splits or 'auto'}"
                kw = dict(config=cfg, splits=splits or None, dot=dot)
                try:
                    got = decode_attention(q, *bf16[0], lengths, **kw)
                    ms = timed(lambda k, v: decode_attention(q, k, v, lengths, **kw), bf16)
                    rows.append(dict(batch=S, row=f"triton bf16 {name}", ms=ms, gb=gb_bf16, err=rel_fro(got, want)))
                    kq, ks, vq, vs = fp8[0]
                    got = decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs, **kw)
                    ms = timed(lambda kq, ks, vq, vs: decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs,
                                                                       **kw), fp8)
                    rows.append(dict(batch=S, row=f"triton fp8 {name}", ms=ms, gb=gb_fp8, err=rel_fro(got, want)))
                except Exception as exc:  # a config that does not compile (shared memory, registers) is a row, not a stop
                    rows.append(dict(batch=S, row=f"triton {name}", ms=None, gb=None, err=None,
                                     failed=f"{type(exc).__name__}: {str(exc)[:120]}"))
        del bf16, fp8
        if dev == "cuda":
            torch.cuda.empty_cache()

    best = {}
    for r in rows:
        if r["ms"] is None or r["row"] == "torch":
            continue
        kind = "fp8" if " fp8 " in r["row"] else "bf16"
        r["ok"] = r["err"] <= (args.fp8_tol if kind == "fp8" else args.tol)
        key = (r["batch"], kind)
        if r["ok"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    print("\n| batch | row | ms per layer | GB per layer | GB/s | error vs torch | best |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        if r["ms"] is None:
            print(f"| {r['batch']} | {r['row']} | failed: {r['failed']} | | | | |")
            continue
        mark = "**best**" if any(b is r for b in best.values()) else ("" if r.get("ok", True) else "ERROR")
        print(f"| {r['batch']} | {r['row']} | {r['ms']:.4f} | {r['gb']:.3f} | {r['gb'] / r['ms'] * 1e3:.0f} | "
              f"{r['err']:.1e} | {mark} |")
    result = {"rows": rows, "best": {f"{b} {k}": r["row"] for (b, k), r in best.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

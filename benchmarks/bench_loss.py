"""Fused linear cross-entropy, forward + backward: every backend and our `triton` variants side by side (GPU).

    source benchmarks/gpu_env.sh && python -m benchmarks.bench_loss                # the H200 run (~5 min)
    python -m benchmarks.bench_loss --shapes=8192x1280x32768 --full_shapes=1 --repeats=3   # quick look
    python -m benchmarks.bench_loss --variants=none --no-components                 # backends only

Rows, on the first `--full_shapes` shapes (the others get only `--short_rows`):
- registry backends through nanochat.kernels: `torch eager` (`torch`), `torch.compile` (`torch`,
  compiled), `liger`, `cce`, `triton` (its default CONFIG);
- `liger direct`, `cce direct`: the libraries called as their docs show (registry overhead = the ratio);
- cce diagnostics, called directly: `/no-filter` (filter_eps=None: exact gradients, no skipped blocks),
  `/fp32-accum` (fp32 dE/dC accumulation), `/no-softcap` (errors against a reference without softcap);
- `triton/<variant>`: loss_triton.CONFIG overrides from TRITON_VARIANTS (`--variants`: names, `all`, `none`),
  each with the time predicted for it at the main shape (docs/triton_ce_notes.md says why);
- components (`--components`): the pieces of one chunk of the split and fused loops timed alone, times the
  number of chunks, so the gap between a variant and the 3-GEMM floor can be attributed.

Method, per shape: 3 input sets (bf16 hidden [N, C] and weight [V, C], int64 targets) rotated so that no
call finds its inputs in L2; each row warms up, then timing rounds are interleaved across rows (round r
times every row once; drift hits all rows alike), CUDA events around loss + backward; median of --repeats.
Gradients are set to None before each call, as zero_grad does. Extra memory = max_memory_allocated during
one fwd+bwd - memory allocated before it (the inputs) - bytes of the gradients it leaves: the transient
cost of the loss itself. Errors: relative Frobenius error of loss, dhidden, dW against check_kernels.py's
fp32 reference (dh on --ref_rows sampled tokens, dW on --ref_cols sampled vocab rows).
Prints a markdown table last, then one JSON line.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from check_kernels import (  # noqa: E402
    IGNORE, compiled_torch_loss, fp32_reference, make_loss_inputs, registry_loss, rel_err, sample_indices)

from nanochat import kernels  # noqa: E402
from nanochat.flags import parse_flags  # noqa: E402
from nanochat.kernels import loss_triton  # noqa: E402

# name -> (loss_triton.CONFIG overrides, predicted ms at 65536x1280x65536 on the H200 where one plain GEMM
# runs at ~671 TFLOP/s, i.e. a 49.2 ms 3-GEMM floor). Reasons: docs/triton_ce_notes.md, "Predictions v2".
TRITON_VARIANTS: dict[str, tuple[dict, float]] = {
    "split/fp32acc/c1408-v1default": ({"mode": "split", "dw_accum": "fp32", "chunk_rows": 1408}, 62.7),
    "split": ({"mode": "split"}, 57.2),
    "split/c4096-overmem": ({"mode": "split", "chunk_rows": 4096}, 56.3),
    "split/ce-warps32": ({"mode": "split", "num_warps": 32, "block_v": 8192}, 56.0),
    "onepass": ({"mode": "onepass"}, 55.5),
    "onepass/ce-warps32": ({"mode": "onepass", "num_warps": 32, "block_v": 8192}, 55.3),
    "onepass/c4096-overmem": ({"mode": "onepass", "chunk_rows": 4096}, 54.7),
    "fused": ({"mode": "fused"}, 55.0),
    "fused/c2560": ({"mode": "fused", "chunk_rows": 2560}, 54.7),
    "fused/128x128x64w8s4": ({"mode": "fused", "gemm_block_n": 128, "gemm_stages": 4}, 55.5),
    "fused/128x128x64w4s3": ({"mode": "fused", "gemm_block_n": 128, "gemm_warps": 4}, 55.0),
    "fused/256x128x64w8s3": ({"mode": "fused", "gemm_block_m": 256, "gemm_block_n": 128}, 55.5),
    "fused/bf16dh": ({"mode": "fused", "dh_fp32": False}, 54.9),
    "fused/precise-tanh": ({"mode": "fused", "fast_tanh": False}, 56.0),
    "fused/c4096-overmem": ({"mode": "fused", "chunk_rows": 4096}, 54.1),
    "fused/fp32acc-overmem": ({"mode": "fused", "dw_accum": "fp32", "chunk_rows": 2048}, 57.5),
}


@dataclass
class BenchConfig:
    shapes: str = field(default="65536x1280x65536,65536x1280x32768,65536x2048x32768",
                        metadata={"help": "comma list of NxCxV"})
    full_shapes: int = field(default=1, metadata={"help": "the first K shapes get every row and the components"})
    short_rows: list[str] = field(default_factory=lambda: ["triton", "liger", "cce", "torch.compile"],
                                  metadata={"help": "rows for the other shapes"})
    rows: list[str] = field(default_factory=list, metadata={"help": "non-variant rows to run (default: all)"})
    variants: list[str] = field(default_factory=lambda: ["all"], metadata={"help": "triton variants, all, none"})
    components: bool = True
    softcap: float = 15.0
    ignore_frac: float = field(default=0.0, metadata={"help": "fraction of ignored targets (pretraining: 0)"})
    logit_scale: float = field(default=4.0, metadata={"help": "std of the logits before the softcap"})
    warmup: int = 3
    repeats: int = 15
    ref_rows: int = 8192
    ref_cols: int = 8192
    seed: int | None = None


# ---------------------------------------------------------------- rows

def triton_variant(overrides: dict):
    """The registry's triton backend with CONFIG overridden for the call (restored afterwards)."""
    base = registry_loss("triton")

    def fn(h, w, t, softcap):
        old = loss_triton.CONFIG
        loss_triton.CONFIG = replace(old, **overrides)
        try:
            return base(h, w, t, softcap)
        finally:
            loss_triton.CONFIG = old
    return fn


def build_rows(cfg: BenchConfig, full: bool) -> dict[str, tuple[object, bool, float | None]]:
    """row name -> (callable(h, w, t, softcap) -> loss, or the reason it cannot run; whether the row uses
    the softcap (else it is checked against a reference without one); predicted ms or None)."""
    table = kernels.available_backends()
    rows: dict[str, tuple[object, bool, float | None]] = {
        "torch eager": (registry_loss("torch"), True, None),
        "torch.compile": (compiled_torch_loss(), True, None),
    }
    for name in ("liger", "cce", "triton"):
        ok, reason = table.get(name, (False, "not registered"))
        rows[name] = (registry_loss(name) if ok else reason, True, None)
    if table.get("liger", (False,))[0]:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger_losses: dict[float, object] = {}

        def liger_direct(h, w, t, softcap):
            if softcap not in liger_losses:
                liger_losses[softcap] = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, softcap=softcap)
            return liger_losses[softcap](w, h, t)  # note the library's order: weight first
        rows["liger direct"] = (liger_direct, True, None)
    if table.get("cce", (False,))[0]:
        from cut_cross_entropy import linear_cross_entropy

        def cce(use_softcap=True, **kw):
            def fn(h, w, t, softcap):
                return linear_cross_entropy(h, w, t, ignore_index=IGNORE, softcap=softcap if use_softcap else None, **kw)
            return fn
        rows["cce direct"] = (cce(), True, None)
        rows["cce direct/no-filter"] = (cce(filter_eps=None), True, None)
        rows["cce direct/fp32-accum"] = (cce(accum_e_fp32=True, accum_c_fp32=True), True, None)
        rows["cce direct/no-softcap"] = (cce(use_softcap=False), False, None)
    if not full:
        return {k: v for k, v in rows.items() if k in cfg.short_rows}
    if cfg.rows:
        rows = {k: v for k, v in rows.items() if k in cfg.rows}
    chosen = list(TRITON_VARIANTS) if cfg.variants == ["all"] else [] if cfg.variants == ["none"] else cfg.variants
    unknown = set(chosen) - set(TRITON_VARIANTS)
    if unknown:
        raise ValueError(f"unknown --variants {sorted(unknown)}; choose from: {', '.join(TRITON_VARIANTS)}, all, none")
    triton_ok = table.get("triton", (False, "not registered"))
    for name in chosen:
        overrides, predicted = TRITON_VARIANTS[name]
        rows[f"triton/{name}"] = (triton_variant(overrides) if triton_ok[0] else triton_ok[1], True, predicted)
    return rows


# ---------------------------------------------------------------- measuring

def fwd_bwd(fn, h, w, t, softcap) -> torch.Tensor:
    h.grad = w.grad = None
    loss = fn(h, w, t, softcap)
    loss.backward()
    return loss


def cuda_ms(fn, reps: int = 10) -> float:
    """Median time of fn() in ms (CUDA events), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def components(n, c, v, softcap, gen) -> list[dict]:
    """Each piece of one chunk of the split and fused loops timed alone (fresh buffers, the chunk size the
    default budget picks), times the number of chunks: where the time over the 3-GEMM floor goes."""
    k = loss_triton._kernels()
    dt = torch.bfloat16
    rows = loss_triton.chunk_rows_for(n, v, c, dt, dt, loss_triton.TritonCEConfig())
    chunks = -(-n // rows)
    h = torch.randn(rows, c, device="cuda", generator=gen).to(dt)
    w = (torch.randn(v, c, device="cuda", generator=gen) * (4 / c**0.5)).to(dt)
    t = torch.randint(0, v, (rows,), device="cuda", generator=gen)
    buf = torch.empty(rows, v, device="cuda", dtype=dt)
    dh = torch.empty(rows, c, device="cuda", dtype=dt)
    acc16 = torch.zeros(v, c, device="cuda", dtype=dt)
    acc32 = torch.zeros(v, c, device="cuda", dtype=torch.float32)
    loss = torch.empty(rows, device="cuda")
    scale = torch.full((1,), 1.0 / n, device="cuda")
    cfg = loss_triton.TritonCEConfig()
    out: list[dict] = []

    def add(name, call, flop=0.0):
        try:
            ms = cuda_ms(call)
        except Exception as exc:  # one piece failing (e.g. a GEMM config out of shared memory) is reported
            print(f"  component {name}: FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            return
        row = {"component": name, "per_chunk_ms": ms, "chunks": chunks, "total_ms": ms * chunks}
        if flop:
            row["tflops"] = flop / ms / 1e9
        out.append(row)
        print(f"  component {name}: {ms:.3f} ms x {chunks} = {ms * chunks:.1f} ms", flush=True)

    gemm = 2 * rows * c * v
    add("logits mm (cuBLAS, bf16 out)", lambda: torch.mm(h, w.t(), out=buf), gemm)
    add("split CE kernel (2 reads + 1 write)", lambda: k.ce_rows_kernel[(rows,)](
        buf, buf.stride(0), t, loss, scale, 0, v, IGNORE, softcap, HAS_SOFTCAP=True, WRITE_GRAD=True,
        FAST_TANH=True, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps))
    add("split CE kernel, warps32 block8192", lambda: k.ce_rows_kernel[(rows,)](
        buf, buf.stride(0), t, loss, scale, 0, v, IGNORE, softcap, HAS_SOFTCAP=True, WRITE_GRAD=True,
        FAST_TANH=True, BLOCK_V=8192, num_warps=32))
    psum1 = torch.empty(rows, 1, device="cuda")
    xt1 = torch.empty(rows, device="cuda")
    add("onepass exp kernel (1 read + 1 write)", lambda: k.exp_rows_kernel[(rows,)](
        buf, buf.stride(0), t, psum1, xt1, v, softcap, WRITE_E=True, FAST_TANH=True,
        BLOCK_V=cfg.block_v, num_warps=cfg.num_warps))
    buf.normal_(generator=gen).mul_(1e-3)  # gradient-sized values for the GEMMs that read it
    add("dh mm (n_c x C out, K = V)", lambda: torch.mm(buf, w, out=dh), gemm)
    add("dh mm, fp32 out", lambda: torch.mm(buf, w, out_dtype=torch.float32), gemm)
    add("dW addmm_ into bf16 (beta 1)", lambda: torch.addmm(acc16, buf.t(), h, out=acc16), gemm)
    add("dW addmm into fp32 (beta 1)",
        lambda: torch.addmm(acc32, buf.t(), h, out_dtype=torch.float32, out=acc32), gemm)
    add("dW mm alone (no accumulate, bf16 out)", lambda: torch.mm(buf.t(), h, out=acc16), gemm)
    n_tiles_max = -(-v // 128)
    psum = torch.empty(rows, n_tiles_max, device="cuda")
    xt = torch.empty(rows, device="cuda")
    r = torch.empty(rows, device="cuda")
    for name in ("fused", "fused/128x128x64w8s4", "fused/128x128x64w4s3", "fused/256x128x64w8s3"):
        g = replace(cfg, **TRITON_VARIANTS[name][0])
        n_tiles = -(-v // g.gemm_block_n)
        add(f"logits GEMM + exp epilogue [{name}]", lambda g=g, n_tiles=n_tiles: k.logits_exp_kernel[
            (-(-rows // g.gemm_block_m) * n_tiles,)](
            h, w, buf, psum, xt, t, rows, v, c, h.stride(0), w.stride(0), buf.stride(0), n_tiles, softcap,
            WRITE_E=True, FAST_TANH=True, EVEN_K=c % g.gemm_block_k == 0, PRECISION="tf32", UPCAST=False,
            BLOCK_M=g.gemm_block_m, BLOCK_N=g.gemm_block_n, BLOCK_K=g.gemm_block_k,
            num_warps=g.gemm_warps, num_stages=g.gemm_stages), gemm)
    n_tiles = -(-v // cfg.gemm_block_n)

    def small_kernels():
        k.row_stats_kernel[(rows,)](psum, n_tiles, xt, t, loss, r, buf, buf.stride(0), scale, 0, v, IGNORE,
                                    softcap, WRITE_E=True, BLOCK_T=1 << (n_tiles - 1).bit_length())
        k.row_scale_kernel[(rows,)](h, h.stride(0), r, dh, dh.stride(0), c, BLOCK_C=2048)
        k.row_scale_kernel[(rows,)](h, h.stride(0), r, dh, dh.stride(0), c, BLOCK_C=2048)
    add("fused row_stats + 2 row scales", small_kernels)
    return out


def bench_shape(shape, cfg: BenchConfig, gen, full: bool) -> tuple[list[dict], float]:
    n, c, v = shape
    label = f"{n}x{c}x{v}"
    sets = []
    for _ in range(3):
        h, w, t = make_loss_inputs(n, c, v, ignore_frac=cfg.ignore_frac, logit_scale=cfg.logit_scale, gen=gen)
        sets.append((h.requires_grad_(True), w.requires_grad_(True), t))
    h0, w0, t0 = sets[0]
    # the floor: one plain [n, c] x [c, v] bf16 GEMM, timed
    gemm_ms = cuda_ms(lambda: torch.mm(h0.detach(), w0.detach().t()), reps=5)
    print(f"\n## {label} (N x C x V): one plain GEMM {gemm_ms:.2f} ms = {2 * n * c * v / gemm_ms / 1e9:.0f} "
          f"TFLOP/s -> 3-GEMM floor {3 * gemm_ms:.1f} ms", flush=True)
    torch.cuda.empty_cache()
    rows_idx, cols_idx = sample_indices(n, cfg.ref_rows, gen), sample_indices(v, cfg.ref_cols, gen)
    n_valid = max(int((t0 != IGNORE).sum()), 1)
    refs: dict[bool, tuple] = {}

    def reference(with_softcap: bool):
        if with_softcap not in refs:
            started = time.time()
            per_token, dh_ref, dw_ref = fp32_reference(h0.detach(), w0.detach(), t0, rows=rows_idx, cols=cols_idx,
                                                       softcap=cfg.softcap if with_softcap else None)
            refs[with_softcap] = (per_token.double().sum() / n_valid, dh_ref / n_valid, dw_ref / n_valid)
            torch.cuda.empty_cache()
            print(f"  fp32 reference (softcap {with_softcap}) in {time.time() - started:.1f}s", flush=True)
        return refs[with_softcap]

    results: dict[str, dict] = {}
    live: dict[str, tuple] = {}
    for name, (fn, capped, predicted) in build_rows(cfg, full).items():
        softcap = cfg.softcap if capped else None
        row = {"shape": label, "backend": name}
        if predicted is not None and full:
            row["predicted_ms"] = predicted
        results[name] = row
        if isinstance(fn, str):
            row["error"] = f"unavailable: {fn}"
            continue
        try:
            started = time.time()
            for i in range(cfg.warmup):
                fwd_bwd(fn, *sets[i % 3], softcap)
            torch.cuda.synchronize()
            row["warmup_s"] = round(time.time() - started, 1)
            h, w, t = sets[1]
            h.grad = w.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd(fn, h, w, t, softcap)
            torch.cuda.synchronize()
            grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
            row["extra_gib"] = (torch.cuda.max_memory_allocated() - base - grads) / 2**30
            loss_ref, dh_ref, dw_ref = reference(capped)
            loss = fwd_bwd(fn, h0, w0, t0, softcap)
            row["loss_err"] = rel_err(loss.double(), loss_ref)
            row["dh_err"] = rel_err(h0.grad[rows_idx].float(), dh_ref)
            row["dw_err"] = rel_err(w0.grad[cols_idx].float(), dw_ref)
            row["times"] = []
            live[name] = (fn, softcap)
        except Exception as exc:  # a failing row is marked; the others go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        for s in sets:
            s[0].grad = s[1].grad = None
        torch.cuda.empty_cache()
        print(f"  {name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items() if k not in ("shape", "backend", "times")), flush=True)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(cfg.repeats):  # interleaved rounds
        for i, (name, (fn, softcap)) in enumerate(list(live.items())):
            h, w, t = sets[(r + i) % 3]  # consecutive calls never share inputs
            try:
                h.grad = w.grad = None
                start.record()
                fwd_bwd(fn, h, w, t, softcap)
                end.record()
                end.synchronize()
                results[name]["times"].append(start.elapsed_time(end))
            except Exception as exc:
                results[name]["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                live.pop(name)
    for row in results.values():
        if row.get("times"):
            row["ms"] = statistics.median(row["times"])
            row["ms_spread"] = (min(row["times"]), max(row["times"]))
            row["over_floor_ms"] = row["ms"] - 3 * gemm_ms
        row.pop("times", None)
    for lib in ("liger", "cce"):
        reg, direct = results.get(lib, {}), results.get(f"{lib} direct", {})
        if "ms" in reg and "ms" in direct:
            reg["overhead_vs_direct"] = reg["ms"] / direct["ms"] - 1
    for ref_name in ("liger", "cce"):
        ref_ms = results.get(ref_name, {}).get("ms") or results.get(f"{ref_name} direct", {}).get("ms")
        for row in results.values():
            if "ms" in row and ref_ms:
                row[f"speedup_vs_{ref_name}"] = ref_ms / row["ms"]
    del sets
    torch.cuda.empty_cache()
    return list(results.values()), gemm_ms


def table(rows: list[dict]) -> str:
    def f(row, key, spec):
        return format(row[key], spec) if key in row else "-"
    out = ["| shape | backend | ms (median) | predicted | over floor | vs liger | vs cce | extra GiB | dW err "
           "| dh err | loss err | overhead vs direct |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r and "ms" not in r:
            out.append(f"| {r['shape']} | {r['backend']} | failed: {r['error'][:100]} | | | | | | | | | |")
            continue
        out.append(f"| {r['shape']} | {r['backend']} | {f(r, 'ms', '.2f')} | {f(r, 'predicted_ms', '.1f')} | "
                   f"{f(r, 'over_floor_ms', '+.1f')} | {f(r, 'speedup_vs_liger', '.2f')} | "
                   f"{f(r, 'speedup_vs_cce', '.2f')} | {f(r, 'extra_gib', '.3f')} | {f(r, 'dw_err', '.1e')} | "
                   f"{f(r, 'dh_err', '.1e')} | {f(r, 'loss_err', '.1e')} | {f(r, 'overhead_vs_direct', '+.1%')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(BenchConfig, argv, description=__doc__.split("\n")[0])
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss needs a CUDA GPU")
    seed = cfg.seed if cfg.seed is not None else int(time.time()) % 2**31
    gen = torch.Generator(device="cuda").manual_seed(seed)
    print(f"seed {seed} | {torch.cuda.get_device_name()} | torch {torch.__version__} | softcap {cfg.softcap} | "
          f"logit std {cfg.logit_scale} | ignored {cfg.ignore_frac}", flush=True)
    rows, comps, floors = [], [], {}
    for i, spec in enumerate(s for s in cfg.shapes.split(",") if s):
        shape = tuple(int(x) for x in spec.lower().split("x"))
        full = i < cfg.full_shapes
        shape_rows, gemm_ms = bench_shape(shape, cfg, gen, full)
        rows += shape_rows
        floors[spec] = {"gemm_ms": gemm_ms, "floor_ms": 3 * gemm_ms}
        if full and cfg.components:
            comps += [dict(shape=spec, **r) for r in components(*shape, cfg.softcap, gen)]
            torch.cuda.empty_cache()
    if comps:
        print("\n| shape | component (one chunk, alone) | per chunk ms | chunks | total ms | TFLOP/s |\n|---|---|---:|---:|---:|---:|")
        for r in comps:
            tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
            print(f"| {r['shape']} | {r['component']} | {r['per_chunk_ms']:.3f} | {r['chunks']} | {r['total_ms']:.1f} | {tf} |")
    print("\n" + "\n".join(f"{s}: one plain GEMM {f['gemm_ms']:.2f} ms, 3-GEMM floor {f['floor_ms']:.1f} ms"
                           for s, f in floors.items()))
    print()
    print(table(rows))
    result = {"bench": "loss", "seed": seed, "device": torch.cuda.get_device_name(), "floors": floors,
              "components": comps, "rows": rows}
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()

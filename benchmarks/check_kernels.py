"""GPU correctness check of every kernel backend against an fp32 reference, on fresh random inputs.

    source benchmarks/gpu_env.sh && python benchmarks/check_kernels.py            # the H200 run
    python benchmarks/check_kernels.py --shapes=8192x1280x32768 --no-attention   # quick
    python benchmarks/check_kernels.py --shapes= --attn_backends=fa4,auto        # attention only (fa4_gpu.sh)

Loss backends (every registered one that is available, plus `torch` under torch.compile), in bf16 with
softcap and ~5% ignored targets: relative error of the loss, dhidden and dW against the reference; PASS
when all are within --tol (1e-2: bf16 noise). On small shapes also reductions sum/none and a batch whose
targets are all ignored (defined as loss 0 with zero gradients). Attention backends: output and dq/dk/dv against fp32 math attention, full causal and
sliding windows, with GQA. Exits 1 on any failure; prints a table, then one JSON line.

The reference (`fp32_reference`) is fp32-accurate but affordable at N=V=65536: matmuls run on TF32 tensor
cores, which is exact for bf16 operands (their 8-bit mantissas fit TF32's 11), and an fp32 operand
(dlogits) is split into a bf16-exact high part and a remainder (error ~2^-19). Loss and lse use all
tokens; dhidden is compared on --ref_rows random tokens and dW on --ref_cols random vocab rows (unbiased
samples of the full relative error, at ~1.6x the cost of one forward instead of ~5x).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also when run as a file
from nanochat import kernels  # noqa: E402
from nanochat.kernels import attention as attn  # noqa: E402
from nanochat.flags import parse_flags  # noqa: E402

IGNORE = -1


@dataclass
class CheckConfig:
    shapes: str = field(default="65536x1280x65536,4096x768x50257", metadata={"help": "comma list of NxCxV"})
    softcap: float = 15.0
    ignore_frac: float = 0.05
    logit_scale: float = field(default=4.0, metadata={"help": "std of the logits (softcap 15 then bites in the tails)"})
    tol: float = field(default=1e-2, metadata={"help": "max relative error of loss, dhidden, dW"})
    seed: int | None = field(default=None, metadata={"help": "default: from the clock (printed)"})
    backends: list[str] = field(default_factory=list, metadata={"help": "loss variants to check (default: all)"})
    ref_rows: int = field(default=8192, metadata={"help": "tokens whose dhidden is compared (0 = all)"})
    ref_cols: int = field(default=8192, metadata={"help": "vocab rows whose dW is compared (0 = all)"})
    small_numel: int = field(default=1 << 28, metadata={"help": "N*V up to which sum/none/all-ignored are checked"})
    attention: bool = True
    attn_tol: float = 1e-2
    attn_backends: list[str] = field(default_factory=list, metadata={
        "help": "attention backends to check, e.g. fa4,auto (default: all); " + attn.ATTENTION_BACKENDS.help()})


# ---------------------------------------------------------------- fp32 reference for the loss

def _cap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _mm_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for fp32 `a` and bf16-valued fp32 `b`, fp32-accurate on TF32 tensor cores."""
    hi = a.bfloat16().float()
    return hi @ b + (a - hi) @ b


def _dlogits(z: torch.Tensor, lse: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor,
             softcap: float | None) -> torch.Tensor:
    """d(sum of token losses)/d(raw logits) for a block: (softmax - onehot) * softcap' on valid rows."""
    c = _cap(z, softcap)
    d = torch.exp(c - lse[:, None]) - onehot
    if softcap is not None:
        d *= 1 - (c / softcap) ** 2
    return d * valid[:, None]


@torch.no_grad()
def fp32_reference(h, w, targets, *, softcap, rows, cols, ignore_index=IGNORE, chunk=8192):
    """Per-token losses [N] (0 where ignored) and the gradients of their SUM: dh[rows] [R, C], dW[cols] [K, C].

    h, w are bf16 (their values make the TF32 products exact); everything else is fp32.
    """
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        n = h.size(0)
        wf = w.float()
        valid = (targets != ignore_index).float()
        safe_t = targets.clamp(min=0)
        lse = torch.empty(n, device=h.device)
        tgt = torch.empty(n, device=h.device)
        for s in range(0, n, chunk):
            c = _cap(h[s:s + chunk].float() @ wf.t(), softcap)
            lse[s:s + chunk] = torch.logsumexp(c, dim=-1)
            tgt[s:s + chunk] = c.gather(1, safe_t[s:s + chunk, None])[:, 0]
            del c
        per_token = (lse - tgt) * valid
        dh = torch.empty(len(rows), h.size(1), device=h.device)
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            z = h[r].float() @ wf.t()
            onehot = torch.zeros_like(z).scatter_(1, safe_t[r, None], 1.0)
            dh[s:s + chunk] = _mm_split(_dlogits(z, lse[r], onehot, valid[r], softcap), wf)
            del z, onehot
        dw = torch.zeros(len(cols), h.size(1), device=h.device)
        wc = wf[cols]
        for s in range(0, n, chunk):
            hs = h[s:s + chunk].float()
            z = hs @ wc.t()
            onehot = (targets[s:s + chunk, None] == cols[None, :]).float()
            dw += _mm_split(_dlogits(z, lse[s:s + chunk], onehot, valid[s:s + chunk], softcap).t(), hs)
            del z, onehot
        return per_token, dh, dw
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def make_loss_inputs(n, c, v, *, ignore_frac, logit_scale, gen, device="cuda"):
    h = torch.randn(n, c, device=device, generator=gen).bfloat16()
    w = (torch.randn(v, c, device=device, generator=gen) * (logit_scale / c**0.5)).bfloat16()
    t = torch.randint(0, v, (n,), device=device, generator=gen)
    t[torch.rand(n, device=device, generator=gen) < ignore_frac] = IGNORE
    return h, w, t


def sample_indices(total: int, k: int, gen, device="cuda") -> torch.Tensor:
    if k <= 0 or k >= total:
        return torch.arange(total, device=device)
    return torch.randperm(total, device=device, generator=gen)[:k].sort().values


# ---------------------------------------------------------------- loss variants

def registry_loss(name: str):
    """callable(h, w, t, softcap, reduction="mean"): the loss through nanochat.kernels, backend `name`."""
    def fn(h, w, t, softcap, reduction="mean"):
        if kernels.get_kernel_backend() != name:
            kernels.set_kernel_backend(name)
        return kernels.fused_linear_cross_entropy(h, w, t, ignore_index=IGNORE, softcap=softcap,
                                                  reduction=reduction)
    return fn


def compiled_torch_loss():
    """Like registry_loss("torch"), under torch.compile (one graph per shape and reduction)."""
    # raise the recompile limit so that no graph falls back to eager silently
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    compiled = torch.compile(kernels.fused_linear_cross_entropy, dynamic=False)

    def fn(h, w, t, softcap, reduction="mean"):
        if kernels.get_kernel_backend() != "torch":
            kernels.set_kernel_backend("torch")
            with torch.no_grad():  # a tiny eager call logs the backend outside the compiled graph
                kernels.fused_linear_cross_entropy(h[:1], w, t[:1], ignore_index=IGNORE)
        return compiled(h, w, t, ignore_index=IGNORE, softcap=softcap, reduction=reduction)
    return fn


def loss_variants(selected: list[str]) -> dict[str, object]:
    """name -> callable(h, w, t, softcap, reduction) through the registry; unavailable ones -> reason str."""
    out: dict[str, object] = {name: registry_loss(name) if ok else reason
                              for name, (ok, reason) in kernels.available_backends().items()}
    out["torch+compile"] = compiled_torch_loss()
    if selected:
        unknown = set(selected) - set(out)
        if unknown:
            raise ValueError(f"unknown --backends {sorted(unknown)}; choose from: {', '.join(out)}")
        out = {k: v for k, v in out.items() if k in selected}
    return out


def prepare_shape(shape, cfg, gen) -> dict:
    """Fresh inputs for one shape and their fp32 reference, shared by every backend."""
    n, c, v = shape
    h0, w0, t = make_loss_inputs(n, c, v, ignore_frac=cfg.ignore_frac, logit_scale=cfg.logit_scale, gen=gen)
    rows = sample_indices(n, cfg.ref_rows, gen)
    cols = sample_indices(v, cfg.ref_cols, gen)
    t0 = time.time()
    per_token, dh_ref, dw_ref = fp32_reference(h0, w0, t, softcap=cfg.softcap, rows=rows, cols=cols)
    n_valid = max(int((t != IGNORE).sum()), 1)
    print(f"shape {n}x{c}x{v}: reference in {time.time() - t0:.1f}s, {n_valid} valid targets", flush=True)
    return dict(shape=shape, h0=h0, w0=w0, t=t, rows=rows, cols=cols, per_token=per_token, dh_ref=dh_ref,
                dw_ref=dw_ref, n_valid=n_valid)


def check_loss_shape(name, fn, prep: dict, cfg, rows_out: list[dict]) -> None:
    (n, c, v), h0, w0, t, rows, cols = (prep[k] for k in ("shape", "h0", "w0", "t", "rows", "cols"))
    per_token, dh_ref, dw_ref, n_valid = (prep[k] for k in ("per_token", "dh_ref", "dw_ref", "n_valid"))
    reductions = ["mean"] + (["sum", "none"] if n * v <= cfg.small_numel else [])
    for reduction in reductions:
        record = {"check": f"loss/{reduction}", "backend": name, "shape": f"{n}x{c}x{v}"}
        try:
            h = h0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)
            loss = fn(h, w, t, cfg.softcap, reduction)
            (loss.sum() if reduction == "none" else loss).backward()
            torch.cuda.synchronize()
            scale = 1.0 / n_valid if reduction == "mean" else 1.0
            if reduction == "none":
                loss_ref, loss_got = per_token, loss.float()
            else:
                loss_ref = per_token.double().sum() * scale
                loss_got = loss.double()
            errs = {"loss": rel_err(loss_got, loss_ref), "dh": rel_err(h.grad[rows].float(), dh_ref * scale),
                    "dW": rel_err(w.grad[cols].float(), dw_ref * scale)}
            record.update(errs, ok=all(e <= cfg.tol for e in errs.values()))
        except Exception as exc:  # one broken backend must not hide the others
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        rows_out.append(record)
        print(f"  {record}", flush=True)
        h = w = loss = None
        torch.cuda.empty_cache()
    if n * v <= cfg.small_numel:  # every target ignored: 0 loss, zero (finite) gradients
        record = {"check": "loss/all-ignored", "backend": name, "shape": f"{n}x{c}x{v}"}
        try:
            h = h0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)
            loss = fn(h, w, torch.full_like(t, IGNORE), cfg.softcap, "mean")
            loss.backward()
            ok = bool(loss.float() == 0) and bool((h.grad == 0).all()) and bool((w.grad == 0).all())
            record.update(ok=ok, loss=loss.item())
        except Exception as exc:
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        rows_out.append(record)
        print(f"  {record}", flush=True)


# ---------------------------------------------------------------- attention

def _attn_reference(q, k, v, g, mask):
    """fp32 math attention and its input gradients; q [B,T,H,D], k/v [B,T,Hkv,D], mask [T,T] bool."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        qf, kf, vf = (x.detach().float().requires_grad_(True) for x in (q, k, v))
        rep = q.size(2) // k.size(2)
        qt = qf.transpose(1, 2)
        kt = kf.transpose(1, 2).repeat_interleave(rep, dim=1)
        vt = vf.transpose(1, 2).repeat_interleave(rep, dim=1)
        scores = (qt @ kt.transpose(-1, -2)) * q.size(-1) ** -0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ vt).transpose(1, 2)
        out.backward(g.float())
        return out.detach(), qf.grad, kf.grad, vf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _masks(t: int, window: int | None, device) -> dict[str, torch.Tensor]:
    """Causal masks; for a window both readings, w keys including self (ours) or w+1, so that a backend
    off by one is reported as such rather than as a large error."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    d = i - j
    if window is None:
        return {"causal": d >= 0}
    return {"i-j<w": (d >= 0) & (d < window), "i-j<=w": (d >= 0) & (d <= window)}


def check_attention(cfg, gen, rows_out: list[dict]) -> None:
    cases = [(4, 2048, 10, 10, 128, None), (4, 2048, 10, 10, 128, 512), (2, 1024, 8, 2, 128, 256)]
    conventions: dict[str, str] = {}
    names = attn.ATTENTION_BACKENDS.names()
    unknown = set(cfg.attn_backends) - set(names)
    if unknown:
        raise ValueError(f"unknown --attn_backends {sorted(unknown)}; choose from: {', '.join(names)}")
    for name in [n for n in names if not cfg.attn_backends or n in cfg.attn_backends]:
        if name != "auto":
            be = attn.ATTENTION_BACKENDS[name]
            ok, reason = be.is_available()
            if not ok:
                rows_out.append({"check": "attention", "backend": name, "skipped": str(reason)})
                print(f"  attention {name}: skipped ({reason})")
                continue
        for b, t, hq, hkv, d, window in cases:
            record = {"check": f"attention/{'full' if window is None else f'window{window}'}", "backend": name,
                      "shape": f"B{b} T{t} H{hq}/{hkv} D{d}"}
            if name != "auto" and not be.supports(window, torch.bfloat16, torch.device("cuda")):
                record["skipped"] = "supports() says no"
                rows_out.append(record)
                continue
            try:
                q = torch.randn(b, t, hq, d, device="cuda", generator=gen).bfloat16().requires_grad_(True)
                k = torch.randn(b, t, hkv, d, device="cuda", generator=gen).bfloat16().requires_grad_(True)
                v = torch.randn(b, t, hkv, d, device="cuda", generator=gen).bfloat16().requires_grad_(True)
                g = torch.randn(b, t, hq, d, device="cuda", generator=gen).bfloat16()
                out = attn.attention(q, k, v, window=window, backend=name)
                out.backward(g)
                best = None
                for conv, mask in _masks(t, window, q.device).items():
                    ref = _attn_reference(q, k, v, g, mask)
                    e = rel_err(out.float(), ref[0])
                    if best is None or e < best[1]:
                        best = (conv, e, ref)
                conv, e_out, (_, dq, dk, dv) = best
                errs = {"out": e_out, "dq": rel_err(q.grad.float(), dq), "dk": rel_err(k.grad.float(), dk),
                        "dv": rel_err(v.grad.float(), dv)}
                # nanochat.kernels.attention defines the window as i - j < window (self included)
                right = window is None or conv == "i-j<w"
                record.update(errs, convention=conv, ok=right and all(x <= cfg.attn_tol for x in errs.values()))
                if window is not None:
                    conventions[name] = conv
            except Exception as exc:
                record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            rows_out.append(record)
            print(f"  {record}", flush=True)
            q = k = v = g = out = None
    if len(set(conventions.values())) > 1:
        rows_out.append({"check": "attention/window-convention", "backend": "all", "ok": False,
                         "error": f"backends disagree on what a window means: {conventions}"})


# ---------------------------------------------------------------- main

def fmt(x) -> str:
    return "" if x is None else (f"{x:.2e}" if isinstance(x, float) else str(x))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_flags(CheckConfig, argv, description=__doc__.split("\n")[0])
    if not torch.cuda.is_available():
        print("check_kernels needs a CUDA GPU (the CPU backends are covered by tests/test_kernels_loss.py)")
        return 2
    seed = cfg.seed if cfg.seed is not None else int(time.time()) % 2**31
    print(f"seed {seed} (rerun with --seed={seed}) | {torch.cuda.get_device_name()} | torch {torch.__version__}")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in cfg.shapes.split(",") if s]
    results: list[dict] = []
    variants = loss_variants(cfg.backends)
    for name, fn in variants.items():
        if isinstance(fn, str):
            results.append({"check": "loss", "backend": name, "skipped": fn})
            print(f"loss {name}: skipped ({fn})")
    for shape in shapes:
        prep = prepare_shape(shape, cfg, gen)
        for name, fn in variants.items():
            if not isinstance(fn, str):
                check_loss_shape(name, fn, prep, cfg, results)
        del prep
        torch.cuda.empty_cache()
    if cfg.attention:
        print("attention:", flush=True)
        check_attention(cfg, gen, results)

    failed = [r for r in results if r.get("ok") is False]
    print("\n| check | backend | shape | errors (relative) | result |\n|---|---|---|---|---|")
    for r in results:
        errs = " ".join(f"{k}={fmt(r[k])}" for k in ("loss", "dh", "dW", "out", "dq", "dk", "dv") if k in r)
        if "convention" in r:
            errs += f" ({r['convention']})"
        status = "skip: " + r["skipped"] if "skipped" in r else ("PASS" if r.get("ok") else "FAIL " + r.get("error", ""))
        print(f"| {r['check']} | {r['backend']} | {r.get('shape', '')} | {errs} | {status[:120]} |")
    print(f"\n{len(failed)} failed of {sum('ok' in r for r in results)} checks (tol {cfg.tol:g} loss, {cfg.attn_tol:g} attention)")
    print(json.dumps({"seed": seed, "failed": len(failed), "results": results}, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The fa4 backend (FlashAttention-4) on the CPU: registration, the reason it is unavailable, auto's fallback,
the window mapping against FA4's own mask rule, and the custom-op plumbing (eager, opcheck, torch.compile with
fullgraph) around a float64 stand-in for FA4's kernels. The real kernels are checked by the gpu tests below,
run by benchmarks/fa4_gpu.sh."""
import math
import types

import pytest
import torch

from nanochat.kernels import attention as attn_mod
from nanochat.kernels.attention import ATTENTION_BACKENDS, FA4Backend, causal_window_mask, select_backend


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    monkeypatch.setattr(attn_mod, "_LOGGED", set())


# ---- FA4's mask rule, read off flash_attn/cute (4.0.0b36) ----

def fa4_resolve(causal: bool, left: int | None, right: int | None) -> tuple[bool, bool, int | None, int | None]:
    """interface._resolve_causal_local_window: (causal, local, left, right) as the kernels receive them."""
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    if left is None and right is None:
        return causal, False, None, None
    if left is None and right == 0:
        return True, False, None, None
    return False, True, left, right


def fa4_visible(q_len: int, k_len: int, causal: bool, left: int | None, right: int | None) -> torch.Tensor:
    """[q_len, k_len] bool, True = attended, as mask.py's AttentionMask.apply_mask computes it on sm90. Queries
    are aligned to the last keys (causal_row_offset = 1 + seqlen_k - seqlen_q): causal masks key j of query i
    when j >= i + 1 + k_len - q_len (col_limit_right); local masks j >= i + 1 + k_len - q_len + right and
    j < i + k_len - q_len - left (col_limit_left = row + causal_row_offset - 1 - left)."""
    causal, local, left, right = fa4_resolve(causal, left, right)
    i = torch.arange(q_len).view(-1, 1)
    j = torch.arange(k_len).view(1, -1)
    shift = k_len - q_len
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        visible &= j < i + 1 + shift
    if local:
        if right is not None:
            visible &= j < i + 1 + shift + right
        if left is not None:
            visible &= j >= i + shift - left
    return visible


def test_fa4_mask_rule_by_hand():
    # FA4's window_size=(1, 0): each query sees itself and one key back
    assert fa4_visible(4, 4, True, 1, 0).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert fa4_visible(3, 3, True, None, None).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (37, 37), (64, 64), (1, 20), (5, 20)])
@pytest.mark.parametrize("window", [None, 1, 2, 5, 19, 20, 36, 37, 38, 1000])
def test_window_mapping_matches_our_mask(q_len, k_len, window):
    """Our window w (i - j < w, the query's own position included) is FA4's window_size (w - 1, 0)."""
    left, right = FA4Backend.window_size(window, k_len)
    assert torch.equal(fa4_visible(q_len, k_len, True, left, right),
                       causal_window_mask(q_len, k_len, window, "cpu"))


def test_window_mapping_off_by_one_would_be_caught():
    assert not torch.equal(fa4_visible(16, 16, True, 5, 0), causal_window_mask(16, 16, 5, "cpu"))


# ---- registration, availability, auto ----

def test_fa4_registered_before_cudnn_and_flex():
    names = list(ATTENTION_BACKENDS)  # auto's order: fa4 measured faster than both (BENCHMARKS.md, attention)
    assert names.index("fa3") < names.index("fa4") < names.index("cudnn") < names.index("flex")
    assert ATTENTION_BACKENDS["fa4"].name == "fa4"
    assert ATTENTION_BACKENDS["fa4"].supports(512, torch.bfloat16, torch.device("cuda"))
    assert not ATTENTION_BACKENDS["fa4"].supports(512, torch.float32, torch.device("cuda"))
    assert not ATTENTION_BACKENDS["fa4"].supports(None, torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_fa4_unavailable_here_with_reason_logged_once(monkeypatch):
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    backend = FA4Backend()
    ok, reason = backend.is_available()
    assert not ok and ("not installed" in reason or "CUDA" in reason), reason
    assert backend.is_available() == (False, reason)
    assert logged == [f"attention: fa4 unavailable: {reason}"]


def fake_installed(monkeypatch, tmp_path):
    """find_spec('flash_attn') -> a package folder holding cute/, as flash-attn-4 installs it."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "flash_attn")])
    monkeypatch.setattr(attn_mod.importlib.util, "find_spec", lambda name: spec if name == "flash_attn" else None)


def test_fa4_reasons(monkeypatch, tmp_path):
    monkeypatch.setattr(attn_mod, "_FA4", None)
    monkeypatch.setattr(attn_mod.importlib.util, "find_spec", lambda name: None)
    assert "flash-attn-4 (flash_attn.cute) is not installed; pip install flash-attn-4" in attn_mod._fa4_status()[1]
    fake_installed(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attn_mod._fa4_status() == (False, "needs a CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "needs sm_90 or newer" in attn_mod._fa4_status()[1] and "found sm_80" in attn_mod._fa4_status()[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))

    def broken_import(name):
        raise ImportError("libcute_dsl_runtime.so: cannot open shared object file")
    monkeypatch.setattr(attn_mod.importlib, "import_module", broken_import)
    ok, reason = attn_mod._fa4_status()
    assert not ok and "ImportError: libcute_dsl_runtime.so: cannot open" in reason
    monkeypatch.setattr(attn_mod.importlib, "import_module", lambda name: types.SimpleNamespace())
    assert "lacks _flash_attn_fwd/_flash_attn_bwd" in attn_mod._fa4_status()[1]
    interface = types.SimpleNamespace(_flash_attn_fwd=None, _flash_attn_bwd=None)
    monkeypatch.setattr(attn_mod.importlib, "import_module", lambda name: interface)
    assert attn_mod._fa4_status() == (True, "ok") and attn_mod._FA4 is interface


def fake_available(monkeypatch, names):
    for name, backend in ATTENTION_BACKENDS.items():
        if name != "fa4":
            ok = (True, "ok") if name in names else (False, "faked unavailable")
            monkeypatch.setattr(backend, "is_available", lambda ok=ok: ok)


def test_auto_falls_back_to_flex_and_logs_why(monkeypatch):
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    monkeypatch.setattr(attn_mod, "_fa4_status", lambda: (False, "flash-attn-4 (flash_attn.cute) is not installed"))
    monkeypatch.setitem(ATTENTION_BACKENDS, "fa4", FA4Backend())
    fake_available(monkeypatch, {"cudnn", "flex", "sdpa"})
    cuda = torch.device("cuda")
    assert select_backend(512, torch.bfloat16, torch.device("cpu")) == "sdpa"
    assert select_backend(512, torch.float32, cuda) == "flex"
    assert logged == []  # fa4 is probed only for a layer it could serve: not on the CPU, not in fp32
    assert select_backend(None, torch.bfloat16, cuda) == "cudnn"
    assert select_backend(512, torch.bfloat16, cuda) == "flex"
    assert select_backend(256, torch.bfloat16, cuda) == "flex"
    assert logged == ["attention: fa4 unavailable: flash-attn-4 (flash_attn.cute) is not installed"]
    with pytest.raises(attn_mod.BackendUnavailable, match="'fa4' unavailable: flash-attn-4"):
        select_backend(512, torch.bfloat16, cuda, "fa4")


def test_auto_picks_fa4_for_windows_where_available(monkeypatch):
    fake_available(monkeypatch, {"cudnn", "flex", "sdpa"})
    monkeypatch.setattr(ATTENTION_BACKENDS["fa4"], "is_available", lambda: (True, "ok"))
    cuda = torch.device("cuda")
    assert select_backend(None, torch.bfloat16, cuda) == "fa4"
    assert select_backend(512, torch.bfloat16, cuda) == "fa4"
    assert select_backend(512, torch.float32, cuda) == "flex"
    assert select_backend(None, torch.bfloat16, cuda, "fa4") == "fa4"
    assert select_backend(None, torch.bfloat16, torch.device("cpu")) == "sdpa"


# ---- the custom ops, around a float64 stand-in for FA4's kernels ----

def _stand_in_probs(q, k, causal, left, right):
    """Softmax probabilities [B, H, Tq, Tk] in float64 under fa4_visible, k expanded to q's heads."""
    groups = q.size(2) // k.size(2)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(groups, 2))
    scores = scores / math.sqrt(q.size(3))
    scores = scores.masked_fill(~fa4_visible(q.size(1), k.size(1), causal, left, right), float("-inf"))
    return scores.softmax(-1), scores.logsumexp(-1)


def stand_in_interface(calls: list):
    """An object with interface._flash_attn_fwd/_bwd's signatures (as the fa4 ops call them), computing FA4's
    math in float64: the backward by hand (autograd does not record inside a custom op)."""
    def fwd(q, k, v, causal=False, window_size_left=None, window_size_right=None, return_lse=False):
        calls.append(("fwd", causal, window_size_left, window_size_right))
        p, lse = _stand_in_probs(q, k, causal, window_size_left, window_size_right)
        v_heads = v.double().repeat_interleave(q.size(2) // v.size(2), 2)
        out = torch.einsum("bhij,bjhd->bihd", p, v_heads).to(q.dtype).contiguous()  # FA4: torch.empty(...)
        return out, lse.float().contiguous(), None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
            window_size_right=None):
        calls.append(("bwd", causal, window_size_left, window_size_right))
        groups = q.size(2) // k.size(2)
        p, _ = _stand_in_probs(q, k, causal, window_size_left, window_size_right)
        kk, vv = (t.double().repeat_interleave(groups, 2) for t in (k, v))
        do = dout.double()
        dp = torch.einsum("bihd,bjhd->bhij", do, vv)
        ds = p * (dp - (do * out.double()).sum(-1).transpose(1, 2).unsqueeze(-1)) / math.sqrt(q.size(3))
        dq = torch.einsum("bhij,bjhd->bihd", ds, kk)
        dk = torch.einsum("bhij,bihd->bjhd", ds, q.double())
        dv = torch.einsum("bhij,bihd->bjhd", p, do)
        fold = lambda t: t.unflatten(2, (k.size(2), groups)).sum(3)  # noqa: E731  (GQA: sum each group)
        return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)  # the op makes them contiguous

    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd)


def rand_qkv(B=2, T=24, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_()
            for s in ((B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D))]


def reference(q, k, v, window):
    """Our semantics (causal_window_mask) in float64: out, and grads of sum(out * g)."""
    T, H, D = q.size(1), q.size(2), q.size(3)
    groups = H // k.size(2)
    kk, vv = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(D)
    scores = scores.masked_fill(~causal_window_mask(T, T, window, q.device), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), vv)


def run_and_grads(fn, q, k, v, g):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(g)
    return [out.detach()] + [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("window", [None, 1, 7, 24, 100])
def test_fa4_ops_forward_backward_eager_and_compiled(monkeypatch, window):
    calls = []
    monkeypatch.setattr(attn_mod, "_FA4", stand_in_interface(calls))
    q, k, v = rand_qkv(seed=window or 0)
    g = torch.randn_like(q)
    want = run_and_grads(lambda q, k, v: reference(q, k, v, window), q, k, v, g)
    backend = ATTENTION_BACKENDS["fa4"]
    eager = run_and_grads(lambda q, k, v: backend.attend(q, k, v, window), q, k, v, g)
    left = None if window is None or window >= 24 else window - 1
    assert calls == [("fwd", True, left, 0), ("bwd", True, left, 0)]
    torch._dynamo.reset()
    compiled_fn = torch.compile(lambda q, k, v: backend.attend(q, k, v, window), fullgraph=True, backend="aot_eager")
    compiled = run_and_grads(compiled_fn, q, k, v, g)
    for got in (eager, compiled):
        for x, ref in zip(got, want):
            torch.testing.assert_close(x, ref, atol=1e-10, rtol=0)


def test_fa4_ops_pass_opcheck(monkeypatch):
    """Schema, fake impls (shapes, strides), autograd registration and AOT dispatch of both ops."""
    monkeypatch.setattr(attn_mod, "_FA4", stand_in_interface([]))
    q, k, v = rand_qkv(B=1, T=16, H=4, Hkv=1, D=8, seed=3)
    torch.library.opcheck(torch.ops.nanochat.fa4_forward, (q, k, v, 3))
    torch.library.opcheck(torch.ops.nanochat.fa4_forward, (q, k, v, None))
    out, lse = torch.ops.nanochat.fa4_forward(q, k, v, 3)
    assert lse.shape == (1, 4, 16) and lse.dtype == torch.float32
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 3)
    torch.library.opcheck(torch.ops.nanochat.fa4_backward, args)


# ---- the real kernels (benchmarks/fa4_gpu.sh) ----

def fa4_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ok, reason = ATTENTION_BACKENDS["fa4"].is_available()
    if not ok:
        pytest.skip(f"fa4 unavailable: {reason}")


def gpu_inputs(B, T, H, Hkv, D, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, H, D)]
    return [torch.randn(s, device="cuda", generator=g).bfloat16() for s in shapes]


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# (window, kv heads of 4): full causal, windows of 1 (self only), an odd size, one covering the whole sequence (runs
# the causal kernel), GQA. Few kernel configurations (each a JIT compile): causal and local, MHA and 4:1 GQA local.
@pytest.mark.gpu
@pytest.mark.parametrize("window,Hkv", [(None, 4), (1, 4), (300, 4), (2048, 4), (128, 1), (300, 1)])
def test_fa4_gpu_matches_fp64_reference(window, Hkv):
    fa4_or_skip()
    q, k, v, g = gpu_inputs(2, 1024, 4, Hkv, 128, seed=(window or 0) + Hkv)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn_mod.attention(*leaves, window=window, backend="fa4")
    out.backward(g)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference(*ref, window)
    want.backward(g.double())
    # a window of 1 leaves one key per softmax: dq and dk are exactly 0, and the kernel's are rounding noise, so
    # an exact-zero reference is checked against the upstream gradient's scale instead of relatively
    errors = [rel(x, r) if r.norm() > 0 else (x.double().norm() / g.double().norm()).item()
              for x, r in zip([out, *(t.grad for t in leaves)], [want, *(t.grad for t in ref)])]
    assert max(errors) < 1e-2, errors  # bf16 inputs and outputs: ~4e-3 typical


@pytest.mark.gpu
def test_fa4_gpu_compiled_matches_eager_and_audits_as_fa4():
    from torch.profiler import ProfilerActivity, profile

    from nanochat import profiling
    fa4_or_skip()
    q, k, v, g = gpu_inputs(2, 512, 4, 1, 128, seed=1)
    fn = torch.compile(lambda q, k, v: attn_mod.attention(q, k, v, window=128, backend="fa4"), fullgraph=True)
    results = []
    for f in (lambda q, k, v: attn_mod.attention(q, k, v, window=128, backend="fa4"), fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*leaves)
        out.backward(g)
        results.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*results):  # dq accumulates with atomics: equal up to summation order
        assert rel(a, b) < 5e-3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward(g)
        torch.cuda.synchronize()
    summary = profiling.summarize(profiling.profiler_events(prof))
    attention_kernels = [k["name"] for k in summary["kernels"] if k["group"] == "attention"]
    print("fa4 kernels:", *attention_kernels, sep="\n  ")
    assert profiling.check_expectations(summary, ["attention=fa4"]) == []
    assert profiling.check_expectations(summary, ["attention=fa3"]) != []
    assert profiling.check_expectations(summary, ["attention=fa2"]) != []


@pytest.mark.gpu
def test_fa4_gpu_model_step_sssl_matches_sdpa():
    """A small GPT with SSSL windows: auto routes its window layers to fa4 (GQA 4:1), and a training step gives
    sdpa's loss and gradients."""
    from nanochat.model.gpt import GPTConfig
    from tests.test_gpt import build, loss_and_grads
    fa4_or_skip()
    cfg = GPTConfig(sequence_len=512, vocab_size=512, n_layer=4, n_head=4, n_kv_head=1, n_embd=512, head_dim=128,
                    window_pattern="SSSL", short_window=128)
    assert select_backend(128, torch.bfloat16, torch.device("cuda")) == "fa4"
    model = build(cfg).cuda().train()
    idx, tgt = (torch.randint(0, 512, (2, 512), device="cuda") for _ in range(2))
    loss_fa4, grads_fa4 = loss_and_grads(model, idx, tgt, "auto")
    loss_sdpa, grads_sdpa = loss_and_grads(model, idx, tgt, "sdpa")
    assert abs(loss_fa4 - loss_sdpa) < 1e-2 * abs(loss_sdpa)
    assert (grads_fa4 - grads_sdpa).norm() < 3e-2 * grads_sdpa.norm()


# ---- the benchmark's target lines ----

def test_bench_attention_speedups_versus_cudnn():
    import importlib
    bench = importlib.import_module("benchmarks.bench_attention")
    results = [dict(backend="cudnn", window=None, layer_ms=3.0), dict(backend="fa4", window=None, layer_ms=2.5),
               dict(backend="fa4", window=512, layer_ms=1.5), dict(backend="flex", window=512, layer_ms=4.0),
               dict(backend="fa4", window=256, layer_ms=1.0), dict(backend="flex", window=None, error="boom")]
    got = {(v["backend"], v["window"]): (v["speedup"], v["target"], v["ok"]) for v in bench.versus_cudnn(results, 512)}
    assert got == {("fa4", None): (1.2, 1.0, True), ("fa4", 512): (2.0, 1.8, True), ("flex", 512): (0.75, None, None),
                   ("fa4", 256): (3.0, None, None)}
    results[2]["layer_ms"] = 2.0  # 1.5x: short of 1.8x
    fa4_window = [v for v in bench.versus_cudnn(results, 512) if (v["backend"], v["window"]) == ("fa4", 512)]
    assert [v["ok"] for v in fa4_window] == [False]
    assert bench.versus_cudnn(results[1:], 512) == []  # no cuDNN full row to compare with


def test_check_kernels_attention_filter_names_the_choices():
    import importlib
    check = importlib.import_module("benchmarks.check_kernels")
    cfg = check.CheckConfig(attn_backends=["fa5"])
    with pytest.raises(ValueError, match="unknown --attn_backends \\['fa5'\\]; choose from: auto, fa3, fa4, cudnn"):
        check.check_attention(cfg, None, [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_check_kernels_checks_only_the_named_attention_backends():
    import importlib
    check = importlib.import_module("benchmarks.check_kernels")
    rows = []
    check.check_attention(check.CheckConfig(attn_backends=["fa4", "cudnn"]), None, rows)
    assert [(r["backend"], "skipped" in r) for r in rows] == [("fa4", True), ("cudnn", True)]


# ---- the GPU call: its commands parse, its summary reads the logs ----

def test_fa4_gpu_script_commands_parse(tmp_path, monkeypatch):
    from tests import test_runs
    from tests.test_runs import check_commands, record_commands
    monkeypatch.setitem(test_runs.CONFIG_CLASSES, "benchmarks.fa4_summary", "SummaryConfig")
    commands = record_commands(tmp_path, "benchmarks/fa4_gpu.sh", {"OUT": str(tmp_path / "out"),
                                                                   "FA4_SITE": str(tmp_path / "site")})
    assert check_commands(commands) == {"pytest", "benchmarks.check_kernels", "benchmarks.bench_attention",
                                        "benchmarks.fa4_summary"}


def test_fa4_summary_reads_the_logs(tmp_path, capsys):
    import importlib
    import json
    summary = importlib.import_module("benchmarks.fa4_summary")
    (tmp_path / "fa4_available.txt").write_text("NVIDIA H100 80GB HBM3 (9, 0)\nfa4 available: (True, 'ok')\n")
    (tmp_path / "fa4_gpu_tests.txt").write_text("....\n12 passed, 14 deselected in 95.20s (0:01:35)\n")
    check = {"seed": 1, "failed": 0, "results": [
        {"check": "attention/full", "backend": "fa4", "out": 1.1e-3, "dq": 2.0e-3, "dk": 1.9e-3, "dv": 1.5e-3,
         "ok": True},
        {"check": "attention/window512", "backend": "fa4", "out": 1.2e-3, "dq": 2.2e-3, "dk": 2.0e-3, "dv": 1.6e-3,
         "ok": True},
        {"check": "attention/full", "backend": "auto", "out": 9e-3, "ok": True}]}
    (tmp_path / "check_kernels.txt").write_text("table\n" + json.dumps(check) + "\n")
    bench = {"gpu": "NVIDIA H100 80GB HBM3", "shape": {"window": 512}, "fa4_max_rel_err": 2.3e-3,
             "rows": [dict(backend="cudnn", window=None, layer_ms=3.0), dict(backend="fa4", window=None, layer_ms=2.9),
                      dict(backend="fa4", window=512, layer_ms=1.5), dict(backend="flex", window=512, layer_ms=4.2)],
             "vs_cudnn_full": [dict(backend="fa4", window=None, speedup=1.034, target=1.0, ok=True),
                               dict(backend="fa4", window=512, speedup=2.0, target=1.8, ok=True),
                               dict(backend="flex", window=512, speedup=0.714, target=None, ok=None)]}
    (tmp_path / "bench_attention.txt").write_text(json.dumps(bench) + "\n")
    summary.main([f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out.strip().splitlines()
    table = "\n".join(out)
    assert "| fa4 window 512 vs cudnn full, fwd+bwd | 2.00x (1.500 ms) | >= 1.8x | PASS |" in table
    assert "| check_kernels fa4 vs fp32 (fresh inputs) | max 2.20e-03 over 2 cases, 0 failed | <= 0.0025 | PASS |" \
        in table
    assert "| GPU tests (test_attention_fa4.py -m gpu) | 12 passed, 14 deselected in 95.20s (0:01:35) | all pass " \
        "| PASS |" in table
    assert json.loads(out[-1])["failed"] == 0
    (tmp_path / "fa4_gpu_tests.txt").write_text("F...\n1 failed, 11 passed in 95.20s\n")
    (tmp_path / "bench_attention.txt").unlink()
    summary.main([f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "| bench_attention | no JSON (see bench_attention.txt) | - | FAIL |" in out
    assert json.loads(out[-1])["failed"] == 2

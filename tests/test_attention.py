"""Attention backends vs a float64 explicit-mask reference; auto's per-layer choice; errors."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from nanochat.kernels import BackendUnavailable
from nanochat.kernels import attention as attn_mod
from nanochat.kernels.attention import ATTENTION_BACKENDS, attention, causal_window_mask, select_backend

# Backends whose attend() runs on the CPU: sdpa fully; flex forward only (unfused, no backward), so
# the model never routes a CPU layer to flex, but its block masks are checked here all the same.
CPU_FORWARD = ["sdpa", "flex"]
CPU_BACKWARD = [n for n, b in ATTENTION_BACKENDS.items() if b.supports(None, torch.float32, torch.device("cpu"))]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
FP32_ATOL = 2e-5  # fp32 kernels vs the float64 reference, unit-variance inputs


def reference(q, k, v, window):
    """Softmax attention in float64 with the mask written out: key j visible to query i iff
    j <= i and i - j < window. q [B, T, H, D], k/v [B, T, Hkv, D]."""
    q, k, v = (t.double() for t in (q, k, v))
    T, H, D = q.size(1), q.size(2), q.size(3)
    groups = H // k.size(2)
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    visible = (j <= i) & ((i - j < window) if window is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    monkeypatch.setattr(attn_mod, "_LOGGED", set())


def rand_qkv(B=2, T=37, H=4, Hkv=2, D=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)]
    return [torch.randn(s, generator=g).requires_grad_(requires_grad) for s in shapes]


def test_cpu_routing():
    assert CPU_BACKWARD == ["sdpa"]


def test_mask_semantics_by_hand():
    m = causal_window_mask(4, 4, 2, "cpu").int()
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # queries at positions 3, 4 of a 5-key cache (offset defaults to k_len - q_len)
    assert causal_window_mask(2, 5, None, "cpu").int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("backend", CPU_FORWARD)
@pytest.mark.parametrize("window", [None, 1, 5, 16, 37, 100])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_backend_matches_reference(backend, window, Hkv):
    q, k, v = rand_qkv(Hkv=Hkv, seed=hash((backend, window, Hkv)) % 1000)
    out = ATTENTION_BACKENDS[backend].attend(q, k, v, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, window), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKWARD)
@pytest.mark.parametrize("window", [None, 7])
def test_backend_gradients_match_reference(backend, window):
    q, k, v = rand_qkv(Hkv=2, seed=7, requires_grad=True)
    grad_out = torch.randn_like(q)
    (ATTENTION_BACKENDS[backend].attend(q, k, v, window) * grad_out).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (reference(q64, k64, v64, window) * grad_out.double()).sum().backward()
    for g, ref in zip(got, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(g.double(), ref, atol=1e-4, rtol=0)


def test_public_call_and_auto_on_cpu(monkeypatch):
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    q, k, v = rand_qkv(Hkv=1, seed=3)
    for _ in range(2):  # logged once per layer, not per call
        out = attention(q, k, v, window=9, layer_idx=3)
    torch.testing.assert_close(out.double(), reference(q, k, v, 9), atol=FP32_ATOL, rtol=0)
    assert logged == ["attention: layer 3 window 9 -> sdpa"]


def test_kv_cache_path_matches_full(monkeypatch):
    """Prefill 10 positions then decode one at a time: each step equals the full causal result."""
    B, T, H, Hkv, D, window = 2, 20, 4, 2, 16, 6
    q, k, v = rand_qkv(B, T, H, Hkv, D, seed=11)
    full = reference(q, k, v, window)
    cache = SimpleNamespace(k=torch.zeros(3, B, 32, Hkv, D), v=torch.zeros(3, B, 32, Hkv, D), pos=0)
    outs = [attention(q[:, :10], k[:, :10], v[:, :10], window=window, kv_cache=cache, layer_idx=1)]
    cache.pos = 10
    for t in range(10, T):
        outs.append(attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], window=window, kv_cache=cache, layer_idx=1))
        cache.pos += 1
    torch.testing.assert_close(torch.cat(outs, 1).double(), full, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(cache.k[1, :, :T], k)
    assert cache.k[0].abs().sum() == 0  # other layers untouched


def test_kv_cache_overflow_is_a_clear_error():
    q, k, v = rand_qkv(1, 4, 2, 2, 8)
    cache = SimpleNamespace(k=torch.zeros(1, 1, 6, 2, 8), v=torch.zeros(1, 1, 6, 2, 8), pos=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        attention(q, k, v, window=None, kv_cache=cache)


def fake_available(monkeypatch, names):
    for name, backend in ATTENTION_BACKENDS.items():
        ok = (True, "ok") if name in names else (False, "faked unavailable")
        monkeypatch.setattr(backend, "is_available", lambda ok=ok: ok)


def test_auto_choice_logic(monkeypatch):
    cuda, cpu, bf16, fp32 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16, torch.float32
    fake_available(monkeypatch, {"fa3", "cudnn", "flex", "sdpa"})
    assert select_backend(None, bf16, cuda) == "fa3"
    assert select_backend(512, bf16, cuda) == "fa3"
    assert select_backend(None, bf16, cpu) == "sdpa"  # auto never picks the unfused CPU flex
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"cudnn", "flex", "sdpa"})
    assert select_backend(None, bf16, cuda) == "cudnn"
    assert select_backend(512, bf16, cuda) == "flex"   # cudnn: full windows only
    assert select_backend(None, fp32, cuda) == "flex"  # cudnn: half precision only
    assert select_backend(None, torch.float64, cuda) == "sdpa"
    assert select_backend(None, fp32, cpu) == "sdpa"
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"sdpa"})
    assert select_backend(512, bf16, cuda) == "sdpa"
    assert select_backend(None, bf16, cuda) == "sdpa"


def test_auto_takes_sdpa_for_window_layers_outside_a_compiled_graph(monkeypatch):
    """Evaluation and fine-tuning run eagerly on rows of many lengths: flex would compile per shape (and run
    unfused past dynamo's recompile limit), so auto's window layers take sdpa's explicit mask there; inside a
    compiled graph flex, a named flex, and full-causal layers on cudnn are unaffected."""
    cuda, bf16, fp32 = torch.device("cuda"), torch.bfloat16, torch.float32
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"cudnn", "flex", "sdpa"})
    assert select_backend(512, bf16, cuda, compiled=False) == "sdpa"
    assert select_backend(512, bf16, cuda, compiled=True) == "flex"
    assert select_backend(None, fp32, cuda, compiled=False) == "sdpa"  # cudnn: half precision only
    assert select_backend(None, bf16, cuda, compiled=False) == "cudnn"
    assert select_backend(512, bf16, cuda, "flex", compiled=False) == "flex"  # named: kept
    monkeypatch.setattr(attn_mod, "_LOGGED", set())
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    assert attn_mod._layer_backend("auto", 512, bf16, "cuda", 1, False, False) == "sdpa"
    assert logged == ["attention: layer 1 window 512 -> sdpa (outside a compiled graph; flex inside one)"]


def test_explicit_backend_falls_back_per_layer_when_unsupported(monkeypatch):
    fake_available(monkeypatch, {"cudnn", "flex", "sdpa"})
    assert select_backend(None, torch.bfloat16, "cuda", "cudnn") == "cudnn"
    assert select_backend(256, torch.bfloat16, "cuda", "cudnn") == "flex"
    assert select_backend(256, torch.bfloat16, "cuda", "sdpa") == "sdpa"


def test_explicit_flex_on_cpu_runs_sdpa_and_says_so(monkeypatch):
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    q, k, v = rand_qkv(seed=4)
    out = attention(q, k, v, window=5, backend="flex", layer_idx=2)
    torch.testing.assert_close(out.double(), reference(q, k, v, 5), atol=FP32_ATOL, rtol=0)
    assert logged == ["attention: layer 2 window 5 -> sdpa (flex does not support this layer)"]


def test_explicit_unavailable_backend_names_the_reason():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    for name in ("fa3", "cudnn", "fa4"):
        with pytest.raises(BackendUnavailable, match=f"attention backend '{name}' unavailable: .+"):
            select_backend(None, torch.bfloat16, "cpu", name)
    with pytest.raises(BackendUnavailable, match="flash_attn_interface|CUDA"):
        attention(*rand_qkv(), window=None, backend="fa3")


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match="auto, fa3, fa4, cudnn, flex, sdpa"):
        attention(*rand_qkv(), window=None, backend="nope")


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        attention(*rand_qkv(), window=0)


def test_fa3_window_size_semantics():
    # flash-attn's (left, right): query i sees keys [i - left, i]; our window counts the query itself
    assert attn_mod.FA3Backend.window_size(None) == (-1, 0)
    assert attn_mod.FA3Backend.window_size(1) == (0, 0)
    assert attn_mod.FA3Backend.window_size(512) == (511, 0)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NANOCHAT_SLOW_TESTS"),
                    reason="compiles flex on the CPU (~30 s); set NANOCHAT_SLOW_TESTS=1")
def test_compiled_flex_on_cpu():
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = rand_qkv(1, 64, 2, 1, 16, seed=5)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    mask = attn_mod._flex_block_mask(64, 8, torch.device("cpu"))
    out = torch.compile(flex_attention)(qt, kt, vt, block_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out.double(), reference(q, k, v, 8), atol=FP32_ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 256, 64])
@pytest.mark.parametrize("T", [512, 80])
def test_cuda_backends_bf16(window, T):
    """T=80 with 4 query heads per kv head: inductor's flex-decoding template (queries < 128) has no valid
    config for it (BLOCK_M = next_pow2(80 * 4) > 128), so flex must take its main kernel there."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, T, 8, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(2, T, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(2, T, 2, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), window)
    for name, backend in ATTENTION_BACKENDS.items():
        if backend.is_available()[0] and backend.supports(window, q.dtype, q.device):
            out = backend.attend(q, k, v, window).cpu().double()
            assert (out - ref).abs().max() < 2e-2, name


def test_window_masks_are_cached_per_shape(monkeypatch):
    monkeypatch.setattr(attn_mod, "_SDPA_MASKS", {})
    cpu = torch.device("cpu")
    first = attn_mod._cached_window_mask(16, 4, cpu)
    assert attn_mod._cached_window_mask(16, 4, cpu) is first, "built once per (T, window, device)"
    assert attn_mod._cached_window_mask(16, 5, cpu) is not first
    assert torch.equal(first, causal_window_mask(16, 16, 4, cpu))


def _bench_attention():
    import importlib
    return importlib.import_module("benchmarks.bench_attention")


def test_bench_attention_bursts_rotate_inputs_with_one_untimed_lead_in():
    bench = _bench_attention()
    sets = [[torch.full((1, 2, 1, 1), float(i), requires_grad=True) for _ in range(3)] + [torch.ones(1, 2, 1, 1)]
            for i in range(3)]
    seen = []

    def fn(q, k, v):
        seen.append(int(q[0, 0, 0, 0]))
        return q * k * v

    ms = bench.time_calls(fn, sets, first=4, calls=5, device=torch.device("cpu"))
    assert ms >= 0 and seen == [0, 1, 2, 0, 1, 2], seen  # lead-in on set 3 % 3, then sets 4 .. 8 (mod 3)
    seen.clear()
    bench.time_calls(fn, sets, first=2, calls=1, device=torch.device("cpu"))
    assert seen == [2], "a synced single call has no lead-in"


def test_bench_attention_cpu_smoke(monkeypatch, capsys):
    """The benchmark's CPU mode runs end to end and reports both timings (back to back and synced)."""
    bench = _bench_attention()
    monkeypatch.setattr("sys.argv", ["bench_attention", "--device=cpu", "--batch=1", "--heads=2", "--seq_len=32",
                                     "--head_dim=8", "--window=8", "--warmup=1", "--repeats=2", "--burst=3",
                                     "--burst_rounds=2", "--input_sets=2", "--seed=1"])
    bench.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| layer ms synced | direct ms synced | overhead synced |" in "\n".join(lines)
    result = json.loads(lines[-1])
    assert result["all_correct"] and result["burst"] == 3 and [r["window"] for r in result["rows"]] == [None, 8]
    for row in result["rows"]:
        assert row["backend"] == "sdpa" and row["layer_ms"] > 0 and row["direct_ms_synced"] > 0
        assert "overhead_pct" in row and "overhead_pct_synced" in row

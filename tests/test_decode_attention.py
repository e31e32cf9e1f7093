"""The decode-attention kernel against a float64 softmax over each row's filled (windowed) positions: on
the CPU through Triton's interpreter (tests/conftest.py), on a GPU natively (there also at d20's shape)."""
import os

import pytest
import torch

pytest.importorskip("triton")
from nanochat.kernels.decode_attention import decode_attention, quantize_fp8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5   # relative to the reference's largest magnitude
BF16_TOL = 2e-2
FP8_TOL = 0.15    # fro_err against the exact cache; e4m3 keeps 3 mantissa bits (<= 6% per value): 4% median, 9% worst of 60 seeds


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator(device="cpu").manual_seed(seed)


def reference(q, k, v, lengths, window):
    """float64 softmax(q.k / sqrt(D)) v per row over positions [n - window, n) clipped to [0, n)."""
    S, H, D = q.shape
    G = H // k.size(1)
    out = torch.empty(S, H, D, dtype=torch.float64)
    for s in range(S):
        n = int(lengths[s])
        lo = max(0, n - window) if window else 0
        keys = k[s, :, lo:n].double().repeat_interleave(G, dim=0)      # [H, n - lo, D]
        values = v[s, :, lo:n].double().repeat_interleave(G, dim=0)
        scores = torch.einsum("hd,hld->hl", q[s].double(), keys) * D ** -0.5
        out[s] = torch.einsum("hl,hld->hd", scores.softmax(-1), values)
    return out


def make(S, H, Hkv, L, D, gen, dtype=torch.float32):
    q = torch.randn(S, H, D, generator=gen).to(DEVICE, dtype)
    k = (torch.randn(S, Hkv, L, D, generator=gen) * 2).to(DEVICE, dtype)  # scores of a few units: peaked rows
    v = torch.randn(S, Hkv, L, D, generator=gen).to(DEVICE, dtype)
    lengths = torch.randint(1, L + 1, (S,), generator=gen)
    lengths[0] = L  # one full row
    return q, k, v, lengths.to(DEVICE)


def rel_err(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max()).item()


def fro_err(got, want):
    return ((got.double().cpu() - want).norm() / want.norm()).item()


SMALL = (16, 4, 1)  # 16 positions per step: several blocks and chunks at these short lengths


@pytest.mark.parametrize("S,H,Hkv,L,D,window,splits,config", [
    (3, 2, 2, 70, 16, None, None, None),    # multi-head, the default split and config
    (2, 2, 2, 300, 16, 100, None, None),    # the default config over several of its 128-position blocks
    (2, 4, 2, 100, 32, None, 3, SMALL),     # grouped-query heads, chunks ending mid-block
    (4, 2, 1, 90, 16, 17, 4, SMALL),        # a sliding window shorter than most rows
    (1, 2, 2, 40, 16, None, 8, (8, 2, 2)),  # more chunks than a short row fills: empty chunks
    (2, 2, 2, 130, 16, 45, 1, SMALL),       # one chunk: many blocks, the window starting mid-block
])
@pytest.mark.parametrize("dot", [False, True])
def test_matches_float64_softmax(S, H, Hkv, L, D, window, splits, config, dot, gen):
    if dot and config is not None and config[0] < 16:
        config = SMALL  # a tl.dot needs 16 positions per step
    q, k, v, lengths = make(S, H, Hkv, L, D, gen)
    got = decode_attention(q, k, v, lengths, window=window, splits=splits, config=config, dot=dot)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_err(got, reference(q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), window)) <= FP32_TOL


def reference_lse(q, k, lengths, window):
    """float64 log-sum-exp of the scaled scores each row's softmax normalizes, [S, H]."""
    S, H, D = q.shape
    G = H // k.size(1)
    lse = torch.empty(S, H, dtype=torch.float64)
    for s in range(S):
        n = int(lengths[s])
        lo = max(0, n - window) if window else 0
        keys = k[s, :, lo:n].double().repeat_interleave(G, dim=0)
        lse[s] = (torch.einsum("hd,hld->hl", q[s].double(), keys) * D ** -0.5).logsumexp(-1)
    return lse


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_log_sum_exp_matches_float64(dot, fp8, gen):
    """return_lse: the log of each row's softmax denominator, what merging with other keys needs (with an
    fp8 cache: of the dequantized keys, which the reference is given)."""
    q, k, v, lengths = make(3, 4, 2, 100, 32, gen)
    window = 40
    if fp8:
        (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
        out, lse = decode_attention(q, kq, vq, lengths, window=window, k_scale=ks, v_scale=vs, splits=3,
                                    config=SMALL, dot=dot, return_lse=True)
        k = kq.float() * ks.unsqueeze(-1)
    else:
        out, lse = decode_attention(q, k, v, lengths, window=window, splits=3, config=SMALL, dot=dot,
                                    return_lse=True)
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32
    assert (lse.double().cpu() - reference_lse(q.cpu(), k.cpu(), lengths.cpu(), window)).abs().max() <= 1e-4


@pytest.mark.parametrize("dot", [False, True])
def test_ignores_positions_past_each_row(dot, gen):
    """What lies beyond a row's length (stale keys of an earlier request) must not change its output."""
    q, k, v, lengths = make(2, 2, 2, 64, 16, gen)
    lengths = torch.tensor([20, 33], device=DEVICE)
    a = decode_attention(q, k, v, lengths, splits=4, config=SMALL, dot=dot)
    k[0, :, 20:], v[1, :, 33:] = 1e4, -1e4
    torch.testing.assert_close(decode_attention(q, k, v, lengths, splits=4, config=SMALL, dot=dot), a, rtol=0, atol=0)
    # an fp8 cache: even NaN bit patterns in the stale values and scales stay out
    (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
    def fp8() -> torch.Tensor:
        return decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs, splits=4, config=SMALL, dot=dot)
    before = fp8()
    for x in (kq, vq, ks, vs):
        x[0, :, 20:], x[1, :, 33:] = float("nan"), float("nan")
    torch.testing.assert_close(fp8(), before, rtol=0, atol=0)


@pytest.mark.parametrize("dot", [False, True])
def test_fp8_cache_equals_its_dequantized_values(dot, gen):
    """An fp8 cache with per-vector scales: the same math as attending over the dequantized cache (the dot
    kernel takes fp32 q here, so its tiles go to an exact fp32 product too)."""
    q, k, v, lengths = make(2, 4, 2, 50, 16, gen)
    (kq, k_scale), (vq, v_scale) = quantize_fp8(k), quantize_fp8(v)
    got = decode_attention(q, kq, vq, lengths, window=30, k_scale=k_scale, v_scale=v_scale, splits=2, config=SMALL,
                           dot=dot)
    want = reference(q.cpu(), (kq.float() * k_scale[..., None]).cpu(), (vq.float() * v_scale[..., None]).cpu(),
                     lengths.cpu(), 30)
    assert rel_err(got, want) <= FP32_TOL
    assert fro_err(got, reference(q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), 30)) <= FP8_TOL


def test_dot_kernel_with_16_bit_operands(gen):
    """The tensor-core kernel's real operand path: a 16-bit q and cache (and fp8 tiles converted to it) go
    to tl.dot. fp16 here: Triton's CPU interpreter computes bf16 dots wrongly (the GPU test covers bf16)."""
    q, k, v, lengths = make(3, 4, 2, 300, 32, gen)
    want = reference(q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), 200)
    half = decode_attention(q.half(), k.half(), v.half(), lengths, window=200, dot=True)
    assert half.dtype == torch.float16 and rel_err(half, want) <= BF16_TOL
    (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
    for q16 in (q.half(), q.bfloat16()):  # an fp8 cache takes fp16 operands whatever q's dtype
        fp8 = decode_attention(q16, kq, vq, lengths, window=200, k_scale=ks, v_scale=vs, dot=True)
        assert fp8.dtype == q16.dtype and fro_err(fp8, want) <= FP8_TOL


def test_quantize_fp8_round_trip(gen):
    x = torch.randn(3, 5, 64, generator=gen) * torch.logspace(-3, 3, 5)[None, :, None]  # scales 1e-3..1e3
    values, scale = quantize_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == x.shape[:-1]
    back = values.float() * scale[..., None]
    assert ((back - x).abs() / x.abs().amax(-1, keepdim=True)).max() <= 2 ** -4  # half an e4m3 step at the top


@pytest.mark.skipif(DEVICE != "cuda", reason="d20's decode shape in bf16: GPU only (slow in the interpreter)")
@pytest.mark.parametrize("dot", [False, True])
def test_bf16_and_fp8_caches_on_the_gpu(dot, gen):
    q, k, v, lengths = make(8, 10, 10, 1280, 128, gen)
    want = reference(q.cpu(), k.cpu(), v.cpu(), lengths.cpu(), None)
    bf16 = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths, dot=dot)
    assert rel_err(bf16, want) <= BF16_TOL
    (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
    fp8 = decode_attention(q.bfloat16(), kq, vq, lengths, k_scale=ks, v_scale=vs, dot=dot)
    assert fro_err(fp8, want) <= FP8_TOL


def test_bad_arguments(gen):
    q, k, v, lengths = make(1, 2, 2, 32, 16, gen)
    with pytest.raises(ValueError, match="both"):
        decode_attention(q, k, v, lengths, k_scale=torch.ones(k.shape[:-1]))
    with pytest.raises(ValueError, match="power-of-two"):
        decode_attention(q[..., :12], k[..., :12], v[..., :12], lengths)
    with pytest.raises(ValueError, match="16 positions"):
        decode_attention(q, k, v, lengths, config=(8, 2, 1), dot=True)


def test_benchmark_script_runs_and_checks_every_row():
    """benchmarks/bench_decode_attention on tiny shapes (the interpreter on the CPU): every config row is
    timed and checked against the torch path, and the fastest passing one is named per cache dtype."""
    from benchmarks import bench_decode_attention
    result = bench_decode_attention.main([f"--device={DEVICE}", "--batches=2", "--heads=2", "--head_dim=16",
                                          "--max_seq_len=80", "--prompt=40", "--layers=2", "--repeats=1",
                                          "--configs=16/4/1,32/4/2/dot", "--splits=0,2", "--graph"])
    triton_rows = [r for r in result["rows"] if r["row"] != "torch"]
    assert len(triton_rows) == 2 * 2 * 2 and all(r.get("ok") for r in triton_rows)
    assert set(result["best"]) == {"2 bf16", "2 fp8"}

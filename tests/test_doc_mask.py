"""Document masking (--doc_mask): attention over a packed row stays within each document (documents start at BOS).

CPU: each backend that runs here (sdpa forward and backward, flex forward eager and compiled, fa4's custom ops
around a float64 stand-in for its kernels) equals attention run on each document alone (float64 reference, fresh
random inputs), with and without a window; a tiny GPT's logits on a packed row of three documents equal each
document's alone, and differ without doc_mask; auto's choice and the errors; the flag from base_train to GPTConfig
and through a checkpoint; the engine on one document. GPU (marked gpu): flex and fa4 against sdpa, forward and
backward, eager and compiled.
"""
import dataclasses
import os
import types

import pytest
import torch

from nanochat import runtime
from nanochat.kernels import attention as attn_mod
from nanochat.kernels.attention import ATTENTION_BACKENDS, Documents, attention, select_backend
from nanochat.model.gpt import GPTConfig
from tests.test_attention import reference
from tests.test_attention_fa4 import stand_in_interface
from tests.test_gpt import FEATURES, build, count_compiled_frames, tiny

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
BOS = 0
FP32_ATOL = 2e-5  # fp32 kernels vs the float64 reference, unit-variance inputs (as tests/test_attention.py)


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    monkeypatch.setattr(attn_mod, "_LOGGED", set())


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def packed_rows(rows: list[list[int]], vocab: int = 50, gen: torch.Generator | None = None,
                continued: tuple[int, ...] = ()) -> torch.Tensor:
    """idx [B, T]: row b is documents of the lengths rows[b], each BOS then random non-BOS tokens; a row in
    `continued` starts mid-document (its first document has no BOS: the rest of one from the row before)."""
    out = []
    for b, lengths in enumerate(rows):
        row = []
        for d, n in enumerate(lengths):
            body = torch.randint(1, vocab, (n,), generator=gen).tolist()
            row += body if d == 0 and b in continued else [BOS] + body[1:]
        out.append(row)
    return torch.tensor(out)


def segments(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document of one row: at each BOS, and at the row's start whatever its token."""
    starts = sorted({0, *(row == BOS).nonzero().flatten().tolist()})
    return list(zip(starts, starts[1:] + [row.numel()]))


def per_document(fn, idx: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors sliced to one document, batch 1) for every document of every row, put back in place."""
    out = None
    for b in range(idx.size(0)):
        for a, e in segments(idx[b]):
            y = fn(*(t[b:b + 1, a:e] for t in tensors))
            if out is None:
                out = y.new_zeros((idx.size(0), idx.size(1), *y.shape[2:]))
            out[b:b + 1, a:e] = y
    return out


ROWS = [[9, 1, 14, 8], [20, 12]]  # a one-token document; a row continuing a document (row 1, continued)


def qkv(seed: int, T: int = 32, H: int = 4, Hkv: int = 2, D: int = 16, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, T, H, D), (2, T, Hkv, D), (2, T, Hkv, D)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def test_documents_by_hand():
    idx = torch.tensor([[BOS, 5, 6, BOS, BOS, 7], [3, 4, BOS, 5, 6, 7]])
    docs = Documents(idx, BOS)
    assert docs.ids.tolist() == [[1, 1, 1, 2, 3, 3], [1, 1, 2, 2, 2, 2]] and docs.ids.dtype == torch.int32
    assert docs.cu_seqlens().tolist() == [0, 3, 4, 6, 8, 12]  # flat starts, then B * T
    assert docs.cu_seqlens().dtype == torch.int32
    mask = docs.mask(2)[1, 0].int()  # row 1, window 2: causal, one key back, not across position 2
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    built = []
    assert docs.derived("k", lambda: built.append(1) or "x") == "x" == docs.derived("k", lambda: built.append(2))
    assert built == [1], "derived structures are built once per Documents"


# ---- every backend that runs on the CPU, against each document attended alone ----

@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [None, 1, 5, 100])
@pytest.mark.parametrize("Hkv", [4, 1])
def test_backend_equals_each_document_alone(backend, window, Hkv):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    idx = packed_rows(ROWS, gen=g, continued=(1,))
    q, k, v = qkv(seed, Hkv=Hkv)
    out = ATTENTION_BACKENDS[backend].attend_docs(q, k, v, window, Documents(idx, BOS))
    want = per_document(lambda q, k, v: reference(q, k, v, window), idx, q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, atol=FP32_ATOL, rtol=0, msg=lambda m: f"seed {seed}: {m}")
    if window != 1:  # without documents the result differs (the test can fail); a window of 1 sees only itself
        assert (reference(q, k, v, window) - want).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_gradients_equal_each_document_alone(window):
    seed = fresh_seed()
    idx = packed_rows(ROWS, gen=torch.Generator().manual_seed(seed), continued=(1,))
    q, k, v = qkv(seed, Hkv=2, grad=True)
    g = torch.randn_like(q)
    (attention(q, k, v, window=window, docs=Documents(idx, BOS)) * g).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (per_document(lambda q, k, v: reference(q, k, v, window), idx, q64, k64, v64) * g.double()).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0, msg=lambda m: f"seed {seed}: {m}")


def test_compiled_flex_on_cpu_equals_each_document_alone():
    """The flex path traced into a compiled graph (BlockMask built in-graph, shared by two calls) on the CPU,
    forward only: flex has no CPU backward. A second batch of documents runs without recompiling."""
    flex = ATTENTION_BACKENDS["flex"]

    def two_layers(q, k, v, idx):
        docs = Documents(idx, BOS)
        return flex.attend_docs(q, k, v, 5, docs), flex.attend_docs(q, k, v, 5, docs)
    torch._dynamo.reset()
    compiled = torch.compile(two_layers, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (ROWS, [[3, 29], [7, 7, 18]]):
            seed = fresh_seed()
            idx = packed_rows(rows, gen=torch.Generator().manual_seed(seed))
            q, k, v = qkv(seed, Hkv=2)
            first, second = compiled(q, k, v, idx)
            want = per_document(lambda q, k, v: reference(q, k, v, 5), idx, q, k, v)
            for out in (first, second):
                torch.testing.assert_close(out.double(), want, atol=FP32_ATOL, rtol=0,
                                           msg=lambda m: f"seed {seed}: {m}")


# ---- fa4: its custom ops as variable-length sequences, around a float64 stand-in ----

def varlen_stand_in(calls: list):
    """interface._flash_attn_fwd/_bwd with cu_seqlens: each sequence through the dense float64 stand-in."""
    dense = stand_in_interface([])

    def split(cu):
        return list(zip(cu[:-1].tolist(), cu[1:].tolist()))

    def fwd(q, k, v, causal=False, window_size_left=None, window_size_right=None, return_lse=False,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        assert cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == max_seqlen_k
        calls.append(("fwd", window_size_left, tuple(cu_seqlens_q.tolist()), max_seqlen_q))
        parts = [dense._flash_attn_fwd(q[None, a:e], k[None, a:e], v[None, a:e], causal, window_size_left,
                                       window_size_right, return_lse)[:2] for a, e in split(cu_seqlens_q)]
        return torch.cat([o[0] for o, _ in parts]), torch.cat([lse[0] for _, lse in parts], dim=1), None, None, None

    def bwd(q, k, v, out, dout, lse, causal=False, window_size_left=None, window_size_right=None,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        calls.append(("bwd", window_size_left, tuple(cu_seqlens_q.tolist()), max_seqlen_q))
        grads = [dense._flash_attn_bwd(q[None, a:e], k[None, a:e], v[None, a:e], out[None, a:e], dout[None, a:e],
                                       lse[None, :, a:e], causal=causal, window_size_left=window_size_left,
                                       window_size_right=window_size_right) for a, e in split(cu_seqlens_q)]
        return tuple(torch.cat([g[i][0] for g in grads]) for i in range(3))

    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd)


@pytest.mark.parametrize("window", [None, 4, 32])
def test_fa4_documents_as_varlen_sequences_eager_and_compiled(monkeypatch, window):
    calls = []
    monkeypatch.setattr(attn_mod, "_FA4", varlen_stand_in(calls))
    fa4 = ATTENTION_BACKENDS["fa4"]
    seed = fresh_seed()
    idx = packed_rows(ROWS, gen=torch.Generator().manual_seed(seed), continued=(1,))
    q, k, v = qkv(seed, Hkv=2, dtype=torch.float64, grad=True)
    g = torch.randn_like(q)

    def two_layers(q, k, v, idx):  # cu_seqlens once per forward, for both layers
        docs = Documents(idx, BOS)
        return fa4.attend_docs(q, k, v, window, docs) + 2 * fa4.attend_docs(q, k, v, window, docs)

    def run(fn):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, idx)
        out.backward(g)
        return [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want_out = 3 * per_document(lambda q, k, v: reference(q, k, v, window), idx, q64, k64, v64)
    want_out.backward(g)
    want = [want_out.detach(), q64.grad, k64.grad, v64.grad]
    eager = run(two_layers)
    cu = tuple(Documents(idx, BOS).cu_seqlens().tolist())
    left = None if window is None or window >= 32 else window - 1
    assert calls == [("fwd", left, cu, 32)] * 2 + [("bwd", left, cu, 32)] * 2
    torch._dynamo.reset()
    compiled = run(torch.compile(two_layers, fullgraph=True, backend="aot_eager"))
    for got in (eager, compiled):
        for x, ref in zip(got, want):
            torch.testing.assert_close(x, ref, atol=1e-10, rtol=0, msg=lambda m: f"seed {seed}: {m}")


def test_fa4_varlen_ops_pass_opcheck(monkeypatch):
    monkeypatch.setattr(attn_mod, "_FA4", varlen_stand_in([]))
    idx = packed_rows([[5, 11], [16]], gen=torch.Generator().manual_seed(0))
    cu = Documents(idx, BOS).cu_seqlens()
    q, k, v = (t.flatten(0, 1) for t in qkv(1, T=16, Hkv=1, dtype=torch.float64, grad=True))
    torch.library.opcheck(torch.ops.nanochat.cu_seqlens, (Documents(idx, BOS).starts,))
    torch.library.opcheck(torch.ops.nanochat.fa4_forward, (q, k, v, 3, cu, 16))
    out, lse = torch.ops.nanochat.fa4_forward(q, k, v, 3, cu, 16)
    assert out.shape == q.shape and lse.shape == (4, 32)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), 3, cu, 16)
    torch.library.opcheck(torch.ops.nanochat.fa4_backward, args)


# ---- auto's choice, the log line, the errors ----

def fake_available(monkeypatch, names):
    for name, backend in ATTENTION_BACKENDS.items():
        ok = (True, "ok") if name in names else (False, "faked unavailable")
        monkeypatch.setattr(backend, "is_available", lambda ok=ok: ok)


def test_auto_skips_backends_that_cannot_mask_documents(monkeypatch):
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    fake_available(monkeypatch, set(ATTENTION_BACKENDS))
    assert select_backend(None, bf16, cuda) == "fa3" and select_backend(None, bf16, cuda, doc_mask=True) == "fa4"
    assert select_backend(512, bf16, cuda, doc_mask=True) == "fa4"
    assert select_backend(512, bf16, cuda, "flex", doc_mask=True) == "flex"  # named: kept
    assert select_backend(None, torch.float32, cuda, doc_mask=True) == "flex"
    assert select_backend(None, bf16, torch.device("cpu"), doc_mask=True) == "sdpa"
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"fa3", "cudnn", "flex", "sdpa"})
    assert select_backend(None, bf16, cuda) == "fa3" and select_backend(None, bf16, cuda, doc_mask=True) == "flex"
    assert select_backend(None, bf16, cuda, "flex", doc_mask=True) == "flex"
    assert select_backend(None, bf16, torch.device("cpu"), "flex", doc_mask=True) == "sdpa"  # flex: CUDA only


def test_auto_masks_documents_with_sdpa_outside_a_compiled_graph(monkeypatch):
    """Outside a compiled graph (evaluation, fine-tuning: a new row length every batch) auto takes sdpa's explicit
    mask, not flex, which would compile per shape; fa4 (no compile per shape) and a named flex or fa3 are unaffected."""
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"fa3", "cudnn", "flex", "sdpa"})
    assert select_backend(None, bf16, cuda, doc_mask=True, compiled=False) == "sdpa"
    assert select_backend(512, bf16, cuda, doc_mask=True, compiled=False) == "sdpa"
    assert select_backend(512, bf16, cuda, doc_mask=True, compiled=True) == "flex"
    assert select_backend(None, bf16, cuda, "flex", doc_mask=True, compiled=False) == "flex"  # named: kept
    assert select_backend(512, bf16, cuda, compiled=False) == select_backend(512, bf16, cuda) == "fa3"  # no documents
    fake_available(monkeypatch, set(ATTENTION_BACKENDS))
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    assert select_backend(None, bf16, cuda, doc_mask=True, compiled=False) == "fa4"  # varlen: no per-shape compile
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"flex", "sdpa"})
    monkeypatch.setattr(attn_mod, "_LOGGED", set())
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    assert attn_mod._layer_backend("auto", None, bf16, "cuda", 3, True, False) == "sdpa"
    assert attn_mod._layer_backend("auto", None, bf16, "cuda", 4, True, True) == "flex"
    assert logged == ["attention: layer 3 window full -> sdpa, masked per document (outside a compiled graph; "
                      "flex inside one)", "attention: layer 4 window full -> flex, masked per document"]


def test_layer_backends_are_the_picks_of_each_distinct_window(monkeypatch):
    """What base_train (flex in the graph or not) and profile_kernels (the kernels to expect) ask of a model."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(attn_mod, "_CHOICES", {})
    fake_available(monkeypatch, {"fa3", "cudnn", "flex", "sdpa"})
    windows = [512, 512, None]
    assert attn_mod.layer_backends(windows, cuda) == {"fa3"}
    assert attn_mod.layer_backends(windows, cuda, doc_mask=True) == {"flex"}
    assert attn_mod.layer_backends(windows, cuda, doc_mask=True, compiled=False) == {"sdpa"}
    assert attn_mod.layer_backends(windows, cuda, "cudnn") == {"cudnn", "fa3"}  # cudnn has no window: auto's pick


@pytest.mark.parametrize("name", ["cudnn", "fa3"])
def test_naming_a_backend_without_document_masking_is_an_error(monkeypatch, name):
    fake_available(monkeypatch, set(ATTENTION_BACKENDS))
    fix = f"'{name}' cannot mask documents .*Use --attn auto or one of fa4, flex, sdpa, or --doc_mask false"
    with pytest.raises(ValueError, match=fix):
        select_backend(None, torch.bfloat16, "cuda", name, doc_mask=True)
    with pytest.raises(ValueError, match=fix):
        tiny(doc_mask=True, bos_id=BOS, attn_backend=name)
    assert select_backend(None, torch.bfloat16, "cuda", name) == name  # without documents it serves


def test_doc_mask_needs_a_bos_id():
    for bad in (None, -1, 300):
        with pytest.raises(ValueError, match=r"doc_mask needs bos_id.*tokenizer.get_bos_token_id\(\)"):
            tiny(doc_mask=True, bos_id=bad)
    assert tiny(bos_id=None).doc_mask is False  # no doc_mask: no BOS needed


def test_the_log_says_which_backend_masks_documents(monkeypatch):
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    idx = packed_rows(ROWS)
    q, k, v = qkv(0)
    for _ in range(2):
        attention(q, k, v, window=7, layer_idx=1, docs=Documents(idx, BOS))
    assert logged == ["attention: layer 1 window 7 -> sdpa, masked per document"]


def test_kv_cache_path_refuses_documents():
    q, k, v = qkv(0)
    cache = types.SimpleNamespace(k=torch.zeros(1, 2, 64, 2, 16), v=torch.zeros(1, 2, 64, 2, 16), pos=0)
    with pytest.raises(ValueError, match="not the KV-cache path"):
        attention(q, k, v, window=None, kv_cache=cache, docs=Documents(packed_rows(ROWS), BOS))


# ---- the model ----

DOCS = [9, 1, 13, 9]  # one row of 32: four documents, a one-token one among them


@pytest.mark.parametrize("window_pattern", ["L", "SL"])
def test_gpt_packed_row_equals_each_document_alone(window_pattern):
    """Every architecture option on (the smear included: it must not reach over a BOS either). Logits of the
    packed row equal each document's run alone up to fp32 rounding: a document's positions are shifted, and
    rotary attention sees only relative positions."""
    cfg = tiny(**FEATURES, window_pattern=window_pattern, short_window=4, doc_mask=True, bos_id=BOS)
    model = build(cfg)
    seed = fresh_seed()
    idx = packed_rows([DOCS, [14, 18]], vocab=cfg.vocab_size, gen=torch.Generator().manual_seed(seed),
                      continued=(1,))
    with torch.no_grad():
        packed = model(idx)
        alone = per_document(model, idx, idx)
        unmasked = build(dataclasses.replace(cfg, doc_mask=False))(idx)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0, msg=lambda m: f"seed {seed}: {m}")
    first = slice(0, DOCS[0])  # the first document sees nothing before it either way
    torch.testing.assert_close(unmasked[0, first], alone[0, first], atol=1e-5, rtol=0)
    assert (unmasked[0, DOCS[0]:] - alone[0, DOCS[0]:]).abs().max() > 1e-2, "doc_mask=False must differ"


def test_gpt_loss_and_gradients_equal_the_documents_alone():
    cfg = tiny(**FEATURES, window_pattern="SL", short_window=4, doc_mask=True, bos_id=BOS)
    model = build(cfg).train()
    idx = packed_rows([DOCS], vocab=cfg.vocab_size, gen=torch.Generator().manual_seed(fresh_seed()))
    targets = torch.roll(idx, -1, 1)
    targets[0, -1] = -1
    model(idx, targets, loss_reduction="sum").backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for a, e in segments(idx[0]):
        model(idx[:, a:e], targets[:, a:e], loss_reduction="sum").backward()
    for got, want in zip(packed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_compiled_gpt_with_documents_is_one_graph_and_equals_eager():
    """torch.compile(fullgraph=True) of the model's forward and backward with documents (sdpa on the CPU;
    aot_eager: Dynamo and AOTAutograd, not Inductor's codegen). Documents change each batch: no recompile."""
    cfg = tiny(**FEATURES, window_pattern="SL", short_window=4, doc_mask=True, bos_id=BOS)
    model = build(cfg).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in ([DOCS], [[4, 20, 8]]):
            idx = packed_rows(rows, vocab=cfg.vocab_size, gen=torch.Generator().manual_seed(fresh_seed()))
            for fn in (model, compiled):
                model.zero_grad()
                fn(idx, torch.roll(idx, -1, 1)).backward()
                if fn is model:
                    want = [p.grad.clone() for p in model.parameters()]
            for got, ref in zip((p.grad for p in model.parameters()), want):
                torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_compile_model_keeps_fa4_documents_in_one_graph(monkeypatch):
    """The training path (runtime.compile_model, no fullgraph) with fa4's documents: the offsets' data-dependent
    length is captured, so the whole model is one frame, not a graph break in every layer (S20: each block then
    compiled on its own, past the recompile limit, and the step ran at 0.67x). Equal to eager."""
    monkeypatch.setattr(attn_mod, "_FA4", varlen_stand_in([]))
    monkeypatch.setattr(ATTENTION_BACKENDS["fa4"], "is_available", lambda: (True, "ok"))
    monkeypatch.setattr(type(ATTENTION_BACKENDS["fa4"]), "supports", lambda self, *args, **kwargs: True)
    counter = count_compiled_frames(monkeypatch, "aot_eager")
    model = build(tiny(n_layer=4, doc_mask=True, bos_id=BOS, attn_backend="fa4")).double().train()
    idx = packed_rows([DOCS], vocab=model.config.vocab_size, gen=torch.Generator().manual_seed(fresh_seed()))
    losses = []
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):  # the default; compile_model sets it
        compiled = runtime.compile_model(model)
        for fn in (model, compiled):
            model.zero_grad()
            losses.append(fn(idx, torch.roll(idx, -1, 1)))
            losses[-1].backward()
            if fn is model:
                want = [p.grad.clone() for p in model.parameters()]
    assert counter.frame_count == 1, f"{counter.frame_count} frames: a graph break"
    torch.testing.assert_close(losses[1], losses[0], atol=1e-10, rtol=0)
    for got, ref in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)


def test_engine_equals_the_masked_forward_on_one_document():
    """The KV-cache paths ignore documents (one conversation per row): on a prompt that is one document (a BOS
    only at its start), greedy decoding equals the doc-masked model's full forward, the engine's stop tokens (BOS,
    <|assistant_end|>) stopping both."""
    from nanochat.inference.engine import Engine
    from tests.helpers_chat import naive_generate, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    bos = tok.get_bos_token_id()
    model = tiny_model(window_pattern="SL", doc_mask=True, bos_id=bos)
    engine = Engine(model, tok)
    for text in ("The quick brown fox", "To be, or not to be: that is the question"):
        prompt = tok.encode(text, prepend="<|bos|>")
        with torch.inference_mode():
            out, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=24, temperature=0)
        want = naive_generate(model, prompt, max_tokens=24, stop_ids=engine.tools.stop_ids)
        assert out[0][:len(want)] == want


# ---- the flag: base_train -> BuildConfig -> GPTConfig -> checkpoint ----

def test_flag_parses_and_reaches_the_model_config():
    from nanochat.build import BuildConfig, build as build_model
    from nanochat.flags import parse_flags
    from scripts.base_train import TrainConfig

    argv = ["--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64", "--compile=false"]
    assert parse_flags(TrainConfig, [*argv, "--doc-mask", "false"]).doc_mask is False
    cfg = parse_flags(TrainConfig, argv)
    assert cfg.doc_mask is True  # the default since it won the race
    assert cfg.model_config(256, bos_id=7).doc_mask and cfg.model_config(256, bos_id=7).bos_id == 7
    assert cfg.model_config(256, recipe=False, bos_id=7).doc_mask  # the plain block keeps it too
    model = build_model(cfg, torch.device("cpu"), 256, bos_id=7).model
    assert model.config.doc_mask and model.config.bos_id == 7
    with pytest.raises(ValueError, match="doc_mask needs bos_id"):
        build_model(parse_flags(BuildConfig, [*argv, "--doc_mask=true"]), torch.device("cpu"), 256)


def test_checkpoint_config_round_trips_and_older_ones_load_without_doc_mask():
    from nanochat.checkpoint import build_model
    from nanochat.export.hf import check_exportable

    cfg = tiny(**FEATURES, doc_mask=True, bos_id=BOS)
    model = build(cfg)
    saved = dataclasses.asdict(cfg)
    loaded = build_model(saved, model.state_dict())
    assert loaded.config == dataclasses.replace(cfg, attn_backend="auto", recompute="none")
    older = {k: v for k, v in saved.items() if k not in ("doc_mask", "bos_id")}  # saved before the flag existed
    old = build_model(older, model.state_dict())
    assert old.config.doc_mask is False and old.config.bos_id is None
    check_exportable(saved)  # run-only: one document, as the exported model runs, is the same with or without


def test_base_train_with_doc_mask_saves_it_with_the_tokenizers_bos(tmp_path, monkeypatch):
    from helpers_base_train import isolate, make_assets, tiny_flags

    from nanochat.checkpoint import load_model
    from nanochat.tokenizer import Tokenizer
    from scripts import base_train

    tok_dir, data_dir = make_assets(tmp_path / "assets")
    isolate(monkeypatch, tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_REPORT_DIR", str(tmp_path / "report"))
    logged = []
    monkeypatch.setattr(attn_mod, "log0", logged.append)
    base_train.main(tiny_flags(tok_dir, data_dir, num_iterations=2, save_every=-1, doc_mask="true"))
    assert "attention: layer 1 window full -> sdpa, masked per document" in logged
    model, _, meta = load_model("base", model_dir=tmp_path / "base" / "checkpoints" / "base" / "d2")
    bos = Tokenizer.load(tok_dir).get_bos_token_id()
    assert model.config.doc_mask and model.config.bos_id == bos == meta["model_config"]["bos_id"]


# ---- the GPU: flex and fa4 against sdpa, forward and backward ----

def gpu_case(seed: int, B=4, T=1024, H=8, Hkv=2, D=128):
    """bf16 q, k, v, grad [B, T, ...] and packed rows of random documents (mean ~200 tokens, a 1-token one)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, H, D)]
    tensors = [torch.randn(s, device="cuda", generator=g).bfloat16() for s in shapes]
    starts = torch.rand(B, T, device="cuda", generator=g) < 1 / 200
    starts[:, :2] = True
    idx = torch.where(starts, BOS, 1)
    idx[1, 0] = 5  # row 1 continues a document
    return tensors, idx


def run_backend(name, window, q, k, v, g, idx, fn=None):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    call = fn or (lambda q, k, v, idx: attention(q, k, v, window=window, backend=name, docs=Documents(idx, BOS)))
    out = call(*leaves, idx)
    out.backward(g)
    return [out.detach().double(), *(t.grad.double() for t in leaves)]


def rel(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


BF16_REL = 1e-2  # bf16 inputs and outputs vs an fp32-accumulating reference: ~4e-3 typical (tests/test_attention_fa4.py)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["flex", "fa4"])
@pytest.mark.parametrize("window", [None, 1, 300])
def test_gpu_backend_matches_sdpa_with_documents(name, window):
    ok, reason = ATTENTION_BACKENDS[name].is_available()
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")
    (q, k, v, g), idx = gpu_case(seed=fresh_seed())
    want = run_backend("sdpa", window, *(t.float() for t in (q, k, v, g)), idx)  # the fp32 reference
    got = run_backend(name, window, q, k, v, g, idx)
    # window 1: one key per softmax, so dq and dk are 0 up to the reference's own rounding (norms ~1e-7 of the
    # upstream gradient's): such a gradient is checked against the upstream gradient's scale instead
    scale = g.double().norm()
    errors = [rel(x, r) if r.norm() > 1e-3 * scale else ((x - r).norm() / scale).item() for x, r in zip(got, want)]
    assert max(errors) < BF16_REL, errors
    if window != 1:  # a window of 1 sees only the query's own key, documents or not
        plain = attention(q, k, v, window=window, backend="sdpa").double()
        assert rel(plain, want[0]) > 10 * BF16_REL, "documents must change the result (the test can fail)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["flex", "fa4"])
def test_gpu_compiled_backend_matches_eager_with_documents(name):
    """One compiled graph (fullgraph) over two layers sharing the documents' structures; new documents in the
    next batch do not recompile."""
    ok, reason = ATTENTION_BACKENDS[name].is_available()
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")

    def two_layers(q, k, v, idx):
        docs = Documents(idx, BOS)
        return attention(q, k, v, window=256, backend=name, docs=docs) + attention(q, k, v, window=None, backend=name,
                                                                                  docs=docs)
    cases = [gpu_case(fresh_seed()) for _ in range(2)]
    eager = [run_backend(name, None, q, k, v, g, idx, fn=two_layers) for (q, k, v, g), idx in cases]
    torch._dynamo.reset()  # eager flex compiles flex_attention once per window: those are not the recompiles asked
    compiled = torch.compile(two_layers, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ((q, k, v, g), idx), want in zip(cases, eager):
            got = run_backend(name, None, q, k, v, g, idx, fn=compiled)
            assert max(rel(x, r) for x, r in zip(got, want)) < 5e-3  # equal up to summation order


def gpu_doc_model(**kw) -> torch.nn.Module:
    """The GPU tests' small doc-masked GPT (SSSL, GQA 4:1, vocab 512) on CUDA, in training mode."""
    cfg = GPTConfig(sequence_len=1024, vocab_size=512, n_layer=4, n_head=4, n_kv_head=1, n_embd=512, head_dim=128,
                    window_pattern="SSSL", short_window=256, smear=True, doc_mask=True, bos_id=BOS, **kw)
    return build(cfg).cuda().train()


def gpu_tokens(seed: int) -> torch.Tensor:
    """gpu_case's packed rows [4, 1024] with random tokens (vocab 512) between the BOS tokens."""
    _, idx = gpu_case(seed)
    return torch.where(idx == BOS, BOS, torch.randint(1, 512, idx.shape, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_model_step_with_documents_matches_sdpa():
    """A small GPT (SSSL, GQA 4:1) with doc_mask: the backend auto picks in a compiled graph (fa4, or flex where FA4
    is missing) gives sdpa's loss and gradients in a bf16 training step."""
    from tests.test_gpt import loss_and_grads
    chosen = select_backend(256, torch.bfloat16, torch.device("cuda"), doc_mask=True)
    assert chosen in ("fa4", "flex"), chosen
    model = gpu_doc_model()
    idx = gpu_tokens(fresh_seed())
    tgt = torch.roll(idx, -1, 1)
    loss_auto, grads_auto = loss_and_grads(model, idx, tgt, chosen)  # named: auto in eager would take sdpa
    loss_sdpa, grads_sdpa = loss_and_grads(model, idx, tgt, "sdpa")
    assert abs(loss_auto - loss_sdpa) < 1e-2 * abs(loss_sdpa)
    assert (grads_auto - grads_sdpa).norm() < 3e-2 * grads_sdpa.norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["flex", "fa4"])
def test_gpu_compile_model_with_documents_has_no_graph_break(name):
    """A compiled training step (runtime.compile_model, Inductor: base_train's path) of a doc-masked model on each
    backend that masks documents adds no graph break; two batches of other documents, no recompile."""
    ok, reason = ATTENTION_BACKENDS[name].is_available()
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")
    model = gpu_doc_model(attn_backend=name)
    torch._dynamo.reset()
    compiled = runtime.compile_model(model)
    before = sum(runtime.graph_breaks().values())
    for seed in (fresh_seed(), fresh_seed()):
        idx = gpu_tokens(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16), torch._dynamo.config.patch(error_on_recompile=True):
            compiled(idx, torch.roll(idx, -1, 1)).backward()
    assert sum(runtime.graph_breaks().values()) == before, runtime.graph_breaks()


# ---- benchmarks/bench_attention.py --doc_len ----

def test_bench_attention_times_document_masked_rows_on_cpu(monkeypatch, capsys):
    """The benchmark's CPU smoke run with documents: sdpa's document rows are checked against the benchmark's
    own reference (documents masked there too) and timed with the masks reused, built fresh, and direct."""
    import importlib
    import json
    bench = importlib.import_module("benchmarks.bench_attention")
    monkeypatch.setattr("sys.argv", ["bench_attention", "--device=cpu", "--batch=2", "--heads=2", "--seq_len=64",
                                     "--head_dim=8", "--window=16", "--warmup=1", "--repeats=2", "--burst=2",
                                     "--burst_rounds=2", "--input_sets=2", "--seed=3", "--doc_len=12"])
    bench.main()
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    docs = [r for r in result["rows"] if r.get("docs")]
    assert result["all_correct"] and result["doc_len"] == 12 and result["docs_per_row"] > 2
    assert [(r["backend"], r["window"]) for r in docs] == [("sdpa", None), ("sdpa", 16)]
    assert all(r["layer_ms"] > 0 and r["fresh_ms"] > 0 and r["direct_ms_synced"] > 0 for r in docs)
    assert "| sdpa | 16 docs |" in out and "docs: sdpa window 16: " in out


def test_bench_attention_reference_masks_documents():
    import importlib
    bench = importlib.import_module("benchmarks.bench_attention")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    idx = packed_rows(ROWS, gen=g, continued=(1,))
    q, k, v, grad = (torch.randn(2, 32, 2, 8, generator=g) for _ in range(4))
    got = bench.reference([q, k, v, grad], 5, 1, Documents(idx, BOS).ids)[0]
    want = per_document(lambda q, k, v: reference(q, k, v, 5), idx, q, k, v)
    torch.testing.assert_close(got.double(), want, atol=FP32_ATOL, rtol=0, msg=lambda m: f"seed {seed}: {m}")


def test_gpu_script_docs_part_commands_parse(tmp_path):
    from tests.test_runs import check_commands, record_commands
    commands = record_commands(tmp_path, "benchmarks/fa4_gpu.sh", {"OUT": str(tmp_path / "out"),
                                                                   "FA4_SITE": str(tmp_path / "site")}, ("docs",))
    assert check_commands(commands) == {"pytest", "benchmarks.bench_attention"}
    assert ["tests/test_doc_mask.py"] == [a for c in commands for a in c if a.endswith(".py")]
    assert any("--doc_len=512" in c for c in commands)

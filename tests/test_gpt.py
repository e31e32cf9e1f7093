"""The GPT on the CPU in fp32: shapes, loss, causality, padding, windows, KV cache, FLOPs, groups."""
import math

import pytest
import torch
import torch.nn.functional as F

import nanochat.model.gpt as gpt_mod
from nanochat.model.gpt import GPT, GPTConfig, KVCache, config_from_depth

V, T = 300, 32
# every architecture option on at once (init-only options too): the tests below run with it
FEATURES = dict(value_embeds=True, value_embed_gate="input", smear=True, backout=True, qk_scale=1.2,
                rope_base=100_000.0, unet_skips=True, attn_gate=True, bigram_embeds=True, init_ramp=True,
                c_fc_init_scale=0.4, embedding_init_std=0.8)


def tiny(**kw) -> GPTConfig:
    base = dict(sequence_len=T, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=32)
    return GPTConfig(**{**base, **kw})


def build(cfg: GPTConfig, seed: int = 0, perturb: bool = True) -> GPT:
    """Meta build + init, then (perturb) random output projections and scalars: at init those are
    zero/one, which would hide bugs in the attention and MLP paths behind an identity network."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.c_proj.weight.normal_(std=0.05)
                block.mlp.c_proj.weight.normal_(std=0.02)
                if block.attn.ve_gate is not None:
                    block.attn.ve_gate.uniform_(0.5, 1.5)
                if block.attn.ve_gate_linear is not None:
                    block.attn.ve_gate_linear.weight.normal_(std=0.5)
                if block.attn.attn_gate_linear is not None:  # zero at init: every gate 0.5
                    block.attn.attn_gate_linear.weight.normal_(std=0.5)
            for name in ("smear_lambda", "backout_lambda", "skip_lambdas", "bigram_lambdas"):  # zero or small at init
                if hasattr(model, name):
                    getattr(model, name).uniform_(0.3, 0.8)
            if hasattr(model, "smear_gate"):
                model.smear_gate.weight.normal_(std=0.5)
            if hasattr(model, "bigram_embed"):  # zero at init
                model.bigram_embed.weight.normal_(std=0.5)
            model.lm_head.weight.normal_(std=0.05)
            model.x0_lambdas.uniform_(0.1, 0.5)
            model.resid_lambdas.uniform_(0.8, 1.2)
    return model.eval()


def tokens(B=2, T_=T, seed=1):
    return torch.randint(0, V, (B, T_), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_reductions():
    model = build(tiny(value_embeds=True, window_pattern="SL", short_window=8))
    idx, tgt = tokens(), tokens(seed=2)
    logits = model(idx)
    assert logits.shape == (2, T, V) and logits.dtype == torch.float32
    assert model(idx, tgt).shape == ()
    assert model(idx, tgt, loss_reduction="none").shape == (2, T)
    assert model.config.padded_vocab_size == 320 and model.lm_head.weight.shape == (320, 64)


def test_loss_equals_manual_cross_entropy_on_softcapped_logits():
    cfg = tiny(window_pattern="SL", short_window=8)
    model = build(cfg)
    idx, tgt = tokens(), tokens(seed=2)
    tgt[0, :5] = -1
    logits = model(idx)
    assert logits.abs().max() <= cfg.softcap
    raw = F.linear(gpt_mod.norm(model_hidden(model, idx)), model.lm_head.weight[:V])
    torch.testing.assert_close(logits, cfg.softcap * torch.tanh(raw / cfg.softcap), atol=1e-5, rtol=0)
    manual = F.cross_entropy(logits.view(-1, V), tgt.view(-1), ignore_index=-1)
    assert abs(model(idx, tgt).item() - manual.item()) < 1e-5
    per_token = model(idx, tgt, loss_reduction="none")
    assert (per_token[0, :5] == 0).all()
    assert abs(per_token.sum().item() - model(idx, tgt, loss_reduction="sum").item()) < 1e-3


def model_hidden(model: GPT, idx):
    """The residual stream before the final norm, by hooking the last block."""
    out = {}
    handle = model.blocks[-1].register_forward_hook(lambda m, i, o: out.setdefault("h", o))
    model(idx)
    handle.remove()
    return out["h"]


@pytest.mark.parametrize("pattern,features", [("L", {}), ("SL", {"value_embeds": True}), ("SL", FEATURES)])
def test_causality(pattern, features):
    model = build(tiny(window_pattern=pattern, short_window=5, **features))
    idx = tokens()
    base = model(idx)
    for t in (0, 10, T - 2):
        changed = idx.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 17) % V
        out = model(changed)
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], atol=1e-6, rtol=0)
        assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-3  # the change does reach later positions


def test_padded_vocab_rows_never_count():
    model = build(tiny(value_embeds=True))
    idx, tgt = tokens(), tokens(seed=2)
    logits, loss = model(idx), model(idx, tgt)
    with torch.no_grad():
        model.lm_head.weight[V:] = float("nan")
        model.wte.weight[V:] = float("nan")
        for table in model.value_embeds.values():
            table.weight[V:] = float("nan")
    assert torch.equal(model(idx), logits)
    assert torch.equal(model(idx, tgt), loss)


def reference_attention(q, k, v, *, window, backend="auto", kv_cache=None, layer_idx=0):
    """Explicit-mask softmax attention in float64 (no backend involved)."""
    Tq, H, D = q.size(1), q.size(2), q.size(3)
    g = H // k.size(2)
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    scores = torch.einsum("bihd,bjhd->bhij", qd, kd) / math.sqrt(D)
    i, j = torch.arange(Tq).view(-1, 1), torch.arange(Tq).view(1, -1)
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    return torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed, -math.inf).softmax(-1), vd).to(q.dtype)


def test_sliding_window_model_equals_explicit_mask_reference(monkeypatch):
    cfg = tiny(n_layer=3, window_pattern="S", short_window=6, value_embeds=True)
    assert cfg.layer_windows() == [6, 6, None]
    model = build(cfg)
    idx = tokens()
    out = model(idx)
    monkeypatch.setattr(gpt_mod, "attention", reference_attention)
    torch.testing.assert_close(out, model(idx), atol=1e-5, rtol=0)
    full = build(tiny(n_layer=3, window_pattern="L", value_embeds=True))  # same seed -> same weights
    assert (full(idx) - out).abs().max() > 1e-3  # the window changes the result


def test_layer_windows_cycle_and_last_is_full():
    cfg = tiny(n_layer=6, window_pattern="SSSL", sequence_len=64)
    assert cfg.layer_windows() == [32, 32, 32, None, 32, None]
    assert tiny(n_layer=3, window_pattern="SL", short_window=4).layer_windows() == [4, None, None]


@pytest.mark.parametrize("pattern,n_kv_head,features", [("L", 4, {}), ("SL", 2, {"value_embeds": True}),
                                                       ("SSL", 1, {"value_embeds": True}), ("SL", 2, FEATURES)])
def test_kv_cache_decoding_equals_full_forward(pattern, n_kv_head, features):
    cfg = tiny(n_layer=3, window_pattern=pattern, short_window=5, n_kv_head=n_kv_head, **features)
    model = build(cfg)
    idx = tokens(T_=24)
    full = model(idx)
    cache = KVCache(2, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, max_seq_len=40, device="cpu", dtype=torch.float32)
    steps = [model(idx[:, :10], kv_cache=cache)]
    assert cache.pos == 10
    for t in range(10, 24):
        steps.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(model(idx[:, :7], kv_cache=cache), full[:, :7], atol=1e-4, rtol=0)


def test_estimate_flops_hand_count():
    cfg = tiny(n_head=2, n_kv_head=1, window_pattern="SL", short_window=8, value_embeds=True)
    model = build(cfg, perturb=False)
    # per layer: c_q 64x64, c_k 64x32, c_v 64x32, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64
    per_layer = 4096 + 2048 + 2048 + 4096 + 16384 + 16384
    matmul = 2 * per_layer + V * 64  # lm_head: the 300 real rows; embeddings and scalars excluded
    attn = 12 * 2 * 32 * (8 + T)     # layer 0: window 8, layer 1: full (sequence_len)
    assert model.estimate_flops() == 6 * matmul + attn == 686592
    # a window longer than the sequence counts as the sequence
    assert build(tiny(window_pattern="SL", short_window=1000), perturb=False).estimate_flops() == \
        build(tiny(window_pattern="L"), perturb=False).estimate_flops()


@pytest.mark.parametrize("features", [{}, {"value_embeds": True}, FEATURES])
def test_param_groups_partition_parameters(features):
    model = build(tiny(n_layer=3, **features), perturb=False)
    groups = model.param_groups()
    assert set(groups) == {"matrix", "embedding", "value_embed", "bigram_embed", "lm_head", "resid", "x0", "scalar"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups.values() for p in g) == model.num_params()
    ve, gated = features.get("value_embeds", False), features.get("value_embed_gate") == "input"
    attn_gates = [b.attn.attn_gate_linear.weight for b in model.blocks if b.attn.attn_gate_linear is not None]
    assert len(attn_gates) == (3 if features.get("attn_gate") else 0)
    assert all(p.ndim == 2 for p in groups["matrix"]) and \
        len(groups["matrix"]) == 3 * 6 + (2 if gated else 0) + len(attn_gates)
    assert {id(p) for p in attn_gates} <= {id(p) for p in groups["matrix"]}  # Muon, like the value-embed gate
    assert groups["lm_head"] == [model.lm_head.weight] and groups["embedding"] == [model.wte.weight]
    assert len(groups["value_embed"]) == (2 if ve else 0)  # layers 0 and 2 of 3 carry value embeds
    assert groups["resid"] == [model.resid_lambdas]
    bigram = features.get("bigram_embeds", False)  # the table alone in its group; its lambdas beside x0's
    assert groups["bigram_embed"] == ([model.bigram_embed.weight] if bigram else [])
    assert groups["x0"] == [model.x0_lambdas, *([model.bigram_lambdas] if bigram else [])]
    # scalar value-embed gates; or smear's lambda and gate, backout's lambda, the skip lambdas
    assert len(groups["scalar"]) == (4 if features is FEATURES else 2 if ve else 0)


def test_meta_build_init_is_finite_and_as_documented():
    cfg = tiny(value_embeds=True, window_pattern="SL")
    model = build(cfg, perturb=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model.cos).all() and model.cos.shape == (1, 10 * T, 1, 16)
    torch.testing.assert_close(model.cos[0, 5, 0, 0], torch.tensor(math.cos(5.0)))
    assert all((b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all() for b in model.blocks)
    assert (model.resid_lambdas == 1).all() and (model.x0_lambdas == 0).all()
    assert abs(model.wte.weight.std().item() - 1) < 0.05 and model.lm_head.weight.std().item() < 0.01
    loss = model(tokens(), tokens(seed=2))
    assert abs(loss.item() - math.log(V)) < 0.05  # near-uniform predictions at init
    assert "cos" not in model.state_dict()  # derived buffers are not checkpointed


@pytest.mark.parametrize("features", [{}, {"value_embeds": True}, FEATURES])
def test_gradients_reach_every_parameter(features):
    model = build(tiny(n_layer=3, window_pattern="SL", short_window=4, **features)).train()
    model(tokens(), tokens(seed=2)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_activations_stay_in_autocast_dtype(monkeypatch):
    """CUDA autocast runs rms_norm in fp32 while linears give bf16; emulate that on the CPU: norm must
    hand back bf16 (so saved activations are half-size) and attention must see one dtype."""
    model = build(tiny(value_embeds=True, window_pattern="SL", short_window=8))
    monkeypatch.setattr(gpt_mod.kernels, "rms_norm", lambda x: F.rms_norm(x.float(), (x.size(-1),)))
    seen = []

    def checked_attention(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return gpt_mod.kernels.attention.attention(q, k, v, **kw)

    monkeypatch.setattr(gpt_mod, "attention", checked_attention)
    block_out = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: block_out.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens(), tokens(seed=2))
    assert seen == [(torch.bfloat16,) * 3] * 2
    assert block_out == [torch.bfloat16]  # the residual stream runs in bf16
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 1.0


def test_value_embeds_change_the_output():
    idx = tokens()
    with_ve = build(tiny(value_embeds=True))
    without = build(tiny(value_embeds=False))
    assert (with_ve(idx) - without(idx)).abs().max() > 1e-4


def test_config_from_depth():
    cfg = config_from_depth(20, vocab_size=32768, sequence_len=2048)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (20, 1280, 10, 10, 128)
    cfg = config_from_depth(3, 1000, 256)  # 192 rounds up to 256
    assert (cfg.n_embd, cfg.n_head) == (256, 2)
    cfg = config_from_depth(4, 1000, 256, head_dim=64, window_pattern="SSL", n_kv_head=2, value_embeds=True)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.window_pattern, cfg.value_embeds) == (256, 4, 2, "SSL", True)
    with pytest.raises(TypeError, match="n_layers"):
        config_from_depth(4, 1000, 256, n_layers=3)


def test_config_round_trips_through_a_dict():
    from dataclasses import asdict

    cfg = tiny(window_pattern="SSL", short_window=7, value_embeds=True)
    assert GPTConfig(**asdict(cfg)) == cfg  # checkpoints store asdict(config) in meta.json


@pytest.mark.parametrize("kw,match", [
    (dict(window_pattern="SX"), "window_pattern"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(head_dim=31), "head_dim"),
    (dict(attn_backend="fast"), "auto, fa3"),
    (dict(recompute="all"), "none, pointwise, mlp, block"),
    (dict(attn_gate=True, n_embd=8), r"attn_gate .* n_embd >= 12, got n_embd=8"),
])
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def count_compiled_frames(monkeypatch, backend: str):
    """Dynamo reset, and torch.compile (as runtime.compile_model calls it) routed to `backend` through a counter
    of the frames it compiles: more than one per model is a graph break."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, dynamic=kw["dynamic"],
                                                                             backend=counter))
    torch._dynamo.reset()
    return counter


@pytest.mark.parametrize("features", [{"value_embeds": True}, FEATURES, {**FEATURES, "doc_mask": True, "bos_id": 0}])
def test_forward_compiles_without_graph_breaks(features, monkeypatch):
    """The training path (runtime.compile_model, no fullgraph: fullgraph captures what a default compile breaks
    on, as FA4's offsets in S20) compiles the model as one frame: no .item(), data-dependent branch or log call."""
    from nanochat import runtime

    model = build(tiny(window_pattern="SL", short_window=8, **features))
    idx, tgt = tokens(), tokens(seed=2)
    if model.config.doc_mask:
        idx[:, ::7] = 0  # documents of 7 tokens
    expected = model(idx, tgt)  # eager first: the backend choice and its log line happen here
    counter = count_compiled_frames(monkeypatch, "eager")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):  # the default; compile_model sets it
        got = runtime.compile_model(model)(idx, tgt)
    assert counter.frame_count == 1, f"{counter.frame_count} frames: a graph break"
    torch.testing.assert_close(got, expected)


def _loss_grads_and_saved_bytes(recompute: str):
    """Loss, gradients and the activation bytes autograd keeps outside checkpointed regions (recompute
    keeps its own inside them, freed after the forward)."""
    model = build(tiny(window_pattern="SL", short_window=8, value_embeds=True, recompute=recompute)).train()
    saved = {}

    def pack(t):
        if not t.is_leaf:  # activations, not weights or inputs
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens(), tokens(seed=2))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved.values())


def test_recompute_gives_the_same_gradients_for_less_saved_memory():
    loss, grads, saved = _loss_grads_and_saved_bytes("none")
    per_layer_hidden = 2 * T * 4 * 64 * 4  # B x T x 4C fp32: the MLP's hidden layer, one copy per layer
    previous = saved
    for mode in ("mlp", "block"):
        loss_r, grads_r, saved_r = _loss_grads_and_saved_bytes(mode)
        torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(grads_r[name], g, rtol=1e-6, atol=1e-7, msg=f"{mode}: {name}")
        assert saved_r <= previous - 2 * per_layer_hidden, (mode, saved_r, previous)  # 2 layers
        previous = saved_r


@pytest.mark.parametrize("recompute", ["mlp", "block"])
def test_recompute_compiles_without_graph_breaks(recompute):
    """torch.compile traces the checkpointed regions whole (fullgraph) and the gradients do not change."""
    model = build(tiny(window_pattern="SL", short_window=8, recompute=recompute)).train()
    idx, tgt = tokens(), tokens(seed=2)
    model(idx, tgt).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="aot_eager", fullgraph=True)(idx, tgt).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)


POINTWISE_FLAGS = ("ban_recompute_used_far_apart", "ban_recompute_long_fusible_chains",
                   "ban_recompute_materialized_backward")


def _compiled_grads_and_saved_bytes(pointwise: bool):
    """Gradients and the bytes the compiled forward saves for the backward (weights excluded), partitioned
    as inductor partitions (min-cut over decomposed ops) but run eagerly."""
    from nanochat import runtime

    if pointwise:
        runtime.recompute_pointwise_in_backward()
    torch._dynamo.reset()  # a fresh partition under the flags now in force
    model = build(tiny(window_pattern="SL", short_window=8, n_layer=3)).train()
    saved = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved.append(t.numel() * t.element_size())
        return t

    compiled = torch.compile(model, backend="aot_eager_decomp_partition", dynamic=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(tokens(), tokens(seed=2))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, sum(saved)


def test_pointwise_recompute_saves_less_with_the_same_gradients():
    import torch._functorch.config as functorch_config

    model = build(tiny(window_pattern="SL", short_window=8, n_layer=3)).train()
    model(tokens(), tokens(seed=2)).backward()
    eager = {n: p.grad for n, p in model.named_parameters()}
    defaults = {flag: getattr(functorch_config, flag) for flag in POINTWISE_FLAGS}
    with functorch_config.patch(defaults):  # restored after the test: the setting is process-wide
        grads, saved = _compiled_grads_and_saved_bytes(pointwise=False)
        assert all(defaults.values())
        grads_pw, saved_pw = _compiled_grads_and_saved_bytes(pointwise=True)
        assert not any(getattr(functorch_config, flag) for flag in POINTWISE_FLAGS)
    assert {flag: getattr(functorch_config, flag) for flag in POINTWISE_FLAGS} == defaults
    for name, g in eager.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(grads_pw[name], g, rtol=1e-5, atol=1e-6, msg=name)
    hidden = 2 * T * 4 * 64 * 4  # B x T x 4C fp32, one MLP hidden layer
    assert saved_pw <= saved - 3 * hidden, (saved_pw, saved)  # at least ReLU²'s output, in each of 3 layers
    torch._dynamo.reset()


def test_pointwise_recompute_is_set_by_compile_model_and_needs_compile(monkeypatch):
    from nanochat import runtime

    calls = []
    monkeypatch.setattr(runtime, "recompute_pointwise_in_backward", lambda: calls.append(1))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    runtime.compile_model(build(tiny(recompute="none")))
    assert calls == []
    runtime.compile_model(build(tiny(recompute="pointwise")))
    assert calls == [1]
    runtime.check_recompute("pointwise", compile=True)
    with pytest.raises(ValueError, match="needs --compile true"):
        runtime.check_recompute("pointwise", compile=False)


def loss_and_grads(model: GPT, idx, tgt, backend: str) -> tuple[float, torch.Tensor]:
    """A bf16-autocast training step's loss and all gradients, flattened, with every layer on `backend`."""
    for block in model.blocks:
        block.attn.backend = backend
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, tgt)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_backends_match_sdpa_in_the_model():
    """bf16 autocast on the GPU: auto's per-layer picks (fa3/cudnn/flex) give sdpa's loss and gradients,
    and KV-cache decoding (fa3's kvcache kernel when present) matches the full forward."""
    cfg = tiny(sequence_len=256, n_layer=4, window_pattern="SSL", short_window=64, value_embeds=True)
    model = build(cfg).cuda().train()
    idx = torch.randint(0, V, (2, 256), device="cuda")
    tgt = torch.randint(0, V, (2, 256), device="cuda")
    loss_auto, grads_auto = loss_and_grads(model, idx, tgt, "auto")
    loss_sdpa, grads_sdpa = loss_and_grads(model, idx, tgt, "sdpa")
    assert abs(loss_auto - loss_sdpa) < 1e-2 * abs(loss_sdpa)
    assert (grads_auto - grads_sdpa).norm() < 3e-2 * grads_sdpa.norm()

    model.eval()
    for block in model.blocks:
        block.attn.backend = "auto"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(idx[:, :80])
        cache = KVCache(2, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 128, "cuda", torch.bfloat16)
        steps = [model(idx[:, :50], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(50, 80)]
    assert (torch.cat(steps, 1) - full).abs().max() < 0.1  # bf16 logits, softcap 15


@pytest.mark.parametrize("option", ["smear", "backout", "value_embed_gate", "qk_scale", "rope_base", "unet_skips",
                                    "attn_gate", "bigram_embeds"])
def test_each_option_changes_the_output(option):
    """Each architecture option, alone on top of value embeddings, is live (same weights otherwise)."""
    changed = {"smear": True, "backout": True, "value_embed_gate": "input", "qk_scale": 1.5, "rope_base": 100.0,
               "unet_skips": True, "attn_gate": True, "bigram_embeds": True}[option]
    plain, other = (build(tiny(n_layer=4, value_embeds=True, **kw)) for kw in ({}, {option: changed}))
    idx = tokens()
    assert (plain(idx) - other(idx)).abs().max() > 1e-3


def test_smear_mixes_in_exactly_the_previous_embedding():
    model = build(tiny(smear=True))
    idx = tokens()
    x = gpt_mod.embed(model.wte, idx)
    gate = model.smear_lambda * torch.sigmoid(model.smear_gate(x[..., :gpt_mod.SMEAR_CHANNELS]))
    expected = torch.cat((x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]), dim=1)
    torch.testing.assert_close(model._smear(x, None), expected)
    before = gpt_mod.embed(model.wte, idx[:, :1])
    torch.testing.assert_close(model._smear(x[:, 1:], before), expected[:, 1:])  # a decode step's view


def test_recipe_init_values():
    model = build(tiny(n_layer=5, **FEATURES), perturb=False)
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert (model.skip_lambdas == 0).all()
    assert all((b.attn.attn_gate_linear.weight == 0).all() for b in model.blocks)  # every gate 0.5
    assert (model.bigram_embed.weight == 0).all() and model.bigram_embed.weight.shape == (5 * 320, 64)
    torch.testing.assert_close(model.bigram_lambdas, torch.full((5,), 0.1))
    bound = math.sqrt(3.0 / 64)
    assert model.blocks[0].mlp.c_fc.weight.abs().max() <= 0.4 * bound < model.blocks[0].attn.c_q.weight.abs().max()
    assert abs(model.wte.weight.std().item() - 0.8) < 0.05
    angles = gpt_mod.rotary_angles(3, 32, base=100_000.0)
    torch.testing.assert_close(model.cos[0, :3, 0], angles.cos())


def test_checkpoint_config_without_the_options_builds_the_old_model():
    """A model_config saved before the options existed (no such keys) gives a model without them."""
    old = {k: v for k, v in tiny(value_embeds=True).__dict__.items() if k not in FEATURES or k == "value_embeds"}
    cfg = GPTConfig(**old)
    assert not cfg.smear and not cfg.backout and cfg.value_embed_gate == "scalar" and cfg.qk_scale == 1.0
    assert not cfg.attn_gate and not cfg.bigram_embeds
    assert {n for n, _ in build(cfg).named_parameters()} == {n for n, _ in build(tiny(value_embeds=True)).named_parameters()}
    from nanochat.checkpoint import build_model
    trained = build(tiny(value_embeds=True))
    loaded = build_model(old, trained.state_dict())  # strict: no gate weights expected, none missing
    assert torch.equal(loaded(tokens()), trained(tokens()))


def test_attn_gate_scales_each_heads_output_by_a_sigmoid_of_the_block_input():
    """One layer against float64 by hand: y_h = softmax attention of head h (explicit mask), times
    sigmoid(W x[:12])_h, then c_proj. Random gate weights, so each head and position gets its own gate."""
    model = build(tiny(attn_gate=True, window_pattern="SL", short_window=6))
    attn = model.blocks[0].attn
    x = gpt_mod.norm(torch.randn(2, T, 64, generator=torch.Generator().manual_seed(3)))
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    q, k, v = attn.qkv(x, cos, sin)
    heads = reference_attention(q.double(), k.double(), v.double(), window=attn.window)  # [B, T, H, D]
    gate = torch.sigmoid(x[..., :12].double() @ attn.attn_gate_linear.weight.double().T)  # [B, T, H]
    assert gate.std() > 0.05  # not one gate for all
    expected = (heads * gate[..., None]).reshape(2, T, -1) @ attn.c_proj.weight.double().T
    got = attn(x, cos, sin, None, gpt_mod.causal_attend)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_attn_gate_at_init_halves_the_attention_output():
    """Zero gate weights (init_weights) give sigmoid(0) = 0.5 for every head: half the ungated output."""
    model = build(tiny(attn_gate=True))
    attn = model.blocks[0].attn
    torch.nn.init.zeros_(attn.attn_gate_linear.weight)
    x = gpt_mod.norm(torch.randn(2, T, 64))
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    gated = attn(x, cos, sin, None, gpt_mod.causal_attend)
    attn.attn_gate_linear = None
    torch.testing.assert_close(gated, 0.5 * attn(x, cos, sin, None, gpt_mod.causal_attend))


def test_bigram_rows_hash_in_range_and_reserve_the_last_row_where_nothing_comes_before():
    rows = tiny().bigram_rows  # 5 x the padded vocab (320)
    assert rows == 1600
    idx = tokens(B=3, T_=40)
    got = gpt_mod.bigram_row_ids(idx, None, rows)
    assert got.dtype == torch.int64 and got.shape == idx.shape
    assert (got[:, 0] == rows - 1).all()  # a sequence's first token has no previous one
    assert ((got[:, 1:] >= 0) & (got[:, 1:] < rows - 1)).all()  # hashed pairs never take the reserved row
    a, b = gpt_mod.BIGRAM_HASH
    assert a % 2 == 1 and b % 2 == 1
    for i, t in ((0, 1), (1, 17), (2, 39)):
        assert got[i, t].item() == ((a * idx[i, t].item()) ^ (b * idx[i, t - 1].item())) % (rows - 1)
    # the tokens before the first position (a KV cache's last ones) give a decode step the full forward's rows
    torch.testing.assert_close(gpt_mod.bigram_row_ids(idx[:, 5:], idx[:, 4], rows), got[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(gpt_mod.bigram_row_ids(idx[:, 5:6], idx[:, 4], rows), got[:, 5:6], rtol=0, atol=0)
    # doc_mask: a BOS is a document's start, whatever came before it
    starts = torch.zeros_like(idx, dtype=torch.bool)
    starts[0, 7] = starts[2, 20] = True
    masked = gpt_mod.bigram_row_ids(idx, None, rows, starts)
    assert masked[0, 7] == masked[2, 20] == rows - 1
    assert torch.equal(masked[~starts], got[~starts])
    assert gpt_mod.bigram_row_ids(idx[:, 7:], idx[:, 6], rows, starts[:, 7:])[0, 0] == rows - 1  # in a decode step too
    # the largest vocab a table could have here: no overflow, still in range
    big = torch.tensor([[2**20 - 1, 2**20 - 2, 2**20 - 1, 0]])
    big_rows = gpt_mod.bigram_row_ids(big, big[:, 0], 5 * 2**20)
    assert ((big_rows >= 0) & (big_rows < 5 * 2**20 - 1)).all()


def test_bigram_rows_tell_previous_tokens_apart():
    """For a fixed current token, different previous tokens land on different rows: all of 16, and of all 300
    about as many as a random function gives (1599 rows: ~273 expected, 300 at best)."""
    rows = tiny().bigram_rows
    cur, prev = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    got = gpt_mod.bigram_row_ids(torch.stack((prev, cur), 1), None, rows)[:, 1].view(V, V)  # [current, previous]
    assert torch.unique(got[7, :16]).numel() == 16
    assert min(torch.unique(row).numel() for row in got) >= 250
    assert torch.unique(got).numel() == rows - 1  # every hashed row is reached


def test_bigram_table_is_inert_at_init_and_learns_from_the_first_step():
    """Zero table: the model equals the same weights without bigram_embeds. One identical optimizer step for both
    (the same gradients for every shared weight, since the outputs are equal): the table's used rows move, only
    those, and the outputs part."""
    from nanochat.optim import build_optimizer

    off = build(tiny(**{**FEATURES, "bigram_embeds": False})).train()
    with torch.device("meta"):
        on = GPT(tiny(**FEATURES))
    on.to_empty(device="cpu")
    on.init_weights()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert sorted(missing) == ["bigram_embed.weight", "bigram_lambdas"] and not unexpected
    on.train()
    idx, tgt = tokens(), tokens(seed=2)
    assert torch.equal(on(idx), off(idx))
    for model in (off, on):
        opt = build_optimizer(model, adam_groups="tuned")
        model(idx, tgt).backward()
        opt.step()
    shared = on.state_dict()
    assert all(torch.equal(shared[name], p) for name, p in off.state_dict().items())
    table = on.bigram_embed.weight
    used = torch.zeros(table.size(0), dtype=torch.bool)
    used[gpt_mod.bigram_row_ids(idx, None, on.config.bigram_rows)] = True
    assert (table[used] != 0).any(dim=1).all() and (table[~used] == 0).all()
    with torch.no_grad():
        assert (on(idx, tgt) - off(idx, tgt)).abs() > 1e-4

"""nanochat.build on the CPU: base_train and profile_kernels build one model and optimizer from the same flags,
in the one order (precision before the optimizer, compile last), with the recipe's or the plain settings."""
import dataclasses

import pytest
import torch

from nanochat import runtime
from nanochat.build import BuildConfig, build
from nanochat.flags import parse_flags
from nanochat.model.gpt import GPTConfig, config_from_depth
from scripts.base_train import TrainConfig
from scripts.profile_kernels import ProfileConfig

CPU = torch.device("cpu")
TINY = ["--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64", "--compile=false"]


def groups(optimizer) -> dict[str, tuple]:
    """Each optimizer group's kind -> (lr, weight decay, betas or None)."""
    return {g["kind"]: (g["lr"], g["weight_decay"], g.get("betas")) for g in optimizer.param_groups}


def test_train_and_profile_build_the_same_model_and_optimizer():
    argv = [*TINY, "--smear=false", "--window_pattern=SL", "--matrix_lr=0.03", "--adam_groups=uniform"]
    built = []
    for cls in (TrainConfig, ProfileConfig):
        torch.manual_seed(0)
        built.append(build(parse_flags(cls, argv), CPU, vocab_size=256, bos_id=0))
    (train_model, _, train_opt), (prof_model, _, prof_opt) = built
    assert train_model.config == prof_model.config
    assert train_model.config.smear is False and train_model.config.short_window == 64  # min(128, context)
    assert groups(train_opt) == groups(prof_opt) and groups(train_opt)["matrix"][0] == 0.03
    prof_state = prof_model.state_dict()
    assert all(torch.equal(t, prof_state[k]) for k, t in train_model.state_dict().items())  # same init


def test_scales_reach_the_optimizer_and_the_recipe_is_the_default():
    cfg = parse_flags(BuildConfig, TINY)
    _, _, opt = build(cfg, CPU, vocab_size=256, lr_scale=2.0, wd_scale=0.5, bos_id=0)
    by_kind = groups(opt)
    assert by_kind["matrix"][:2] == (pytest.approx(2 * cfg.matrix_lr), pytest.approx(0.5 * cfg.weight_decay))
    assert by_kind["lm_head"][0] == pytest.approx(2 * cfg.unembedding_lr)  # width 64 < 768: not width-scaled
    assert cfg.optimizer_options(2.0, 0.5)["embedding_lr"] == pytest.approx(2 * cfg.embedding_lr)
    model_config = cfg.model_config(256, bos_id=0)
    assert model_config.smear and model_config.value_embeds and model_config.qk_scale == cfg.qk_scale
    assert model_config.unet_skips and model_config.doc_mask and cfg.muon_compile is None  # S17's race winners
    assert not model_config.attn_gate and not model_config.bigram_embeds  # candidates, off until they win a race


def test_attn_gate_flag_reaches_the_recipe_model_only():
    cfg = parse_flags(BuildConfig, [*TINY, "--attn_gate=true"])
    model, _, opt = build(cfg, CPU, vocab_size=256, bos_id=0)
    assert model.config.attn_gate and all(b.attn.attn_gate_linear is not None for b in model.blocks)
    muon = {id(p) for g in opt.param_groups if g["kind"] == "matrix" for p in g["params"]}
    assert all(id(b.attn.attn_gate_linear.weight) in muon for b in model.blocks)
    assert not cfg.model_config(256, recipe=False, bos_id=0).attn_gate  # the plain block stays plain


def test_plain_build_is_the_bare_gpt_and_build_optimizers_defaults():
    cfg = parse_flags(BuildConfig, [*TINY, "--window_pattern=SL"])
    model, _, opt = build(cfg, CPU, vocab_size=256, recipe=False, bos_id=0)
    plain = config_from_depth(2, vocab_size=256, sequence_len=64, aspect_ratio=32, head_dim=32, window_pattern="SL",
                              doc_mask=True, bos_id=0)  # document masking is how the data is read, kept
    assert model.config == plain and model.config.layer_windows() == [32, None]  # S = half the context
    assert not model.config.smear and model.config.qk_scale == GPTConfig.qk_scale
    by_kind = groups(opt)
    assert by_kind["matrix"][:2] == (0.02, 0.0) and by_kind["embedding"] == (0.2, 0.0, (0.8, 0.95))  # uniform


def test_compile_comes_last_and_defaults_to_off_on_the_cpu(monkeypatch):
    cfg = parse_flags(BuildConfig, [*TINY, "--compile=none"])
    model, train_model, _ = build(cfg, CPU, vocab_size=256, bos_id=0)
    assert cfg.compile is False and train_model is model
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or torch.nn.Identity())
    model, train_model, opt = build(dataclasses.replace(cfg, compile=True), CPU, vocab_size=256, bos_id=0)
    assert compiled == [model] and isinstance(train_model, torch.nn.Identity)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="needs --compile true"):
        build(dataclasses.replace(cfg, compile=False, recompute="pointwise"), CPU, vocab_size=256, bos_id=0)


def test_muon_compile_reaches_muon_in_both_builds():
    """--muon_compile (none: decided by the device at the first step) reaches Muon with the recipe and without."""
    for recipe in (True, False):
        for flag, expected in (("none", None), ("false", False), ("true", True)):
            cfg = parse_flags(BuildConfig, [*TINY, f"--muon_compile={flag}"])
            assert build(cfg, CPU, vocab_size=256, recipe=recipe, bos_id=0).optimizer.muon.compile is expected


def test_bigram_embeds_flag_reaches_the_recipe_model_and_its_optimizer_group():
    """--bigram_embeds true: the table (5 x the padded vocab rows) in its own AdamW group with the value embeddings'
    settings, its per-layer lambdas with x0's; the plain block stays without it."""
    from nanochat.optim import ADAMW_KINDS

    cfg = parse_flags(BuildConfig, [*TINY, "--bigram_embeds=true"])
    model, _, opt = build(cfg, CPU, vocab_size=256, bos_id=0)
    assert model.config.bigram_embeds and model.bigram_embed.weight.shape == (5 * 256, 64)
    kinds = {g["kind"]: g for g in opt.param_groups}
    assert kinds["bigram_embed"]["params"] == [model.bigram_embed.weight]
    assert any(p is model.bigram_lambdas for p in kinds["x0"]["params"])
    assert ADAMW_KINDS["bigram_embed"] == ADAMW_KINDS["value_embed"]
    assert groups(opt)["bigram_embed"] == groups(opt)["value_embed"]  # rate, decay and betas (tuned, the default)
    assert not cfg.model_config(256, recipe=False, bos_id=0).bigram_embeds


def test_graph_breaks_counts_each_reason_on_one_line():
    """runtime.graph_breaks: Dynamo's break reasons so far, whitespace collapsed, with their counts."""
    def data_dependent(x):
        return x.nonzero().sum()
    before = runtime.graph_breaks()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        torch.compile(data_dependent, backend="eager")(torch.ones(3))
    new = {reason: n - before.get(reason, 0) for reason, n in runtime.graph_breaks().items()
           if n > before.get(reason, 0)}
    assert len(new) == 1 and list(new.values()) == [1], new
    reason = next(iter(new))
    assert "aten.nonzero" in reason and "\n" not in reason and "  " not in reason

"""A model and its optimizer, ready to train: the flags that describe them (`BuildConfig`) and `build`.

    cfg = parse_flags(TrainConfig, argv)        # TrainConfig derives from BuildConfig
    model, train_model, optimizer = build(cfg, device, vocab_size)

The trainers and the benchmarks declare no model, kernel, precision, compile or optimizer flag of their own:
they derive their flags dataclass from BuildConfig (a benchmark redeclares some fields as axes), and every
one builds through `build`, which runs the steps whose order matters once: the model on the meta device,
materialized and initialized, the loss backend chosen, converted to the training precision (before the
optimizer and before compiling), the optimizer, the fp8 weight cache (it hooks the optimizer's step), and
torch.compile last. The defaults are the recipe measured in BENCHMARKS.md ("recipe"); learning rates and
weight decay are those at the d12 reference batch (scripts.base_train scales them with depth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from nanochat import kernels
from nanochat.kernels.attention import ATTENTION_BACKENDS
from nanochat.model import ARCHITECTURES, model_class
from nanochat.model.gpt import GPTConfig, config_from_depth
from nanochat.optim import PRETRAIN_LRS, MuonAdamW, build_optimizer
from nanochat.precision import FP8_RECIPES, apply_precision, cache_low_precision_weights
from nanochat.runtime import check_recompute, compile_model, default_compile


@dataclass
class BuildConfig:
    # model
    arch: str = field(default="gpt", metadata={"help": ARCHITECTURES.help()})
    depth: int = field(default=20, metadata={"help": "number of layers; width = depth * aspect_ratio"})
    aspect_ratio: int = field(default=64, metadata={"help": "width = depth * aspect_ratio, rounded up to head_dim"})
    head_dim: int = field(default=128, metadata={"help": "channels per attention head"})
    max_seq_len: int | None = field(default=None, metadata={"help": "context length (default 2048; 512 on CPU)"})
    window_pattern: str = field(default="L", metadata={"help": "per-layer windows, e.g. SSSL (S = short_window)"})
    short_window: int | None = field(default=None, metadata={"help": "the S window in tokens (default: a quarter "
                                                             "of the context, rounded up to 128)"})
    n_kv_head: int | None = field(default=None, metadata={"help": "key/value heads for GQA (default: n_head)"})
    value_embeds: bool = field(default=True, metadata={"help": "value embeddings on alternating layers"})
    value_embed_gate: str = field(default="input", metadata={"help": "their gate: input (from the block input) or scalar"})
    smear: bool = field(default=True, metadata={"help": "mix the previous token's embedding in through a gate"})
    backout: bool = field(default=True, metadata={"help": "subtract a learned part of the mid-depth residual at the end"})
    qk_scale: float = field(default=1.2, metadata={"help": "q and k times this after QK-norm"})
    rope_base: float = field(default=100_000.0, metadata={"help": "rotary base frequency"})
    unet_skips: bool = field(default=True, metadata={"help": "early layers' outputs added to their mirror layers' inputs"})
    attn_gate: bool = field(default=False, metadata={"help": "each head's attention output times a sigmoid gate of "
                                                     "the block input, before the output projection"})
    bigram_embeds: bool = field(default=False, metadata={"help": "add a hashed (previous, current) token embedding "
                                                         "(5 x vocab rows, zero at init) into every layer's input "
                                                         "with a learned per-layer weight"})
    doc_mask: bool = field(default=True, metadata={"help": "attention (and the smear) within each document of a "
                                                   "packed row only, documents starting at BOS (fa4, flex or sdpa)"})
    init_ramp: bool = field(default=True, metadata={"help": "residual and x0 scalars start ramped over depth"})
    c_fc_init_scale: float = field(default=0.4, metadata={"help": "the MLP input matrix's initial scale factor"})
    embedding_init_std: float = field(default=0.8, metadata={"help": "initial std of the token embedding"})
    recompute: str = field(default="none", metadata={"help": "activation recompute: none, pointwise (compiled), mlp or block (memory for compute)"})
    # kernels
    kernel: str = field(default="torch", metadata={"help": kernels.LOSS_BACKENDS.help()})
    attn: str = field(default="auto", metadata={"help": ATTENTION_BACKENDS.help()})
    # precision
    precision: str = field(default="bf16", metadata={"help": "bf16, fp8 (torchao, Hopper+; TE's own with --arch te) "
                                                     "or nvfp4 (--arch te, Blackwell)"})
    fp8_recipe: str = field(default="tensorwise", metadata={"help": FP8_RECIPES.help()})
    fp8_min_dim: int = field(default=1024, metadata={"help": "fp8 only for linears whose smaller dim is >= this"})
    fp8_lm_head: bool = field(default=False, metadata={"help": "fp8 for the lm_head too (if the model runs it as a module)"})
    fp8_fast_accum: bool = field(default=False, metadata={"help": "fp8: fast accumulation in the backward GEMMs too (faster, less precise)"})
    fp8_skip: list[str] = field(default_factory=list, metadata={"help": "fp8: layer name patterns kept in bf16, e.g. *.attn.c_proj"})
    # compile
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model (default: on for CUDA)"})
    compile_mode: str = field(default="default", metadata={"help": "default or max-autotune-no-cudagraphs"})
    # optimizer (fine-tuning keeps nanochat's rates: nanochat.finetune)
    matrix_lr: float = field(default=PRETRAIN_LRS.matrix, metadata={"help": "Muon learning rate"})
    embedding_lr: float = field(default=PRETRAIN_LRS.embedding,
                                metadata={"help": "AdamW rate of the token (and value) embeddings"})
    unembedding_lr: float = field(default=PRETRAIN_LRS.unembedding, metadata={"help": "AdamW rate of lm_head"})
    scalar_lr: float = field(default=PRETRAIN_LRS.scalar, metadata={"help": "AdamW rate of the per-layer scalars"})
    weight_decay: float = field(default=0.28, metadata={"help": "Muon's cautious weight decay at d12 (scaled with "
                                                        "batch and horizon)"})
    adam_groups: str = field(default="tuned", metadata={"help": "AdamW settings: tuned (per-kind betas, rates, decay) "
                                                        "or uniform"})
    muon_beta2: float = field(default=0.9, metadata={"help": "Muon's per-neuron normalization EMA (NorMuon); 0 = off"})
    muon_row_equilibrate: bool = field(default=True, metadata={"help": "Muon: rescale the momentum's rows to their "
                                                               "mean norm before orthogonalizing (MuonEq)"})
    muon_renorm: bool = field(default=True, metadata={"help": "Muon: rescale each orthogonalized update to the norm "
                                                      "of a semi-orthogonal matrix (Muon+)"})
    muon_compile: bool | None = field(default=None, metadata={"help": "torch.compile Muon's update into fused "
                                                              "kernels (none: on for CUDA)"})
    shard_optimizer: bool = field(default=False, metadata={"help": "ZeRO-1: each rank keeps only its share of the optimizer state"})

    def model_config(self, vocab_size: int, depth: int | None = None, recipe: bool = True,
                     bos_id: int | None = None) -> GPTConfig:
        """The GPTConfig of these flags (or of the same recipe at another depth), `bos_id` the tokenizer's
        (doc_mask needs it). recipe=False: the shape, the runtime choices and doc_mask only, GPTConfig's
        defaults for the rest (the plain block: `--recipe false` of scripts.profile_kernels, and Transformer
        Engine's layers there)."""
        seq = self.max_seq_len
        if not recipe:
            return config_from_depth(depth or self.depth, vocab_size=vocab_size, sequence_len=seq,
                                     aspect_ratio=self.aspect_ratio, head_dim=self.head_dim,
                                     window_pattern=self.window_pattern, attn_backend=self.attn,
                                     recompute=self.recompute, doc_mask=self.doc_mask, bos_id=bos_id)
        short = self.short_window if self.short_window is not None else -(-seq // 4 // 128) * 128
        return config_from_depth(
            depth or self.depth, vocab_size=vocab_size, sequence_len=seq, aspect_ratio=self.aspect_ratio,
            head_dim=self.head_dim, window_pattern=self.window_pattern, short_window=min(short, seq),
            value_embeds=self.value_embeds, value_embed_gate=self.value_embed_gate, smear=self.smear,
            backout=self.backout, qk_scale=self.qk_scale, rope_base=self.rope_base, unet_skips=self.unet_skips,
            attn_gate=self.attn_gate, bigram_embeds=self.bigram_embeds, init_ramp=self.init_ramp,
            c_fc_init_scale=self.c_fc_init_scale, embedding_init_std=self.embedding_init_std, attn_backend=self.attn,
            recompute=self.recompute, doc_mask=self.doc_mask, bos_id=bos_id,
            **({"n_kv_head": self.n_kv_head} if self.n_kv_head else {}))

    def optimizer_options(self, lr_scale: float = 1.0, wd_scale: float = 1.0) -> dict:
        """build_optimizer's keyword arguments: every learning rate times lr_scale, the weight decay times wd_scale."""
        return dict(matrix_lr=self.matrix_lr * lr_scale, embedding_lr=self.embedding_lr * lr_scale,
                    unembedding_lr=self.unembedding_lr * lr_scale, scalar_lr=self.scalar_lr * lr_scale,
                    weight_decay=self.weight_decay * wd_scale, adam_groups=self.adam_groups,
                    muon_beta2=self.muon_beta2, muon_row_equilibrate=self.muon_row_equilibrate,
                    muon_renorm=self.muon_renorm, muon_compile=self.muon_compile, shard=self.shard_optimizer)

    def resolve_compile(self, device_type: str) -> None:
        """Fill `compile` when unset (on for CUDA, off for TE's layers) and refuse a recompute it cannot do."""
        if self.compile is None:
            self.compile = default_compile(device_type, self.arch)
        check_recompute(self.recompute, self.compile)


class Built(NamedTuple):
    model: nn.Module         # uncompiled: evaluation at other shapes, sampling, checkpoints
    train_model: nn.Module   # what the training step calls: the compiled model, or `model` itself
    optimizer: MuonAdamW


def build(cfg: BuildConfig, device: torch.device, vocab_size: int, *, lr_scale: float = 1.0,
          wd_scale: float = 1.0, recipe: bool = True, bos_id: int | None = None) -> Built:
    """The model (freshly initialized: seed torch first) and its optimizer, in the one order that works (see the
    module docstring). Fills cfg.compile when unset. recipe=False: the plain block (BuildConfig.model_config)
    and build_optimizer's own defaults, for comparisons with the public nanochat's model. bos_id: the
    tokenizer's (--doc_mask needs it)."""
    cfg.resolve_compile(device.type)
    with torch.device("meta"):
        model = model_class(cfg.arch)(cfg.model_config(vocab_size, recipe=recipe, bos_id=bos_id))
    model.to_empty(device=device)
    model.init_weights()
    kernels.set_kernel_backend(cfg.kernel)
    apply_precision(model, cfg.precision, device, fp8_recipe=cfg.fp8_recipe, fp8_min_dim=cfg.fp8_min_dim,
                    fp8_lm_head=cfg.fp8_lm_head, fp8_fast_accum=cfg.fp8_fast_accum, fp8_skip=cfg.fp8_skip)
    options = (cfg.optimizer_options(lr_scale, wd_scale) if recipe
               else {"shard": cfg.shard_optimizer, "muon_compile": cfg.muon_compile})
    optimizer = build_optimizer(model, **options)
    cache_low_precision_weights(model, optimizer, cfg.precision)
    train_model = compile_model(model, cfg.compile_mode) if cfg.compile else model
    return Built(model, train_model, optimizer)

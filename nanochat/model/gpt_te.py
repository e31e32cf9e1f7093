"""TEGPT: our GPT's shape built from NVIDIA Transformer Engine layers (`--arch te`), for bf16/fp8/nvfp4.

    with torch.device("meta"):
        model = TEGPT(config_from_depth(20, vocab_size=32768, sequence_len=2048))
    model.to_empty(device="cuda"); model.init_weights()
    model.set_precision("fp8")          # te.autocast(recipe=Float8CurrentScaling()) around the blocks

Why it exists: TE fuses norm + GEMM + quantization per layer and is the only route to NVFP4 (Blackwell);
beside our GPT in the benchmark table it says what those fusions are worth. Same knobs as GPTConfig
(depth, width, heads, GQA via num_gqa_groups, per-layer windows via window_size, rotary, QK-norm,
ReLU² via TE's "srelu", resid/x0 lambdas, untied embedding, softcapped lm_head through our loss kernels).
Differences from nanochat.model.gpt.GPT, all inside TE's TransformerLayer:
- its RMSNorms (pre-attention, pre-MLP, QK) carry a learnable gain (init 1, an AdamW "scalar");
- its rotary turns channel pairs the other way round (same relative-position model);
- attention is TE's own (cuDNN fused / flash), `attn_backend` is ignored; no value embeddings, no KV cache;
- state_dict names are TE's, so TE checkpoints do not load into GPT (and vice versa).
Transformer Engine is imported lazily: this module imports without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nanochat.model.gpt import GPTConfig, embed, flops_per_token, lm_head_output, rotary_angles

TE_INSTALL_HINT = ("Transformer Engine is not installed (package `transformer_engine`, with its PyTorch extension "
                   "`transformer_engine_torch`). Install it with: pip install 'transformer-engine[pytorch]' "
                   "(CUDA 12), or the CUDA 13 wheels: pip install transformer-engine-cu13 and build "
                   "transformer-engine-torch against your torch (benchmarks/te_build.sh does this offline)")
OUTPUT_PROJECTIONS = ("proj.weight", "fc2_weight")  # zero-initialized: every block starts as the identity


def import_te():
    """transformer_engine.pytorch, or an ImportError that names the package and how to install it."""
    try:
        import transformer_engine.pytorch as te
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA library load
        raise ImportError(f"--arch te needs Transformer Engine: {TE_INSTALL_HINT}. ({type(exc).__name__}: {exc})") from exc
    return te


def te_recipe(precision: str, fp8_recipe: str = "tensorwise"):
    """The TE recipe for a precision: fp8 tensorwise = current (per-tensor, per-step) scaling, fp8 rowwise =
    TE's 1x128/128x128 block scaling (TE has no per-row recipe on Hopper), nvfp4 = NVFP4BlockScaling."""
    from transformer_engine.common import recipe
    if precision == "nvfp4":
        return recipe.NVFP4BlockScaling()
    if precision == "fp8":
        return recipe.Float8CurrentScaling() if fp8_recipe == "tensorwise" else recipe.Float8BlockScaling()
    raise ValueError(f"no Transformer Engine recipe for precision {precision!r}; choose bf16, fp8 or nvfp4")


def te_window(window: int | None) -> tuple[int, int]:
    """Our window (query i sees keys i - window < j <= i) as TE's (left, right) sizes; -1 = unbounded."""
    return (-1, 0) if window is None else (window - 1, 0)


def rope_freqs(length: int, head_dim: int, device=None) -> torch.Tensor:
    """TE's rotary input: angles [length, 1, 1, head_dim] (each half repeated), fp32."""
    angles = rotary_angles(length, head_dim, device)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


class TEGPT(nn.Module):
    """GPT on te.TransformerLayer blocks; interface of nanochat.model.gpt.GPT (without KV-cache inference)."""

    lm_head_in_loss_kernel = True  # as GPT's: lm_head.weight goes to the fused loss kernel

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        te = import_te()
        if cfg.recompute != "none":
            raise ValueError("--arch te does not support --recompute; use --arch gpt or --recompute none")
        plain = GPTConfig()  # TE's layer runs the plain block: these options have no place in it
        options = {"value_embeds": False, "smear": False, "backout": False, "unet_skips": False, "doc_mask": False,
                   "attn_gate": False, "bigram_embeds": False, "qk_scale": plain.qk_scale,
                   "rope_base": plain.rope_base}
        unsupported = {k: getattr(cfg, k) for k, v in options.items() if getattr(cfg, k) != v}
        if unsupported:
            raise ValueError(f"--arch te builds the plain block (TE's TransformerLayer), without {sorted(unsupported)}: "
                             f"pass {' '.join(f'--{k} {v}' for k, v in options.items() if k in unsupported)}, or use "
                             f"--arch gpt")
        self.config = cfg
        self.precision, self.fp8_recipe = "bf16", "tensorwise"
        self.windows = cfg.layer_windows()
        device = torch.get_default_device()  # TE layers default to "cuda": pass meta/cpu/cuda explicitly
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(
            te.TransformerLayer(
                hidden_size=cfg.n_embd, ffn_hidden_size=4 * cfg.n_embd, num_attention_heads=cfg.n_head,
                num_gqa_groups=cfg.n_kv_head, kv_channels=cfg.head_dim, layer_number=i + 1,
                self_attn_mask_type="causal", window_size=te_window(w), hidden_dropout=0.0, attention_dropout=0.0,
                bias=False, activation="srelu", normalization="RMSNorm", qk_norm_type="RMSNorm",
                attn_input_format="bshd", device=device)
            for i, w in enumerate(self.windows))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
        self.register_buffer("rope", rope_freqs(cfg.sequence_len, cfg.head_dim), persistent=False)

    def set_precision(self, precision: str, fp8_recipe: str = "tensorwise") -> None:
        """bf16, fp8 or nvfp4: the blocks then run inside te.autocast with that recipe."""
        if precision != "bf16":
            te_recipe(precision, fp8_recipe)  # an unknown name fails here, not in the first forward
        self.precision, self.fp8_recipe = precision, fp8_recipe

    @torch.no_grad()
    def init_weights(self) -> None:
        """As GPT.init_weights: uniform std 1/sqrt(n_embd) matrices, zero output projections, embedding std 1,
        tiny lm_head, norm gains 1, resid lambdas 1, x0 lambdas 0."""
        cfg = self.config
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0 / cfg.n_embd)
        for name, p in self.blocks.named_parameters():
            if p.ndim < 2:
                nn.init.ones_(p)
            elif name.endswith(OUTPUT_PROJECTIONS):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bound, bound)
        nn.init.ones_(self.resid_lambdas)
        nn.init.zeros_(self.x0_lambdas)
        self.rope.copy_(rope_freqs(cfg.sequence_len, cfg.head_dim, device=self.rope.device))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx [B, T] -> loss (targets given; -1 = ignored) or softcapped fp32 logits [B, T, vocab_size]."""
        if kv_cache is not None:
            raise NotImplementedError("--arch te is for training benchmarks: no KV-cache inference; load the "
                                      "weights into --arch gpt for generation")
        te = import_te()
        T = idx.size(1)
        if T > self.config.sequence_len:
            raise ValueError(f"sequence of {T} tokens exceeds sequence_len {self.config.sequence_len}")
        rope = self.rope[:T]
        x = x0 = embed(self.wte, idx)
        with self._autocast(te):
            for i, block in enumerate(self.blocks):
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                x = block(x, rotary_pos_emb=rope)
        return lm_head_output(x, self.lm_head, self.config, targets, loss_reduction)

    def _autocast(self, te):
        enabled = self.precision != "bf16"
        recipe = te_recipe(self.precision, self.fp8_recipe) if enabled else None
        if hasattr(te, "autocast"):  # TE >= 2.8
            return te.autocast(enabled=enabled, recipe=recipe)
        return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """As GPT.estimate_flops (nanochat.model.gpt.flops_per_token); TE's norm gains are not matmul params."""
        return flops_per_token(self.config, self.blocks)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimizer groups as GPT's: block matrices -> Muon; embedding, lm_head, scalars (lambdas and the
        TE norm gains) -> AdamW."""
        groups = {
            "matrix": [p for p in self.blocks.parameters() if p.ndim == 2],
            "embedding": [self.wte.weight],
            "lm_head": [self.lm_head.weight],
            "scalar": [self.resid_lambdas, self.x0_lambdas, *(p for p in self.blocks.parameters() if p.ndim < 2)],
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters())), "param_groups misses a parameter"
        return groups

"""The GPT: a decoder-only Transformer in the modern nanochat style.

    cfg = config_from_depth(20, vocab_size=32768, sequence_len=2048)
    with torch.device("meta"):
        model = GPT(cfg)            # shapes only, no memory
    model.to_empty(device="cuda")
    model.init_weights()

Per block: x = resid_lambda * x + x0_lambda * x0 (x0 = the normed embedding), then
x += attn(norm(x)) and x += mlp(norm(x)). Attention: rotary positions, QK RMSNorm, grouped-query
heads, a per-layer window (window_pattern) and optional value embeddings mixed into v. MLP: ReLU², 4x.
All norms are parameter-free RMSNorm, no linear has a bias, embedding and lm_head are untied, the
vocab is padded to a multiple of 64 (padding rows never reach logits or loss) and logits are
softcapped with tanh. Mixed precision is the caller's business (torch.autocast on CUDA).

Options (GPTConfig; all off by default, so older checkpoints load as they trained): `smear` mixes each
position's embedding with the previous token's through a learned gate (a cheap bigram); `backout`
subtracts a learned fraction of the mid-depth residual before the final norm; `value_embed_gate="input"`
gates value embeddings per kv head from the block input; `qk_scale` sharpens attention after QK-norm;
`rope_base`; `unet_skips` adds each early layer's output to its mirror layer's input with a learned weight;
`doc_mask` keeps each document of a packed row to itself (every document starts with `bos_id`): attention
does not cross a document start, nor does the smear (a BOS token gets nothing of the token before it);
`attn_gate` scales each head's attention output by sigmoid(W x[:12]) of the block input before c_proj, so a
head can turn its contribution down per token (W starts at zero: every gate 0.5); `bigram_embeds` adds to the
residual at every layer, beside the x0 term, a learned per-layer share of a row of a hashed bigram table
(BIGRAM_ROWS_PER_VOCAB x vocab rows, zero at init), the row picked by (previous token, current token): bigram
statistics for the price of one lookup (see `bigram_row_ids`).

One block computation serves training, prefill and the decode step: `GPT.run` takes the rotary rows and an
`attend(attn, q, k, v)` callable, so a feature is written once and inference stays exact.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat import kernels
from nanochat.kernels.attention import ATTENTION_BACKENDS, Documents, attention, check_doc_mask_backend

ROPE_BASE = 10000.0
ROPE_LENGTH_FACTOR = 10  # rotary tables cover 10 x sequence_len positions, room for long generations
VOCAB_MULTIPLE = 64      # pad the vocab so that the lm_head matmul tiles evenly
RECOMPUTE = ("none", "pointwise", "mlp", "block")
VALUE_EMBED_GATES = ("scalar", "input")
SMEAR_CHANNELS = 24      # the smear gate reads this many leading channels of the embedding
VE_GATE_CHANNELS = 12    # the input-dependent value-embedding gate reads this many of the block input
ATTN_GATE_CHANNELS = 12  # the attention output gate (attn_gate) reads this many of the block input
BIGRAM_ROWS_PER_VOCAB = 5  # bigram_embeds: the hashed table's rows per (padded) vocab entry; the last row is reserved
BIGRAM_HASH = (0x9E3779B1, 0x85EBCA6B)  # odd multipliers of the current and the previous token (bigram_row_ids)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    head_dim: int = 128
    window_pattern: str = "L"        # per-layer chars, cycled: L = full, S = short_window; last layer always L
    short_window: int | None = None  # default sequence_len // 2
    value_embeds: bool = False
    softcap: float = 15.0
    attn_backend: str = "auto"
    recompute: str = "none"          # activation recompute in training: none | pointwise | mlp | block (see Block)
    rope_base: float = ROPE_BASE
    qk_scale: float = 1.0            # q and k times this after QK-norm: logits x qk_scale² (sharper attention)
    smear: bool = False
    backout: bool = False
    value_embed_gate: str = "scalar"  # scalar: one learned gate per kv head; input: 3 sigmoid(W x[:12]) per kv head
    unet_skips: bool = False
    attn_gate: bool = False          # each head's output times sigmoid(W x[:12]) of the block input, before c_proj
    bigram_embeds: bool = False      # a hashed (previous, current) token table added into every layer's input
    doc_mask: bool = False           # forwards without a KV cache stay within each document (see the module docstring)
    bos_id: int | None = None        # the token that starts every document (the tokenizer's <|bos|>); doc_mask reads it
    # initialization only (a checkpoint runs the same without them)
    init_ramp: bool = False          # resid lambdas 1.15 -> 1.05 and x0 lambdas 0.20 -> 0.05 over depth, not 1 and 0
    c_fc_init_scale: float = 1.0     # the MLP's input matrix starts at this times the other matrices' scale
    embedding_init_std: float = 1.0

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) "
                             "for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern must be a non-empty string of 'S' (short) and 'L' (long/full), "
                             f"e.g. 'SSSL'; got {self.window_pattern!r}")
        if self.short_window is not None and self.short_window < 1:
            raise ValueError(f"short_window must be >= 1 or None (sequence_len // 2), got {self.short_window}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}; got {self.recompute!r}")
        if self.value_embed_gate not in VALUE_EMBED_GATES:
            raise ValueError(f"value_embed_gate must be one of {', '.join(VALUE_EMBED_GATES)}; "
                             f"got {self.value_embed_gate!r}")
        if self.smear and self.n_embd < SMEAR_CHANNELS or self.value_embeds and self.value_embed_gate == "input" \
                and self.n_embd < VE_GATE_CHANNELS:
            raise ValueError(f"smear needs n_embd >= {SMEAR_CHANNELS} and the input gate >= {VE_GATE_CHANNELS}; "
                             f"got n_embd={self.n_embd}")
        if self.attn_gate and self.n_embd < ATTN_GATE_CHANNELS:
            raise ValueError(f"attn_gate reads the first {ATTN_GATE_CHANNELS} channels of the block input: it needs "
                             f"n_embd >= {ATTN_GATE_CHANNELS}, got n_embd={self.n_embd}; widen the model or turn "
                             "attn_gate off")
        ATTENTION_BACKENDS.canonical(self.attn_backend)  # an unknown name fails here, listing the choices
        if self.doc_mask:
            if self.bos_id is None or not 0 <= self.bos_id < self.vocab_size:
                raise ValueError(f"doc_mask needs bos_id, the token that starts every document, in [0, vocab_size="
                                 f"{self.vocab_size}); got {self.bos_id!r}. Pass the tokenizer's: "
                                 "bos_id=tokenizer.get_bos_token_id() (scripts.base_train does)")
            check_doc_mask_backend(self.attn_backend)

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def bigram_rows(self) -> int:
        """Rows of the bigram table (bigram_embeds): hashed pairs in all but the last, the "no previous token" row."""
        return BIGRAM_ROWS_PER_VOCAB * self.padded_vocab_size

    def layer_windows(self) -> list[int | None]:
        """Attention window per layer (None = full causal), the pattern cycled, last layer full."""
        short = self.short_window if self.short_window is not None else max(1, self.sequence_len // 2)
        windows = [short if self.window_pattern[i % len(self.window_pattern)] == "S" else None
                   for i in range(self.n_layer)]
        windows[-1] = None
        return windows

    def has_value_embed(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last layer always included."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    @property
    def backout_layer(self) -> int:
        """The layer whose output backout subtracts (a fraction of) at the end: mid-depth."""
        return self.n_layer // 2


def config_from_depth(depth: int, vocab_size: int, sequence_len: int, aspect_ratio: int = 64, head_dim: int = 128,
                      window_pattern: str = "L", **overrides) -> GPTConfig:
    """Model shape from one knob: width = depth * aspect_ratio rounded up to a multiple of head_dim."""
    if depth < 1 or aspect_ratio < 1:
        raise ValueError(f"depth and aspect_ratio must be >= 1, got depth={depth}, aspect_ratio={aspect_ratio}")
    unknown = set(overrides) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise TypeError(f"unknown GPTConfig field(s) {sorted(unknown)}; valid: {[f.name for f in fields(GPTConfig)]}")
    width = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = width // head_dim
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                    n_kv_head=n_head, n_embd=width, head_dim=head_dim, window_pattern=window_pattern)
    return replace(cfg, **overrides)


def rotary_angles(length: int, head_dim: int, device=None, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotary angles [length, head_dim // 2] in fp32: position p times frequency base^(-2i/head_dim).
    Shared with gpt_te, so both models rotate by the same angles."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    return torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)


def rotary_tables(length: int, head_dim: int, device=None,
                  base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, length, 1, head_dim // 2] in fp32, for positions 0..length-1."""
    angles = rotary_angles(length, head_dim, device, base)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x [B, T, H, D] by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm that keeps x's dtype: CUDA autocast would return fp32, doubling the bytes
    of every saved activation and adding casts; compiled, this is one bf16-in, bf16-out kernel."""
    return kernels.rms_norm(x).to(x.dtype)


def embed(wte: nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
    """The normed token embedding x0 [B, T, C], in the autocast dtype when autocast is on (bf16 on CUDA):
    the residual stream then has half the activation memory and elementwise traffic of fp32, while the
    weights stay fp32 (the optimizer's master copy)."""
    x = wte(idx)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return norm(x)


def bigram_row_ids(idx: torch.Tensor, prev_tokens: torch.Tensor | None, rows: int,
                   doc_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Each position's row of the bigram table [B, T] (int64, on idx's device): the xor of the current and the
    previous token times BIGRAM_HASH's odd constants, mod rows - 1; the reserved last row where there is no previous
    token: the first position when `prev_tokens` [B] (the tokens before idx[:, 0]) is None, and wherever
    `doc_starts` [B, T] is True (doc_mask: a BOS gets nothing of the document before it, as in the smear). The
    constants are below 2^32, so for any vocab below 2^30 the products fit int64 and the xor stays non-negative."""
    idx = idx.long()
    first = idx[:, :1] if prev_tokens is None else prev_tokens.long()[:, None]
    prev = torch.cat((first, idx[:, :-1]), dim=1)
    row = torch.bitwise_xor(BIGRAM_HASH[0] * idx, BIGRAM_HASH[1] * prev) % (rows - 1)
    no_prev = torch.zeros_like(idx, dtype=torch.bool) if doc_starts is None else doc_starts
    if prev_tokens is None:
        no_prev = no_prev | (torch.arange(idx.size(1), device=idx.device) == 0)
    return row.masked_fill(no_prev, rows - 1)


Attend = Callable[["CausalSelfAttention", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_attend(attn: "CausalSelfAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Training's attention: q [B, T, H, D] over k, v [B, T, Hkv, D] of the same positions, the layer's window."""
    return attention(q, k, v, window=attn.window, backend=attn.backend)


def document_attend(docs: Documents) -> Attend:
    """causal_attend within the documents of packed rows (doc_mask), `docs` found once per forward."""
    def attend(attn: "CausalSelfAttention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, window=attn.window, backend=attn.backend, layer_idx=attn.layer_idx, docs=docs)
    return attend


def lm_head_output(x: torch.Tensor, lm_head: nn.Linear, cfg: GPTConfig, targets: torch.Tensor | None,
                   loss_reduction: str) -> torch.Tensor:
    """Final norm, then softcapped fp32 logits [B, T, vocab_size] (no targets) or the loss through the
    selected loss kernel (scalar, or [B, T] for "none"). Only the real vocab rows of lm_head are used,
    so padding rows never reach logits or loss."""
    x = norm(x)
    weight = lm_head.weight[:cfg.vocab_size]
    if targets is None:
        return kernels.apply_softcap(F.linear(x, weight).float(), cfg.softcap)
    loss = kernels.fused_linear_cross_entropy(x, weight, targets, ignore_index=-1, softcap=cfg.softcap,
                                              reduction=loss_reduction)
    return loss.view(targets.shape) if loss_reduction == "none" else loss


def flops_per_token(cfg: GPTConfig, blocks: nn.Module) -> float:
    """Training FLOPs per token (forward + backward), the MFU numerator:
    6 * matmul params (the blocks' matrices and lm_head's real rows; embeddings and scalars excluded)
    + sum over layers of 12 * n_head * head_dim * min(window, sequence_len)."""
    matmul = sum(p.numel() for p in blocks.parameters() if p.ndim == 2) + cfg.vocab_size * cfg.n_embd
    attn = sum(12 * cfg.n_head * cfg.head_dim * (cfg.sequence_len if w is None else min(w, cfg.sequence_len))
               for w in cfg.layer_windows())
    return float(6 * matmul + attn)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self.layer_idx, self.window, self.backend = layer_idx, window, cfg.attn_backend
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qk_scale = cfg.qk_scale
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        # the value embedding's gate per kv head, on layers that have one: a learned scalar (AdamW), or
        # 3 sigmoid(W x[..., :VE_GATE_CHANNELS]) of the block input (W a small matrix, Muon)
        self.ve_gate = self.ve_gate_linear = None
        if cfg.has_value_embed(layer_idx) and cfg.value_embed_gate == "scalar":
            self.ve_gate = nn.Parameter(torch.empty(cfg.n_kv_head))
        elif cfg.has_value_embed(layer_idx):
            self.ve_gate_linear = nn.Linear(VE_GATE_CHANNELS, cfg.n_kv_head, bias=False)
        # attn_gate: each head's output times sigmoid(W x[..., :ATTN_GATE_CHANNELS]) of the block input (Muon)
        self.attn_gate_linear = nn.Linear(ATTN_GATE_CHANNELS, cfg.n_head, bias=False) if cfg.attn_gate else None

    def qkv_weight(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """c_q, c_k and c_v stacked into one [(H + 2 Hkv) D, C] matrix for `qkv` (into `out` when given,
        cast to its dtype)."""
        return torch.cat((self.c_q.weight, self.c_k.weight, self.c_v.weight), out=out)

    def qkv_sizes(self) -> tuple[int, int, int]:
        return self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim

    def project_qkv(self, x: torch.Tensor,
                    fused_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x, flat ([B, T, H D], [B, T, Hkv D] twice): the layer's own projections
        (`project_own`), or one matmul with a caller's stacked `fused_weight` (a decoder's)."""
        if fused_weight is None:
            return self.project_own(x)
        return F.linear(x, fused_weight).split(self.qkv_sizes(), dim=-1)

    def project_own(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three linears c_q, c_k, c_v. Its own method so that fp8 layers (fp8_linear.Fp8Attention)
        can replace it, knowing nothing of who else stacks these weights."""
        return self.c_q(x), self.c_k(x), self.c_v(x)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ve: torch.Tensor | None = None,
            fused_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, D] and k, v [B, T, Hkv, D] of the normed input x [B, T, C]: rotary and QK-norm
        applied, the gated value embedding ve (any shape of B*T*Hkv*D elements) mixed into v. A method
        of its own so that a decoder with its own cache layout can reuse the exact math. With
        `fused_weight` (`qkv_weight()`, kept by the caller) the three projections are one matmul: a
        decode step at batch 1 is bound by kernel count, not bytes."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, fused_weight)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            if self.ve_gate_linear is not None:
                gate = 3 * torch.sigmoid(self.ve_gate_linear(x[..., :VE_GATE_CHANNELS])).unsqueeze(-1)  # [B, T, Hkv, 1]
            else:
                gate = self.ve_gate.view(1, 1, -1, 1)
            v = v + gate.to(v.dtype) * ve.view_as(v).to(v.dtype)
        # Rotary then QK-norm (as nanochat). The order does not matter: rotary rotates channel pairs,
        # which leaves each head vector's RMS unchanged, so norm(rope(q)) == rope(norm(q)).
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        return q, k, v

    def forward(self, x, cos, sin, ve, attend: Attend, fused_weight: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin, ve, fused_weight)
        y = attend(self, q, k, v)  # [B, T, H, D]
        if self.attn_gate_linear is not None:
            gate = torch.sigmoid(self.attn_gate_linear(x[..., :ATTN_GATE_CHANNELS])).unsqueeze(-1)  # [B, T, H, 1]
            y = y * gate.to(y.dtype)
        return self.c_proj(y.reshape(B, T, -1).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Attention then MLP, each on the normed residual. With gradients on, `recompute` trades compute
    for activation memory: "pointwise" (compiled runs; see runtime.compile_model) recomputes norms,
    rotary and ReLU² in the backward but no matmul; "mlp" keeps only the MLP's input and recomputes its
    4x-wide hidden layer in backward (the largest activation: ~30% of a block's, for one more c_fc
    matmul); "block" keeps only the block's input and recomputes the whole block (~1/3 more compute)."""

    def __init__(self, cfg: GPTConfig, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer_idx, window)
        self.mlp = MLP(cfg)
        self.recompute = cfg.recompute

    def forward(self, x, cos, sin, ve=None, attend: Attend = causal_attend, fused_weight=None):
        if self.recompute == "block" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, ve, attend, fused_weight, use_reentrant=False)
        return self._forward(x, cos, sin, ve, attend, fused_weight)

    def _forward(self, x, cos, sin, ve, attend, fused_weight):
        x = x + self.attn(norm(x), cos, sin, ve, attend, fused_weight)
        if self.recompute == "mlp" and torch.is_grad_enabled():
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _mlp(self, x):
        return self.mlp(norm(x))


class GPT(nn.Module):
    lm_head_in_loss_kernel = True  # lm_head.weight goes to the fused loss kernel, never through lm_head(x)

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        vocab, kv_dim = cfg.padded_vocab_size, cfg.n_kv_head * cfg.head_dim
        self.windows = cfg.layer_windows()
        self.wte = nn.Embedding(vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, w) for i, w in enumerate(self.windows))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, kv_dim) for i in range(cfg.n_layer) if cfg.has_value_embed(i)})
        self.lm_head = nn.Linear(cfg.n_embd, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
        if cfg.smear:  # x_t += lambda * sigmoid(w . x_t[:SMEAR_CHANNELS]) * x_{t-1}
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.empty(1))
        if cfg.backout:  # x_final = x - lambda * x after the backout layer
            self.backout_lambda = nn.Parameter(torch.empty(1))
        if cfg.unet_skips:  # layer n-1-i's input += lambda_i * layer i's output, i < n // 2
            self.skip_lambdas = nn.Parameter(torch.empty(cfg.n_layer // 2))
        if cfg.bigram_embeds:  # layer i's input += lambda_i * bigram_embed[hash(previous token, token)]
            self.bigram_embed = nn.Embedding(cfg.bigram_rows, cfg.n_embd)
            self.bigram_lambdas = nn.Parameter(torch.empty(cfg.n_layer))
        self.rotary_len = cfg.sequence_len * ROPE_LENGTH_FACTOR
        cos, sin = rotary_tables(self.rotary_len, cfg.head_dim, base=cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # derived, so never saved in checkpoints
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer (after `to_empty`). Matrices: uniform with std 1/sqrt(fan_in)
        (c_fc times c_fc_init_scale); output projections zero, so each block starts as the identity; embeddings
        std embedding_init_std; lm_head tiny, so the first logits are near-uniform; residual scalars 1 and x0
        scalars 0 (or, with init_ramp, 1.15 -> 1.05 and 0.20 -> 0.05 over depth); value-embed gates 1 (the
        input gate: small positive weights, so 3 sigmoid starts near 1.5); attention output gates zero (each
        head's output x 0.5 at first, still the identity block since c_proj is zero); smear off (lambda 0),
        backout 0.2, skips 0; the bigram table zero (the model starts as without it; the rows used get gradients
        at once) and its per-layer scalars 0.1 (nonzero, so the table's gradient is too)."""
        cfg = self.config
        nn.init.normal_(self.wte.weight, std=cfg.embedding_init_std)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = math.sqrt(3.0 / cfg.n_embd)  # uniform(-b, b) has std b / sqrt(3)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -bound * cfg.c_fc_init_scale, bound * cfg.c_fc_init_scale)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.ones_(block.attn.ve_gate)
            if block.attn.ve_gate_linear is not None:
                nn.init.uniform_(block.attn.ve_gate_linear.weight, 0.0, 0.02)
            if block.attn.attn_gate_linear is not None:
                nn.init.zeros_(block.attn.attn_gate_linear.weight)
        for table in self.value_embeds.values():  # a small perturbation of v at first
            nn.init.uniform_(table.weight, -bound, bound)
        if cfg.init_ramp:
            depth = torch.linspace(0.0, 1.0, cfg.n_layer) if cfg.n_layer > 1 else torch.zeros(1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        else:
            nn.init.ones_(self.resid_lambdas)
            nn.init.zeros_(self.x0_lambdas)
        if cfg.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)
        if cfg.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        if cfg.unet_skips:
            nn.init.zeros_(self.skip_lambdas)
        if cfg.bigram_embeds:
            nn.init.zeros_(self.bigram_embed.weight)
            nn.init.constant_(self.bigram_lambdas, 0.1)
        cos, sin = rotary_tables(self.rotary_len, cfg.head_dim, device=self.cos.device, base=cfg.rope_base)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: "KVCache | None" = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx [B, T] -> loss (targets given; -1 = ignored) or softcapped fp32 logits [B, T, vocab_size]."""
        return lm_head_output(self.trunk(idx, kv_cache), self.lm_head, self.config, targets, loss_reduction)

    def trunk(self, idx: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        """idx [B, T] -> the residual stream after the last block [B, T, C], before the final norm and
        lm_head (a batched prefill takes logits at each row's last position only). With a KVCache the
        positions start at its `pos`: their k/v are written there and attend to everything before."""
        T = idx.size(1)
        pos = 0 if kv_cache is None else kv_cache.pos
        if pos + T > self.rotary_len:
            raise ValueError(f"positions up to {pos + T} exceed the rotary table ({self.rotary_len} = "
                             f"{ROPE_LENGTH_FACTOR} x sequence_len); use a larger GPTConfig.sequence_len")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        if kv_cache is None:  # doc_mask: the documents found once per forward, shared by every layer
            attend = document_attend(Documents(idx, self.config.bos_id)) if self.config.doc_mask else causal_attend
            return self.run(idx, cos, sin, attend)

        def attend(attn, q, k, v):
            return attention(q, k, v, window=attn.window, backend=attn.backend, kv_cache=kv_cache,
                             layer_idx=attn.layer_idx)
        x = self.run(idx, cos, sin, attend, prev_tokens=kv_cache.last_tokens if pos else None)
        kv_cache.pos += T
        kv_cache.last_tokens = idx[:, -1]
        return x

    def run(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend = causal_attend,
            prev_tokens: torch.Tensor | None = None,
            qkv_weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The model's one block computation, for training, prefill and decoding alike: tokens idx [B, T] at
        rotary rows cos, sin (any shape that broadcasts to [B, T, 1, D/2]) -> the residual stream [B, T, C].
        `attend(attn, q, k, v)` does each layer's attention (and any caching); `prev_tokens` [B] are the
        tokens before idx[:, 0] (smear and bigram_embeds; None: nothing before); `qkv_weights` one stacked q/k/v
        matrix per layer (a decoder's: one projection matmul instead of three)."""
        cfg = self.config
        x = embed(self.wte, idx)
        doc_starts = idx == cfg.bos_id if cfg.doc_mask else None
        if cfg.smear:
            x = self._smear(x, None if prev_tokens is None else embed(self.wte, prev_tokens[:, None]), doc_starts)
        bigram = None
        if cfg.bigram_embeds:  # no norm: the table starts at zero, and the norm of zero has no useful gradient
            bigram = self.bigram_embed(bigram_row_ids(idx, prev_tokens, cfg.bigram_rows, doc_starts)).to(x.dtype)
        x0, mid, skips = x, None, []
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if bigram is not None:
                x = x + self.bigram_lambdas[i] * bigram
            if cfg.unet_skips and i >= cfg.n_layer - len(skips):
                x = x + self.skip_lambdas[cfg.n_layer - 1 - i] * skips[cfg.n_layer - 1 - i]
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, ve, attend, None if qkv_weights is None else qkv_weights[i])
            if cfg.unet_skips and i < cfg.n_layer // 2:
                skips.append(x)
            if i == cfg.backout_layer:
                mid = x
        if cfg.backout:
            x = x - self.backout_lambda.to(x.dtype) * mid
        return x

    def _smear(self, x: torch.Tensor, before_first: torch.Tensor | None,
               doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """x_t + lambda sigmoid(w . x_t[:SMEAR_CHANNELS]) x_{t-1}, where x_{-1} is `before_first` [B, 1, C]
        (the previous token's normed embedding), or nothing when None (a sequence's first position); nothing
        before the positions where `doc_starts` [B, T] is True either (doc_mask: documents stay apart)."""
        if before_first is None:
            before_first = torch.zeros_like(x[:, :1])
        before = torch.cat((before_first, x[:, :-1]), dim=1)
        if doc_starts is not None:
            before = before.masked_fill(doc_starts.unsqueeze(-1), 0.0)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + gate.to(x.dtype) * before

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward), the MFU numerator: see `flops_per_token`."""
        return flops_per_token(self.config, self.blocks)

    def scaling_params(self) -> int:
        """The parameters a training horizon scales with: the blocks' matrices and lm_head's real rows."""
        cfg = self.config
        return sum(p.numel() for p in self.blocks.parameters() if p.ndim == 2) + cfg.vocab_size * cfg.n_embd

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimizer groups, every parameter exactly once: "matrix" (2-D weights in blocks, Muon); for
        AdamW "embedding" (wte), "value_embed", "bigram_embed" (the bigram table), "lm_head", "resid" and "x0"
        (the per-layer lambdas; the bigram table's per-layer lambdas too: they weigh a side input into the
        residual just as x0's do) and "scalar" (value-embed scalar gates, smear, backout and skip parameters)."""
        extra = [getattr(self, name) for name in ("smear_lambda", "backout_lambda", "skip_lambdas") if hasattr(self, name)]
        if self.config.smear:
            extra.append(self.smear_gate.weight)
        groups = {
            "matrix": [p for p in self.blocks.parameters() if p.ndim == 2],
            "embedding": [self.wte.weight],
            "value_embed": [t.weight for t in self.value_embeds.values()],
            "bigram_embed": [self.bigram_embed.weight] if self.config.bigram_embeds else [],
            "lm_head": [self.lm_head.weight],
            "resid": [self.resid_lambdas],
            "x0": [self.x0_lambdas, *([self.bigram_lambdas] if self.config.bigram_embeds else [])],
            "scalar": [*(p for p in self.blocks.parameters() if p.ndim < 2), *extra],
        }
        assert sum(len(g) for g in groups.values()) == len(list(self.parameters())), "param_groups misses a parameter"
        return groups


class KVCache:
    """Keys and values of every layer for inference: k, v [num_layers, B, max_seq_len, Hkv, D],
    preallocated. `pos` positions are filled; GPT.forward writes its T new positions at
    [pos, pos + T) in every layer and then advances pos by T."""

    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        shape = (num_layers, batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.last_tokens: torch.Tensor | None = None  # [B] the last tokens written (smear reads them next)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_seq_len(self) -> int:
        return self.k.size(2)

    def reset(self) -> None:
        self.pos, self.last_tokens = 0, None


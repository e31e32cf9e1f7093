"""nanochat's GPT for Hugging Face transformers, written out next to the weights by `python -m scripts.export_hf`:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=64, do_sample=False)

A self-contained copy of the forward pass of nanochat/model/gpt.py (it imports only torch and transformers), with
every architecture choice read from config.json. x0 = the normed token embedding (with `smear`: plus a gated
share of the previous token's). Per block: x = resid_lambda * x + x0_lambda * x0 (with `unet_skips`: plus a
weighted early layer's output on its mirror layer), x += attn(norm(x)), x += mlp(norm(x)); with `backout`, a
learned share of the mid-depth residual is subtracted at the end. Attention: rotary positions (rope_base), then a
parameter-free RMSNorm of q and k (times qk_scale), grouped-query heads, a per-layer causal window
(window_pattern), and on some layers a value embedding of the input token mixed into v through a per-head gate
(a scalar, or computed from the block input); with `attn_gate`, each head's output times a sigmoid gate of the
block input before the output projection; with `bigram_embeds`, each block's input also gets a learned per-layer
share of a row of a bigram table, the row a hash of (previous token, token). MLP: ReLU squared, 4x wide. Logits:
final norm, lm_head, softcap * tanh(logits / softcap). No biases, no norm weights.

The export refuses a model whose config has a field this file does not implement (nanochat/export/hf.py), so a
new architecture feature has to be added here, and to the export test, before such a model can be exported.
What nanochat's engine does beyond the model is not here: its calculator tool (generate() leaves a
<|python_start|> call unanswered).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.2x names the KV cache `cache`, earlier releases `past_key_values`: accept and return either
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class NanochatConfig(PretrainedConfig):
    """The architecture fields of nanochat's GPTConfig (same names and meaning), plus the number of input
    channels the smear, value-embedding and attention output gates read, and the bigram table's rows and hash
    multipliers (constants of nanochat/model/gpt.py)."""

    model_type = "nanochat"

    def __init__(self, vocab_size: int = 32768, sequence_len: int = 2048, n_layer: int = 12, n_head: int = 6,
                 n_kv_head: int = 6, n_embd: int = 768, head_dim: int = 128, window_pattern: str = "L",
                 short_window: int | None = None, value_embeds: bool = False, softcap: float | None = 15.0,
                 rope_base: float = 10000.0, qk_scale: float = 1.0, smear: bool = False, backout: bool = False,
                 value_embed_gate: str = "scalar", unet_skips: bool = False, attn_gate: bool = False,
                 bigram_embeds: bool = False, smear_channels: int = 24, ve_gate_channels: int = 12,
                 attn_gate_channels: int = 12, bigram_rows: int = 0, bigram_hash: tuple[int, int] = (0, 0),
                 use_cache: bool = True, **kwargs):
        self.vocab_size, self.sequence_len = vocab_size, sequence_len
        self.n_layer, self.n_head, self.n_kv_head = n_layer, n_head, n_kv_head
        self.n_embd, self.head_dim = n_embd, head_dim
        self.window_pattern, self.short_window = window_pattern, short_window
        self.value_embeds, self.softcap, self.rope_base = value_embeds, softcap, rope_base
        self.qk_scale, self.smear, self.backout, self.unet_skips = qk_scale, smear, backout, unet_skips
        self.attn_gate, self.attn_gate_channels = attn_gate, attn_gate_channels
        if value_embed_gate not in ("scalar", "input"):
            raise ValueError(f"value_embed_gate must be scalar or input, got {value_embed_gate!r}")
        self.value_embed_gate = value_embed_gate
        self.smear_channels, self.ve_gate_channels = smear_channels, ve_gate_channels
        if bigram_embeds and (bigram_rows < 2 or len(bigram_hash) != 2):
            raise ValueError(f"bigram_embeds needs bigram_rows >= 2 and two bigram_hash multipliers, got {bigram_rows} "
                             f"and {bigram_hash!r}: export the model again with nanochat's scripts.export_hf")
        self.bigram_embeds, self.bigram_rows, self.bigram_hash = bigram_embeds, bigram_rows, list(bigram_hash)
        self.use_cache = use_cache  # generate() keeps keys and values between steps
        # the names transformers' utilities look for
        self.hidden_size, self.num_hidden_layers = n_embd, n_layer
        self.num_attention_heads, self.num_key_value_heads = n_head, n_kv_head
        self.max_position_embeddings = sequence_len
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def layer_windows(self) -> list[int | None]:
        """Attention window per layer (None = full causal): window_pattern cycled, last layer full."""
        short = self.short_window if self.short_window is not None else max(1, self.sequence_len // 2)
        windows = [short if self.window_pattern[i % len(self.window_pattern)] == "S" else None
                   for i in range(self.n_layer)]
        windows[-1] = None
        return windows

    def has_value_embed(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last layer always included."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x [B, T, H, D] by the angles whose cos/sin are [B, T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: NanochatConfig, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self.layer_idx, self.window = layer_idx, window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.qk_scale, self.ve_gate_channels = config.qk_scale, config.ve_gate_channels
        # the value embedding's gate per kv head: a learned scalar, or 3 sigmoid(W x[..., :ve_gate_channels])
        self.ve_gate = self.ve_gate_linear = None
        if config.has_value_embed(layer_idx) and config.value_embed_gate == "scalar":
            self.ve_gate = nn.Parameter(torch.ones(config.n_kv_head))
        elif config.has_value_embed(layer_idx):
            self.ve_gate_linear = nn.Linear(config.ve_gate_channels, config.n_kv_head, bias=False)
        # attn_gate: each head's output times sigmoid(W x[..., :attn_gate_channels]), before c_proj
        self.attn_gate_channels = config.attn_gate_channels
        self.attn_gate_linear = (nn.Linear(config.attn_gate_channels, config.n_head, bias=False)
                                 if config.attn_gate else None)

    def forward(self, x, cos, sin, ve, key_valid, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            if self.ve_gate_linear is not None:
                gate = 3 * torch.sigmoid(self.ve_gate_linear(x[..., :self.ve_gate_channels])).unsqueeze(-1)
            else:
                gate = self.ve_gate.view(1, 1, -1, 1)
            v = v + gate.to(v.dtype) * ve.view_as(v).to(v.dtype)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        S = k.size(2)  # keys: everything cached, then these T
        q_idx = torch.arange(S - T, S, device=x.device)[:, None]
        k_idx = torch.arange(S, device=x.device)[None, :]
        allowed = k_idx <= q_idx
        if self.window is not None:
            allowed = allowed & (q_idx - k_idx < self.window)
        # padding keys masked out; a query always sees itself, so a padding row is never all -inf (NaN)
        mask = (allowed[None] & key_valid[:, None, :]) | (k_idx == q_idx)[None]
        groups = self.n_head // self.n_kv_head
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                           attn_mask=mask[:, None])
        y = y.transpose(1, 2)  # [B, T, heads, D]
        if self.attn_gate_linear is not None:
            y = y * torch.sigmoid(self.attn_gate_linear(x[..., :self.attn_gate_channels])).unsqueeze(-1).to(y.dtype)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: NanochatConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: NanochatConfig, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self.attn = Attention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ve, key_valid, cache):
        x = x + self.attn(rms_norm(x), cos, sin, ve, key_valid, cache)
        return x + self.mlp(rms_norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    """Parameter names as in nanochat's GPT (wte, blocks.i.attn.c_q, value_embeds.i, lm_head, ...), the
    vocabulary unpadded."""

    config_class = NanochatConfig
    base_model_prefix = "nanochat"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: NanochatConfig) -> None:
        super().__init__(config)
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i, w) for i, w in enumerate(config.layer_windows()))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if config.unet_skips:
            self.skip_lambdas = nn.Parameter(torch.zeros(config.n_layer // 2))
        if config.bigram_embeds:  # every row kept (the hash reads their number): no padding to drop
            self.bigram_embed = nn.Embedding(config.bigram_rows, config.n_embd)
            self.bigram_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """nanochat's init, for a model built from a config alone (from_pretrained overwrites every weight)."""
        if isinstance(module, nn.Linear):
            nn.init.uniform_(module.weight, -(3.0 / module.in_features) ** 0.5, (3.0 / module.in_features) ** 0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, Attention) and module.ve_gate is not None:
            nn.init.ones_(module.ve_gate)
        elif isinstance(module, NanochatForCausalLM):
            nn.init.ones_(module.resid_lambdas)
            nn.init.zeros_(module.x0_lambdas)
            for name in ("smear_lambda", "backout_lambda", "skip_lambdas"):
                if hasattr(module, name):
                    nn.init.zeros_(getattr(module, name))
            if module.config.bigram_embeds:
                nn.init.zeros_(module.bigram_embed.weight)
                nn.init.constant_(module.bigram_lambdas, 0.1)

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def smear(self, x: torch.Tensor, prev_ids: torch.Tensor | None, prev_valid: torch.Tensor) -> torch.Tensor:
        """x_t + smear_lambda sigmoid(smear_gate(x_t[:smear_channels])) x_{t-1}, x the normed embeddings, x_{-1}
        that of `prev_ids` [B, 1]; nothing where `prev_valid` [B, T] is False (see forward)."""
        before_first = torch.zeros_like(x[:, :1]) if prev_ids is None else rms_norm(self.wte(prev_ids))
        before = torch.cat((before_first, x[:, :-1]), dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :self.config.smear_channels]))
        return x + gate.to(x.dtype) * before * prev_valid[..., None].to(x.dtype)

    def bigram(self, input_ids: torch.Tensor, prev_ids: torch.Tensor | None,
               prev_valid: torch.Tensor) -> torch.Tensor:
        """Each position's bigram table row: (token * hash[0]) xor (previous token * hash[1]) mod (rows - 1), the
        previous token of the first position `prev_ids` [B, 1]; the last row where `prev_valid` [B, T] is False."""
        rows, (a, b) = self.config.bigram_rows, self.config.bigram_hash
        ids = input_ids.long()
        prev = torch.cat((ids[:, :1] if prev_ids is None else prev_ids.long(), ids[:, :-1]), dim=1)
        row = torch.bitwise_xor(a * ids, b * prev) % (rows - 1)
        return self.bigram_embed(row.masked_fill(~prev_valid, rows - 1))

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, 1, head_dim/2] in fp32 of angles position * rope_base^(-2i/head_dim)."""
        D = self.config.head_dim
        inv_freq = self.config.rope_base ** (-torch.arange(0, D, 2, dtype=torch.float32, device=position_ids.device) / D)
        angles = position_ids.float()[..., None] * inv_freq
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> softcapped logits [B, T, vocab] (the last `logits_to_keep` positions when > 0).
        attention_mask [B, past + T] (1 = token, 0 = padding) masks padded keys; positions then count real
        tokens only (left padding). labels: the next-token loss (labels shifted inside, -100 ignored)."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            from transformers import DynamicCache
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        key_valid = attention_mask.bool()
        cos, sin = self.rotary(position_ids)
        cfg = self.config
        # the token before the first position: the last one of the previous call, kept on the cache object; a
        # position has a previous token where the key before it is a token (not padding, not before the start)
        prev_ids = getattr(cache, "nanochat_last_tokens", None) if cache is not None else None
        prev_valid = torch.cat((torch.zeros_like(key_valid[:, :1]), key_valid[:, :-1]), dim=1)[:, -T:]
        if cache is not None:
            cache.nanochat_last_tokens = input_ids[:, -1:]
        x = rms_norm(self.wte(input_ids))
        if cfg.smear:
            x = self.smear(x, prev_ids, prev_valid)
        bigram = self.bigram(input_ids, prev_ids, prev_valid) if cfg.bigram_embeds else None
        x0, mid, skips = x, None, []
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if bigram is not None:
                x = x + self.bigram_lambdas[i] * bigram
            if cfg.unet_skips and i >= cfg.n_layer - len(skips):  # layer i's mirror among the first half
                x = x + self.skip_lambdas[cfg.n_layer - 1 - i] * skips[cfg.n_layer - 1 - i]
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, ve, key_valid, cache)
            if cfg.unet_skips and i < cfg.n_layer // 2:
                skips.append(x)
            if i == cfg.n_layer // 2:
                mid = x
        if cfg.backout:
            x = x - self.backout_lambda.to(x.dtype) * mid
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(rms_norm(x)).float()
        if self.config.softcap is not None:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})

"""The decode step: `StaticDecoder`, one token per row over a static KV cache, compiled and CUDA-graphed,
with its attention paths (`DECODE_ATTENTIONS`: the masked torch one here, the Triton kernels in
kernels.decode_attention) and the shared-prompt attention that n samples of one prompt use.
"""
from __future__ import annotations

import os

import torch

from nanochat.common import autocast_for, log0
from nanochat.model.gpt import lm_head_output
from nanochat.registry import Backend, Registry, package_status


def cache_dtype(device: torch.device) -> torch.dtype:
    """KV caches are bf16 on CUDA (half the bytes a decode step reads), fp32 elsewhere (exact on CPU)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def int_tensor_on(values: list, device: torch.device) -> torch.Tensor:
    """Python ints (a list, or a list of equal-length lists) as an int64 tensor on `device`, copied through
    pinned memory on CUDA: a copy from pageable memory would wait for the work already queued (a decode
    step in flight)."""
    host = torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class TorchDecode(Backend):
    name, summary = "torch", "masked, reads the whole cache"

    def supports(self, device: torch.device, head_dim: int, kv_fp8: bool) -> bool:
        return not kv_fp8


class TritonDecode(Backend):
    """kernels.decode_attention: reads only each row's filled positions, from a bf16 or an fp8 cache."""

    def __init__(self, name: str, summary: str) -> None:
        self.name, self.summary = name, summary

    def is_available(self) -> tuple[bool, str]:
        return package_status("triton", "triton", "pip install 'nanochat[gpu]'")

    def supports(self, device: torch.device, head_dim: int, kv_fp8: bool) -> bool:
        return device.type == "cuda" and head_dim & (head_dim - 1) == 0  # the kernels' tiles: a power of two

    def kernel(self, device: torch.device):
        """The kernel module, imported here, on use: triton is an optional dependency."""
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"attention='{self.name}' runs on CUDA, got {device}; use attention='torch' "
                             "(or set TRITON_INTERPRET=1 before starting Python: Triton's slow CPU interpreter)")
        try:
            from nanochat.kernels import decode_attention
        except ImportError as exc:
            raise ImportError(f"attention='{self.name}' needs triton ({exc}): pip install 'nanochat[gpu]'") from exc
        return decode_attention


# auto's order: on a bf16 cache the tensor-core kernel, on an fp8 cache the CUDA-core one (BENCHMARKS.md, H200 at
# batch 128: triton_dot 1.16x the torch path on bf16), the masked torch path where no kernel serves (the CPU)
DECODE_ATTENTIONS = Registry("decode attention", "--attention", [
    TritonDecode("triton_dot", "the decode kernel on tensor cores"),
    TritonDecode("triton", "the decode kernel on CUDA cores"),
    TorchDecode(),
], auto=True)
FP8_CACHE_ORDER = ("triton", "triton_dot", "torch")


def resolve_decode_attention(attention: str, device: torch.device, head_dim: int, kv_fp8: bool) -> str:
    """The decode attention that `attention` names: for "auto" the first in DECODE_ATTENTIONS (FP8_CACHE_ORDER
    for an fp8 cache) that serves this device and head_dim and is installed, else "torch". Other names pass
    through."""
    attention = DECODE_ATTENTIONS.canonical(attention)
    if attention != "auto":
        return attention
    return DECODE_ATTENTIONS.pick(device, head_dim, kv_fp8, order=FP8_CACHE_ORDER if kv_fp8 else None) or "torch"


def masked_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                            key_pos: torch.Tensor, window: int | None = None,
                            return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The decode step's torch attention: q [S, H, D] (one query per row) over the whole static caches
    [S, Hkv, L, D], masked to the positions key_pos (arange(L)) <= pos[s], the last `window` of them when
    given -> [S, H, D] in the cache dtype. Three kernels (q.K, softmax, p.V) that read every position.
    return_lse=True also returns the log of each softmax's denominator [S, H] (fp32), for `merge_attention`."""
    S, H, D = q.shape
    Hkv = k_cache.size(1)
    valid = key_pos[None, :] <= pos[:, None]                                    # [S, L]
    if window is not None:
        valid = valid & (pos[:, None] - key_pos[None, :] < window)
    qg = q.view(S, Hkv, H // Hkv, D).to(k_cache.dtype)                         # query heads by kv head
    scores = (qg @ k_cache.transpose(-1, -2)).float() * D ** -0.5               # [S, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = (torch.softmax(scores, dim=-1).to(v_cache.dtype) @ v_cache).reshape(S, H, D)
    return (out, torch.logsumexp(scores, dim=-1).reshape(S, H)) if return_lse else out


def shared_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                            window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [S, H, D] (one query per row, row s at position pos[s]) over the keys k, v [Hkv, P, D] of one prompt
    that every row continues from -> (out [S, H, D], lse [S, H] fp32). All rows' queries of a kv head go
    through one matmul, so a step reads the prompt once instead of once per row (n samples of a prompt:
    Engine.generate, RL rollouts). A row whose window has left the whole prompt behind gets lse -inf."""
    S, H, D = q.shape
    Hkv, P = k.size(0), k.size(1)
    G = H // Hkv
    qg = q.view(S, Hkv, G, D).transpose(0, 1).reshape(Hkv, S * G, D).to(k.dtype)   # rows x heads of a kv head
    scores = (qg @ k.transpose(1, 2)).float() * D ** -0.5                           # [Hkv, S*G, P]
    if window is not None:
        visible = pos[:, None] - torch.arange(P, device=pos.device)[None, :] < window  # [S, P]
        scores = scores.masked_fill(~visible.repeat_interleave(G, dim=0)[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                           # [Hkv, S*G]
    weights = torch.exp(scores - lse.clamp(min=torch.finfo(lse.dtype).min).unsqueeze(-1))  # all -inf: zeros
    out = weights.to(v.dtype) @ v                                                   # [Hkv, S*G, D]
    return (out.view(Hkv, S, G, D).transpose(0, 1).reshape(S, H, D),
            lse.view(Hkv, S, G).transpose(0, 1).reshape(S, H))


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets, from each set's output [S, H, D] and
    log-sum-exp [S, H] (lse_b finite; lse_a may be -inf: no key of set a) -> fp32 [S, H, D]."""
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a.float() * torch.exp(lse_a - lse).unsqueeze(-1)
            + out_b.float() * torch.exp(lse_b - lse).unsqueeze(-1))


class StaticDecoder:
    """A fixed-shape one-token decode step over `slots` rows, each at its own position.

    GPT.forward with a KVCache keeps one int `pos` for the whole batch, which suits prefill but not
    decode: rows of different lengths cannot share a step, and an int that changes every step defeats
    CUDA graphs. Here positions live in a tensor and every shape is fixed, so one step (embedding,
    blocks, lm_head) can be compiled and captured in a CUDA graph once and replayed for every token,
    and a server can put unrelated requests in different slots of the same step (continuous batching).

    The step is the model's own block computation (`GPT.run`) for T=1, with each row's rotary row and an
    attention that stores the step's k/v and reads the whole static cache [slots, Hkv, max_seq_len, D] under
    a mask of the positions each row has filled; `prev_tokens` carries each row's last token (smear).
    `tests/test_engine.py` checks it token-for-token against full recomputation.

    fuse_qkv (default: when compiled) keeps each layer's q, k, v weights stacked in one matrix, so the
    step runs one projection matmul instead of three: at batch 1 a step is bound by its ~17 kernels per
    layer, not by bytes. The stacked copies are refreshed from the model by every `load_prompt`, so a
    model trained between generations (RL) is never decoded with stale weights.

    attention="triton" replaces the masked torch attention by `kernels.decode_attention`, one kernel that
    reads only each row's filled positions ("triton_dot": its tensor-core variant, one program per kv head);
    with either, kv_fp8=True stores the cache in float8 (e4m3) with a scale per vector, halving the bytes a
    batched step reads (not exact: greedy tokens can differ). "auto" (the default) takes the faster kernel on
    CUDA and the torch path elsewhere (`resolve_decode_attention`), and logs its pick.

    shared_prompt_len=P > 0 makes a decoder for n continuations of one prompt of P tokens
    (`load_shared_prompt`): the prompt's keys and values are stored once, in the cache dtype, and attended
    by all rows through one matmul per kv head (`shared_prompt_attention`); each row's own cache holds only
    its max_seq_len - P generated positions, and the two attentions are merged by their log-sum-exps. At
    batch 128, a 1,024-token prompt and 256 new tokens, a d20 step reads ~1/8 of the KV bytes of 128 copies.
    """

    def __init__(self, model, slots: int, max_seq_len: int, compile: bool = False,
                 cuda_graph: bool | None = None, fuse_qkv: bool | None = None, attention: str = "auto",
                 kv_fp8: bool = False, shared_prompt_len: int = 0):
        DECODE_ATTENTIONS.canonical(attention)  # an unknown name fails here, listing the choices
        if not 0 <= shared_prompt_len < max_seq_len:
            raise ValueError(f"shared_prompt_len must be in [0, max_seq_len={max_seq_len}), got {shared_prompt_len}")
        cfg = model.config
        self.model, self.slots, self.max_seq_len = model, slots, max_seq_len
        self.shared_prompt_len = shared_prompt_len
        self.device = next(model.parameters()).device
        if attention == "auto":
            attention = resolve_decode_attention(attention, self.device, cfg.head_dim, kv_fp8)
            log0(f"decode attention: auto -> {attention}")
        if kv_fp8 and attention == "torch":
            raise ValueError("an fp8 KV cache is read by the triton decode kernel only: pass attention='triton' "
                             "(on CUDA, or with TRITON_INTERPRET=1 on the CPU)")
        self.dtype = cache_dtype(self.device)
        self.attention, self._kernel = attention, None
        if attention != "torch":
            self._kernel = DECODE_ATTENTIONS[attention].kernel(self.device)
        # One buffer per layer, not one [n_layer, ...] tensor: under torch.compile a write into a slice of
        # a shared buffer that is read afterwards can be functionalized into a copy of the whole buffer,
        # once per layer (the d20 decode step measured 62 ms at 32 slots); a per-layer buffer is written
        # once and then read, the pattern the compiler updates in place.
        row_len = max_seq_len - shared_prompt_len
        shape = (slots, cfg.n_kv_head, row_len, cfg.head_dim)
        kv_dtype = torch.float8_e4m3fn if kv_fp8 else self.dtype
        self.k = [torch.zeros(shape, device=self.device, dtype=kv_dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=self.device, dtype=kv_dtype) for _ in range(cfg.n_layer)]
        scales = lambda: [torch.ones(shape[:-1], device=self.device) for _ in range(cfg.n_layer)]  # noqa: E731
        self.k_scale, self.v_scale = (scales(), scales()) if kv_fp8 else (None, None)
        self.prompt_k = self.prompt_v = None
        if shared_prompt_len:
            prompt_shape = (cfg.n_kv_head, shared_prompt_len, cfg.head_dim)
            self.prompt_k = [torch.zeros(prompt_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
            self.prompt_v = [torch.zeros(prompt_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        # where the next token goes (absolute: rotary); row caches are indexed from shared_prompt_len on
        self.pos = torch.full((slots,), shared_prompt_len, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # the step's input tokens
        self.prev_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # the tokens before them
        self._rows = torch.arange(slots, device=self.device)
        self._key_pos = torch.arange(row_len, device=self.device)
        fuse_qkv = compile if fuse_qkv is None else fuse_qkv
        self.qkv_weights = None
        if fuse_qkv:
            rows = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
            self.qkv_weights = [torch.empty(rows, cfg.n_embd, device=self.device, dtype=self.dtype)
                                for _ in range(cfg.n_layer)]
            self._qkv_versions: tuple[int, ...] | None = None
            self._refresh_qkv_weights()
        self._step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._use_graph = (compile if cuda_graph is None else cuda_graph) and self.device.type == "cuda"
        self._logits: torch.Tensor | None = None

    def load_prompt(self, slots: list[int], cache, rows: torch.Tensor | None = None,
                    lengths: torch.Tensor | None = None) -> None:
        """Copy a prefilled KVCache (the model's own prefill) into `slots`: a batch-1 cache goes into
        every slot, a batch-len(slots) cache row by row; refresh the stacked q/k/v weights.

        For a right-padded batch (`Engine.prefill_batch`): `rows` (int64 on the device, one per slot) names
        the cache row each slot takes (a row may fill several slots: n samples) and `lengths` (on the
        device, one per slot) each slot's prompt length, its position. All cache.pos positions are copied;
        those at or past a slot's length hold padding, which no step attends to: a step writes its token's
        k/v at the slot's position before attending to positions <= it (both attention paths)."""
        if self.shared_prompt_len:
            raise ValueError("this decoder continues one shared prompt: load it with load_shared_prompt(cache)")
        n = cache.pos
        if n >= self.max_seq_len:
            raise ValueError(f"prompt of {n} tokens does not fit max_seq_len {self.max_seq_len}")
        index = int_tensor_on(slots, self.device)
        if self.qkv_weights is not None:
            self._refresh_qkv_weights()
        for layer in range(len(self.k)):
            k, v = cache.k[layer, :, :n], cache.v[layer, :, :n]
            if rows is not None:
                k, v = k.index_select(0, rows), v.index_select(0, rows)
            self._store(layer, (index, slice(None), slice(0, n)), k.transpose(1, 2), v.transpose(1, 2))
        if lengths is None:
            self.pos[index] = n
        else:
            self.pos.index_copy_(0, index, lengths.to(self.pos.dtype))
        last = cache.last_tokens if rows is None else cache.last_tokens.index_select(0, rows)
        self.prev_tokens.index_copy_(0, index, last.expand(len(slots)))

    def load_shared_prompt(self, cache) -> None:
        """Store a prefilled batch-1 KVCache of exactly shared_prompt_len positions as the prompt every slot
        continues from, put every slot right after it, and refresh the stacked q/k/v weights."""
        if not self.shared_prompt_len:
            raise ValueError("this decoder has no shared prompt (shared_prompt_len=0): use load_prompt")
        if cache.batch_size != 1 or cache.pos != self.shared_prompt_len:
            raise ValueError(f"load_shared_prompt takes a batch-1 cache of {self.shared_prompt_len} positions, "
                             f"got batch {cache.batch_size} with {cache.pos}")
        if self.qkv_weights is not None:
            self._refresh_qkv_weights()
        n = self.shared_prompt_len
        for layer in range(len(self.prompt_k)):
            self.prompt_k[layer].copy_(cache.k[layer, 0, :n].transpose(0, 1))
            self.prompt_v[layer].copy_(cache.v[layer, 0, :n].transpose(0, 1))
        self.pos.fill_(n)
        self.prev_tokens.copy_(cache.last_tokens.expand(self.slots))

    @torch.no_grad()
    def _refresh_qkv_weights(self) -> None:
        """Stack each layer's current c_q, c_k, c_v weights into its buffer, in place (the CUDA graph
        reads these buffers), cast to the cache dtype on the way. Skipped while no weight has changed
        since the last stacking (their version counters: an optimizer step or load_state_dict bumps
        them): a server loads a prompt per request and never trains, and restacking cost it 3 launches
        per layer per admission."""
        weights = [lin.weight for block in self.model.blocks for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v)]
        versions = tuple(w._version for w in weights)
        if versions == self._qkv_versions:
            return
        for weight, block in zip(self.qkv_weights, self.model.blocks):
            block.attn.qkv_weight(out=weight)
        self._qkv_versions = versions

    def _store(self, layer: int, where: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [..., D] into `layer`'s caches at index `where` (quantized for an fp8 cache)."""
        if self.k_scale is None:
            self.k[layer][where] = k.to(self.dtype)
            self.v[layer][where] = v.to(self.dtype)
            return
        (kq, ks), (vq, vs) = self._kernel.quantize_fp8(k), self._kernel.quantize_fp8(v)
        self.k[layer][where], self.k_scale[layer][where] = kq, ks
        self.v[layer][where], self.v_scale[layer][where] = vq, vs

    def _step(self) -> torch.Tensor:
        model = self.model
        tok, pos = self.tokens, self.pos.clamp(self.shared_prompt_len, self.max_seq_len - 1)
        row_pos = pos - self.shared_prompt_len                                       # index in the row caches
        cos, sin = model.cos[0, pos].unsqueeze(1), model.sin[0, pos].unsqueeze(1)  # [S, 1, 1, D/2]

        def attend(attn, q, k, v):  # q [S, 1, H, D]; k, v [S, 1, Hkv, D] of this step's token
            i, shared = attn.layer_idx, self.prompt_k is not None
            self._store(i, (self._rows, slice(None), row_pos), k[:, 0], v[:, 0])
            if self.attention != "torch":
                y = self._kernel.decode_attention(q[:, 0], self.k[i], self.v[i], row_pos + 1, attn.window,
                                                  None if self.k_scale is None else self.k_scale[i],
                                                  None if self.v_scale is None else self.v_scale[i],
                                                  dot=self.attention == "triton_dot", return_lse=shared)
            else:
                y = masked_decode_attention(q[:, 0], self.k[i], self.v[i], row_pos, self._key_pos, attn.window,
                                            return_lse=shared)
            if shared:  # the row's own positions, merged with the prompt's
                y_prompt, lse_prompt = shared_prompt_attention(q[:, 0], self.prompt_k[i], self.prompt_v[i], pos,
                                                               attn.window)
                y = merge_attention(y_prompt, lse_prompt, *y)
            return y.unsqueeze(1).to(q.dtype)

        x = model.run(tok.unsqueeze(1), cos, sin, attend, prev_tokens=self.prev_tokens, qkv_weights=self.qkv_weights)
        self.prev_tokens.copy_(tok)
        self.pos.copy_(pos + 1)
        return lm_head_output(x[:, 0], model.lm_head, model.config, None, "mean")

    def step(self) -> torch.Tensor:
        """Feed `self.tokens` at `self.pos` for every slot; returns fp32 logits [slots, vocab]
        (a buffer overwritten by the next step) and advances every slot's position by one."""
        with autocast_for(self.device):
            if not self._use_graph:
                return self._step_fn()
            if self._graph is None:
                self._capture()
            self._graph.replay()
            return self._logits

    def step_outside_graph(self) -> torch.Tensor:
        """One step through the (compiled) step function without the CUDA graph: the same kernels, each
        one visible to a profiler. Advances every slot's position like step()."""
        with autocast_for(self.device):
            return self._step_fn()

    def _capture(self) -> None:
        """Warm up (compiles) on a side stream, then record one step into a CUDA graph."""
        saved_pos, saved_prev = self.pos.clone(), self.prev_tokens.clone()  # k/v written past a row's position
        # are rewritten before being read
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step_fn()
        self.pos.copy_(saved_pos)  # undo the warm-up steps
        self.prev_tokens.copy_(saved_prev)

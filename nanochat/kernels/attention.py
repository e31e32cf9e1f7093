"""Causal (optionally sliding-window) attention behind one call, with swappable backends.

    y = attention(q, k, v, window=512)             # q [B, T, H, D], k/v [B, T, Hkv, D] -> y [B, T, H, D]

Semantics, identical on every backend: query i attends to key j iff j <= i and, when `window` is an
int, i - j < window (the window counts the query's own position). `window=None` is full causal.
Hkv must divide H (grouped-query attention). The softmax scale is 1/sqrt(D).

A backend is one class (nanochat.registry.Backend) with `is_available() -> (bool, reason)`,
`supports(window, dtype, device, doc_mask)` (may it compute this layer correctly?), `masks_documents`
and `attend(q, k, v, window)`,
plus one line in ATTENTION_BACKENDS. The registry order is auto's preference order: auto takes, per
layer, the first backend that is available and supports the layer.

With a KV cache (inference), this step's k/v are written at cache positions [pos, pos + T) and the
queries attend over [0, pos + T) with the same mask, shifted by pos; the caller advances `pos`
after its last layer.

Document masking (`docs=Documents(idx, bos_id)`, training and evaluation over packed rows): a row holds
several documents, each starting with BOS; query i then also needs key j in its own document. Backends
that can (`masks_documents`: sdpa with an explicit mask, flex with a BlockMask, fa4 as variable-length
sequences) implement `attend_docs(q, k, v, window, docs)`; auto skips the others (fa3, cudnn), and
naming one of those with documents is an error. The KV-cache path decodes one document per row: no docs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanochat.common import log0
from nanochat.registry import Backend, BackendUnavailable, Registry  # noqa: F401 -- BackendUnavailable: public

try:  # FlexAttention arrived in torch 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _FLEX_REASON = "ok"
except ImportError as _exc:
    create_block_mask = flex_attention = None
    _FLEX_REASON = f"torch {torch.__version__} has no FlexAttention ({_exc}); needs torch >= 2.5"

HALF_DTYPES = (torch.bfloat16, torch.float16)


def causal_window_mask(q_len: int, k_len: int, window: int | None, device, offset: int | None = None) -> torch.Tensor:
    """Boolean [q_len, k_len] mask, True = attend. Query i sits at absolute position offset + i
    (default k_len - q_len: the queries are the last q_len positions); key j sits at position j."""
    offset = k_len - q_len if offset is None else offset
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (q_pos - k_pos < window)
    return mask


def _eager_cached(cache: dict, key: tuple, build: Callable[[], Any]) -> Any:
    """cache[key], built on first use. Inside a compiled graph nothing is stored: the value is built
    in-graph there (the compiler folds it), and a tensor made while tracing must not outlive the trace."""
    value = cache.get(key)
    if value is None:
        value = build()
        if not torch.compiler.is_compiling():
            cache[key] = value
    return value


_SDPA_MASKS: dict[tuple, torch.Tensor] = {}


def _cached_window_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """The [T, T] sliding-window mask, built once per (T, window, device)."""
    return _eager_cached(_SDPA_MASKS, (T, window, str(device)), lambda: causal_window_mask(T, T, window, device))


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand [B, Hkv, T, D] k/v to q's head count, for kernels whose GQA support is uncertain."""
    groups = q.size(1) // k.size(1)
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _first(result: Any) -> torch.Tensor:
    """flash-attn versions return either `out` or `(out, softmax_lse, ...)`."""
    return result[0] if isinstance(result, (tuple, list)) else result


class Documents:
    """The documents of packed rows idx [B, T], for attention that stays within each of them.

    Built once per forward from the token ids: a document starts at every `bos_id` and at a row's first
    position (whatever its token). `ids` [B, T] int32 numbers each position's document within its row
    (from 1); query i sees key j only if ids[b, i] == ids[b, j]. What a backend derives from it (a mask per
    window, FA4's cu_seqlens) is built on first use and shared by the forward's other layers (`derived`).
    """

    def __init__(self, idx: torch.Tensor, bos_id: int) -> None:
        starts = idx == bos_id
        self.starts = torch.cat((torch.ones_like(starts[:, :1]), starts[:, 1:]), dim=1)
        self.ids = self.starts.cumsum(1, dtype=torch.int32)
        self._derived: dict[Any, Any] = {}

    def derived(self, key: Any, build: Callable[[], Any]) -> Any:
        """self's `key` structure, built by `build()` on first use (a per-forward cache: under torch.compile
        it lives only within the trace, like the rest of the forward)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def mask(self, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, T, T], True = attend: the causal(+window) rule and the same document."""
        T = self.ids.size(1)
        same = self.ids.unsqueeze(2) == self.ids.unsqueeze(1)
        return (causal_window_mask(T, T, window, self.ids.device) & same).unsqueeze(1)

    def cu_seqlens(self) -> torch.Tensor:
        """int32 [n + 1]: where each of the n documents of the flattened B * T positions starts, then B * T."""
        return _cu_seqlens(self.starts)


@torch.library.custom_op("nanochat::cu_seqlens", mutates_args=())
def _cu_seqlens(starts: torch.Tensor) -> torch.Tensor:
    """The flat offsets of the True positions of starts [B, T] (bool), then B * T, int32. Its length depends
    on the data (a device sync), so it is one op with a dynamic output size: a compiled model stays one graph."""
    flat = starts.flatten()
    return torch.cat((flat.nonzero().flatten(), flat.new_tensor([flat.numel()], dtype=torch.long))).int()


@_cu_seqlens.register_fake
def _(starts):
    return starts.new_empty(torch.library.get_ctx().new_dynamic_size(min=2), dtype=torch.int32)


class SDPABackend(Backend):
    """Portable PyTorch SDPA: is_causal for full windows, an explicit boolean mask for sliding ones
    and for documents."""

    name, summary = "sdpa", "PyTorch SDPA, any device"
    masks_documents = True

    def attend(self, q, k, v, window):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        T = q.size(2)
        if window is None or window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
        else:
            # The memory-efficient kernel takes masks but (in older torch) not GQA: expand k/v.
            k, v = _repeat_kv(q, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_window_mask(T, window, q.device))
        return y.transpose(1, 2)

    def attend_docs(self, q, k, v, window, docs):
        mask = docs.derived(("sdpa", window), lambda: docs.mask(window))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = _repeat_kv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


class CudnnBackend(Backend):
    """SDPA pinned to cuDNN's fused attention: the fastest full-causal kernel on Hopper in torch."""

    name, summary = "cudnn", "SDPA on cuDNN, full causal"
    masks_documents = False

    def is_available(self) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "needs a CUDA GPU"
        if not torch.backends.cudnn.is_available():
            return False, "cuDNN is not available in this torch build"
        return True, "ok"

    def supports(self, window, dtype, device, doc_mask=False) -> bool:
        return torch.device(device).type == "cuda" and dtype in HALF_DTYPES and window is None and not doc_mask

    def attend(self, q, k, v, window):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = _repeat_kv(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2)


_BLOCK_MASKS: dict[tuple, Any] = {}
_COMPILED_FLEX: Any = None
# Inductor routes queries shorter than 128 to its flex-decoding template, which finds no valid config when
# T x (query heads per kv head) > 128 (an evaluation row of 80 tokens with GQA 4 fails to compile); our decode
# path is the KV cache's, never flex, so flex always takes its main kernel.
_FLEX_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


def _flex_block_mask(T: int, window: int | None, device: torch.device):
    """Causal(+window) BlockMask, cached per (T, window, device): blocks outside the mask are skipped."""
    if window is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    return _eager_cached(_BLOCK_MASKS, (T, window, str(device)),
                         lambda: create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device))


def _flex_document_mask(ids: torch.Tensor, window: int | None):
    """BlockMask [B] of Documents.ids [B, T]: causal(+window) within each document. Built per forward (the
    documents change every batch): traced into a compiled model's graph, compiled on its own in eager CUDA
    (else it materializes the dense [B, T, T] mask)."""
    def mask_mod(b, h, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (ids[b, q_idx] == ids[b, kv_idx])
        return visible if window is None else visible & (q_idx - kv_idx < window)
    B, T = ids.shape
    return create_block_mask(mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T, device=ids.device,
                             _compile=ids.device.type == "cuda" and not torch.compiler.is_compiling())


def _flex_fn(device: torch.device):
    """flex_attention is only fast compiled (a fused Triton kernel); compiled lazily, once. Elsewhere
    it runs eagerly (unfused, materializes the scores, forward only): for tests. Inside a compiled
    model the plain function is traced into the model's graph."""
    global _COMPILED_FLEX
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class FlexBackend(Backend):
    """FlexAttention with a causal+sliding-window BlockMask: cost scales with the window, not T."""

    name, summary = "flex", "FlexAttention, CUDA"
    masks_documents = True

    def is_available(self) -> tuple[bool, str]:
        return flex_attention is not None, _FLEX_REASON

    def supports(self, window, dtype, device, doc_mask=False) -> bool:
        # On the CPU flex runs forward only and unfused (no backward): attend() works there for
        # testing, but the model never routes a CPU layer to it.
        return torch.device(device).type == "cuda" and dtype in (*HALF_DTYPES, torch.float32)

    def attend(self, q, k, v, window):
        return _flex(q, k, v, _flex_block_mask(q.size(1), window, q.device))

    def attend_docs(self, q, k, v, window, docs):
        return _flex(q, k, v, docs.derived(("flex", window), lambda: _flex_document_mask(docs.ids, window)))


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex_attention of q [B, T, H, D], k/v [B, T, Hkv, D] under `block_mask`, on its main kernel."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1),
                           kernel_options=_FLEX_KERNEL_OPTIONS)
    return y.transpose(1, 2)


def _import_fa3() -> tuple[Any, str]:
    """(flash_attn_interface module or None, reason). Done once at import, so that availability
    checks inside a compiled forward are plain attribute reads."""
    try:
        return importlib.import_module("flash_attn_interface"), "ok"
    except Exception as exc:  # ImportError, or a CUDA/ABI mismatch raised while loading the extension
        return None, (f"flash_attn_interface not importable ({type(exc).__name__}: {exc}); install "
                      "FlashAttention-3 (the hopper/ build of flash-attn) or use --attn auto")


_FA3, _FA3_REASON = _import_fa3()


class FA3Backend(Backend):
    """FlashAttention-3 (Hopper): native [B, T, H, D] layout, native GQA and sliding windows.

    PyTorch's own FA3 route (torch.nn.attention.activate_flash_attention_impl("FA3")) loads this same
    flash_attn_interface module and serves it through SDPA, which has no window argument, so calling
    the module directly is both simpler and more capable.
    """

    name, summary = "fa3", "FlashAttention-3, Hopper"
    masks_documents = False  # its flash_attn_varlen_func could; not wired up without an FA3 build to test it on
    _available: tuple[bool, str] | None = None

    def is_available(self) -> tuple[bool, str]:
        if self._available is None:
            if _FA3 is None:
                self._available = (False, _FA3_REASON)
            elif not torch.cuda.is_available():
                self._available = (False, "needs a CUDA GPU")
            elif torch.cuda.get_device_capability()[0] != 9:
                major, minor = torch.cuda.get_device_capability()
                self._available = (False, f"FA3 needs a Hopper GPU (sm_90), found sm_{major}{minor}; use --attn auto")
            else:
                self._available = (True, "ok")
        return self._available

    def supports(self, window, dtype, device, doc_mask=False) -> bool:
        return torch.device(device).type == "cuda" and dtype in HALF_DTYPES and not doc_mask

    @staticmethod
    def window_size(window: int | None) -> tuple[int, int]:
        # flash-attn's window_size=(left, right): query i sees keys [i - left, i + right]; -1 = unbounded.
        return (-1, 0) if window is None else (window - 1, 0)

    def attend(self, q, k, v, window):
        return _first(_FA3.flash_attn_func(q, k, v, causal=True, window_size=self.window_size(window)))

    def attend_cached(self, q, k, v, window, kv_cache, layer_idx):
        """flash_attn_with_kvcache writes k/v into the cache at cache_seqlens and attends in one kernel."""
        seqlens = torch.full((q.size(0),), kv_cache.pos, dtype=torch.int32, device=q.device)
        out = _FA3.flash_attn_with_kvcache(
            q, kv_cache.k[layer_idx], kv_cache.v[layer_idx], k=k, v=v, cache_seqlens=seqlens,
            causal=True, window_size=self.window_size(window),
        )
        return _first(out)


# FlashAttention-4 (flash-attn-4, CuTe DSL). Its own autograd.Function launches JIT-compiled kernels from
# Python through TVM-FFI, which torch.compile cannot trace; so its forward and backward run here as two
# custom ops (opaque to the compiler, with fake impls for shapes) joined by a registered autograd formula:
# a compiled model keeps one graph. They call FA4's internal _flash_attn_fwd / _flash_attn_bwd (the
# functions its autograd.Function calls), as of flash-attn-4 4.0.0b36.
_FA4: Any = None  # flash_attn.cute.interface, imported by FA4Backend.is_available() on a GPU that can run it


def _fa4_varlen(cu_seqlens: torch.Tensor | None, max_seqlen: int | None) -> dict:
    """FA4's variable-length arguments: the same sequences for queries and keys (documents), or none."""
    if cu_seqlens is None:
        return {}
    return dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)


@torch.library.custom_op("nanochat::fa4_forward", mutates_args=())
def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_left: int | None,
                 cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with FA4's (window_left, 0) window -> (out [B, T, H, D], lse [B, H, T] fp32). With
    cu_seqlens: q [N, H, D] holds the sequences [cu[i], cu[i+1]) of at most max_seqlen positions, each
    attended on its own -> (out [N, H, D], lse [H, N])."""
    out, lse = _FA4._flash_attn_fwd(q, k, v, causal=True, window_size_left=window_left, window_size_right=0,
                                    return_lse=True, **_fa4_varlen(cu_seqlens, max_seqlen))[:2]
    return out, lse


@_fa4_forward.register_fake
def _(q, k, v, window_left, cu_seqlens=None, max_seqlen=None):
    lse_shape = (q.size(1), q.size(0)) if cu_seqlens is not None else (q.size(0), q.size(2), q.size(1))
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("nanochat::fa4_backward", mutates_args=())
def _fa4_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, window_left: int | None, cu_seqlens: torch.Tensor | None = None,
                  max_seqlen: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _FA4._flash_attn_bwd(q, k, v, out, grad_out, lse, causal=True, window_size_left=window_left,
                                      window_size_right=0, **_fa4_varlen(cu_seqlens, max_seqlen))
    # FA4 allocates the grads like its (possibly re-laid-out) inputs; the fake impl promises contiguous ones
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_backward.register_fake
def _(grad_out, q, k, v, out, lse, window_left, cu_seqlens=None, max_seqlen=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, window_left, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.window_left, ctx.max_seqlen = window_left, max_seqlen


def _fa4_autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(grad_out, q, k, v, out, lse, ctx.window_left, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None


_fa4_forward.register_autograd(_fa4_autograd, setup_context=_fa4_setup_context)

FA4_INSTALL_HINT = ("pip install flash-attn-4 (offline GPU machine: carry .whl_fa4 from benchmarks/prepare_fa4.sh "
                    "and source benchmarks/fa4_env.sh)")


def _fa4_status() -> tuple[bool, str]:
    """(usable, reason) for FA4, importing it only where it can run: the import loads CUTLASS's ~200 MB MLIR
    compiler, which a CPU run never needs. Sets _FA4."""
    global _FA4
    spec = importlib.util.find_spec("flash_attn")  # finds the top-level package without importing it
    if spec is None or not any(os.path.isdir(os.path.join(p, "cute")) for p in spec.submodule_search_locations or ()):
        return False, f"flash-attn-4 (flash_attn.cute) is not installed; {FA4_INSTALL_HINT}"
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"FA4's backward needs sm_90 or newer (Hopper, Blackwell), found sm_{major}{minor}"
    try:
        interface = importlib.import_module("flash_attn.cute.interface")
    except Exception as exc:  # ImportError, a CUDA-driver/toolkit mismatch of the CuTe DSL, a missing dependency
        return False, f"flash_attn.cute not importable ({type(exc).__name__}: {exc}); {FA4_INSTALL_HINT}"
    if not all(hasattr(interface, f) for f in ("_flash_attn_fwd", "_flash_attn_bwd")):
        return False, "this flash-attn-4 lacks _flash_attn_fwd/_flash_attn_bwd (written against 4.0.0b36)"
    _FA4 = interface
    return True, "ok"


class FA4Backend(Backend):
    """FlashAttention-4 (CuTe DSL, sm90+): native [B, T, H, D] layout, GQA and sliding windows, forward and
    backward. Each kernel configuration is JIT-compiled on first use (tens of seconds; one config serves every
    window size: the window is a runtime argument). Decode keeps the split-K kernels: FA4 has no kernel that
    appends to a KV cache, and on sm90 no split-KV either."""

    name, summary = "fa4", "FlashAttention-4, sm90+"
    masks_documents = True  # as variable-length sequences (cu_seqlens): causal and windowed, forward and backward
    _available: tuple[bool, str] | None = None

    def is_available(self) -> tuple[bool, str]:
        if self._available is None:
            self._available = _fa4_status()
            if not self._available[0]:  # once per process: auto skips fa4 silently after this
                log0(f"attention: fa4 unavailable: {self._available[1]}")
        return self._available

    def supports(self, window, dtype, device, doc_mask=False) -> bool:
        return torch.device(device).type == "cuda" and dtype in HALF_DTYPES

    @staticmethod
    def window_size(window: int | None, k_len: int) -> tuple[int | None, int]:
        # FA4's (left, right), queries aligned to the last keys: query i sees keys [i - left, i + right],
        # None = unbounded. A window covering every key is full causal (FA4's cheaper causal kernel).
        return (None, 0) if window is None or window >= k_len else (window - 1, 0)

    def attend(self, q, k, v, window):
        return _fa4_forward(q, k, v, self.window_size(window, k.size(1))[0])[0]

    def attend_docs(self, q, k, v, window, docs):
        """The B * T positions as one batch of variable-length sequences, one per document (a row's last
        document ends with the row): each sequence is attended alone, causally, with the window."""
        B, T = q.shape[:2]
        cu_seqlens = docs.derived("cu_seqlens", docs.cu_seqlens)
        out = _fa4_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), self.window_size(window, T)[0],
                           cu_seqlens, T)[0]
        return out.unflatten(0, (B, T))


# name -> backend. Order = auto's preference. Adding a backend: one class above, one line here.
ATTENTION_BACKENDS = Registry("attention backend", "--attn", [
    FA3Backend(),
    FA4Backend(),  # H100: full causal 1.09x cuDNN's, window 512 1.51x flex's; d12 with documents 1.04x (BENCHMARKS.md)
    CudnnBackend(),
    FlexBackend(),
    SDPABackend(),
], auto=True)

_CHOICES: dict[tuple, str] = {}
_LOGGED: set[tuple] = set()


def check_doc_mask_backend(backend: str) -> None:
    """Refuse document masking on a named backend that has no kernel for it (ValueError naming the fix)."""
    name = ATTENTION_BACKENDS.canonical(backend)
    if name != "auto" and not ATTENTION_BACKENDS[name].masks_documents:
        able = ", ".join(n for n, b in ATTENTION_BACKENDS.items() if b.masks_documents)
        raise ValueError(f"attention backend {name!r} cannot mask documents (--doc_mask true): it has no "
                         f"per-document (variable-length) kernel here. Use --attn auto or one of {able}, "
                         "or --doc_mask false")


def select_backend(window: int | None, dtype: torch.dtype, device, backend: str = "auto",
                   doc_mask: bool = False, compiled: bool = True) -> str:
    """The backend name that computes a layer with this window/dtype/device (and documents, doc_mask).

    auto: the first backend in ATTENTION_BACKENDS that is available and supports the layer. An explicit name
    must be available (else BackendUnavailable naming why); for a layer it cannot compute (e.g. cudnn and a
    sliding window) auto's pick is used instead, and the log line says so.
    With doc_mask, a name that cannot mask documents at all is a ValueError (check_doc_mask_backend).
    compiled=False (a forward outside a compiled graph: evaluation, fine-tuning): auto takes sdpa's explicit mask
    instead of flex, for documents and windows alike: flex's kernel (and a document BlockMask) would compile again
    for every new batch shape, and run unfused, materializing the scores, past dynamo's recompile limit.
    """
    device = torch.device(device)
    key = (backend, window, dtype, device.type, doc_mask, compiled)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if doc_mask:
        check_doc_mask_backend(backend)
    if backend != "auto" and ATTENTION_BACKENDS.require(backend).supports(window, dtype, device, doc_mask):
        choice = backend
    else:
        choice = ATTENTION_BACKENDS.pick(window, dtype, device, doc_mask)  # sdpa serves every layer
        if choice == "flex" and not compiled:
            choice = "sdpa"
    _CHOICES[key] = choice
    return choice


def layer_backends(windows: Iterable[int | None], device, backend: str = "auto", doc_mask: bool = False,
                   compiled: bool = True) -> set[str]:
    """The backends select_backend picks for these layer windows in a bf16 (autocast) training step."""
    return {select_backend(window, torch.bfloat16, device, backend, doc_mask, compiled) for window in set(windows)}


@torch.compiler.assume_constant_result
def _layer_backend(backend: str, window: int | None, dtype: torch.dtype, device_type: str, layer_idx: int,
                   doc_mask: bool = False, compiled: bool = True) -> str:
    """select_backend plus the once-per-layer log line. Under torch.compile this runs eagerly at trace
    time and its answer is baked into the graph: no graph break, no per-step Python."""
    name = select_backend(window, dtype, device_type, backend, doc_mask, compiled)
    if (layer_idx, window, name, doc_mask) not in _LOGGED:
        _LOGGED.add((layer_idx, window, name, doc_mask))
        note = "" if backend in ("auto", name) else f" ({backend} does not support this layer)"
        docs = ", masked per document" if doc_mask else ""
        in_graph = name if compiled else select_backend(window, dtype, device_type, backend, doc_mask)
        docs += "" if in_graph == name else f" (outside a compiled graph; {in_graph} inside one)"
        log0(f"attention: layer {layer_idx} window {window or 'full'} -> {name}{docs}{note}")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None, backend: str = "auto",
              kv_cache=None, layer_idx: int = 0, docs: Documents | None = None) -> torch.Tensor:
    """Causal attention, q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D], within each document of `docs`
    when given; see the module docstring."""
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1 or None (full causal), got {window}")
    if kv_cache is not None:
        if docs is not None:
            raise ValueError("document masking is for forwards over packed rows, not the KV-cache path (it decodes "
                             "one document per row): pass docs=None with a kv_cache")
        return _attend_cached(q, k, v, window, backend, kv_cache, layer_idx)
    name = _layer_backend(backend, window, q.dtype, q.device.type, layer_idx, docs is not None,
                          torch.compiler.is_compiling())
    if docs is None:
        return ATTENTION_BACKENDS[name].attend(q, k, v, window)
    return ATTENTION_BACKENDS[name].attend_docs(q, k, v, window, docs)


def _attend_cached(q, k, v, window, backend, kv_cache, layer_idx):
    """Decode/prefill against a KV cache: FA3's fused kvcache kernel when auto/explicit picks fa3,
    else SDPA with an explicit mask over the filled part of the cache (exact for any window)."""
    T, pos = q.size(1), kv_cache.pos
    end = pos + T
    if end > kv_cache.k.size(2):
        raise ValueError(f"KV cache overflow: {pos} cached + {T} new positions > max_seq_len {kv_cache.k.size(2)}; "
                         "allocate the KVCache with a larger max_seq_len")
    name = _layer_backend(backend, window, q.dtype, q.device.type, layer_idx)
    if name == "fa3" and kv_cache.k.dtype == q.dtype:
        return ATTENTION_BACKENDS["fa3"].attend_cached(q, k, v, window, kv_cache, layer_idx)
    kv_cache.k[layer_idx, :, pos:end] = k
    kv_cache.v[layer_idx, :, pos:end] = v
    keys = kv_cache.k[layer_idx, :, :end].to(q.dtype).transpose(1, 2)
    values = kv_cache.v[layer_idx, :, :end].to(q.dtype).transpose(1, 2)
    qt = q.transpose(1, 2)
    keys, values = _repeat_kv(qt, keys, values)
    mask = causal_window_mask(T, end, window, q.device, offset=pos)
    return F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask).transpose(1, 2)

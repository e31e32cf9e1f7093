"""Causal (optionally sliding-window) attention behind one call, with swappable backends.

    y = attention(q, k, v, window=512)             # q [B, T, H, D], k/v [B, T, Hkv, D] -> y [B, T, H, D]

Semantics, identical on every backend: query i attends to key j iff j <= i and, when `window` is an
int, i - j < window (the window counts the query's own position). `window=None` is full causal.
Hkv must divide H (grouped-query attention). The softmax scale is 1/sqrt(D).

A backend is one class (nanochat.registry.Backend) with `is_available() -> (bool, reason)`,
`supports(window, dtype, device)` (may it compute this layer correctly?) and `attend(q, k, v, window)`,
plus one line in ATTENTION_BACKENDS. The registry order is auto's preference order: auto takes, per
layer, the first backend that is available and supports the layer.

With a KV cache (inference), this step's k/v are written at cache positions [pos, pos + T) and the
queries attend over [0, pos + T) with the same mask, shifted by pos; the caller advances `pos`
after its last layer.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable

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


class SDPABackend(Backend):
    """Portable PyTorch SDPA: is_causal for full windows, an explicit boolean mask for sliding ones."""

    name, summary = "sdpa", "PyTorch SDPA, any device"

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


class CudnnBackend(Backend):
    """SDPA pinned to cuDNN's fused attention: the fastest full-causal kernel on Hopper in torch."""

    name, summary = "cudnn", "SDPA on cuDNN, full causal"

    def is_available(self) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "needs a CUDA GPU"
        if not torch.backends.cudnn.is_available():
            return False, "cuDNN is not available in this torch build"
        return True, "ok"

    def supports(self, window, dtype, device) -> bool:
        return torch.device(device).type == "cuda" and dtype in HALF_DTYPES and window is None

    def attend(self, q, k, v, window):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = _repeat_kv(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2)


_BLOCK_MASKS: dict[tuple, Any] = {}
_COMPILED_FLEX: Any = None


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

    def is_available(self) -> tuple[bool, str]:
        return flex_attention is not None, _FLEX_REASON

    def supports(self, window, dtype, device) -> bool:
        # On the CPU flex runs forward only and unfused (no backward): attend() works there for
        # testing, but the model never routes a CPU layer to it.
        return torch.device(device).type == "cuda" and dtype in (*HALF_DTYPES, torch.float32)

    def attend(self, q, k, v, window):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        block_mask = _flex_block_mask(q.size(2), window, q.device)
        y = _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))
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

    def supports(self, window, dtype, device) -> bool:
        return torch.device(device).type == "cuda" and dtype in HALF_DTYPES

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


@torch.library.custom_op("nanochat::fa4_forward", mutates_args=())
def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_left: int | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with FA4's (window_left, 0) window -> (out [B, T, H, D], lse [B, H, T] fp32)."""
    out, lse = _FA4._flash_attn_fwd(q, k, v, causal=True, window_size_left=window_left, window_size_right=0,
                                    return_lse=True)[:2]
    return out, lse


@_fa4_forward.register_fake
def _(q, k, v, window_left):
    return q.new_empty(q.shape), q.new_empty((q.size(0), q.size(2), q.size(1)), dtype=torch.float32)


@torch.library.custom_op("nanochat::fa4_backward", mutates_args=())
def _fa4_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, window_left: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _FA4._flash_attn_bwd(q, k, v, out, grad_out, lse, causal=True, window_size_left=window_left,
                                      window_size_right=0)
    # FA4 allocates the grads like its (possibly re-laid-out) inputs; the fake impl promises contiguous ones
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_backward.register_fake
def _(grad_out, q, k, v, out, lse, window_left):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup_context(ctx, inputs, output):
    q, k, v, window_left = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window_left = window_left


def _fa4_autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _fa4_backward(grad_out, q, k, v, out, lse, ctx.window_left)
    return dq, dk, dv, None


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
    _available: tuple[bool, str] | None = None

    def is_available(self) -> tuple[bool, str]:
        if self._available is None:
            self._available = _fa4_status()
            if not self._available[0]:  # once per process: auto skips fa4 silently after this
                log0(f"attention: fa4 unavailable: {self._available[1]}")
        return self._available

    def supports(self, window, dtype, device) -> bool:
        return torch.device(device).type == "cuda" and dtype in HALF_DTYPES

    @staticmethod
    def window_size(window: int | None, k_len: int) -> tuple[int | None, int]:
        # FA4's (left, right), queries aligned to the last keys: query i sees keys [i - left, i + right],
        # None = unbounded. A window covering every key is full causal (FA4's cheaper causal kernel).
        return (None, 0) if window is None or window >= k_len else (window - 1, 0)

    def attend(self, q, k, v, window):
        return _fa4_forward(q, k, v, self.window_size(window, k.size(1))[0])[0]


# name -> backend. Order = auto's preference. Adding a backend: one class above, one line here.
ATTENTION_BACKENDS = Registry("attention backend", "--attn", [
    FA3Backend(),
    FA4Backend(),  # on the H100: full causal 1.09x cuDNN's, window 512 1.51x flex's (BENCHMARKS.md, attention)
    CudnnBackend(),
    FlexBackend(),
    SDPABackend(),
], auto=True)

_CHOICES: dict[tuple, str] = {}
_LOGGED: set[tuple] = set()


def select_backend(window: int | None, dtype: torch.dtype, device, backend: str = "auto") -> str:
    """The backend name that computes a layer with this window/dtype/device.

    auto: the first backend in ATTENTION_BACKENDS that is available and supports the layer. An
    explicit name must be available (else BackendUnavailable naming why); for a layer it cannot
    compute (e.g. cudnn and a sliding window) auto's pick is used instead, and the log line says so.
    """
    device = torch.device(device)
    key = (backend, window, dtype, device.type)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if backend != "auto" and ATTENTION_BACKENDS.require(backend).supports(window, dtype, device):
        choice = backend
    else:
        choice = ATTENTION_BACKENDS.pick(window, dtype, device)  # sdpa serves every layer
    _CHOICES[key] = choice
    return choice


@torch.compiler.assume_constant_result
def _layer_backend(backend: str, window: int | None, dtype: torch.dtype, device_type: str, layer_idx: int) -> str:
    """select_backend plus the once-per-layer log line. Under torch.compile this runs eagerly at trace
    time and its answer is baked into the graph: no graph break, no per-step Python."""
    name = select_backend(window, dtype, device_type, backend)
    if (layer_idx, window, name) not in _LOGGED:
        _LOGGED.add((layer_idx, window, name))
        note = "" if backend in ("auto", name) else f" ({backend} does not support this layer)"
        log0(f"attention: layer {layer_idx} window {window or 'full'} -> {name}{note}")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None, backend: str = "auto",
              kv_cache=None, layer_idx: int = 0) -> torch.Tensor:
    """Causal attention, q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]; see the module docstring."""
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1 or None (full causal), got {window}")
    if kv_cache is not None:
        return _attend_cached(q, k, v, window, backend, kv_cache, layer_idx)
    name = _layer_backend(backend, window, q.dtype, q.device.type, layer_idx)
    return ATTENTION_BACKENDS[name].attend(q, k, v, window)


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

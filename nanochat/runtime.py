"""Process-wide torch settings every entry point applies first.

A persistent inductor cache under the base dir (FX graph cache on) makes a second run of the same
configuration skip most of its compile time; expandable segments cut fragmentation in long runs.
Variables the user already set are left alone.
"""
from __future__ import annotations

import os

from nanochat.common import get_base_dir


def setup_torch_env() -> dict[str, str]:
    """Set (unless already set) the inductor cache and allocator variables; returns what is in force."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(get_base_dir() / "inductor_cache"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "PYTORCH_ALLOC_CONF")
    return {k: os.environ[k] for k in keys if k in os.environ}


def default_compile(device_type: str, arch: str = "gpt") -> bool:
    """Whether to torch.compile the model when the user did not say: on CUDA only (elsewhere the compile
    time outweighs the gain), and never for Transformer Engine layers (`arch="te"`), which graph-break."""
    return device_type == "cuda" and arch != "te"

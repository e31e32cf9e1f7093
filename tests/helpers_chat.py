"""Shared pieces for the chat tests: tiny tokenizers, a tiny random GPT (built once per process), the shared
eval data folder, and a live chat server."""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest
import torch

from nanochat.tasks.base import resolve_data_root

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
TINY_VOCAB = 512


try:
    DATA = resolve_data_root()  # the shared eval/SFT data folder, or None where it is missing
except FileNotFoundError:
    DATA = None
needs_data = pytest.mark.skipif(DATA is None, reason="shared data folder (../shared/data) not found")
# The tiny models live on the CPU, where the decode kernel runs only in Triton's interpreter (conftest sets it
# where there is no CUDA); on a GPU machine tests/test_decode_attention.py runs the kernel natively.
needs_triton_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the decode kernel on CPU tensors needs TRITON_INTERPRET=1")


def byte_tokenizer():
    """A tokenizer with one token per byte and no merges: token ids are predictable from the text."""
    from nanochat.tokenizer import Tokenizer
    return Tokenizer({bytes([i]): i for i in range(256)})


def _training_text() -> str:
    """~200 KB of text: tinyshakespeare when the shared data is there, else made-up words."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(1, 8))) for _ in range(800)]
    return " ".join(rng.choice(words) for _ in range(40_000))


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer

    text = _training_text()
    chunks = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    return Tokenizer.train_from_iterator(chunks, vocab_size=TINY_VOCAB)


# the architecture options of the training recipe, on in the chat tests so that every inference path (prefill,
# the decoder's step, the server) is checked with them: the smear's carried token, backout, gated value
# embeddings, QK scale, rotary base, U-net skips, the attention output gate and the bigram table (candidates, off
# by default; the bigram table also reads the carried token); grouped-query attention too (2 heads, 1 kv head)
RECIPE = dict(value_embeds=True, value_embed_gate="input", smear=True, backout=True, qk_scale=1.2,
              rope_base=100_000.0, unet_skips=True, attn_gate=True, bigram_embeds=True, n_kv_head=1)


def tiny_model(window_pattern: str = "L", seed: int = 0, sequence_len: int = 256, noise: float = 0.3,
               **options):
    """A 2-layer random GPT over the tiny tokenizer's vocabulary, in eval mode on the CPU, with RECIPE's
    options (override any with `options`).

    `init_weights` zeroes some projections and gates (so a fresh model predicts near-uniform logits, where
    argmax ties would make greedy comparisons meaningless, and the smear and skips would be inert); we add
    noise to every weight matrix (the bigram table too) and set the gates, so that the logits are spread out,
    each position really depends on the context, and every option acts.
    """
    from nanochat.model.gpt import GPT, config_from_depth

    cfg = config_from_depth(2, vocab_size=tiny_tokenizer().get_vocab_size(), sequence_len=sequence_len,
                            aspect_ratio=32, head_dim=32, window_pattern=window_pattern,
                            n_embd=64, n_head=2, attn_backend="auto",
                            **({"short_window": 16} if "S" in window_pattern else {}), **{**RECIPE, **options})
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * noise / p.shape[1] ** 0.5)
        for name in ("smear_lambda", "backout_lambda", "skip_lambdas"):
            if hasattr(model, name):
                getattr(model, name).uniform_(0.3, 0.8, generator=gen)
    return model.eval()


@torch.inference_mode()
def naive_generate(model, tokens: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    """Reference greedy decoding: full forward over the whole sequence at every step, no cache."""
    seq = list(tokens)
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq], dtype=torch.long))[0, -1]
        nxt = int(logits.argmax())
        if nxt in stop_ids:
            break
        seq.append(nxt)
    return seq


class LiveServer:
    """The chat app (tiny model, CPU) served by nanochat.web.server (uvicorn with its timeouts) on a free
    loopback port, in a thread. `server` takes make_server's keywords, `app` create_app's, the rest are
    Limits."""

    def __init__(self, slots: int = 8, app: dict | None = None, server: dict | None = None, **limits):
        import socket
        import threading

        from nanochat.web.app import Limits, create_app
        from nanochat.web.scheduler import BatchScheduler
        from nanochat.web.server import make_server

        self.worker = BatchScheduler(tiny_model(sequence_len=512), tiny_tokenizer(), slots=slots)
        app = create_app([self.worker], limits=Limits(**limits), **(app or {}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, host="127.0.0.1", port=self.port, log_level="warning", **(server or {}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.close()

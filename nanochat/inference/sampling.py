"""Sampling the next token: greedy, temperature with top-k / top-p filtering, and the noise a draw uses.

`sample_next` serves the Engine (one generator per call); the server draws many requests' rows in one batch
with `token_probs`, `hashed_exp_noise` and `draw`, and each row still gets what it would alone.
"""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Next token per row of `logits` [B, V] -> int64 [B]. temperature 0 is argmax (greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = token_probs(logits, temperature, top_k, top_p)
    return draw(probs, torch.empty_like(probs).exponential_(1, generator=generator))


def draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` [B, V], given Exp(1) `noise` of the same shape: argmax(probs / noise).

    This is torch.multinomial's own draw for one sample, so `noise` from a generator's exponential_()
    gives the tokens multinomial would give from that generator, minus its input checks (~9 more kernel
    launches per call); the server passes `hashed_exp_noise` instead, one batch for all its requests."""
    return (probs / noise).argmax(dim=-1)


_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64's
# constants 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB as int64 (products wrap mod 2^64)


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: the mask drops the copied sign bits)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def hashed_exp_noise(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [R, vocab] (for `draw`) whose row r depends only on (keys[r], positions[r]): splitmix64's
    finalizer over key, position and vocab index, 24 bits per uniform. A server keys each row by its
    request's seed and sample and the row's position, so rows of many requests are drawn in one batch of
    ops (a generator per request cost two launches each per step) and each still gets what it would alone."""
    x = (keys * _GOLDEN + positions * vocab)[:, None] + torch.arange(vocab, device=keys.device)
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return -torch.log((_shift_right(x, 40).float() + 0.5) * 2.0 ** -24)


def token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """Next-token probabilities per row of `logits` [B, V] at `temperature` (> 0), after top-k then top-p
    filtering; each row's result depends on that row alone."""
    if temperature <= 0:
        raise ValueError(f"token_probs needs temperature > 0 (0 is greedy: argmax), got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)

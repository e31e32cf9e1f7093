"""Validation bits per byte: a loss figure that does not depend on the tokenizer's vocabulary.

Summed next-token losses (nats) / ln 2 / number of UTF-8 bytes those target tokens stand for.
Special tokens have 0 bytes in `token_bytes` and are left out of both sums, as are ignored
targets (< 0). Under torch.distributed both sums are reduced over ranks.

`text_bpb` is the same figure on raw text, for models of different codebases: the caller gives its
tokenizer and a loss function, and the denominator is the text's own UTF-8 bytes, so two models with
different tokenizers are measured on exactly the same bytes. This file imports nothing of nanochat:
benchmarks/race_eval.py loads it by path into a process running another codebase's model.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """Bits per byte over `steps` (inputs, targets) batches; `model(x, y, loss_reduction="none")`
    must return per-token losses [B, T]."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    it = iter(batches)
    nats = nbytes = None
    for _ in range(steps):
        x, y = next(it)
        loss = model(x, y, loss_reduction="none").float().reshape(-1)
        y = y.reshape(-1)
        valid = y >= 0
        per_token_bytes = torch.where(valid, token_bytes.to(y.device)[y.clamp(min=0)], 0)
        counted = per_token_bytes > 0
        step_nats = (loss * counted).sum()
        step_bytes = per_token_bytes.sum()
        nats = step_nats if nats is None else nats + step_nats
        nbytes = step_bytes if nbytes is None else nbytes + step_bytes
    totals = torch.stack([nats.double(), nbytes.double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    total_nats, total_bytes = totals.tolist()
    if total_bytes == 0:
        raise ValueError("the batches held no target bytes (only special or ignored tokens)")
    return total_nats / (math.log(2) * total_bytes)


@torch.no_grad()
def text_bpb(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], encode: Callable[[str], list[int]],
             bos: int, texts: Sequence[str], seq_len: int, batch_size: int, device: torch.device | str) -> dict:
    """Bits per byte of `texts` under a model: every document is encoded as [bos] + encode(text), the
    documents are concatenated into one stream, and the stream is cut into consecutive rows of seq_len + 1
    tokens that overlap by one, so every token after the first is predicted exactly once (with the context
    of its row). Targets that are `bos` carry no bytes and are left out. bpb = summed nats / ln 2 / UTF-8
    bytes of `texts`; `loss_fn(x, y)` returns per-token nats for int64 [B, T] inputs and targets, any shape
    of B*T elements. The tail of the stream that does not fill a row is padded with ignored targets (-1)."""
    stream: list[int] = []
    for text in texts:
        stream += [bos] + list(encode(text))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes == 0:
        raise ValueError("text_bpb needs some text: the texts hold no bytes")
    rows = -(-(len(stream) - 1) // seq_len)
    tokens = torch.full((rows * seq_len + 1,), -1, dtype=torch.long)
    tokens[:len(stream)] = torch.tensor(stream, dtype=torch.long)
    x_all = tokens[:-1].view(rows, seq_len).clamp(min=0)
    y_all = tokens[1:].view(rows, seq_len)
    nats, counted = 0.0, 0
    for start in range(0, rows, batch_size):
        x = x_all[start:start + batch_size].to(device)
        y = y_all[start:start + batch_size].to(device)
        loss = loss_fn(x, y).float().reshape(y.shape)
        keep = (y >= 0) & (y != bos)
        nats += loss[keep].double().sum().item()
        counted += int(keep.sum())
    return {"bpb": nats / (math.log(2) * n_bytes), "nats": nats, "bytes": n_bytes, "tokens": counted}

"""Train the BPE tokenizer on the first `max_chars` characters of the training shards.

    python -m scripts.tok_train --data_dir DIR --max_chars N --vocab_size V [--doc_cap 10000] [--out_dir DIR]

Writes <base_dir>/tokenizer/ (or --out_dir). Last stdout line: one JSON object.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.data.shards import DocumentStream, list_shards, resolve_data_dir, split_shards
from nanochat.flags import parse_flags
from nanochat.tokenizer import Tokenizer, resolve_tokenizer_dir


def iter_texts(data_dir: str | Path, max_chars: int, split: str = "train",
               doc_cap: int | None = None) -> Iterator[str]:
    """Documents of `split` in shard order, each cut to `doc_cap` chars, until `max_chars` in total
    (or the data ends). Capping keeps a few huge pages from dominating the pair counts.

    Files are read exactly as the pretraining loader reads them (nanochat.data.shards), so the
    tokenizer never sees the validation shard and a .txt file splits into the same documents.
    """
    paths = split_shards(list_shards(data_dir), split)
    seen = 0
    for text in DocumentStream(paths, loop=False):
        if doc_cap is not None:
            text = text[:doc_cap]
        text = text[: max_chars - seen]
        seen += len(text)
        yield text
        if seen >= max_chars:
            return


@dataclass
class TrainConfig:
    """Train the nanochat BPE tokenizer."""
    data_dir: str | None = field(default=None, metadata={"help": "shards dir (default: <base_dir>/base_data if it "
                                                                 "holds shards, else ../shared/data/pretrain)"})
    max_chars: int = field(default=2_000_000_000, metadata={"help": "train on at most this many characters"})
    vocab_size: int = field(default=32768, metadata={"help": "vocabulary size, special tokens included"})
    doc_cap: int = field(default=10_000, metadata={"help": "cut each document to this many characters"})
    out_dir: str | None = field(default=None, metadata={"help": "where to save (default <base_dir>/tokenizer)"})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(TrainConfig, argv)
    if cfg.max_chars <= 0 or cfg.doc_cap <= 0:
        raise SystemExit(f"--max_chars and --doc_cap must be positive (got {cfg.max_chars}, {cfg.doc_cap})")
    data_dir = resolve_data_dir(cfg.data_dir)
    out_dir = resolve_tokenizer_dir(cfg.out_dir)
    print(f"training a {cfg.vocab_size}-token BPE on up to {cfg.max_chars:,} chars of {data_dir}", flush=True)

    chars = 0
    next_report = 10_000_000

    def counted() -> Iterator[str]:
        nonlocal chars, next_report
        for text in iter_texts(data_dir, cfg.max_chars, "train", cfg.doc_cap):
            chars += len(text)
            if chars >= next_report:
                print(f"  read {chars / 1e6:.0f}M chars ({time.perf_counter() - t0:.1f}s)", flush=True)
                next_report += 10_000_000
            yield text

    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(counted(), cfg.vocab_size)
    train_seconds = time.perf_counter() - t0
    tokenizer.save(out_dir)
    print(f"trained on {chars:,} chars in {train_seconds:.1f}s; saved to {out_dir}", flush=True)
    sample = "The quick brown fox jumps over the lazy dog in 2024."
    ids = tokenizer.encode(sample)
    print(f"sample: {len(sample.encode())} bytes -> {len(ids)} tokens: {[tokenizer.decode([i]) for i in ids]}")
    result = {"vocab_size": tokenizer.get_vocab_size(), "train_seconds": round(train_seconds, 2),
              "chars": chars, "out_dir": str(out_dir)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

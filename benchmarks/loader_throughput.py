"""Packed loader throughput (tokens/s) on real shards with a real 32768-token tokenizer.

    python -m benchmarks.loader_throughput [--data_dir DIR] [--tokenizer_dir DIR] [--batch_size 32]
        [--seq_len 2048] [--batches 30] [--tokenizer_threads 4] [--prefetch 2] [--device cpu]

Prints tokens per wall second and per CPU second (all threads). Without --tokenizer_dir it uses
<base_dir>/tokenizer if present (and of --vocab_size), else trains one on --train_chars characters of
the training shards and caches it in <base_dir>/loader_bench_tokenizer. Also times an exact resume
(state_dict -> new loader -> first batch). Last stdout line: one JSON object.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import get_base_dir, synchronize
from nanochat.data.packing import PackedLoader
from nanochat.data.shards import DocumentStream, list_shards, resolve_data_dir, split_shards
from nanochat.flags import parse_flags
from nanochat.tokenizer import Tokenizer


@dataclass
class BenchConfig:
    """Measure PackedLoader tokens/s."""
    data_dir: str | None = field(default=None, metadata={"help": "shards (default: base data dir, then shared)"})
    tokenizer_dir: str | None = field(default=None, metadata={"help": "a saved tokenizer (default: see doc)"})
    train_chars: int = field(default=50_000_000, metadata={"help": "chars to train a tokenizer on if none is saved"})
    vocab_size: int = 32768
    batch_size: int = 32
    seq_len: int = 2048
    warmup: int = field(default=3, metadata={"help": "batches before the clock starts"})
    batches: int = field(default=30, metadata={"help": "batches timed"})
    buffer_size: int = 1000
    tokenizer_batch_size: int = 256
    tokenizer_threads: int = 4
    prefetch: int = 2
    device: str = "cpu"


def load_tokenizer(cfg: BenchConfig, data_dir: Path) -> tuple[Tokenizer, str]:
    candidates = [Path(cfg.tokenizer_dir)] if cfg.tokenizer_dir else \
        [get_base_dir() / "tokenizer", get_base_dir() / "loader_bench_tokenizer"]
    for d in candidates:
        if d.is_dir():
            tok = Tokenizer.load(d)
            if cfg.tokenizer_dir or tok.get_vocab_size() == cfg.vocab_size:
                return tok, str(d)
    if cfg.tokenizer_dir:
        raise FileNotFoundError(f"--tokenizer_dir {cfg.tokenizer_dir} does not exist")

    def texts():
        seen = 0
        for text in DocumentStream(split_shards(list_shards(data_dir), "train"), loop=False):
            yield text[:10_000]
            seen += min(len(text), 10_000)
            if seen >= cfg.train_chars:
                return

    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(texts(), cfg.vocab_size)
    out = candidates[-1]
    tok.save(out)
    print(f"trained a {cfg.vocab_size}-token tokenizer on {cfg.train_chars:,} chars in "
          f"{time.perf_counter() - t0:.0f}s -> {out}", flush=True)
    return tok, str(out)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(BenchConfig, argv)
    data_dir = resolve_data_dir(cfg.data_dir)
    tok, tok_dir = load_tokenizer(cfg, data_dir)
    kw = dict(buffer_size=cfg.buffer_size, tokenizer_batch_size=cfg.tokenizer_batch_size,
              tokenizer_threads=cfg.tokenizer_threads, prefetch=cfg.prefetch)
    loader = PackedLoader(tok, data_dir, "train", cfg.batch_size, cfg.seq_len, cfg.device, **kw)
    for _ in range(cfg.warmup):
        next(loader)
    synchronize(cfg.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(cfg.batches):
        x, y = next(loader)
    synchronize(cfg.device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    tokens_per_s = cfg.batches * x.numel() / seconds
    # CPU time of all our threads: less sensitive than wall time to other jobs on a shared machine
    tokens_per_cpu_s = cfg.batches * x.numel() / cpu_seconds

    state = loader.state_dict()
    expected = next(loader)
    loader.close()
    t1 = time.perf_counter()
    resumed = PackedLoader(tok, data_dir, "train", cfg.batch_size, cfg.seq_len, cfg.device, state=state, **kw)
    got = next(resumed)
    resume_seconds = time.perf_counter() - t1
    resumed.close()
    exact = bool((got[0] == expected[0]).all() and (got[1] == expected[1]).all())

    load = os.getloadavg()[0]
    state_bytes, cropped = len(json.dumps(state)), loader.cropped_fraction
    print("| B x T | tokens/s | tokens/CPU-s | cropped | resume s | exact | state bytes | load avg |")
    print(f"| {cfg.batch_size} x {cfg.seq_len} | {tokens_per_s:,.0f} | {tokens_per_cpu_s:,.0f} | {cropped:.3f} | "
          f"{resume_seconds:.2f} | {exact} | {state_bytes} | {load:.1f} |")
    result = {"tokens_per_s": round(tokens_per_s), "tokens_per_cpu_s": round(tokens_per_cpu_s),
              "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "batches": cfg.batches,
              "seconds": round(seconds, 3), "cropped_fraction": round(cropped, 4),
              "resume_seconds": round(resume_seconds, 3), "resume_exact": exact, "state_bytes": state_bytes,
              "tokenizer_threads": cfg.tokenizer_threads, "prefetch": cfg.prefetch, "device": cfg.device,
              "cpus": os.cpu_count(), "load_avg_1m": round(load, 2), "tokenizer_dir": tok_dir}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

"""Batched encode throughput of the trained tokenizer on real shard text.

    python -m benchmarks.tokenizer_throughput [--tokenizer_dir DIR] [--data_dir DIR] [--megabytes 50]

Documents are read first (not timed), then encoded in batches of `batch_docs` documents, the way the
data loader calls the tokenizer, once per thread count. Last stdout line: one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.data.shards import resolve_data_dir
from nanochat.flags import parse_flags
from nanochat.tokenizer import get_tokenizer
from scripts.tok_train import iter_texts


@dataclass
class BenchConfig:
    """Measure batched tokenizer encode throughput."""
    tokenizer_dir: str | None = field(default=None, metadata={"help": "default <base_dir>/tokenizer"})
    data_dir: str | None = field(default=None, metadata={"help": "shards dir (default as scripts.tok_train)"})
    megabytes: float = field(default=50.0, metadata={"help": "characters of text to encode, in millions"})
    batch_docs: int = field(default=1024, metadata={"help": "documents per encode call"})
    threads: list[int] = field(default_factory=lambda: [1, os.cpu_count() or 1],
                               metadata={"help": "thread counts to measure"})
    repeat: int = field(default=3, metadata={"help": "timed passes per thread count; the fastest is reported "
                                                     "(on a shared machine, slower passes measure the neighbours)"})


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(BenchConfig, argv)
    tok_dir = Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else get_base_dir() / "tokenizer"
    tokenizer = get_tokenizer(tok_dir)
    data_dir = resolve_data_dir(cfg.data_dir)
    docs = list(iter_texts(data_dir, int(cfg.megabytes * 1e6), "train"))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    batches = [docs[i:i + cfg.batch_docs] for i in range(0, len(docs), cfg.batch_docs)]
    print(f"{len(docs):,} docs, {n_bytes / 1e6:.1f} MB, vocab {tokenizer.get_vocab_size()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    rows = []
    for threads in cfg.threads:
        times = []
        for _ in range(cfg.repeat):
            t0 = time.perf_counter()
            n_tokens = sum(len(ids) for batch in batches for ids in tokenizer.encode(batch, num_threads=threads))
            times.append(time.perf_counter() - t0)
        best, median = min(times), statistics.median(times)
        rows.append({"threads": threads, "seconds": round(best, 3), "median_seconds": round(median, 3),
                     "mb_per_s": round(n_bytes / 1e6 / best, 2), "tokens_per_s": round(n_tokens / best),
                     "tokens": n_tokens})

    print(f"{'threads':>8}{'best s':>10}{'median s':>10}{'MB/s':>10}{'tokens/s':>14}")
    for r in rows:
        print(f"{r['threads']:>8}{r['seconds']:>10.2f}{r['median_seconds']:>10.2f}{r['mb_per_s']:>10.2f}"
              f"{r['tokens_per_s']:>14,}")
    result = {"megabytes": round(n_bytes / 1e6, 2), "docs": len(docs),
              "bytes_per_token": round(n_bytes / rows[0]["tokens"], 3),
              "runs": rows, "best_mb_per_s": max(r["mb_per_s"] for r in rows),
              "best_tokens_per_s": max(r["tokens_per_s"] for r in rows), "load_average": os.getloadavg()[0]}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

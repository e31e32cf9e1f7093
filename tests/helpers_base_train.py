"""Shared pieces for the base-training tests: a tiny tokenizer and a tiny data dir of real text, and the
flags of a tiny CPU run (a 2-layer, 64-wide GPT on 64-token rows), so one step takes milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PRETRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pretrain"
TINY_VOCAB = 512
DOCS_PER_SHARD, ROW_GROUP, DOC_CHARS = 64, 16, 2000  # 4 row groups per shard: train holds 8, so 2 ranks get 4 each


def real_texts(count: int, offset: int = 0) -> list[str]:
    """`count` documents of real web text from the first shared pretraining shard."""
    path = PRETRAIN / "shard_00000.parquet"
    if not path.is_file():
        import pytest

        pytest.skip(f"shared pretraining shards not found at {PRETRAIN}")
    pf = pq.ParquetFile(path)
    texts: list[str] = []
    for g in range(pf.num_row_groups):
        texts += [t for t in pf.read_row_group(g, columns=["text"]).column(0).to_pylist() if t]
        if len(texts) >= offset + count:
            break
    return texts[offset:offset + count]


def make_assets(root: Path) -> tuple[Path, Path]:
    """(tokenizer_dir, data_dir) under root: a 512-token BPE trained on ~300 KB of real text, and 3 parquet
    shards (2 train + 1 val) of 64 documents each, cropped to 2000 chars, in row groups of 16."""
    from nanochat.tokenizer import Tokenizer

    corpus, size = [], 0
    for text in real_texts(200, offset=1000):  # documents the data shards below do not hold
        corpus.append(text)
        size += len(text)
        if size >= 300_000:
            break
    tok_dir = root / "tokenizer"
    Tokenizer.train_from_iterator(corpus, vocab_size=TINY_VOCAB).save(tok_dir)
    data_dir = root / "data"
    data_dir.mkdir()
    texts = real_texts(3 * DOCS_PER_SHARD)
    for i in range(3):
        chunk = [t[:DOC_CHARS] for t in texts[i * DOCS_PER_SHARD:(i + 1) * DOCS_PER_SHARD]]
        pq.write_table(pa.table({"text": chunk}), data_dir / f"shard_{i:05d}.parquet", row_group_size=ROW_GROUP)
    return tok_dir, data_dir


def tiny_flags(tok_dir: Path, data_dir: Path, **overrides) -> list[str]:
    """argv of a tiny fp32 CPU run; overrides replace or add flags (value None drops one)."""
    flags = dict(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=4, total_batch_size=256,
                 num_iterations=20, eval_every=-1, eval_tokens=512, sample_every=-1, save_every=0,
                 device_type="cpu", tokenizer_dir=str(tok_dir), data_dir=str(data_dir))
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items() if v is not None]


def read_log_rows(report_dir: Path) -> list[dict]:
    """The rows base_train appended to <report>/train_log.jsonl: per step (loss, lrm, ...) and per eval (val_bpb)."""
    path = report_dir / "train_log.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("stage") == "base"]


def read_train_log(report_dir: Path) -> list[dict]:
    """The per-step rows (those with a training loss), in step order."""
    return [r for r in read_log_rows(report_dir) if "loss" in r]


def isolate(monkeypatch, base_dir: Path) -> None:
    """A fresh base dir, no torchrun variables, and the variables base_train sets with setdefault pinned
    (monkeypatch restores them, so an in-process run leaks nothing into later tests)."""
    import os

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    for key in ("NANOCHAT_DATA_DIR", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE",
                "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(key, os.environ.get(key, str(base_dir / "inductor_cache") if "DIR" in key else "1"))

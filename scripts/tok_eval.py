"""Compression ratio (UTF-8 bytes per token) of the trained tokenizer on held-out text.

    python -m scripts.tok_eval [--tokenizer_dir DIR] [--data_dir DIR] [--num_docs 1000]

Held-out text: the first `num_docs` documents of the validation shard, tinyshakespeare if present,
and a few short built-in samples (code, math, non-English). GPT-2 and GPT-4 (cl100k_base) figures
are added when tiktoken can fetch their files; offline, the script says so and carries on.
Higher bytes/token = better compression. Last stdout line: one JSON object.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from itertools import islice

import tiktoken

from nanochat.data.shards import SHARED_PRETRAIN, DocumentStream, list_shards, resolve_data_dir, split_shards
from nanochat.flags import parse_flags
from nanochat.tokenizer import get_tokenizer, resolve_tokenizer_dir

SAMPLES = {
    "code": (
        "def moving_average(values: list[float], k: int) -> list[float]:\n"
        "    if k <= 0:\n        raise ValueError(f\"k must be positive, got {k}\")\n"
        "    out, acc = [], 0.0\n    for i, v in enumerate(values):\n        acc += v\n"
        "        if i >= k:\n            acc -= values[i - k]\n"
        "        if i >= k - 1:\n            out.append(acc / k)\n    return out\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which vanishes at x = 2, so the minimum is "
        "f(2) = 12 - 24 + 7 = -5. For n >= 1, sum_{k=1}^{n} k = n(n+1)/2; e.g. 1 + 2 + ... + 100 = 5050."
    ),
    "multilingual": (
        "Der Zug nach München fährt um 14:35 Uhr ab. Le café est fermé le dimanche. "
        "東京は日本の首都です。 Москва — столица России. 서울의 인구는 약 천만 명이다. 🚆☕"
    ),
}


@dataclass
class EvalConfig:
    """Evaluate the tokenizer's compression on held-out text."""
    tokenizer_dir: str | None = field(default=None, metadata={"help": "default <base_dir>/tokenizer"})
    data_dir: str | None = field(default=None, metadata={"help": "shards dir; its last file is the held-out split"})
    num_docs: int = field(default=1000, metadata={"help": "validation documents to measure on"})
    compare: bool = field(default=True,
                          metadata={"help": "also measure GPT-2 / cl100k when their files can be fetched"})


def bytes_per_token(encode, texts: list[str], n_bytes: int) -> float:
    """`n_bytes` (the texts' UTF-8 size) over the tokens `encode` (a batch encoder) makes of them."""
    return n_bytes / max(sum(len(ids) for ids in encode(texts)), 1)


def fetch_reference(name: str, timeout_s: float = 30.0) -> tuple[tiktoken.Encoding | None, str | None]:
    """tiktoken.get_encoding downloads its files on first use; a thread bounds how long we wait on it."""
    box: dict = {}

    def work():
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # no network, proxy errors, hash mismatch: all mean "no comparison"
            box["err"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "enc" in box:
        return box["enc"], None
    return None, box.get("err", f"no answer within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(EvalConfig, argv)
    tok_dir = resolve_tokenizer_dir(cfg.tokenizer_dir)
    tokenizer = get_tokenizer(tok_dir)
    data_dir = resolve_data_dir(cfg.data_dir)

    corpora: dict[str, list[str]] = {}
    val_files = split_shards(list_shards(data_dir), "val")
    corpora[f"val:{val_files[0].name}"] = list(islice(DocumentStream(val_files, loop=False), cfg.num_docs))
    for candidate in (data_dir / "tinyshakespeare.txt", SHARED_PRETRAIN / "tinyshakespeare.txt"):
        if candidate.is_file() and candidate not in val_files:
            corpora["tinyshakespeare"] = [candidate.read_text(encoding="utf-8")]
            break
    for name, text in SAMPLES.items():
        corpora[name] = [text]

    encoders = {"ours": lambda texts: tokenizer.encode(texts)}
    skipped = None
    if cfg.compare:
        errors = []
        for ref in ("gpt2", "cl100k_base"):
            enc, err = fetch_reference(ref)
            if enc is not None:
                encoders[ref] = lambda texts, enc=enc: enc.encode_ordinary_batch(texts)
            else:
                errors.append(f"{ref}: {err}")
        if errors:
            skipped = "encoding files cannot be fetched offline (" + "; ".join(errors) + ")"
            print(f"gpt2/cl100k comparison skipped: {skipped}", flush=True)

    results: dict[str, dict[str, float]] = {}
    names = list(encoders)
    print(f"tokenizer {tok_dir} (vocab {tokenizer.get_vocab_size()}); bytes per token, higher is better")
    print(f"{'text':<24}{'bytes':>12}" + "".join(f"{n:>14}" for n in names))
    for corpus, texts in corpora.items():
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        row = {name: round(bytes_per_token(encode, texts, n_bytes), 4) for name, encode in encoders.items()}
        results[corpus] = row
        print(f"{corpus:<24}{n_bytes:>12,}" + "".join(f"{row[n]:>14.3f}" for n in names))

    summary = {"tokenizer_dir": str(tok_dir), "vocab_size": tokenizer.get_vocab_size(),
               "bytes_per_token": results, "comparison_skipped": skipped}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

"""The race's final score: bits per byte of a trained model on raw validation text, by one routine for all.

    python benchmarks/race_eval.py --kind ours --model CHECKPOINT_DIR --val VAL.parquet [--max_chars N]
    python benchmarks/race_eval.py --kind nanochat --peer PEER --model_tag TAG --val VAL.parquet  (NANOCHAT_BASE_DIR set)

Run as a file, not a module: a nanochat peer's package is also called `nanochat`, so for it the peer's
checkout goes first on sys.path and our routine (nanochat/eval/bpb.py, which imports nothing of ours) is
loaded by path. Each model reads the text through its own tokenizer; `text_bpb` divides by the text's own
UTF-8 bytes, so the figures compare across tokenizers. Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_text_bpb():
    spec = importlib.util.spec_from_file_location("race_text_bpb", ROOT / "nanochat" / "eval" / "bpb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.text_bpb


def validation_texts(path: str | Path, max_chars: int) -> list[str]:
    """The first documents of the validation shard, up to `max_chars` characters (the last one cut)."""
    texts, chars = [], 0
    for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
        if not text:
            continue
        texts.append(text[:max_chars - chars])
        chars += len(texts[-1])
        if chars >= max_chars:
            break
    return texts


def ours(model_dir: str, device: torch.device):
    """(loss_fn, encode, bos, seq_len) of one of our checkpoints; bf16 autocast on CUDA, as it trained."""
    sys.path.insert(0, str(ROOT))
    from nanochat.checkpoint import load_model
    model, tokenizer, _ = load_model(model_dir=model_dir, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn(x, y):
        with autocast:
            return model(x, y, loss_reduction="none")
    return loss_fn, tokenizer.encode, tokenizer.get_bos_token_id(), model.config.sequence_len


def nanochat(peer: str, model_tag: str, device: torch.device):
    """The same for the public nanochat's checkpoint under $NANOCHAT_BASE_DIR, through its own loader."""
    sys.path.insert(0, str(Path(peer).resolve()))
    from nanochat.checkpoint_manager import load_model  # the peer's package
    model, tokenizer, _ = load_model("base", device, phase="eval", model_tag=model_tag)

    def loss_fn(x, y):
        return model(x, y, loss_reduction="none")
    return loss_fn, tokenizer.encode, tokenizer.get_bos_token_id(), model.config.sequence_len


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["ours", "nanochat"], required=True)
    parser.add_argument("--model", default="", help="ours: the checkpoint dir (a run dir or one step dir)")
    parser.add_argument("--peer", default="", help="nanochat: its checkout")
    parser.add_argument("--model_tag", default="", help="nanochat: its model tag under $NANOCHAT_BASE_DIR")
    parser.add_argument("--val", required=True, help="the validation shard (parquet, column text)")
    parser.add_argument("--max_chars", type=int, default=4_000_000, help="characters of validation text")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    text_bpb = load_text_bpb()  # before the peer's path goes first
    if args.kind == "ours":
        loss_fn, encode, bos, seq_len = ours(args.model, device)
    else:
        loss_fn, encode, bos, seq_len = nanochat(args.peer, args.model_tag, device)
    texts = validation_texts(args.val, args.max_chars)
    result = text_bpb(loss_fn, encode, bos, texts, seq_len, args.batch_size, device)
    result.update(kind=args.kind, documents=len(texts), seq_len=seq_len)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

"""Race data: the same documents, validation text and tokenizers for every racer of benchmarks.race.

    python -m benchmarks.race_data --src ../shared/data/pretrain --out .race --train_shards 4 [--peer PATH]

Writes into --out:
- data/shard_*.parquet: the first --train_shards training shards of --src, then its validation shard
  (the last file), each document longer than --max_doc_chars split at line breaks into documents of at
  most that many characters (a line longer than that is cut at a sentence end or a space). Web pages are
  a few thousand characters; a Wikipedia article can be 100k, and both trainers would crop all but its
  first row. Written with zstd at a high level: the folder travels to a GPU machine (64 MiB a call).
- tokenizer_ours/: our BPE (scripts.tok_train) on the training shards.
- tokenizer_nanochat/ (with --peer): the peer's own BPE, made by its own `python -m scripts.tok_train` in its
  checkout, on the same shards.
Each step is skipped when its output exists. Last stdout line: one JSON object.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.data.shards import DocumentStream, list_shards
from nanochat.flags import parse_flags
from nanochat.tokenizer import RANKS_FILE

ROW_GROUP = 1024
ZSTD_LEVEL = 19


@dataclass
class DataConfig:
    """Prepare a race's data and tokenizers."""
    src: str = field(default="../shared/data/pretrain", metadata={"help": "shards to take (last = validation)"})
    out: str = field(default=".race", metadata={"help": "output folder (data/, tokenizer_ours/, tokenizer_nanochat/)"})
    train_shards: int = field(default=4, metadata={"help": "how many training shards of --src to take"})
    max_doc_chars: int = field(default=6000, metadata={"help": "longer documents are split at line breaks"})
    vocab_size: int = field(default=32768, metadata={"help": "vocabulary of both tokenizers"})
    tokenizer_chars: int = field(default=2_000_000_000, metadata={"help": "characters each tokenizer trains on"})
    peer: str = field(default="", metadata={"help": "a checkout of karpathy/nanochat: also train its tokenizer"})


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` as consecutive pieces of at most `max_chars` characters that join back to it exactly: cut after
    the last newline that fits, else after the last sentence end ('. ', '! ', '? '), else after the last space,
    else at `max_chars`."""
    pieces = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cut = window.rfind("\n") + 1
        if cut == 0:
            ends = [m.end() for m in re.finditer(r"[.!?] ", window)]
            cut = ends[-1] if ends else window.rfind(" ") + 1
        cut = cut or max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text] if text else pieces


def write_split_shard(src: Path, dst: Path, max_chars: int) -> tuple[int, int]:
    """src's documents, split, into dst (atomically). Returns (documents in, documents out)."""
    docs_in, out = 0, []
    for text in DocumentStream([src], loop=False):
        docs_in += 1
        out += split_text(text, max_chars)
    tmp = dst.with_suffix(".tmp")
    pq.write_table(pa.table({"text": out}), tmp, row_group_size=ROW_GROUP, compression="zstd",
                   compression_level=ZSTD_LEVEL)
    os.replace(tmp, dst)
    return docs_in, len(out)


def peer_env(peer: Path, base_dir: Path) -> dict:
    """Environment to run the peer's scripts: its checkout first on the path, its base dir, a stub `wandb`
    (its scripts import it at start; its default `--run dummy` never calls it) when wandb is missing. Absolute
    paths: the peer runs in its own checkout, where a relative --out would name another folder."""
    base_dir = Path(base_dir).resolve()
    stub = base_dir / "stubs"
    (stub / "wandb").mkdir(parents=True, exist_ok=True)
    (stub / "wandb" / "__init__.py").write_text('"""Stand-in: the peer imports wandb; with --run dummy it is unused."""\n')
    path = [str(peer)] + ([] if importlib.util.find_spec("wandb") else [str(stub)])
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    ours = str(Path(__file__).resolve().parents[1])  # our scripts/ is a regular package: it would shadow theirs
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(ours)]
    env["PYTHONPATH"] = os.pathsep.join(path + kept)
    return env


def check_peer(peer: str | Path) -> Path:
    """The peer checkout, or a clear error that says how to get it."""
    path = Path(peer).expanduser().resolve()
    needed = ["scripts/base_train.py", "scripts/tok_train.py", "nanochat/gpt.py", "nanochat/checkpoint_manager.py"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise SystemExit(f"--peer {peer}: not a checkout of karpathy/nanochat (missing {', '.join(missing)}). Get it "
                         f"with `git clone https://github.com/karpathy/nanochat {path} && git -C {path} checkout "
                         f"92d63d4` (the commit BENCHMARKS.md's races pin), and install its needs: rustbpe, tiktoken")
    return path


def link_peer_base(base_dir: Path, data_dir: Path, tokenizer_dir: Path | None) -> None:
    """The peer reads shards from <base>/base_data_climbmix/ (last = validation) and its tokenizer from
    <base>/tokenizer/: point both at ours."""
    base_dir.mkdir(parents=True, exist_ok=True)
    links = {"base_data_climbmix": data_dir}
    if tokenizer_dir is not None:
        links["tokenizer"] = tokenizer_dir
    for name, target in links.items():
        link = base_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve(), target_is_directory=True)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_flags(DataConfig, argv, description=__doc__.split("\n")[0])
    out = Path(cfg.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    shards = list_shards(cfg.src)
    if len(shards) < cfg.train_shards + 1:
        raise SystemExit(f"{cfg.src} holds {len(shards)} shards; --train_shards {cfg.train_shards} needs one more "
                         f"(the last is the validation shard)")
    chosen = shards[:cfg.train_shards] + shards[-1:]
    counts = {}
    for i, src in enumerate(chosen):
        dst = data / f"shard_{i:05d}.parquet"
        if not dst.exists():
            counts[dst.name] = write_split_shard(src, dst, cfg.max_doc_chars)
            print(f"{src.name} -> {dst.name}: {counts[dst.name][0]} -> {counts[dst.name][1]} documents", flush=True)
    ours = out / "tokenizer_ours"
    if not (ours / RANKS_FILE).is_file():
        subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--data_dir={data}", f"--out_dir={ours}",
                        f"--max_chars={cfg.tokenizer_chars}", f"--vocab_size={cfg.vocab_size}"], check=True)
    result = {"data": str(data), "shards": len(chosen), "tokenizer_ours": str(ours),
              "data_mib": round(sum(p.stat().st_size for p in data.glob("*.parquet")) / 2**20, 1)}
    if cfg.peer:
        peer = check_peer(cfg.peer)
        theirs = out / "tokenizer_nanochat"
        if not theirs.is_dir():
            base = out / "peer_tok_base"
            link_peer_base(base, data, None)
            subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--max-chars={cfg.tokenizer_chars}",
                            f"--vocab-size={cfg.vocab_size}"], check=True, cwd=peer, env=peer_env(peer, base))
            (base / "tokenizer").rename(theirs)
        result["tokenizer_nanochat"] = str(theirs)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

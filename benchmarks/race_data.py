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
- data/tokens.json, the manifest: which --src shard made each shard (and --max_doc_chars), each shard's bytes and
  documents, and per tokenizer the tokens a trainer reads from each training shard in one epoch: every document's
  tokens plus its BOS (both trainers put one BOS before each document; race documents are shorter than a row, so
  nothing is split). benchmarks.race divides the tokens a racer trains on by these to tell how many epochs of
  the race data it sees: past one, the racers start to memorize it.
Each step is skipped when its output exists (the manifest's counts: when they match the shards' names and sizes
and the tokenizer's files). An --out made from other shards or --max_doc_chars is refused, not mixed.
Last stdout line: one JSON object.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.data.shards import DocumentStream, list_shards
from nanochat.flags import parse_flags
from nanochat.tokenizer import META_FILE, RANKS_FILE, Tokenizer

ROW_GROUP = 1024
ZSTD_LEVEL = 19
MANIFEST = "tokens.json"  # in data/: where each shard came from, and its tokens per tokenizer
TOKENIZER_FILES = {"ours": (RANKS_FILE, META_FILE), "nanochat": ("tokenizer.pkl",)}  # what a count depends on
CARRIES = "carries.txt"  # benchmarks/race_prepare.sh's "<shard> <carry folder>" lines, in the race dir


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
    threads: int = field(default=0, metadata={"help": "threads that count tokens (0: one per CPU core)"})


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


def write_json(path: Path, obj: dict) -> None:
    """`obj` into `path` atomically: a run cut off leaves the old file or the new one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def claim_out(data: Path, made_from: dict[str, str], max_doc_chars: int) -> dict:
    """The manifest of `data`, written now when there is none, after refusing a folder made from other --src
    shards or --max_doc_chars: its shards would be kept and mixed with this run's. A folder of an older race_data
    (shards, no manifest) is taken only when it holds exactly the shard names this run would write."""
    path = data / MANIFEST
    fix = f"delete {data.parent} (or pick another --out) to make it anew"
    if path.is_file():
        manifest = json.loads(path.read_text())
        if (manifest["made_from"], manifest["max_doc_chars"]) != (made_from, max_doc_chars):
            raise SystemExit(f"{data.parent} was made from --src shards {manifest['made_from']} with --max_doc_chars "
                             f"{manifest['max_doc_chars']}; this run asks for {made_from} with --max_doc_chars "
                             f"{max_doc_chars}: {fix}")
        return manifest
    present = sorted(p.name for p in data.glob("*.parquet"))
    if present and present != sorted(made_from):
        raise SystemExit(f"{data} holds {present} and no {MANIFEST} (an older race_data made it): which --src shards "
                         f"they came from is unknown, and this run would write {sorted(made_from)}: {fix}")
    manifest = {"made_from": made_from, "max_doc_chars": max_doc_chars, "validation": None, "shards": {},
                "tokenizers": {}}
    write_json(path, manifest)
    return manifest


def tokenizer_digest(directory: Path, kind: str) -> str:
    """sha256 of the files a tokenizer encodes with: counts made with other files are stale."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES[kind]:
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def token_counter(kind: str, directory: Path, threads: int) -> tuple[Callable[[list[str]], list[int]], str]:
    """(texts -> the tokens a trainer reads for each: its BOS and the text's tokens, how the tokenizer was loaded),
    through that kind's tokenizer loaded as its trainer loads it."""
    if kind == "ours":
        tokenizer = Tokenizer.load(directory)
        bos = tokenizer.get_bos_token_id()
        return (lambda texts: [len(ids) for ids in tokenizer.encode(texts, prepend=bos, num_threads=threads)],
                "nanochat.tokenizer.Tokenizer.load")
    # the peer's RustBPETokenizer.from_directory unpickles this tiktoken Encoding; its encode(texts, prepend=bos)
    # is encode_ordinary_batch with the one BOS id put first
    with open(directory / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    return (lambda texts: [1 + len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=threads)],
            "its tokenizer.pkl unpickled, as the peer's RustBPETokenizer.from_directory does")


def count_tokens(paths: list[Path], counter: Callable[[list[str]], list[int]]) -> dict[str, int]:
    """Tokens per shard, each row group's documents counted in one batch."""
    counts = {}
    for path in paths:
        shard = pq.ParquetFile(path)
        counts[path.name] = sum(sum(counter(shard.read_row_group(g, columns=["text"]).column("text").to_pylist()))
                                for g in range(shard.num_row_groups))
    return counts


def update_manifest(data: Path, manifest: dict, tokenizers: dict[str, Path], threads: int) -> dict:
    """`manifest` with each shard's bytes and documents and, per tokenizer, its tokens of each training shard;
    a tokenizer's counts are kept when the shards (names, sizes) and its files are those they were made with."""
    files = sorted(data.glob("*.parquet"))
    shards = {p.name: {"bytes": p.stat().st_size, "documents": pq.ParquetFile(p).metadata.num_rows} for p in files}
    same_shards = manifest["shards"] == shards
    counted = {}
    for kind, directory in tokenizers.items():
        digest, old = tokenizer_digest(directory, kind), manifest["tokenizers"].get(kind)
        if same_shards and old and old["sha256"] == digest:
            counted[kind] = old
            continue
        counter, how = token_counter(kind, directory, threads)
        start = time.time()
        counts = count_tokens(files[:-1], counter)
        counted[kind] = {"dir": directory.name, "sha256": digest, "train_tokens": counts}
        print(f"{directory.name} ({how}, {threads} threads): {sum(counts.values()):,} tokens in {len(counts)} "
              f"training shards, counted in {time.time() - start:.0f} s", flush=True)
    updated = {**manifest, "validation": files[-1].name, "shards": shards, "tokenizers": counted}
    if updated != manifest:
        write_json(data / MANIFEST, updated)
    return updated


def compare_shards(data: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """(the manifest's shards that `data` lacks, the shards in `data` it does not describe: another name, or
    another size than it counted)."""
    present = {p.name: p.stat().st_size for p in sorted(data.glob("*.parquet"))}
    missing = [name for name in manifest["shards"] if name not in present]
    wrong = [f"{name} ({size:,} bytes)" for name, size in present.items()
             if manifest["shards"].get(name, {}).get("bytes") != size]
    return missing, wrong


def train_tokens(race_dir: str | Path, kinds: list[str]) -> tuple[dict[str, int], list[str]]:
    """Per tokenizer kind, the tokens of the training shards now in <race_dir>/data by its manifest; and notes on
    each count that is not known (no manifest: {}) or counts fewer shards than the manifest names."""
    race_dir = Path(race_dir)
    data = race_dir / "data"
    path = data / MANIFEST
    rerun = ("run benchmarks.race_data again where this race data was made (`--out DIR --train_shards N`, N as it "
             "was made; it keeps the shards and tokenizers and counts), or benchmarks/race_prepare.sh")
    if not path.is_file():
        return {}, [f"no {path} (race data made before race_data counted tokens): epochs unknown; {rerun}"]
    manifest = json.loads(path.read_text())
    missing, wrong = compare_shards(data, manifest)
    if wrong or manifest["validation"] in missing:
        what = f"does not describe {', '.join(wrong)}" if wrong else f"names {manifest['validation']} the validation " \
               "shard, which is missing (the trainers would validate on the last training shard)"
        return {}, [f"{path} {what}: epochs unknown; {rerun}"]
    train = [name for name in manifest["shards"] if name != manifest["validation"] and name not in missing]
    notes = [f"{path} names training shards {missing} that are not in {data}: the racers train on the "
             f"{len(train)} there, and their epochs count those"] if missing else []
    tokens = {}
    for kind in kinds:
        entry, directory = manifest["tokenizers"].get(kind), race_dir / f"tokenizer_{kind}"
        if entry is None:
            notes.append(f"{path} counts no tokens of {directory.name}: its epochs unknown; {rerun}")
        elif tokenizer_digest(directory, kind) != entry["sha256"]:
            notes.append(f"{directory} is not the tokenizer {path} counted with: its epochs unknown; {rerun}")
        else:
            tokens[kind] = sum(entry["train_tokens"][name] for name in train)
    return tokens, notes


def check_staged(race_dir: str | Path) -> None:
    """Stop unless <race_dir>/data holds every shard its manifest names and nothing else, naming each missing
    shard and the carry folder that brings it (<race_dir>/carries.txt, written by benchmarks/race_prepare.sh)."""
    race_dir = Path(race_dir)
    data = race_dir / "data"
    if not (data / MANIFEST).is_file():
        raise SystemExit(f"no {data / MANIFEST}: stage a .race_a made by the current benchmarks/race_prepare.sh first")
    manifest = json.loads((data / MANIFEST).read_text())
    missing, wrong = compare_shards(data, manifest)
    carries = dict(line.split() for line in (race_dir / CARRIES).read_text().splitlines() if line.strip()) \
        if (race_dir / CARRIES).is_file() else {}
    by_carry: dict[str, list[str]] = {}
    for name in missing:
        by_carry.setdefault(carries.get(name, "unknown: no carries.txt"), []).append(name)
    problems = [f"missing {', '.join(names)} (carry {carry})" for carry, names in by_carry.items()]
    problems += [f"{name} is not a shard the manifest counted (left from an older staging? `rm -rf {race_dir}` and "
                 "stage again)" for name in wrong]
    if missing:
        problems.append("stage those carries first (`bash benchmarks/race_gpu.sh stage`, a call each, machine warm)")
    if problems:
        raise SystemExit(f"{data}: " + "; ".join(problems))
    print(f"{data}: all {len(manifest['shards'])} shards of {MANIFEST}", flush=True)


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
    made_from = {f"shard_{i:05d}.parquet": src.name for i, src in enumerate(chosen)}
    manifest = claim_out(data, made_from, cfg.max_doc_chars)
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
    theirs = out / "tokenizer_nanochat"
    if cfg.peer:
        peer = check_peer(cfg.peer)
        if not theirs.is_dir():
            base = out / "peer_tok_base"
            link_peer_base(base, data, None)
            subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--max-chars={cfg.tokenizer_chars}",
                            f"--vocab-size={cfg.vocab_size}"], check=True, cwd=peer, env=peer_env(peer, base))
            (base / "tokenizer").rename(theirs)
        result["tokenizer_nanochat"] = str(theirs)
    # the peer's tokenizer is counted whenever it is there, with --peer or not: tiktoken alone reads it
    tokenizers = {"ours": ours, **({"nanochat": theirs} if (theirs / "tokenizer.pkl").is_file() else {})}
    manifest = update_manifest(data, manifest, tokenizers, cfg.threads or os.cpu_count() or 1)
    result["train_tokens"] = {kind: sum(e["train_tokens"].values()) for kind, e in manifest["tokenizers"].items()}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

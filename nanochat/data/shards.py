"""Text shards on disk -> documents, split by rank, in a fixed order, with a resumable position.

A data dir holds shard files of ONE format: `.parquet` (a string column `text`, one document per row),
`.jsonl` (one JSON object with a "text" field per line) or `.txt` (documents separated by blank lines, so
a plain book or tinyshakespeare becomes many short documents instead of one that packing would crop away).
If a dir mixes formats, parquet wins, then jsonl, then txt, and the others are ignored (logged): the
shared dev dir keeps tinyshakespeare.txt next to its parquet shards, and the last parquet shard must stay
the validation shard. Sorted order; the last file is the validation split.

The unit of reading (and of sharding across ranks) is a "row group": a parquet row group, or a block of
`TEXT_BLOCK_DOCS` documents of a .jsonl/.txt file. The row groups of a split are numbered globally in
file order, and row group g goes to rank g % world_size, so every rank gets a fair share even when
files hold few row groups. When a split has fewer row groups than ranks (a small validation shard on
8 GPUs), every rank reads every row group and keeps rows r with r % world_size == rank instead.

A bad shard is refused when the stream is built, before any training, by file name and with the fix: not
parquet, no `text` column, a `text` column of something other than strings, a row group that does not
decode (each rank decodes its own row groups once per process, in parallel: a damaged download fails now,
not at the step that first reads it), a .txt/.jsonl file that is not UTF-8, or no documents (an empty
shard is an error, not a skip: it is most likely a broken download, and a silent skip would shift the
train/val split).
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import default_data_dir, log0

FORMATS = (".parquet", ".jsonl", ".txt")  # order of preference when a dir mixes formats
TEXT_BLOCK_DOCS = 1024  # documents per row group of a .jsonl/.txt file (parquet shards use 1024 too)
SHARED_PRETRAIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pretrain"
_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns, row group) this process has decoded without error
_FIX = "download shards with `python -m nanochat.data.download -n 8`, or point at a folder of shards with " \
       "`--data_dir ../shared/data/pretrain`"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The dir given, else the user's data dir if it holds shards, else the shared dev shards if present."""
    if data_dir:
        return Path(data_dir)
    default = default_data_dir()
    if not (default.is_dir() and any(p.suffix in FORMATS for p in default.iterdir())) and SHARED_PRETRAIN.is_dir():
        return SHARED_PRETRAIN
    return default


def list_shards(data_dir: str | Path) -> list[Path]:
    """Sorted shard files of one format (parquet > jsonl > txt) in `data_dir`; clear error if none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data dir {data_dir} does not exist: {_FIX}")
    files = [p for p in data_dir.iterdir() if p.is_file() and p.suffix in FORMATS]
    for suffix in FORMATS:
        chosen = sorted(p for p in files if p.suffix == suffix)
        if chosen:
            ignored = sorted(p.name for p in files if p.suffix != suffix)
            if ignored:
                log0(f"{data_dir}: using the {suffix} files, ignoring {ignored}")
            return chosen
    raise FileNotFoundError(f"data dir {data_dir} holds no {'/'.join(FORMATS)} files: {_FIX}")


def split_shards(paths: list[Path], split: str) -> list[Path]:
    """"val" = the last file, "train" = all the others."""
    paths = [Path(p) for p in paths]
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(paths) < 2:
        where = paths[0].parent if paths else "the data dir"
        raise ValueError(f"{where} holds {len(paths)} shard file(s), but the last file is the validation split "
                         f"and training needs at least one more: add shards (`python -m nanochat.data.download -n 8`)")
    return paths[-1:] if split == "val" else paths[:-1]


# ---------------------------------------------------------------------------------------------- reading files

def _not_parquet(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable parquet file ({err}); it is probably a broken download: "
                      f"delete it and run `python -m nanochat.data.download -n N` again")


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
        raise _not_parquet(path, err) from err
    names = pf.schema_arrow.names
    if "text" not in names:
        raise ValueError(f"{path} has no `text` column (its columns: {names}); shards need one document per "
                         f"row in a string column named `text`")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: its `text` column holds {kind} values, but shards need one document per row "
                         f"as a string: write the column as strings (e.g. pa.array(texts, pa.string()))")
    return pf


def _verify_row_groups(paths: list[Path], groups: list[tuple[int, int]]) -> None:
    """Decode the given (file index, row group) of parquet shards, each once per process, several files at a
    time: a damaged row group fails here, before training, instead of at the step that first reads it."""
    todo: dict[Path, list[tuple[int, tuple]]] = {}
    for i, j in groups:
        path = paths[i]
        if path.suffix == ".parquet":  # .txt/.jsonl files were read whole when their documents were counted
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns, j)
            if key not in _VERIFIED:
                todo.setdefault(path, []).append((j, key))
    if not todo:
        return

    def verify(path: Path, items: list[tuple[int, tuple]]) -> int:
        pf = _open_parquet(path)
        for j, key in items:
            try:
                pf.read_row_group(j, columns=["text"])
            except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... for a damaged page
                raise ValueError(f"{path}: row group {j} of {pf.num_row_groups} does not decode ({err}); the file "
                                 "is damaged: delete it and download it again "
                                 "(`python -m nanochat.data.download -n N`)") from err
            _VERIFIED.add(key)
        return len(items)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
        count = sum(f.result() for f in [pool.submit(verify, path, items) for path, items in todo.items()])
    log0(f"decoded {count} row groups of {len(todo)} parquet shard(s) in {time.perf_counter() - t0:.1f} s: "
         "none is damaged")


def _read_text_docs(path: Path) -> list[str]:
    """All documents of a .txt (blank-line separated) or .jsonl ("text" field per line) file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, e.g. `iconv -f "
                         f"latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`, and keep only the converted "
                         f"file in the data dir") from err
    if path.suffix == ".txt":
        return [d.strip() for d in re.split(r"\n[ \t\r]*\n", text) if d.strip()]
    docs = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({err}); each line must be one JSON object "
                             f"with a \"text\" field") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{lineno} has no string \"text\" field; each line must be one JSON "
                             f"object with a \"text\" field")
        docs.append(obj["text"])
    return docs


def _count_row_groups(path: Path) -> int:
    """Row groups of a file; refuses a file that is unreadable, lacks `text`, or holds no documents."""
    if path.suffix == ".parquet":
        pf = _open_parquet(path)
        num_rows, num_groups = pf.metadata.num_rows, pf.num_row_groups
    else:
        num_rows = len(_read_text_docs(path))
        num_groups = -(-num_rows // TEXT_BLOCK_DOCS)
    if num_rows == 0:
        raise ValueError(f"{path} is an empty shard (no documents); delete it, or re-download it with "
                         f"`python -m nanochat.data.download -n N`")
    return num_groups


@dataclass(frozen=True)
class DocId:
    """Identity of a document in a stream: (epoch, global row group, row); orders like the stream does."""
    epoch: int
    group: int
    row: int


class DocumentStream:
    """The documents of some shard files for one rank, in a fixed order, looping over epochs if `loop`.

    `position` (epoch, shard, row_group, row of the next document) is JSON-able; a stream built with it
    continues exactly where the old one stopped. `fetch` re-reads given documents by id, which is how
    the packer rebuilds its buffer on resume. Empty documents are skipped.
    """

    def __init__(self, paths: list[Path], rank: int = 0, world_size: int = 1, position: dict | None = None,
                 loop: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("DocumentStream needs at least one shard file")
        self.rank, self.world_size, self.loop = rank, world_size, loop
        self.groups: list[tuple[int, int]] = []  # global row group -> (file index, row group in file)
        for i, path in enumerate(self.paths):
            self.groups += [(i, j) for j in range(_count_row_groups(path))]
        # Fewer row groups than ranks: every rank reads every group and takes every world_size-th row.
        self.stride_rows = len(self.groups) < world_size
        self.my_groups = list(range(len(self.groups))) if self.stride_rows else \
            list(range(rank, len(self.groups), world_size))
        _verify_row_groups(self.paths, [self.groups[g] for g in self.my_groups])
        self.epoch, self.index, self.row = 0, 0, 0  # next document: epoch, my_groups[index], row
        if position is not None:
            self._seek(position)
        self._cache: tuple[int, list] | None = None  # (global group, its texts)
        self._open: tuple[int, pq.ParquetFile | list[str]] | None = None  # last file opened

    # -- position ----------------------------------------------------------------------------------------------
    @property
    def position(self) -> dict:
        g = self.my_groups[self.index] if self.index < len(self.my_groups) else len(self.groups)
        shard, row_group = self.groups[g] if g < len(self.groups) else (len(self.paths), 0)
        return {"epoch": self.epoch, "shard": shard, "row_group": row_group, "row": self.row}

    def _seek(self, position: dict) -> None:
        key = (position["shard"], position["row_group"])
        if key == (len(self.paths), 0):
            g = len(self.groups)
        elif key in self.groups:
            g = self.groups.index(key)
        else:
            raise ValueError(f"saved data position {position} does not exist in {[p.name for p in self.paths]}: "
                             f"the shards changed since the state was saved")
        self.epoch, self.row = position["epoch"], position["row"]
        self.index = next((k for k, mg in enumerate(self.my_groups) if mg >= g), len(self.my_groups))

    # -- reading -----------------------------------------------------------------------------------------------
    def _read_group(self, g: int) -> list:
        """Texts (None for missing) of global row group g, cached: the packer reads the same group often."""
        if self._cache is not None and self._cache[0] == g:
            return self._cache[1]
        file_index, j = self.groups[g]
        if self._open is None or self._open[0] != file_index:
            path = self.paths[file_index]
            self._open = (file_index, _open_parquet(path) if path.suffix == ".parquet" else _read_text_docs(path))
        source = self._open[1]
        if isinstance(source, list):
            texts = source[j * TEXT_BLOCK_DOCS:(j + 1) * TEXT_BLOCK_DOCS]
        else:
            try:
                texts = source.read_row_group(j, columns=["text"]).column(0).to_pylist()
            except Exception as err:
                raise _not_parquet(self.paths[file_index], err) from err
        self._cache = (g, texts)
        return texts

    def read(self, max_docs: int) -> list[tuple[DocId, str]]:
        """Up to `max_docs` next documents with their ids; [] only when the data ended (loop=False)."""
        out: list[tuple[DocId, str]] = []
        step = self.world_size if self.stride_rows else 1
        empty_epochs = 0
        while len(out) < max_docs:
            if self.index >= len(self.my_groups):
                if not self.loop:
                    break
                empty_epochs = empty_epochs + 1 if not out else 0
                if empty_epochs > 1:
                    raise ValueError(f"rank {self.rank} of {self.world_size} finds only empty documents in "
                                     f"{[p.name for p in self.paths]}: check the shards' `text` values")
                self.epoch, self.index, self.row = self.epoch + 1, 0, 0
            g = self.my_groups[self.index]
            texts = self._read_group(g)
            if self.stride_rows and self.row % step != self.rank:
                self.row += (self.rank - self.row) % step  # first row of this rank at or after self.row
            while self.row < len(texts) and len(out) < max_docs:
                text = texts[self.row]
                if text:
                    out.append((DocId(self.epoch, g, self.row), text))
                self.row += step
            if self.row >= len(texts):
                self.index, self.row = self.index + 1, 0
        return out

    def fetch(self, ids: list[DocId]) -> list[str]:
        """Texts of documents by id (any order), reading each row group once."""
        texts: dict[DocId, str] = {}
        for d in sorted(ids, key=lambda d: (d.group, d.row)):
            texts[d] = self._read_group(d.group)[d.row]
        return [texts[d] for d in ids]

    def __iter__(self) -> Iterator[str]:
        while batch := self.read(256):
            yield from (text for _, text in batch)

"""SmolTalk (HuggingFaceTB/smol-smoltalk): ~460k synthetic chat conversations, hosted on the Hub.

Its real source is the Hub's parquet export: the datasets-server API lists the parquet files of a
split, we download them once into `<base>/smoltalk/` and read the `messages` column
(a list of `{role, content}`). Tests and offline machines pass `path=` to a local parquet file of
the same layout.
"""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import get_base_dir
from nanochat.tasks.base import Task

DATASET = "HuggingFaceTB/smol-smoltalk"
PARQUET_API = "https://datasets-server.huggingface.co/parquet"
ROLES = ("system", "user", "assistant")


def parquet_urls(split: str, dataset: str = DATASET, api_url: str = PARQUET_API, timeout: float = 30.0) -> list[str]:
    """The parquet file URLs of one split, as the Hub's datasets-server lists them."""
    query = urllib.parse.urlencode({"dataset": dataset})
    with urllib.request.urlopen(f"{api_url}?{query}", timeout=timeout) as resp:
        listing = json.load(resp)
    urls = [f["url"] for f in listing.get("parquet_files", []) if f.get("split") == split]
    if not urls:
        raise ValueError(f"{api_url} lists no parquet files for {dataset} split {split!r}")
    return urls


def download_split(split: str, out_dir: Path | None = None, api_url: str = PARQUET_API) -> list[Path]:
    """Download (once) the split's parquet files; returns the local paths."""
    out_dir = Path(out_dir) if out_dir else get_base_dir() / "smoltalk" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, url in enumerate(parquet_urls(split, api_url=api_url)):
        path = out_dir / f"{i:04d}.parquet"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            urllib.request.urlretrieve(url, tmp)
            tmp.replace(path)
        paths.append(path)
    return paths


def _clean(messages: list[dict]) -> dict | None:
    """Our conversation format, or None when the roles do not alternate user/assistant."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if len(body) < 2 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body)):
        return None
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in msgs):
        return None
    return {"messages": msgs}


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train", path: str | Path | list[str | Path] | None = None,
                 api_url: str = PARQUET_API, **kw):
        super().__init__(**kw)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        if path is None:
            paths = download_split(split, api_url=api_url)
        else:
            paths = [Path(p) for p in (path if isinstance(path, list) else [path])]
        self.convs, self.skipped = [], 0
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"SmolTalk parquet {p} does not exist; pass path= a parquet file with a "
                                        f"`messages` column, or path=None to download {DATASET}")
            table = pq.read_table(p, columns=["messages"])
            for messages in table.column("messages").to_pylist():
                conv = _clean(messages)
                if conv is None:
                    self.skipped += 1
                else:
                    self.convs.append(conv)

    def num_examples(self) -> int:
        return len(self.convs)

    def get_example(self, index: int) -> dict:
        return self.convs[index]

"""Download pretraining shards `shard_{i:05d}.parquet` over HTTP: parallel, retried, never half-written.

    python -m nanochat.data.download -n N [--base_url URL] [--out_dir DIR] [--workers K]

Shards go to <base_dir>/base_data by default (see nanochat.common.default_data_dir); the base URL defaults
to $NANOCHAT_DATA_URL, then to karpathy's FineWeb-Edu shards on the HF hub. The last shard downloaded
serves as the validation split. The command's last stdout line: JSON.

A shard is written to a hidden temporary file in the destination dir, checked (byte count against
Content-Length, then it must open as parquet) and only then renamed into place with `os.replace`, which
is atomic on one filesystem. So a file under a final name is always a complete shard, a killed or cut-off
download leaves at most a `.shard_*.tmp` file (ignored by the loader), and a re-run skips the shards that
are already complete. A 404 is not retried (the shard does not exist there); network errors, cut-off
transfers and 5xx/429 answers are retried with exponential backoff.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import default_data_dir, log0, logger
from nanochat.flags import build_parser

# karpathy's FineWeb-Edu 100B-token sample, shuffled and cut into ~1800 parquet shards (`text` column).
DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 20


class ShardNotFound(FileNotFoundError):
    """The server answered 404: the repository has no such shard (or the base URL is wrong)."""


class IncompleteDownload(OSError):
    """The transfer ended before Content-Length bytes arrived."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def base_url_or_default(base_url: str | None = None) -> str:
    """The base URL given, else $NANOCHAT_DATA_URL, else the FineWeb-Edu shards on the HF hub."""
    return (base_url or os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_BASE_URL).rstrip("/")


def is_complete(path: Path) -> bool:
    """A complete shard: the file exists under its final name and opens as parquet."""
    try:
        pq.ParquetFile(path)
        return True
    except Exception:  # missing, truncated, not parquet
        return False


def _fetch(url: str, dest: Path, timeout: float) -> int:
    """Stream `url` into `dest`; raise IncompleteDownload if fewer bytes than Content-Length arrive."""
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
        expected = response.headers.get("Content-Length")
        got = 0
        while chunk := response.read(CHUNK):
            f.write(chunk)
            got += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    if expected is not None and got != int(expected):
        raise IncompleteDownload(f"got {got} of {expected} bytes")
    return got


def download_shard(index: int, base_url: str, out_dir: Path, retries: int = 5, backoff: float = 1.0,
                   timeout: float = 60.0) -> tuple[Path, bool]:
    """Fetch one shard unless it is complete already; returns (path, whether it was downloaded)."""
    name = shard_name(index)
    final, url = out_dir / name, f"{base_url}/{name}"
    if is_complete(final):
        return final, False
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            logger.warning(f"{name}: attempt {attempt} failed ({error}); retrying in {delay:.1f}s")
            time.sleep(delay)
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            t0 = time.perf_counter()
            size = _fetch(url, tmp, timeout)
            try:
                pq.ParquetFile(tmp)
            except Exception as err:
                raise ValueError(f"the {size}-byte file from {url} is not parquet ({err})") from err
            os.replace(tmp, final)
            log0(f"{name}: {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
            return final, True
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise ShardNotFound(f"{url} does not exist (HTTP 404): the repository has fewer shards than asked "
                                    f"for, or the base URL (--base_url / NANOCHAT_DATA_URL) is wrong") from None
            if err.code not in RETRYABLE_HTTP:
                raise RuntimeError(f"{url}: HTTP {err.code} {err.reason}; check --base_url / NANOCHAT_DATA_URL "
                                   f"and your network access") from None
            error = err
        except (OSError, http.client.HTTPException, ValueError) as err:  # URLError, resets, timeouts, cut-offs
            error = err
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"{url}: failed {retries + 1} times, last error: {error}; nothing was written under "
                       f"{final}; run the command again to retry")


def download_shards(num_shards: int, base_url: str | None = None, out_dir=None, workers: int = 4,
                    retries: int = 5, *, backoff: float = 1.0, timeout: float = 60.0) -> list[Path]:
    """Make sure shards 0..num_shards-1 are complete in `out_dir` (default: the user's data dir).

    Downloads in `workers` threads; shards already complete are skipped. If any shard fails, the others
    still finish, and the first failure (by shard index) is raised.
    """
    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    base_url = base_url_or_default(base_url)
    out_dir = Path(out_dir) if out_dir else default_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    log0(f"downloading {num_shards} shards from {base_url} to {out_dir} ({workers} workers)")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(download_shard, i, base_url, out_dir, retries, backoff, timeout)
                   for i in range(num_shards)]
    results, failures = [], []
    for future in futures:
        try:
            results.append(future.result())
        except Exception as err:
            failures.append(err)
    for err in failures:
        logger.error(str(err))
    if failures:
        raise failures[0]
    fetched = sum(downloaded for _, downloaded in results)
    log0(f"{fetched} shards downloaded, {num_shards - fetched} already complete, in {out_dir}")
    return [path for path, _ in results]


@dataclass
class DatasetConfig:
    """Download pretraining shards shard_00000.parquet ... into the data dir."""
    num_shards: int = field(default=8, metadata={"help": "shards 0..N-1 (also -n N); the last one is validation"})
    base_url: str | None = field(default=None, metadata={"help": "where shard_XXXXX.parquet live "
                                                                 "(default: $NANOCHAT_DATA_URL, then FineWeb-Edu)"})
    out_dir: str | None = field(default=None, metadata={"help": "destination (default: <base_dir>/base_data)"})
    workers: int = field(default=4, metadata={"help": "parallel downloads"})
    retries: int = field(default=5, metadata={"help": "retries per shard, with exponential backoff"})


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(DatasetConfig)
    parser.add_argument("-n", dest="num_shards", type=int, help=argparse.SUPPRESS)
    cfg = DatasetConfig(**vars(parser.parse_args(argv)))
    t0 = time.perf_counter()
    paths = download_shards(cfg.num_shards, cfg.base_url, cfg.out_dir, cfg.workers, cfg.retries)
    result = {"num_shards": len(paths), "out_dir": str(paths[0].parent), "base_url": base_url_or_default(cfg.base_url),
              "bytes": sum(p.stat().st_size for p in paths), "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

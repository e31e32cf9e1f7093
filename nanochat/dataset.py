"""Download pretraining shards:  python -m nanochat.dataset -n N [--base_url URL] [--out_dir DIR] [--workers K]

Shards go to <base_dir>/base_data by default (see nanochat.common.default_data_dir); the base URL defaults
to $NANOCHAT_DATA_URL, then to karpathy's FineWeb-Edu shards on the HF hub. Re-running resumes: complete
shards are skipped. The last shard downloaded serves as the validation split. Last stdout line: JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

from nanochat.data.download import base_url_or_default, download_shards
from nanochat.flags import build_parser


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

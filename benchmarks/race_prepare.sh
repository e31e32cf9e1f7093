#!/usr/bin/env bash
# Build the git-ignored folders benchmarks/race_gpu.sh carries to a GPU machine (64 MiB a call):
#   .race_a/  training shards 0-1 and the validation shard of benchmarks.race_data's output, both tokenizers,
#             the peer's checkout (no .git, no images) and a rustbpe wheel for the GPU machine's Python 3.12
#   .race_b/  training shards 2-3
# Usage, from the repo root on the dev machine:  PEER=/path/to/nanochat bash benchmarks/race_prepare.sh
# (PEER: a checkout of karpathy/nanochat at 92d63d4; RACE_DIR: where race_data writes, default .race)
set -euo pipefail
cd "$(dirname "$0")/.."
PEER="${PEER:?set PEER to a checkout of karpathy/nanochat (git clone https://github.com/karpathy/nanochat)}"
RACE_DIR="${RACE_DIR:-.race}"
python -m benchmarks.race_data --src "${SRC:-../shared/data/pretrain}" --out "$RACE_DIR" --train_shards 4 --peer "$PEER"
rm -rf .race_a .race_b && mkdir -p .race_a/data .race_a/whl .race_a/peer .race_b/data
cp "$RACE_DIR"/data/shard_0000[014].parquet .race_a/data/ && cp "$RACE_DIR"/data/shard_0000[23].parquet .race_b/data/
cp -r "$RACE_DIR/tokenizer_ours" "$RACE_DIR/tokenizer_nanochat" .race_a/
git -C "$PEER" archive HEAD | tar -x -C .race_a/peer && rm -f .race_a/peer/dev/*.png .race_a/peer/dev/*.ipynb
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .race_a/whl rustbpe
du -sh .race_a .race_b

#!/usr/bin/env bash
# Build the git-ignored folders that GPU calls carry (the GPU machine reaches no registry and no ../shared):
#   .whl/    wheels for the GPU machine's Python 3.12: liger-kernel, cut-cross-entropy, torchao, rustbpe
#   .carry/  tokenizer/ (32k, trained here on the shared shards), data/ (shard_00000 = train,
#            shard_00006 = validation), eval/core (CORE's tasks, for the speedrun's base_eval)
# Run from the repo root on the dev machine, in the project's venv:  bash benchmarks/prepare_carry.sh
# Then carry [".whl"] for the kernel call and [".whl", ".carry"] for training calls (~45 MiB; limit 64).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
mkdir -p .whl .carry/data .carry/eval
python -m pip download -q --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "torchao==0.18.0" rustbpe
cp "$DATA/pretrain/shard_00000.parquet" "$DATA/pretrain/shard_00006.parquet" .carry/data/
rm -rf .carry/eval/core && cp -r "$DATA/eval/core" .carry/eval/core
if [ ! -d .carry/tokenizer ]; then
    NANOCHAT_BASE_DIR="$PWD/.carry/tok_build" python -m scripts.tok_train --data_dir "$DATA/pretrain" \
        --max_chars 100000000 --vocab_size 32768
    mv .carry/tok_build/tokenizer .carry/tokenizer && rm -rf .carry/tok_build
fi
du -sh .whl .carry

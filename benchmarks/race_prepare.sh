#!/usr/bin/env bash
# Build the git-ignored folders benchmarks/race_gpu.sh carries to a GPU machine, one a call, each under 64 MiB:
#   .race_a/  training shards 0-1, the validation shard and the token manifest (data/tokens.json) of
#             benchmarks.race_data's output, both tokenizers, the peer's checkout (no .git, no images), a rustbpe
#             wheel for the GPU machine's Python 3.12, and carries.txt (the folder that brings each shard)
#   .race_b/  training shards 2-3
#   .race_c/  training shards 4-5 (two training shards a folder, as many folders as TRAIN_SHARDS needs)
# Usage, from the repo root on the dev machine:  PEER=/path/to/nanochat bash benchmarks/race_prepare.sh
# PEER: a checkout of karpathy/nanochat at 92d63d4. TRAIN_SHARDS: training shards of SRC to race on (default 6: all
# of ../shared/data/pretrain's, ~67M tokens; a d12 racer of 524,288-token steps sees one epoch in ~128 steps).
# RACE_DIR: where race_data writes (default .race; race_data refuses one made with another TRAIN_SHARDS).
set -euo pipefail
cd "$(dirname "$0")/.."
PEER="${PEER:?set PEER to a checkout of karpathy/nanochat (git clone https://github.com/karpathy/nanochat)}"
RACE_DIR="${RACE_DIR:-.race}"
TRAIN_SHARDS="${TRAIN_SHARDS:-6}"
LIMIT_MIB=64
case "$(basename "$RACE_DIR")" in
    .race_[a-z]) echo "race_prepare.sh: RACE_DIR=$RACE_DIR is named as a carry folder (deleted below): pick another"
                 exit 2 ;;
esac
python -m benchmarks.race_data --src "${SRC:-../shared/data/pretrain}" --out "$RACE_DIR" \
    --train_shards "$TRAIN_SHARDS" --peer "$PEER"
rm -rf .race_[a-z] && mkdir -p .race_a/data .race_a/whl .race_a/peer
validation=$(printf 'shard_%05d.parquet' "$TRAIN_SHARDS")
cp "$RACE_DIR/data/$validation" "$RACE_DIR/data/tokens.json" .race_a/data/
echo "$validation .race_a" > .race_a/carries.txt
letters=abcdefghijklmnopqrstuvwxyz
for ((i = 0; i < TRAIN_SHARDS; i++)); do
    shard=$(printf 'shard_%05d.parquet' "$i") carry=".race_${letters:i/2:1}"
    mkdir -p "$carry/data" && cp "$RACE_DIR/data/$shard" "$carry/data/"
    echo "$shard $carry" >> .race_a/carries.txt
done
cp -r "$RACE_DIR/tokenizer_ours" "$RACE_DIR/tokenizer_nanochat" .race_a/
git -C "$PEER" archive HEAD | tar -x -C .race_a/peer && rm -f .race_a/peer/dev/*.png .race_a/peer/dev/*.ipynb
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .race_a/whl rustbpe
over=0
for carry in .race_[a-z]; do
    bytes=$(du -sb "$carry" | cut -f1)
    echo "$carry: $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }') MiB ($(ls "$carry/data" | tr '\n' ' '))"
    if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
        echo "race_prepare.sh: $carry is over the $LIMIT_MIB MiB a GPU call carries: race_gpu.sh cannot bring it;" \
             "give it fewer shards (the two-a-folder split above)"
        over=1
    fi
done
exit "$over"

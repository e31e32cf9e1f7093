#!/usr/bin/env bash
# One GPU call: d20 training-step measurements (issue 3) and the benchmark matrix (issue 6) on the H200.
# Needs carry [".whl", ".carry"]: wheels, .carry/tokenizer, .carry/data (a train shard + the val shard).
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export NANOCHAT_BASE_DIR=/tmp/nc; mkdir -p $NANOCHAT_BASE_DIR; cp -r .carry/tokenizer $NANOCHAT_BASE_DIR/
source benchmarks/gpu_env.sh
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$? ($name)"; grep -v "^\[nanochat\] attention: layer" "$OUT/$name.txt" | tail -n "${TAIL:-6}"; }
TRAIN="python3 -m scripts.base_train --data_dir .carry/data --eval_every 0 --save_every 0 --sample_every 0"
run train_d20_b32 170 $TRAIN --depth=20 --device_batch_size=32 --max_seq_len=2048 --num_iterations=6
run train_d20_b8 120 $TRAIN --depth=20 --device_batch_size=8 --max_seq_len=1024 --total_batch_size=65536 --num_iterations=8
BENCH="python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 4 --timeout 180"
TAIL=12 run bench_kernels 330 $BENCH --kernel current,liger,triton --device_batch_size 32 --max_seq_len 2048 --out_dir $OUT/bench1

#!/usr/bin/env bash
# One GPU call: d20 steps after the bf16-residual change (issues 3, 6), fp8 vs bf16 (issue 7), inference (issue 8).
# Needs carry [".whl", ".carry"].
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
export NANOCHAT_BASE_DIR=/tmp/nc; mkdir -p $NANOCHAT_BASE_DIR; cp -r .carry/tokenizer $NANOCHAT_BASE_DIR/
source benchmarks/gpu_env.sh
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$? ($name)"; grep -v "^\[nanochat\] attention: layer" "$OUT/$name.txt" | tail -n "${TAIL:-2}" | cut -c1-900; }
TRAIN="python3 -m scripts.base_train --data_dir .carry/data --eval_every 0 --save_every 0 --sample_every 0 --kernel current"
run train_d20_b32 130 $TRAIN --depth=20 --device_batch_size=32 --max_seq_len=2048 --num_iterations=6
TAIL=5 run bench_fp8 190 python3 -m scripts.bench --depth 24 --device_batch_size 16 --max_seq_len 2048 --total_batch_size 262144 --kernel current --precision bf16,fp8 --warmup 2 --steps 4 --timeout 120 --out_dir $OUT/fp8
LOSS="python3 -m scripts.base_train --data_dir .carry/data --depth 20 --kernel current --num_iterations 200 --device_batch_size 16 --max_seq_len 1024 --total_batch_size 16384 --eval_every 200 --eval_tokens 1048576 --save_every 0 --sample_every 0"
run loss200_bf16 110 $LOSS --precision bf16
run loss200_fp8 110 $LOSS --precision fp8
TAIL=12 run infer_bench 120 python3 -m scripts.infer_bench --batch_sizes 1,8,32,128
run train_d20_b8 90 $TRAIN --depth=20 --device_batch_size=8 --max_seq_len=1024 --total_batch_size=65536 --num_iterations=8

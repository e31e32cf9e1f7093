#!/usr/bin/env bash
# After a refactor, in one short GPU call (no carry needed; liger/cce tests run with carry [".whl"], else skip):
#   bash benchmarks/regression_gpu.sh          # ~4-5 minutes; each part has a time limit in seconds (TESTS_S,
#                                              # STEP_S, DECODE_S; 0 skips the part)
# 1. the test files of the loss kernels, attention, decode, engine, precision/fp8 layers and the build: on a GPU
#    they run their CUDA cases (the `gpu` marks and the files that pick CUDA when it is there)
# 2. the d20 training step of BENCHMARKS.md row r (window L, B16 T2048, 262,144 tokens, --kernel triton)
# 3. decode: scripts.infer_bench at batch 1 and 128 (BENCHMARKS.md row gg)
# Compare 2 and 3 with their rows only on the same kind of GPU, and rerun the baseline tree beside them to claim
# a difference smaller than machine-to-machine spread (a few percent). Logs: $OUT/*.txt; a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
source benchmarks/gpu_env.sh   # carried liger/cce/torchao wheels (.whl), if any: their tests then run too
source benchmarks/run_part.sh
tests=(tests/test_kernels_loss.py tests/test_attention.py tests/test_decode_attention.py tests/test_engine.py
       tests/test_precision.py tests/test_fp8_linear.py tests/test_build.py tests/test_doc_mask.py)
run gpu_tests "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider "${tests[@]}"
run d20_step "${STEP_S:-100}" python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 4 \
    --kernel triton --device_batch_size 16 --max_seq_len 2048 --window_pattern L
run decode "${DECODE_S:-60}" python3 -m scripts.infer_bench --batch_sizes 1,128
echo "=== summary"
for f in gpu_tests d20_step decode; do [ -f "$OUT/$f.txt" ] && { echo "--- $f"; tail -n 2 "$OUT/$f.txt" | cut -c1-600; }; done

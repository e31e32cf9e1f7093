#!/usr/bin/env bash
# After a refactor, in one short GPU call (no carry needed; liger/cce tests run with carry [".whl"], else skip):
#   bash benchmarks/regression_gpu.sh          # ~6 minutes (~8 with a baseline); each part has a time limit in
#                                              # seconds (TESTS_S, STEP_S, DECODE_S; 0 skips the part)
# 1. the test files of the loss kernels, attention, decode, engine, precision/fp8 layers, the build and Muon: on a GPU
#    they run their CUDA cases (the `gpu` marks and the files that pick CUDA when it is there)
# 2. the d20 training step of BENCHMARKS.md row r (window L, B16 T2048, 262,144 tokens, --kernel triton)
# 3. decode: scripts.infer_bench at batch 1 and 128 (BENCHMARKS.md row gg)
# Compare 2 and 3 with their rows only on the same kind of GPU. To claim a difference smaller than machine-to-machine
# spread (a few percent), carry an older tree beside this one: `mkdir .baseline && git archive COMMIT | tar -x -C
# .baseline` here, then carry [".baseline"] (a tree from before ff70542 imports rustbpe at start: carry ".whl" too,
# or stage the race first): its d20 step and decode run in the same call, before ours (logs base_*).
# Logs: $OUT/*.txt; a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
source benchmarks/gpu_env.sh   # carried liger/cce/torchao wheels (.whl), if any: their tests then run too
source benchmarks/run_part.sh
tests=(tests/test_kernels_loss.py tests/test_attention.py tests/test_decode_attention.py tests/test_engine.py
       tests/test_precision.py tests/test_fp8_linear.py tests/test_build.py tests/test_doc_mask.py
       tests/test_optim.py tests/test_muon_update.py)
TAIL=12 run gpu_tests "${TESTS_S:-240}" python3 -m pytest -q -rf -p no:cacheprovider -p no:logging "${tests[@]}"
step=(-m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 4 --kernel triton
      --device_batch_size 16 --max_seq_len 2048 --window_pattern L)
decode=(-m scripts.infer_bench --batch_sizes 1,128)
if [ -d .baseline ]; then
    run base_d20_step "${STEP_S:-100}" env PYTHONPATH="/tmp/site:$PWD/.baseline" python3 -P "${step[@]}"
    run base_decode "${DECODE_S:-60}" env PYTHONPATH="/tmp/site:$PWD/.baseline" python3 -P "${decode[@]}"
fi
# the computation of row r and of the baseline: S17's defaults (U-net skips, document masking, compiled Muon) off
run d20_step "${STEP_S:-100}" python3 "${step[@]}" --unet_skips false --doc_mask false --muon_compile false
run decode "${DECODE_S:-60}" python3 "${decode[@]}"
echo "=== summary"
for f in gpu_tests base_d20_step d20_step base_decode decode; do [ -f "$OUT/$f.txt" ] && { echo "--- $f"; tail -n 2 "$OUT/$f.txt" | cut -c1-600; }; done

#!/usr/bin/env bash
# One GPU call: environment probe, kernel correctness (loss + attention), loss and attention benchmarks.
# Run from the repo root on the H200 with `.whl` carried; full logs go to $OUT (or ./out).
set -uo pipefail
OUT="${OUT:-out}"; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, torch.nn.attention as A
print("gpu", torch.cuda.get_device_name(), "cap", torch.cuda.get_device_capability(), "cudnn", torch.backends.cudnn.version())
print("attention api:", [n for n in dir(A) if not n.startswith("_")])
try:
    import flash_attn_interface; print("flash_attn_interface: yes")
except Exception as e: print("flash_attn_interface:", type(e).__name__, e)
PY
run() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$? ($name)"; tail -n "${TAIL:-25}" "$OUT/$name.txt"; }
run gpu_tests 100 python3 -m pytest -q -m gpu tests -x -p no:cacheprovider
run check_kernels 170 python3 -m benchmarks.check_kernels
run bench_attention 120 python3 -m benchmarks.bench_attention
TAIL=30 run bench_loss 160 python3 -m benchmarks.bench_loss --shapes 65536x1280x65536 --variants split,fused --repeats 12

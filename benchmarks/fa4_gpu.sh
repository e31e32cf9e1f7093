#!/usr/bin/env bash
# Issue 26 (FlashAttention-4 on Hopper) in one GPU call, carry [".whl_fa4"] (bash benchmarks/prepare_fa4.sh first):
#   bash benchmarks/fa4_gpu.sh            # ~5 minutes; at most ~9.2 (every step has a time limit)
# 1. unpack FA4 (benchmarks/fa4_env.sh); is the fa4 backend available, and if not, why
# 2. the GPU tests of tests/test_attention_fa4.py: bf16 against a float64 reference (full, windows, GQA), compiled
#    equals eager, the kernel audit knows FA4's kernels, an SSSL model step routes its window layers to fa4
# 3. check_kernels for fa4 and auto: forward + backward errors against fp32 math attention on fresh inputs
# 4. bench_attention, B32 H10 T2048 D128 bf16 forward + backward: cudnn full, fa4 full and window 512, flex full
#    and window 512, with issue 26's speedup targets over cuDNN's full causal
# and a short table last (benchmarks/fa4_summary.py). FA4 JIT-compiles each kernel configuration on first use
# (~10-15 s each, about 8 here); its disk cache (fa4_env.sh) lets the later steps reuse them. Logs: $OUT/*.txt.
#   bash benchmarks/fa4_gpu.sh docs       # document masking (--doc_mask) instead, at most ~9 minutes:
# the GPU tests of tests/test_doc_mask.py (flex and fa4 with documents against sdpa in fp32, forward and backward;
# compiled equals eager, new documents do not recompile; a doc-masked SSSL model step), then bench_attention
# --doc_len 512: fa4, flex and sdpa with and without documents (FA4's varlen kernels: a few more JIT compiles).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
source benchmarks/fa4_env.sh
source benchmarks/run_part.sh
if [ "${1:-}" = docs ]; then
    TAIL=4 run doc_mask_gpu_tests 280 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_doc_mask.py
    TAIL=16 run bench_attention_docs 250 python3 -m benchmarks.bench_attention --backends=fa4,flex,sdpa --doc_len=512
    exit 0
fi
TAIL=3 run fa4_available 60 python3 -c "
import time, torch
from nanochat.kernels.attention import ATTENTION_BACKENDS
start = time.time()
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), 'torch', torch.__version__)
print('fa4 available:', ATTENTION_BACKENDS['fa4'].is_available(), f'(import {time.time() - start:.1f} s)')"
TAIL=4 run fa4_gpu_tests 220 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_attention_fa4.py
TAIL=8 run check_kernels 80 python3 -m benchmarks.check_kernels --shapes= --attn_backends=fa4,auto
TAIL=12 run bench_attention 180 python3 -m benchmarks.bench_attention --backends=cudnn,fa4,flex
python3 -m benchmarks.fa4_summary --out_dir "$OUT"

#!/usr/bin/env bash
# Build the git-ignored folders that GPU calls carry (the GPU machine reaches no registry and no ../shared):
#   .whl/    wheels for the GPU machine's Python 3.12: liger-kernel, cut-cross-entropy, torchao, rustbpe, and
#            the web server's stack (fastapi, uvicorn and what they need; the image has neither) and the openai
#            client tests/test_web.py drives it with
#   .carry/  tokenizer/ (32k, trained here on the shared shards), data/ (shard_00000 = train,
#            shard_00006 = validation), eval/core and eval/hellaswag (CORE's tasks, for the speedrun's base_eval)
#   .shards_a/, .shards_b/  the other training shards (00001-00003, 00004-00005): the speedrun's full data,
#            carried one folder per call before it (each call carries at most 64 MiB)
# Run from the repo root on the dev machine, in the project's venv:  bash benchmarks/prepare_carry.sh
# Then carry [".whl"] for the kernel call and [".whl", ".carry"] for training calls (~45 MiB; limit 64).
# TE=1 also builds what benchmarks/te_build.sh needs: .whl_te/ (TE meta wheel, 2.11.0 unless TE_VERSION, the
# transformer_engine_torch sdist, pydantic & co, SHA256SUMS) and .whl_te_parts/p0..p3 (the ~180 MB cu13
# core wheel cut in 4, one part per call).
# FA4=1 also builds .whl_fa4/ (FlashAttention-4 and its CuTe DSL stack in one ~55 MiB archive; see
# benchmarks/prepare_fa4.sh): carry [".whl_fa4"] alone, then bash benchmarks/fa4_gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-../shared/data}"
mkdir -p .whl .carry/data .carry/eval
python -m pip download -q --no-deps --only-binary=:all: --dest .whl \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "torchao==0.18.0" rustbpe
# the web stack with its whole dependency closure (newer copies of what the image has shadow it in /tmp/site)
python -m pip download -q --only-binary=:all: --dest .whl \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    "fastapi==0.165.0" "uvicorn==0.54.0" "uvloop==0.23.0" "httptools==0.9.0" "openai==3.57.0"
cp "$DATA/pretrain/shard_00000.parquet" "$DATA/pretrain/shard_00006.parquet" .carry/data/
rm -rf .carry/eval/core .carry/eval/hellaswag .shards_a .shards_b
cp -r "$DATA/eval/core" "$DATA/eval/hellaswag" .carry/eval/
mkdir -p .shards_a .shards_b
cp "$DATA"/pretrain/shard_0000[123].parquet .shards_a/ && cp "$DATA"/pretrain/shard_0000[45].parquet .shards_b/
if [ ! -d .carry/tokenizer ]; then
    NANOCHAT_BASE_DIR="$PWD/.carry/tok_build" python -m scripts.tok_train --data_dir "$DATA/pretrain" \
        --max_chars 100000000 --vocab_size 32768
    mv .carry/tok_build/tokenizer .carry/tokenizer && rm -rf .carry/tok_build
fi
# TE 2.11.0: 2.15.0's core library needs cublasLtGroupedMatrixLayoutInit_internal, which the GPU machine's
# cuBLAS 13.1.0.3 (CUDA 13.0) lacks (session 6); 2.11.0 needs no cuBLASLt symbol missing there (nm -D checked)
TE_VERSION="${TE_VERSION:-2.11.0}"
if [ "${TE:-0}" = 1 ]; then
    rm -rf .whl_te .whl_te_parts && mkdir -p .whl_te
    python -m pip download -q --no-deps --only-binary=:all: --dest .whl_te \
        --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        "transformer-engine==$TE_VERSION" "transformer-engine-cu13==$TE_VERSION" pydantic pydantic-core annotated-types \
        typing-inspection wheel
    # the torch extension is an sdist whose metadata step needs CUDA: fetch the file from the index as is
    TE_VERSION=$TE_VERSION python - <<'PY'
import hashlib, os, re, urllib.request
version = os.environ["TE_VERSION"]
html = urllib.request.urlopen("https://pypi.org/simple/transformer-engine-torch/", timeout=60).read().decode()
url, sha = re.search(rf'href="([^"#]+/transformer_engine_torch-{re.escape(version)}\.tar\.gz)#sha256=([0-9a-f]+)"', html).groups()
data = urllib.request.urlopen(url, timeout=300).read()
assert hashlib.sha256(data).hexdigest() == sha, "sdist checksum mismatch"
open(f".whl_te/transformer_engine_torch-{version}.tar.gz", "wb").write(data)
PY
    (cd .whl_te && sha256sum ./*.whl ./*.tar.gz | sed 's| \./| |' > SHA256SUMS)
    CORE=$(ls .whl_te/transformer_engine_cu13-*.whl)
    mkdir -p .whl_te_parts && split -n 4 -d -a 1 "$CORE" ".whl_te_parts/$(basename "$CORE").part"
    for k in 0 1 2 3; do mkdir -p ".whl_te_parts/p$k" && mv ".whl_te_parts/$(basename "$CORE").part$k" ".whl_te_parts/p$k/"; done
    rm "$CORE"
    du -sh .whl_te .whl_te_parts/p*
fi
if [ "${FA4:-0}" = 1 ]; then
    bash benchmarks/prepare_fa4.sh
fi
du -sh .whl .carry .shards_a .shards_b

#!/usr/bin/env bash
# Build .whl_fa4/ (git-ignored): FlashAttention-4 and its stack for the GPU machine (x86-64, CPython 3.12,
# torch 2.11+cu130, no package registry), small enough for one call's 64 MiB carry.
#
#   bash benchmarks/prepare_fa4.sh        # dev machine, repo root; idempotent (reuses what is there)
#   then carry [".whl_fa4"] and, there:  source benchmarks/fa4_env.sh   (or: bash benchmarks/fa4_gpu.sh)
#
# The wheels, their dependencies pinned (flash-attn-4 4.0.0b36 needs nvidia-cutlass-dsl >= 4.6.2, quack-kernels
# >= 0.5.3, apache-tvm-ffi < 0.2, torch-c-dlpack-ext; the image already has torch, einops, typing-extensions,
# cuda-bindings and protobuf). nvidia-cutlass-dsl 4.8.1 is split into libs-core and libs-base (the Python DSL)
# and one libs-cuNN wheel per CUDA major; we take cu13 (the image's CUDA 13.0 driver and torch): its MLIR compiler
# (_cutlass_ir.cu13...so, 193 MB) and runtime (libcute_dsl_runtime.so, 44 MB) are what FA4 loads on every
# arch, so nothing of it can be left out, and the wheel is 92 MB. Its zip deflate is the problem, not its
# content: all eight wheels unpacked into one site tree and packed as one tar.xz (xz with the x86 branch filter,
# which makes machine code compress better; 256 MiB dictionary) come to about 60 MB. The GPU side unpacks it with
# Python's tarfile into /tmp/site (what pip install --target would have written). Packing takes ~7 minutes on
# 2 cores, once.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1
      nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
      apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5)
SRC=.whl_fa4_src  # the downloaded wheels (the cu13 one alone is over the carry limit): kept out of the carry
OUT=.whl_fa4
ARCHIVE=$OUT/fa4_site.tar.xz
mkdir -p "$SRC" "$OUT"
python -m pip download -q --no-deps --only-binary=:all: --dest "$SRC" --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${PINS[@]}"
# one version of each (an earlier run with other pins leaves its files in $SRC)
wheels=()
for pin in "${PINS[@]}"; do
    name=${pin%%==*}; version=${pin##*==}
    found=$(ls "$SRC"/"${name//-/_}"-"$version"-*.whl)
    wheels+=("$found")
done
(cd "$SRC" && sha256sum $(printf '%s\n' "${wheels[@]}" | xargs -n1 basename)) > "$OUT/SOURCES.sha256.new"
if [ -f "$ARCHIVE" ] && cmp -s "$OUT/SOURCES.sha256.new" "$OUT/SOURCES.sha256"; then
    echo "prepare_fa4: $ARCHIVE is up to date"
    rm "$OUT/SOURCES.sha256.new"
else
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' EXIT
    for w in "${wheels[@]}"; do python -m zipfile -e "$w" "$tree/"; done
    chmod -R u+rwX,go+rX "$tree"
    # deterministic archive (sorted names, no owners, fixed mtime): the same wheels give the same bytes
    (cd "$tree" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - -- *) \
        | xz --x86 --lzma2=preset=9e,dict=256MiB -T1 > "$ARCHIVE.tmp"
    mv "$ARCHIVE.tmp" "$ARCHIVE"
    mv "$OUT/SOURCES.sha256.new" "$OUT/SOURCES.sha256"
fi
ls -l "${wheels[@]}" | awk '{printf "  %6.1f MB  %s\n", $5 / 1e6, $NF}'
du -b "$ARCHIVE" | awk '{printf "%s: %.1f MiB (carry limit 64 MiB, with the work tree)\n", $2, $1 / 2^20}'

# Source on the GPU machine from the repo root, with carry [".whl_fa4"] (from benchmarks/prepare_fa4.sh):
#   source benchmarks/fa4_env.sh
# Unpacks FlashAttention-4 and its CuTe DSL stack into $FA4_SITE (default /tmp/site, once per machine; a later call
# on the same warm machine, the carry left out, uses the stack unpacked there), puts on
# PYTHONPATH that folder, CUTLASS's dsl_packages folder (what the wheel's nvidia_cutlass_dsl_packages.pth adds in a
# real site-packages; PYTHONPATH folders do not run .pth files) and the repo, and turns on FA4's on-disk kernel
# cache: each kernel configuration is JIT-compiled once per machine (~10 s each) instead of once per process.
# Sourced, so no `set -e` / `exit`: a failure is reported, and the fa4 backend then says why it is unavailable.
FA4_SITE="${FA4_SITE:-/tmp/site}"
if [ -f .whl_fa4/fa4_site.tar.xz ]; then
    mkdir -p "$FA4_SITE"
    if cmp -s .whl_fa4/SOURCES.sha256 "$FA4_SITE/.fa4_sources.sha256"; then
        echo "fa4_env: $FA4_SITE already holds this FA4 stack"
    else
        FA4_SITE="$FA4_SITE" python3 - <<'PY' && cp .whl_fa4/SOURCES.sha256 "$FA4_SITE/.fa4_sources.sha256" \
            || echo "fa4_env: unpacking failed"
import os, tarfile, time
start, site = time.time(), os.environ["FA4_SITE"]
with tarfile.open(".whl_fa4/fa4_site.tar.xz") as archive:
    archive.extractall(site, filter="data")
print(f"fa4_env: unpacked the FA4 stack into {site} in {time.time() - start:.1f} s")
PY
    fi
fi
if [ -f "$FA4_SITE/.fa4_sources.sha256" ]; then
    [ -f .whl_fa4/fa4_site.tar.xz ] || echo "fa4_env: using the FA4 stack unpacked in $FA4_SITE by an earlier call"
    export PYTHONPATH="$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_kernel_cache
else
    echo "fa4_env: no FA4 stack in $FA4_SITE (run benchmarks/prepare_fa4.sh here, carry .whl_fa4): fa4 unavailable"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import importlib.metadata as md
for pkg in ("flash-attn-4", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi", "cuda-bindings",
            "protobuf", "einops", "typing-extensions"):
    try:
        print(f"fa4_env: {pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"fa4_env: {pkg} not installed")
PY

# Source at the start of every GPU run, from the repo root:  source benchmarks/gpu_env.sh
# Installs the carried wheels (.whl/: liger-kernel, cut-cross-entropy, torchao; no deps, the image has
# torch and triton) into /tmp/site, puts it and the repo on PYTHONPATH, and prints what the run will use.
# Sourced, so no `set -e` / `exit`: a failure is reported and the shell stays usable.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        || { echo "gpu_env: wheel install failed; continuing without them"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
else
    echo "gpu_env: no wheels in .whl/ (carry .whl): liger/cce/torchao backends will be unavailable"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 - <<'PY'
import importlib.metadata as md
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}) | triton {triton.__version__}")
for pkg in ("liger-kernel", "cut-cross-entropy", "torchao"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} not installed")
PY

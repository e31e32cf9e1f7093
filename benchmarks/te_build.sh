#!/usr/bin/env bash
# Transformer Engine on the GPU machine, offline: install the carried TE wheels, build the PyTorch extension
# against the torch there, then smoke-test te.Linear (bf16 and fp8) and TEGPT. Prints OK/FAIL lines, last a
# JSON line. Run from the repo root:  bash benchmarks/te_build.sh
#
# What travels (built by `TE=1 bash benchmarks/prepare_carry.sh`; TE 2.11.0, whose core library loads with the
# machine's cuBLAS 13.1 where 2.15.0's does not):
#   .whl_te/        transformer_engine-2.11.0 (meta wheel), transformer_engine_torch-2.11.0.tar.gz (sdist),
#                   pydantic, pydantic_core, annotated_types, typing_inspection, wheel, SHA256SUMS   (~4 MB)
#   .whl_te_parts/  pK/transformer_engine_cu13-2.11.0-...whl.partK (K = 0..3): the 179 MB core wheel cut with
#                   `split -n 4 -d -a 1`, since one call carries at most 64 MiB. Carry one pK per call; ignored
#                   paths stay on the warm machine, and this script joins them and checks SHA256SUMS.
#   Calls: carry [".whl_te_parts/p1"], then p2, then p3 (command `true`), then
#          carry [".whl", ".whl_te", ".whl_te_parts/p0"] with `bash benchmarks/te_build.sh`.
# Everything is unpacked into /tmp/te_site; later commands put it on PYTHONPATH (printed last).
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/te_site
BUILD_TIMEOUT=${TE_BUILD_TIMEOUT:-480}
mkdir -p "$SITE" /tmp/te_build
status() { echo "$1 $2"; }
unpack() { python3 -m zipfile -e "$1" "$SITE"; }  # no unzip binary there; extraction merges into $SITE
fail() { status FAIL "$1"; echo "{\"te_build\": \"FAIL\", \"step\": \"$1\"}"; exit 1; }

# 1. the core wheel: whole in .whl_te/ or joined from the parts
CORE=$(ls .whl_te/transformer_engine_cu13-*.whl 2>/dev/null | head -1)
if [ -z "$CORE" ]; then
    PARTS=$(ls .whl_te_parts/p*/transformer_engine_cu13-*.whl.part* 2>/dev/null | sort -V)
    NPARTS=$(echo -n "$PARTS" | grep -c . || true)
    [ "$NPARTS" -ge 1 ] || fail "no core wheel: carry .whl_te_parts/p0 .. p3 first (one per call), or the whole wheel in .whl_te/"
    NAME=$(basename "$(echo "$PARTS" | head -1)" | sed 's/\.part[0-9]*$//')
    CORE=/tmp/te_build/$NAME
    cat $PARTS > "$CORE"
    echo "joined $NPARTS parts -> $CORE ($(stat -c %s "$CORE") bytes)"
fi
if [ -f .whl_te/SHA256SUMS ]; then
    WANT=$(grep "$(basename "$CORE")" .whl_te/SHA256SUMS | cut -d' ' -f1)
    HAVE=$(sha256sum "$CORE" | cut -d' ' -f1)
    [ "$WANT" = "$HAVE" ] && status OK "core wheel checksum" || fail "core wheel checksum (a part is missing or stale: carry every pK)"
fi

# 2. unpack the wheels (core, meta and the extension share transformer_engine/)
python3 -c "import pydantic" 2>/dev/null || for w in .whl_te/pydantic*.whl .whl_te/annotated_types*.whl .whl_te/typing_inspection*.whl; do
    unpack "$w"; done
python3 -c "import wheel" 2>/dev/null || unpack .whl_te/wheel-*.whl
unpack "$CORE" || fail "unpack core wheel"
unpack .whl_te/transformer_engine-[0-9]*.whl || fail "unpack meta wheel"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import pydantic, transformer_engine.common" && status OK "core import" || fail "core import (see traceback)"

# 3. build the PyTorch extension (C++ only, against this torch) under a timeout
NVIDIA_INC=$(python3 - <<'PY'
import glob, os, site
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(os.path.join(p, "nvidia"))]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "**", "include"), recursive=True)})))
PY
)
export CPATH="${NVIDIA_INC}${CPATH:+:$CPATH}"   # cudnn.h, nccl.h, cublasLt.h from torch's nvidia-* wheels
export MAX_JOBS=${MAX_JOBS:-16} NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 NVTE_PYTORCH_FORCE_BUILD=TRUE
export NVTE_BUILD_USE_NVIDIA_WHEELS=0 NVTE_NO_LOCAL_VERSION=1  # version must equal the core wheel's
SDIST=$(ls .whl_te/transformer_engine_torch-*.tar.gz | head -1)
T0=$(date +%s)
timeout "$BUILD_TIMEOUT" python3 -m pip wheel -v --no-build-isolation --no-deps --no-index -w /tmp/te_build/dist "$SDIST" \
    > /tmp/te_build/build.log 2>&1
RC=$?
BUILD_S=$(( $(date +%s) - T0 ))
if [ $RC -ne 0 ]; then
    tail -n 60 /tmp/te_build/build.log
    [ $RC -eq 124 ] && fail "extension build timed out after ${BUILD_TIMEOUT}s" || fail "extension build (rc $RC, ${BUILD_S}s; log tail above)"
fi
status OK "extension built in ${BUILD_S}s"
unpack /tmp/te_build/dist/transformer_engine_torch-*.whl || fail "unpack extension wheel"

# 4. smoke tests
python3 - <<'PY'
import json, time
import torch
out = {"te_build": "OK"}
try:
    import transformer_engine as te_root
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe
    out["te_version"] = getattr(te_root, "__version__", "?")
    print("OK import transformer_engine.pytorch", out["te_version"], "torch", torch.__version__)
except Exception as exc:
    print("FAIL import transformer_engine.pytorch:", type(exc).__name__, exc)
    out["te_build"] = "FAIL import"
    print(json.dumps(out)); raise SystemExit(1)
x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
layer = te.Linear(1024, 1024, bias=False, params_dtype=torch.bfloat16, device="cuda")
ref = x @ layer.weight.t()
for name, rec in (("bf16", None), ("fp8 current", recipe.Float8CurrentScaling()), ("fp8 delayed", recipe.DelayedScaling()),
                  ("fp8 block", recipe.Float8BlockScaling())):
    try:
        with te.autocast(enabled=rec is not None, recipe=rec):
            y = layer(x)
        y.sum().backward()
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        ok = err < (0.01 if rec is None else 0.1)
        print(("OK" if ok else "FAIL"), f"te.Linear {name}: rel err {err:.4f}")
        out[f"linear_{name.replace(' ', '_')}"] = round(err, 4)
    except Exception as exc:
        print("FAIL", f"te.Linear {name}:", type(exc).__name__, str(exc)[:300])
        out[f"linear_{name.replace(' ', '_')}"] = "FAIL"
try:
    from nanochat.model import model_class
    from nanochat.model.gpt import config_from_depth
    from nanochat.precision import apply_precision
    cfg = config_from_depth(4, vocab_size=32768, sequence_len=512, window_pattern="SL")
    for precision in ("bf16", "fp8"):
        with torch.device("meta"):
            model = model_class("te")(cfg)
        model.to_empty(device="cuda"); model.init_weights()
        apply_precision(model, precision, torch.device("cuda"))
        idx = torch.randint(0, 32768, (8, 513), device="cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(10):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        ok = losses[-1] < losses[0]
        print(("OK" if ok else "FAIL"), f"TEGPT d4 {precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        out[f"tegpt_{precision}"] = [round(losses[0], 3), round(losses[-1], 3)]
except Exception as exc:
    print("FAIL TEGPT:", type(exc).__name__, str(exc)[:400])
    out["tegpt"] = "FAIL"
print(json.dumps(out))
PY
echo "export PYTHONPATH=$SITE:\$PYTHONPATH   # to use TE in later commands of this machine"

#!/usr/bin/env bash
# One GPU call (<= 10 min): the one-H200 speedrun preset, cut to fit: d12 pretraining with a 330 s budget
# for the training steps, then base_eval (CORE with 100 items per task, val bpb, samples), then a table.
#
#   bash benchmarks/h200_speedrun.sh          # from the repo root, carrying .carry and .whl
#
# Carried inputs: .carry/tokenizer (copied to $NANOCHAT_BASE_DIR/tokenizer), .carry/data (shard_00000 =
# train, shard_00006 = validation), optionally .carry/eval/core + eval/hellaswag (CORE's data; without
# them CORE is left out), and the other training shards in .shards_a/ and .shards_b/ when earlier calls
# on the same warm machine carried them (a call carries at most 64 MiB). With shard_00000 alone (~9M
# usable tokens at T=2048: the packer crops ~60% of each long Wikipedia article) the d12 model sees the
# same text ~18 times in 330 s and overfits (measured: val bpb 1.73 at step 100, 2.41 at step 319).
# Logs (every stage, full) go to $OUT (or ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export NANOCHAT_BASE_DIR=/tmp/nc
mkdir -p "$NANOCHAT_BASE_DIR"
rm -rf "$NANOCHAT_BASE_DIR/tokenizer" && cp -r .carry/tokenizer "$NANOCHAT_BASE_DIR/tokenizer"
export DATA_DIR=/tmp/speedrun_data  # every carried shard, linked; the last one (00006) is the validation shard
rm -rf "$DATA_DIR" && mkdir -p "$DATA_DIR"
ln -s "$PWD"/.carry/data/*.parquet "$DATA_DIR"/
for extra in .shards_a .shards_b; do
  if [ -d "$extra" ]; then ln -s "$PWD/$extra"/*.parquet "$DATA_DIR"/; else echo "no $extra: fewer training shards"; fi
done
echo "shards: $(ls "$DATA_DIR" | tr '\n' ' ')"
if [ -d .carry/eval/core ] && [ -d .carry/eval/hellaswag ]; then export NANOCHAT_EVAL_DATA=.carry; else
  echo "no .carry/eval/core + eval/hellaswag (bash benchmarks/prepare_carry.sh copies them): CORE will be missing"; fi
source benchmarks/gpu_env.sh
export LOG_DIR="$OUT"

T0=$(date +%s)
PRESET=h200_10min TAG=h200_10min TRAIN_SECONDS=${TRAIN_SECONDS:-330} BASE_EVAL_MAX_PER_TASK=${MAX_PER_TASK:-100} \
  STOP_AFTER=base_eval timeout 560 bash runs/speedrun.sh 2>&1 | tee "$OUT/speedrun.txt" | grep -v 'it/s\]\|s/it\]'
echo "speedrun.sh exit: ${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s"

# the table: each stage's last stdout line is its JSON
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last_json(name):
    path = out / f"{name}.log"
    for line in reversed(path.read_text().splitlines() if path.is_file() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return {}
    return {}
t, e = last_json("base_train"), last_json("base_eval")
fmt = lambda v, f: "n/a" if v is None else format(v, f)
mfu = t.get("mfu")
print("\n| figure | value |\n| --- | --- |")
for name, value in [
    ("steps", t.get("steps")), ("train seconds (steps, compile incl.)", fmt(t.get("train_seconds"), ".0f")),
    ("base_train total seconds", fmt(t.get("total_seconds"), ".0f")), ("compile seconds", fmt(t.get("compile_seconds"), ".1f")),
    ("median tok/s", fmt(t.get("median_tok_per_s"), ",.0f")), ("MFU", "n/a" if mfu is None else f"{100 * mfu:.1f}%"),
    ("peak memory GiB", fmt(t.get("peak_memory_gib"), ".1f")), ("val bpb (train end)", fmt(t.get("val_bpb"), ".4f")),
    ("val bpb (base_eval)", fmt(e.get("val_bpb"), ".4f")), ("CORE", fmt(e.get("core"), ".4f")),
    ("base_eval seconds", fmt(e.get("wall_time_s"), ".0f")), ("cropped fraction", fmt(t.get("cropped_fraction"), ".2f")),
]:
    print(f"| {name} | {value} |")
for s in e.get("samples", [])[:3]:
    print(f"sample: {s!r}")
PY

# Shared helpers of the end-to-end runs (sourced by runs/cpu.sh and runs/speedrun.sh; tested by
# tests/test_runs.py). A stage is "done" when its output is complete, so a rerun skips it and a
# run that failed half-way continues where it stopped.
#   REPORT_DIR must be set (the stages write their report sections there: NANOCHAT_REPORT_DIR).

# The interpreter: $PYTHON, else python, else python3 (GPU images often have only python3).
PY=${PYTHON:-$(command -v python || command -v python3)}

# Print the highest step of <checkpoint_dir> that is complete (step_<n>/ with meta.json and
# model.safetensors; the trainers write a step dir atomically), or nothing.
latest_step() {
  local dir=$1 best="" d n
  [ -d "$dir" ] || return 0
  for d in "$dir"/step_*; do
    n=${d##*/step_}
    [[ $n =~ ^[0-9]+$ ]] && [ -f "$d/meta.json" ] && [ -f "$d/model.safetensors" ] || continue
    n=$((10#$n))
    if [ -z "$best" ] || [ "$n" -gt "$best" ]; then best=$n; fi
  done
  [ -n "$best" ] && echo "$best"
  return 0
}

# True when report section <name> exists and was written for model tag <tag> (each stage writes
# its section last, after its checkpoint, so the section marks the stage as finished).
section_done() {
  local file="$REPORT_DIR/$1.json"
  [ -f "$file" ] && grep -qF "\"model_tag\": \"$2\"" "$file"
}

# True when a training stage finished: a complete checkpoint in <checkpoint_dir> and its report
# section <name> for <tag>. A checkpoint without the section is a run that stopped after a periodic
# save: resume_flag continues it.
stage_done() {
  local dir=$1 section=$2 tag=$3
  [ -n "$(latest_step "$dir")" ] && section_done "$section" "$tag"
}

# Print --resume_from_step=<n> when <checkpoint_dir> holds a complete step, else nothing.
resume_flag() {
  local step
  step=$(latest_step "$1")
  if [ -n "$step" ]; then echo "--resume_from_step=$step"; fi
  return 0
}

# True when the tokenizer in <dir> was saved completely.
tokenizer_done() {
  [ -f "$1/tokenizer.json" ] && [ -f "$1/tokenizer.tiktoken" ]
}

# Pick the pretraining data: $DATA_DIR, else ../shared/data/pretrain (unless <use_shared> is 0: the
# dev shards are far too small for a full-size run), else <n> shards downloaded into <base>/base_data
# (skipped when they are there). Prints the folder.
pick_data_dir() {
  local base=$1 n=$2 use_shared=${3:-1}
  if [ -n "${DATA_DIR:-}" ]; then echo "$DATA_DIR"; return 0; fi
  if [ "$use_shared" = 1 ] && [ -d ../shared/data/pretrain ]; then echo ../shared/data/pretrain; return 0; fi
  if [ "$(find "$base/base_data" -maxdepth 1 -name '*.parquet' 2>/dev/null | wc -l)" -lt "$n" ]; then
    "$PY" -m nanochat.data.download -n "$n" >&2 || return 1
  fi
  echo "$base/base_data"
}

# Stage timing: `stage <name>` starts one (prints a header), `stage_end` records its wall time;
# `stage_table` prints every stage's seconds (a skipped stage shows "skipped").
STAGE_NAMES=(); STAGE_TIMES=(); _STAGE_T0=0
stage() {
  STAGE_NAMES+=("$1"); STAGE_TIMES+=("skipped"); _STAGE_T0=$(date +%s)
  echo; echo "=== $1 ($(date +%H:%M:%S))"
}
stage_end() {
  STAGE_TIMES[${#STAGE_TIMES[@]}-1]="$(( $(date +%s) - _STAGE_T0 )) s"
}
skip() { echo "    done already: $1 (delete it to redo the stage)"; }
stage_table() {
  local i
  printf '\n%-14s %s\n' stage "wall time"
  for i in "${!STAGE_NAMES[@]}"; do printf '%-14s %s\n' "${STAGE_NAMES[$i]}" "${STAGE_TIMES[$i]}"; done
}

# Reassemble the report card from the sections (cheap, so every run does it), its output going to
# <log>, and print the metrics table.
make_report() {
  "$PY" -m nanochat.report > "$1"
  sed -n '/^## Metrics/,/^## Loss curves/p' "$REPORT_DIR/report.md" | grep -v '^## Loss curves' || true
  echo "report card: $REPORT_DIR/report.md"
}

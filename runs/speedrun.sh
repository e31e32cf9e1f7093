#!/usr/bin/env bash
# The GPU run, end to end: data -> tokenizer -> base_train -> base_eval -> chat_sft -> chat_eval ->
# [chat_rl] -> report, every training and evaluation stage under torchrun (NPROC processes).
#
#   PRESET=h200_10min bash runs/speedrun.sh    # one H200: a d12 model pretrained within 10 min of wall time
#   PRESET=d20 bash runs/speedrun.sh           # the nanochat-like d20 run (8 GPUs, a few hours)
#
# Environment: PRESET (h200_10min | d20; default d20), NPROC (default: the GPUs nvidia-smi lists, 1 if
# none), TAG (default the preset name), DATA_DIR (pretraining shards; default ../shared/data/pretrain
# for h200_10min when present, else shards downloaded into the base dir), TRAIN_SECONDS (h200_10min's
# time budget for the training steps, compile included; default 480), RL=1 (add RL and its eval),
# STOP_AFTER=<stage> (stop after that stage: benchmarks use base_eval), BASE_EVAL_MAX_PER_TASK,
# NANOCHAT_BASE_DIR, NANOCHAT_EVAL_DATA (eval/SFT data; default ../shared/data).
# Each stage skips itself when its output is complete (a checkpoint step dir with meta.json and the
# stage's report section); a training stage stopped after a periodic save resumes from it. Logs of
# every stage go to $LOG_DIR (default <base>/logs/<tag>); the last lines are a table of the stages.
#
# h200_10min: d12 (768 wide), context 2048, 32 rows x 2048 per GPU, 524288 tokens per step. The step
# count is sized for an optimistic 1.2M tok/s and --max_seconds=$TRAIN_SECONDS stops training when
# the budget is spent: the LR schedule follows the elapsed time, so the warmdown ends with the budget
# (the step count then depends on the GPU's speed). Startup, evals and the final save come on top
# (~1 min), so pretraining ends inside 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/lib.sh

PRESET=${PRESET:-d20}
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
BASE=$NANOCHAT_BASE_DIR
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "${NPROC:-0}" -lt 1 ]; then NPROC=1; fi
fi
TAG=${TAG:-$PRESET}
RL=${RL:-0}
STOP_AFTER=${STOP_AFTER:-}
CKPT=$BASE/checkpoints
export NANOCHAT_REPORT_DIR="${NANOCHAT_REPORT_DIR:-$BASE/report/$TAG}"
REPORT_DIR=$NANOCHAT_REPORT_DIR; mkdir -p "$REPORT_DIR"
LOG_DIR=${LOG_DIR:-$BASE/logs/$TAG}
mkdir -p "$LOG_DIR"
if command -v torchrun >/dev/null; then TORCHRUN=(torchrun); else TORCHRUN=("$PY" -m torch.distributed.run); fi
TORCHRUN+=(--standalone "--nproc_per_node=$NPROC")

case "$PRESET" in
  h200_10min)
    TRAIN_SECONDS=${TRAIN_SECONDS:-480}
    NUM_SHARDS=8
    TRAIN_FLAGS=(--depth 12 --max_seq_len 2048 --device_batch_size 32 --total_batch_size 524288
                 --num_iterations $(( TRAIN_SECONDS * 1200000 / 524288 )) --max_seconds "$TRAIN_SECONDS"
                 --warmup_steps 20 --eval_every 100 --eval_tokens 1048576 --sample_every 1000000 --save_every -1)
    BASE_EVAL_MAX_PER_TASK=${BASE_EVAL_MAX_PER_TASK:-500}
    CHAT_EVAL_FLAGS=(--max_problems 500 --batch_size 32)
    ;;
  d20)
    NUM_SHARDS=240
    TRAIN_FLAGS=(--depth 20 --max_seq_len 2048 --device_batch_size 32 --total_batch_size 524288
                 --target_param_data_ratio 20 --eval_every 250 --sample_every 2000 --save_every 2000)
    BASE_EVAL_MAX_PER_TASK=${BASE_EVAL_MAX_PER_TASK:--1}
    CHAT_EVAL_FLAGS=(--batch_size 32)
    ;;
  *) echo "PRESET must be h200_10min or d20, got '$PRESET'" >&2; exit 2 ;;
esac
echo "preset $PRESET | tag $TAG | $NPROC process(es) | base dir $BASE | logs $LOG_DIR"

# Run one stage's command with its output also in $LOG_DIR/<stage>.log; stop after $STOP_AFTER.
run_stage() {
  local name=$1; shift
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  stage_end
}
maybe_stop() {
  if [ "$STOP_AFTER" = "$1" ]; then stage_table; exit 0; fi
}

stage data
USE_SHARED=1; if [ "$PRESET" = d20 ]; then USE_SHARED=0; fi
DATA_DIR=$(pick_data_dir "$BASE" "$NUM_SHARDS" "$USE_SHARED")
echo "    pretraining shards: $DATA_DIR"
stage_end
maybe_stop data

stage tokenizer
if tokenizer_done "$BASE/tokenizer"; then skip "$BASE/tokenizer"; else
  run_stage tokenizer "$PY" -m scripts.tok_train --data_dir "$DATA_DIR" --max_chars 2000000000 --vocab_size 32768
fi
maybe_stop tokenizer

stage base_train
if stage_done "$CKPT/base/$TAG" base_train "$TAG"; then skip "$CKPT/base/$TAG"; else
  run_stage base_train "${TORCHRUN[@]}" -m scripts.base_train --data_dir "$DATA_DIR" --model_tag "$TAG" \
    "${TRAIN_FLAGS[@]}" $(resume_flag "$CKPT/base/$TAG")
fi
maybe_stop base_train

stage base_eval
BASE_EVALS=core,bpb,sample
if [ ! -d "${NANOCHAT_EVAL_DATA:-../shared/data}/eval/core" ]; then
  BASE_EVALS=bpb,sample; echo "    no eval/core under ${NANOCHAT_EVAL_DATA:-../shared/data}: CORE left out"; fi
if section_done base_eval "$TAG"; then skip "$REPORT_DIR/base_eval.json"; else
  run_stage base_eval "${TORCHRUN[@]}" -m scripts.base_eval --model_tag "$TAG" --data_dir "$DATA_DIR" \
    --eval "$BASE_EVALS" "--max_per_task=$BASE_EVAL_MAX_PER_TASK" --batch_size 32
fi
maybe_stop base_eval

stage chat_sft
if stage_done "$CKPT/sft/$TAG" chat_sft "$TAG"; then skip "$CKPT/sft/$TAG"; else
  # 32 conversations per step: up to 16 per GPU, rounded up to a multiple of the GPU count
  SFT_DBS=$(( 32 / NPROC < 16 ? 32 / NPROC : 16 )); if [ "$SFT_DBS" -lt 1 ]; then SFT_DBS=1; fi
  SFT_TOTAL=$(( (32 + SFT_DBS * NPROC - 1) / (SFT_DBS * NPROC) * SFT_DBS * NPROC ))
  run_stage chat_sft "${TORCHRUN[@]}" -m scripts.chat_sft --model_tag "$TAG" --device_batch_size "$SFT_DBS" \
    --total_batch_size "$SFT_TOTAL" --save_every 200 $(resume_flag "$CKPT/sft/$TAG")
fi
maybe_stop chat_sft

stage chat_eval
if section_done chat_eval_sft "$TAG"; then skip "$REPORT_DIR/chat_eval_sft.json"; else
  run_stage chat_eval "${TORCHRUN[@]}" -m scripts.chat_eval -i sft --model_tag "$TAG" "${CHAT_EVAL_FLAGS[@]}"
fi
maybe_stop chat_eval

if [ "$RL" = 1 ]; then
  stage chat_rl
  if stage_done "$CKPT/rl/$TAG" chat_rl "$TAG"; then skip "$CKPT/rl/$TAG"; else
    run_stage chat_rl "${TORCHRUN[@]}" -m scripts.chat_rl --model_tag "$TAG" $(resume_flag "$CKPT/rl/$TAG")
  fi
  stage chat_eval_rl
  if section_done chat_eval_rl "$TAG"; then skip "$REPORT_DIR/chat_eval_rl.json"; else
    run_stage chat_eval_rl "${TORCHRUN[@]}" -m scripts.chat_eval -i rl --model_tag "$TAG" -a GSM8K \
      "${CHAT_EVAL_FLAGS[@]}"
  fi
fi

stage report
make_report "$LOG_DIR/report.log"
stage_end

stage_table
echo
echo "chat with it:  NANOCHAT_BASE_DIR=$BASE python -m scripts.chat_web -i sft --model_tag $TAG --num_gpus $NPROC"

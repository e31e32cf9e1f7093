#!/usr/bin/env bash
# The main job: a tiny end-to-end run on the CPU, from raw text to a chat model and its report card,
# in about 10 minutes on 2 cores (pretraining itself stops at TRAIN_SECONDS, 240 s by default):
#   data -> tokenizer -> base_train -> base_eval -> chat_sft -> chat_eval -> [chat_rl] -> report
#
#   bash runs/cpu.sh                      # RL=1 adds a few RL steps; TAG, TRAIN_SECONDS, DATA_DIR override
#
# Each stage skips itself when its output is complete (a checkpoint step dir with meta.json and the
# stage's report section), so a rerun after a failure continues where it stopped.
# Data: $DATA_DIR, else ../shared/data/pretrain, else 2 shards downloaded into $NANOCHAT_BASE_DIR/base_data.
# Evaluation and SFT data: $NANOCHAT_EVAL_DATA, else ../shared/data (without it: no CORE, no chat stages).
# Why these sizes: on 2 cores the lm_head dominates the cost per token, so the CPU run trains its own
# 8192-token tokenizer (in tokenizer_cpu/, leaving tokenizer/ to the full-size runs); depth 4 at
# context 256 with 2048-token steps then does ~3k tok/s and val bpb falls visibly within minutes. The
# time budget (--max_seconds) keeps pretraining under 5 minutes on a slower or busy machine: the
# learning-rate schedule follows the elapsed time, so the warmdown still completes. The per-layer scalars' rate
# is 0.1, not the GPU recipe's 0.5, which trains worse at this 2048-token batch (BENCHMARKS.md, CPU figures).
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/lib.sh

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"  # one thread per core; lower it on a shared machine
export PYTHONUNBUFFERED=1
BASE=$NANOCHAT_BASE_DIR
TAG=${TAG:-cpu_d4}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
RL=${RL:-0}
TOK_DIR=$BASE/tokenizer_cpu
CKPT=$BASE/checkpoints
export NANOCHAT_REPORT_DIR="${NANOCHAT_REPORT_DIR:-$BASE/report/$TAG}"  # this run's report card only
REPORT_DIR=$NANOCHAT_REPORT_DIR; mkdir -p "$REPORT_DIR"
EVAL_DATA=${NANOCHAT_EVAL_DATA:-../shared/data}
HAVE_EVAL_DATA=0
if [ -d "$EVAL_DATA/eval" ] && [ -d "$EVAL_DATA/sft" ]; then HAVE_EVAL_DATA=1; fi
echo "base dir $BASE | tag $TAG | report $REPORT_DIR | threads $OMP_NUM_THREADS | $(uptime | sed 's/.*load/load/')"

stage data
DATA_DIR=$(pick_data_dir "$BASE" 2)
echo "    pretraining shards: $DATA_DIR"
stage_end

stage tokenizer
if tokenizer_done "$TOK_DIR"; then skip "$TOK_DIR"; else
  "$PY" -m scripts.tok_train --data_dir "$DATA_DIR" --max_chars 20000000 --vocab_size 8192 --out_dir "$TOK_DIR"
  stage_end
fi
# The default 32768-token tokenizer, so that README's full-size commands (e.g. the documented
# `python -m scripts.base_train --depth=20 --num_iterations=10 --warmup_steps=2`) run next (~30 s).
stage tokenizer_32k
if tokenizer_done "$BASE/tokenizer"; then skip "$BASE/tokenizer"; else
  "$PY" -m scripts.tok_train --data_dir "$DATA_DIR" --max_chars 100000000 --vocab_size 32768
  stage_end
fi

stage base_train
if stage_done "$CKPT/base/$TAG" base_train "$TAG"; then skip "$CKPT/base/$TAG"; else
  "$PY" -m scripts.base_train --tokenizer_dir "$TOK_DIR" --data_dir "$DATA_DIR" --model_tag "$TAG" \
    --depth 4 --max_seq_len 256 --device_batch_size 8 --total_batch_size 2048 --scalar_lr 0.1 \
    --num_iterations 400 --max_seconds "$TRAIN_SECONDS" --warmup_steps 10 \
    --eval_every 50 --eval_tokens 16384 --sample_every 400 --device_type cpu $(resume_flag "$CKPT/base/$TAG")
  stage_end
fi

stage base_eval
BASE_EVALS=core,bpb,sample
if [ "$HAVE_EVAL_DATA" = 0 ]; then BASE_EVALS=bpb,sample; echo "    no $EVAL_DATA/eval: CORE left out"; fi
if section_done base_eval "$TAG"; then skip "$REPORT_DIR/base_eval.json"; else
  "$PY" -m scripts.base_eval --model_tag "$TAG" --eval "$BASE_EVALS" --max_per_task 16 --batch_size 8 \
    --bpb_tokens 16384 --device_batch_size 8 --data_dir "$DATA_DIR" --device_type cpu
  stage_end
fi

if [ "$HAVE_EVAL_DATA" = 0 ]; then
  echo "no SFT/eval data in $EVAL_DATA (set NANOCHAT_EVAL_DATA): chat stages left out"
else
  stage chat_sft
  if stage_done "$CKPT/sft/$TAG" chat_sft "$TAG"; then skip "$CKPT/sft/$TAG"; else
    "$PY" -m scripts.chat_sft --model_tag "$TAG" --device_batch_size 8 --total_batch_size 8 \
      --num_iterations 200 --init_lr_frac 0.1 --eval_every 50 --eval_examples 64 --device_type cpu \
      $(resume_flag "$CKPT/sft/$TAG")
    stage_end
  fi

  stage chat_eval
  if section_done chat_eval_sft "$TAG"; then skip "$REPORT_DIR/chat_eval_sft.json"; else
    "$PY" -m scripts.chat_eval -i sft --model_tag "$TAG" --max_problems 16 --max_new_tokens 64 --batch_size 8 \
      --device_type cpu
    stage_end
  fi

  if [ "$RL" = 1 ]; then
    stage chat_rl
    if stage_done "$CKPT/rl/$TAG" chat_rl "$TAG"; then skip "$CKPT/rl/$TAG"; else
      "$PY" -m scripts.chat_rl --model_tag "$TAG" --num_iterations 4 --examples_per_step 2 --num_samples 4 \
        --device_batch_size 8 --max_new_tokens 64 --eval_every 0 --eval_examples 8 --save_every -1 \
        --device_type cpu $(resume_flag "$CKPT/rl/$TAG")
      stage_end
    fi
    stage chat_eval_rl
    if section_done chat_eval_rl "$TAG"; then skip "$REPORT_DIR/chat_eval_rl.json"; else
      "$PY" -m scripts.chat_eval -i rl --model_tag "$TAG" -a GSM8K --max_problems 16 --max_new_tokens 64 \
        --device_type cpu
      stage_end
    fi
  fi
fi

stage report
make_report "$REPORT_DIR/report.log"
stage_end

stage_table
WEB_ENV=""
if [ "$BASE" != "$HOME/.cache/nanochat" ]; then WEB_ENV="NANOCHAT_BASE_DIR=$BASE "; fi
SOURCE=sft
if [ "$HAVE_EVAL_DATA" = 0 ]; then SOURCE=base; fi
echo
echo "chat with it:  ${WEB_ENV}python -m scripts.chat_web -i $SOURCE --model_tag $TAG   (then open http://127.0.0.1:8000/)"

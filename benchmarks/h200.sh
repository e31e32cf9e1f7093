#!/usr/bin/env bash
# Every H200 measurement, in parts that each fit one 600 s device call; each part ends with a short table.
#
#   bash benchmarks/h200.sh kernels    # carry [".whl"]: GPU tests, kernel check, attention + loss benchmarks (issues 4, 5)
#   bash benchmarks/h200.sh step       # carry [".whl", ".carry"]: d20 bench matrix: loss kernels, SSSL, and a
#                                      #   repeated row for the compile cache (issues 5, 6)
#   KERNELS=triton,liger bash benchmarks/h200.sh step_kernels   # the loss-kernel rows of step alone
#   bash benchmarks/h200.sh autotune   # carry [".whl", ".carry"]: d20 B=32 step compiled default vs
#                                      #   max-autotune-no-cudagraphs (issue 6: the elementwise share)
#   bash benchmarks/h200.sh pointwise  # carry [".whl", ".carry"]: d20 B=32 T=2048, 524k tokens per step: --recompute none
#                                      #   vs pointwise (issue 6)
#   bash benchmarks/h200.sh fp8_fast   # carry [".whl", ".carry"]: d24 bf16 vs fp8 vs fp8 with fast accumulation in
#                                      #   every GEMM (issue 7)
#   bash benchmarks/h200.sh fp8_skip   # carry [".whl", ".carry"]: d24 bf16 vs fp8 (fast accumulation) with and without
#                                      #   the attention output projections in bf16 (--fp8_skip; issue 7)
#   bash benchmarks/h200.sh fp8_study  # carry [".whl"]: two d24-wide layers in fp8: the generated code (output_code log),
#                                      #   and the cast kernels under inductor tiling settings (issue 7)
#   bash benchmarks/h200.sh sssl_tuned # carry [".whl"]: d20 B=32 T=2048 L vs SSSL, and SSSL with its FlexAttention kernels
#                                      #   autotuned (max_autotune, GEMMs kept on cuBLAS; issue 6)
#   bash benchmarks/h200.sh tuning     # carry [".whl"]: inductor's coordinate-descent tuning (block sizes, warps of its
#                                      #   Triton kernels) on fp8_study's layers and on the d20 B=32 step (issues 6, 7)
#   bash benchmarks/h200.sh clocks     # carry [".whl"]: SM clock and power during one MLP GEMM alone and during the d20
#                                      #   B=32 T=2048 step, run twice (the second compiles from the warm cache; issue 6)
#   bash benchmarks/h200.sh memory     # carry [".whl", ".carry"]: d20 at B=8 T=1024 and B=32 T=2048 with
#                                      #   activation recompute none / mlp / block (issue 6's memory targets)
#   bash benchmarks/h200.sh fp8        # carry [".whl", ".carry"]: d24 bf16 vs fp8 speed + audit (issue 7)
#   bash benchmarks/h200.sh fp8_tests  # GPU tests of the fp8 layers, recipes and audit (issue 7)
#   bash benchmarks/h200.sh fp8_triton # carry [".whl", ".carry"]: our cast kernels (current and delayed scaling)
#                                      #   against Inductor's, d24 bf16 vs our fp8 recipes triton, triton_delayed (issue 7)
#   bash benchmarks/h200.sh fp8_rowwise  # carry [".whl", ".carry"]: d24 bf16 vs fp8 with rowwise scaling (issue 7)
#   bash benchmarks/h200.sh sssl       # carry [".whl", ".carry"]: d20 B=32 T=2048, window L vs SSSL, 6 timed steps (issue 6)
#   bash benchmarks/h200.sh te         # after benchmarks/te_build.sh on the same machine: d24 bench, --arch gpt,te
#                                      #   bf16 and te fp8 (issue 7)
#   bash benchmarks/h200.sh fp8_loss24 # carry [".whl", ".carry"]: d24 200-step losses, bf16 vs fp8, LR / 4 (issue 7);
#                                      #   FAST=1: fp8 with --fp8_fast_accum; RECIPE=triton: our fp8 recipe
#   bash benchmarks/h200.sh stable_losses  # carry [".whl", ".carry"]: d20 200-step losses at LR / 4: current,
#                                      #   triton, liger, fp8 (issues 5, 7); STABLE="fp8" runs a subset; RECIPE, FAST
#                                      #   as in fp8_loss24
#   bash benchmarks/h200.sh fp8_loss20 # carry [".whl", ".carry"]: d20 200-step losses: fp8 vs bf16 (issue 7),
#                                      #   triton vs current loss kernel (issue 5)
#   bash benchmarks/h200.sh parity     # carry [".whl", ".carry"]: fp8_loss20's bf16 runs again: current, triton with
#                                      #   an fp32 dW accumulator and precise tanh, liger (issue 5)
#   bash benchmarks/h200.sh parity_large  # carry [".whl", ".carry"]: d20 100 steps of 131k tokens: current, triton,
#                                      #   liger (issue 5)
#   bash benchmarks/h200.sh grads      # carry [".whl", ".carry"]: d20 training gradients, loss kernel vs kernel,
#                                      #   eager and compiled (issue 5)
#   bash benchmarks/h200.sh infer      # carry [".whl", ".carry"]: infer_bench; the web server under 1 and 32 clients (issue 8)
#   bash benchmarks/h200.sh decode     # carry [".whl", ".carry"]: the infer_bench part of infer, plus the triton
#                                      #   decode kernel with bf16 and fp8 KV caches at batch 1 and 128
#   bash benchmarks/h200.sh decode_dot # carry [".whl", ".carry"]: the tensor-core decode kernel (attention triton_dot):
#                                      #   config sweep at batch 128, infer_bench with bf16 and fp8 caches
#   bash benchmarks/h200.sh decode_tune  # carry [".whl"]: GPU tests of the decoder, the decode kernels' configs timed
#                                      #   inside CUDA graphs, infer_bench with the fp8 cache (issue 8)
#   bash benchmarks/h200.sh decode_shared  # carry [".whl"]: GPU tests of the decoder; infer_bench with n rows continuing
#                                      #   one prompt stored once (--prompts shared) beside distinct prompts (issue 8)
#   bash benchmarks/h200.sh decode_matmul  # carry [".whl"]: GPU tests of the decode kernels and decoder; the decode
#                                      #   step's matmuls at batch 128: cuBLAS bf16, fp8 weights, Inductor-tuned (issue 8)
#   bash benchmarks/h200.sh web        # carry [".whl", ".carry"]: the web server part of infer alone
#   bash benchmarks/h200.sh attention  # carry [".whl"]: the bench_attention part of kernels alone (issue 4)
#   bash benchmarks/h200.sh loss_inputs  # carry [".whl"]: loss kernels on flatter logits (std 1, 0.05), where CCE's
#                                      #   gradient filter skips blocks (issues 4, 5)
#   bash benchmarks/h200.sh speedrun   # carry [".whl", ".carry"]: benchmarks/h200_speedrun.sh (issue 10)
#
# Build the carried folders first: bash benchmarks/prepare_carry.sh. Full logs go to $OUT (or ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:?usage: bash benchmarks/h200.sh kernels|attention|loss_inputs|step|step_kernels|autotune|pointwise|fp8_fast|fp8_skip|fp8_study|sssl_tuned|tuning|clocks|memory|fp8|fp8_tests|fp8_triton|fp8_rowwise|sssl|te|fp8_loss24|fp8_loss20|stable_losses|parity|parity_large|grads|infer|decode|decode_dot|decode_tune|decode_shared|decode_matmul|web|speedrun}"
[ "$PART" = speedrun ] && exec bash benchmarks/h200_speedrun.sh  # sets up its own environment
OUT="${OUT:-out}"; mkdir -p "$OUT"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-/tmp/nc}"; mkdir -p "$NANOCHAT_BASE_DIR"
if [ -d .carry/tokenizer ]; then rm -rf "$NANOCHAT_BASE_DIR/tokenizer"; cp -r .carry/tokenizer "$NANOCHAT_BASE_DIR/"; fi
source benchmarks/gpu_env.sh
source benchmarks/run_part.sh
TRAIN="python3 -m scripts.base_train --data_dir .carry/data --save_every 0 --sample_every 0"
# two d24-wide layers in fp8: quick compiles for studying the cast kernels
STUDY="--depth 2 --aspect_ratio 768 --device_batch_size 16 --max_seq_len 2048 --kernel triton --fp8_fast_accum"
LR_QUARTER="--matrix_lr 0.005 --embedding_lr 0.05 --unembedding_lr 0.001 --scalar_lr 0.125"

case "$PART" in
kernels)
  python3 -c "import torch; print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  TAIL=3 run gpu_tests 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
      tests/test_attention.py tests/test_kernels_loss.py tests/test_decode_attention.py
  TAIL=8 run check_kernels 140 python3 -m benchmarks.check_kernels
  TAIL=16 run bench_attention 100 python3 -m benchmarks.bench_attention
  TAIL=40 run bench_loss 250 python3 -m benchmarks.bench_loss \
      --shapes 65536x1280x65536,65536x1280x32768,65536x2048x32768 --variants split,onepass,onepass/ce-warps32 --repeats 8
  ;;
attention)
  TAIL=16 run bench_attention 100 python3 -m benchmarks.bench_attention --burst_rounds 30
  ;;
loss_inputs)
  for scale in 1 0.05; do
    TAIL=12 run "bench_loss_logits$scale" 150 python3 -m benchmarks.bench_loss --shapes 65536x1280x65536 \
        --rows triton,liger,cce --variants none --components false --repeats 5 --logit_scale "$scale"
  done
  ;;
decode)
  TAIL=10 run infer_bench 300 python3 -m scripts.infer_bench --batch_sizes 1,8,32,128 --attention torch
  TAIL=6 run infer_triton 150 python3 -m scripts.infer_bench --batch_sizes 1,128 --attention triton
  TAIL=6 run infer_triton_fp8 150 python3 -m scripts.infer_bench --batch_sizes 1,128 --attention triton --kv_fp8 true
  ;;
decode_dot)
  # the tensor-core decode kernel: its configs beside the default kernel's, then end to end with the fp8 cache
  TAIL=3 run gpu_tests 80 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py
  TAIL=14 run bench_decode 150 python3 -m benchmarks.bench_decode_attention --batches 128 --splits 0,2 \
      --configs 128/4/2,64/4/2/dot,128/4/2/dot,128/8/3/dot,256/8/2/dot
  TAIL=6 run infer_dot 150 python3 -m scripts.infer_bench --batch_sizes 1,128 --attention triton_dot
  TAIL=6 run infer_dot_fp8 150 python3 -m scripts.infer_bench --batch_sizes 1,128 --attention triton_dot --kv_fp8 true
  ;;
decode_tune)
  TAIL=3 run gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_engine.py \
      -k "gpu or benchmark_script"
  TAIL=16 run bench_decode_graph 150 python3 -m benchmarks.bench_decode_attention --batches 1,32,128 --splits 0 --graph \
      --configs 128/2/2,128/4/2,128/4/2/dot,128/4/3/dot
  TAIL=6 run infer_fp8 150 python3 -m scripts.infer_bench --batch_sizes 1,128 --kv_fp8 true
  ;;
decode_shared)
  TAIL=3 run gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_engine.py \
      -k "gpu"
  TAIL=8 run infer_fp8 240 python3 -m scripts.infer_bench --batch_sizes 1,128 --kv_fp8 true --prompts distinct,shared
  TAIL=8 run infer_shared 240 python3 -m scripts.infer_bench --batch_sizes 1,8,32,128 --prompts shared
  ;;
decode_matmul)
  TAIL=3 run gpu_tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_engine.py \
      -k "gpu or test_decode_attention"
  TAIL=20 run bench_matmul 240 python3 -m benchmarks.bench_decode_matmul --batch 128
  ;;
step|step_kernels)
  BENCH="python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 3 --timeout 140"
  TAIL=8 run bench_kernels 300 $BENCH --kernel "${KERNELS:-triton,liger,cce,current}" --device_batch_size 32 \
      --max_seq_len 2048 --out_dir "$OUT/bench_kernels"
  [ "$PART" = step ] && TAIL=6 run bench_shapes 170 $BENCH --kernel triton --window_pattern SSSL,L --device_batch_size 32 --max_seq_len 2048 \
      --out_dir "$OUT/bench_shapes"   # the L row repeats bench_kernels' first row: compile time from the warm cache
  ;;
autotune)
  TAIL=6 run bench_autotune 590 python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 3 \
      --timeout 420 --kernel triton --device_batch_size 32 --max_seq_len 2048 \
      --compile_mode default,max-autotune-no-cudagraphs --out_dir "$OUT/bench_autotune"
  ;;
pointwise)
  # d20 B=32 T=2048 at nanochat's 524k-token step: pointwise recompute's memory and speed against none
  BENCH="python3 -m scripts.bench --depth 20 --total_batch_size 524288 --warmup 1 --steps 3 --timeout 200 --kernel triton \
      --device_batch_size 32 --max_seq_len 2048"
  TAIL=5 run bench_pointwise 400 $BENCH --recompute none,pointwise --out_dir "$OUT/pointwise"
  ;;
fp8_skip)
  # d24: bf16 and fp8 with fast accumulation, then the same fp8 with each attention output projection in bf16
  BENCH="python3 -m scripts.bench --depth 24 --device_batch_size 16 --max_seq_len 2048 --total_batch_size 262144 \
      --kernel triton --warmup 2 --steps 4 --fp8_fast_accum"
  TAIL=5 run bench_fp8_fast 300 $BENCH --precision bf16,fp8 --timeout 250 --out_dir "$OUT/fp8_fast"
  TAIL=4 run bench_fp8_skip 230 $BENCH --precision fp8 --fp8_skip "*.attn.c_proj" --timeout 220 --out_dir "$OUT/fp8_skip"
  ;;
fp8_study)
  TORCH_LOGS=output_code TAIL=36 run fp8_code 200 python3 -m scripts.profile_kernels $STUDY --precision fp8 \
      --warmup 2 --steps 2 --top 30
  gzip -f "$OUT/fp8_code.txt"
  TAIL=6 run bench_fp8_tiling 330 python3 -m scripts.bench $STUDY --precision fp8 --total_batch_size 262144 \
      --warmup 2 --steps 3 --timeout 100 --out_dir "$OUT/fp8_tiling" \
      --inductor "default,triton.prefer_nd_tiling=True,triton.prefer_nd_tiling=True;triton.tile_reductions=True"
  ;;
tuning)
  TAIL=6 run bench_tuning_fp8 280 python3 -m scripts.bench $STUDY --precision fp8 --total_batch_size 262144 \
      --warmup 2 --steps 3 --timeout 130 --out_dir "$OUT/tuning_fp8" \
      --inductor "default,coordinate_descent_tuning=True,max_autotune_pointwise=True"
  TAIL=5 run bench_tuning_d20 300 python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 3 \
      --timeout 200 --kernel triton --device_batch_size 32 --max_seq_len 2048 --out_dir "$OUT/tuning_d20" \
      --inductor "default,coordinate_descent_tuning=True"
  ;;
clocks)
  TAIL=2 run clocks_gemm 60 python3 -m benchmarks.gpu_clocks --gemm 65536x1280x5120 --seconds 20
  TAIL=8 run clocks_step 330 python3 -m benchmarks.gpu_clocks -- python3 -m scripts.bench --depth 20 \
      --total_batch_size 262144 --warmup 2 --steps 5 --timeout 150 --kernel triton --device_batch_size 32 \
      --max_seq_len 2048 --recompute none,none --out_dir "$OUT/clocks_step"
  ;;
memory)
  BENCH="python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 3 --timeout 140 --kernel triton"
  TAIL=4 run bench_b8 200 $BENCH --device_batch_size 8 --max_seq_len 1024 --recompute none,mlp --out_dir "$OUT/bench_b8"
  TAIL=4 run bench_recompute 300 $BENCH --device_batch_size 32 --max_seq_len 2048 --recompute mlp,block \
      --out_dir "$OUT/bench_recompute"
  ;;
fp8|fp8_fast)
  # d24: bf16 and fp8 (torchao tensorwise: fast accumulation in the forward GEMM only); fp8_fast adds fp8 with fast
  # accumulation in the backward GEMMs too
  BENCH="python3 -m scripts.bench --depth 24 --device_batch_size 16 --max_seq_len 2048 --total_batch_size 262144 \
      --kernel triton --warmup 2 --steps 4"
  TAIL=5 run bench_fp8 330 $BENCH --precision bf16,fp8 --timeout 280 --out_dir "$OUT/fp8"
  [ "$PART" = fp8_fast ] && TAIL=4 run bench_fp8_fast 260 $BENCH --precision fp8 --fp8_fast_accum --timeout 250 \
      --out_dir "$OUT/fp8_fast"
  ;;
fp8_tests)
  TAIL=3 run gpu_tests 260 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_linear.py tests/test_precision.py \
      tests/test_profiling.py
  ;;
fp8_triton)
  TAIL=14 run bench_fp8_cast 150 python3 -m benchmarks.bench_fp8_cast
  TAIL=6 run bench_fp8_triton 430 python3 -m scripts.bench --depth 24 --device_batch_size 16 --max_seq_len 2048 \
      --total_batch_size 262144 --kernel triton --warmup 2 --steps 4 --precision bf16,fp8 \
      --fp8_recipe triton,triton_delayed --timeout 200 --out_dir "$OUT/fp8_triton"
  ;;
fp8_rowwise)
  # the whole call: the rowwise row did not finish in 330 s after its bf16 row (session 6)
  TAIL=5 run bench_fp8_rowwise 590 python3 -m scripts.bench --depth 24 --device_batch_size 16 --max_seq_len 2048 \
      --total_batch_size 262144 --kernel triton --precision bf16,fp8 --fp8_recipe rowwise --warmup 2 --steps 4 \
      --timeout 470 --out_dir "$OUT/fp8_rowwise"
  ;;
sssl|sssl_tuned)
  BENCH="python3 -m scripts.bench --depth 20 --total_batch_size 262144 --warmup 2 --steps 6 --kernel triton \
      --device_batch_size 32 --max_seq_len 2048"
  TAIL=5 run bench_sssl 260 $BENCH --timeout 200 --window_pattern L,SSSL --out_dir "$OUT/sssl"
  # sssl_tuned adds SSSL with FlexAttention's kernels autotuned (max_autotune; every GEMM stays on cuBLAS)
  [ "$PART" = sssl_tuned ] && TAIL=4 run bench_sssl_tuned 280 $BENCH --timeout 250 --window_pattern SSSL \
      --inductor "max_autotune=True;max_autotune_gemm_backends='ATEN'" --out_dir "$OUT/sssl_tuned"
  ;;
te)
  # after benchmarks/te_build.sh on the same warm machine (its /tmp/te_site): TE's GPT in bf16 and fp8 beside ours
  export PYTHONPATH="/tmp/te_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import transformer_engine.pytorch" || { echo "no Transformer Engine: run benchmarks/te_build.sh first"; exit 1; }
  BENCH="python3 -m scripts.bench --depth 24 --device_batch_size 16 --max_seq_len 2048 --total_batch_size 262144 \
      --kernel triton --warmup 2 --steps 3"
  TAIL=5 run bench_te 420 $BENCH --arch gpt,te --doc_mask false --precision bf16 --timeout 200 --out_dir "$OUT/te_bf16"
  TAIL=4 run bench_te_fp8 170 $BENCH --arch te --doc_mask false --precision fp8 --timeout 160 --out_dir "$OUT/te_fp8"
  ;;
fp8_loss24)
  # d24, 200 steps of one 16 x 2048 micro-batch at a quarter of the default learning rates: at the default ones
  # this batch spikes (19.08 at step 85, session 5), and a spiking run cannot show "within 1%"
  LOSS="$TRAIN --depth 24 --kernel triton --num_iterations 200 --warmup_steps 10 --device_batch_size 16 \
      --max_seq_len 2048 --total_batch_size 32768 --eval_every 200 --eval_tokens 1048576 $LR_QUARTER"
  RECIPE="${RECIPE:-tensorwise}"
  run loss200_d24_bf16 200 $LOSS --precision bf16
  if [ "${FAST:-0}" = 1 ]; then run "loss200_d24_fp8_${RECIPE}_fast" 330 $LOSS --precision fp8 --fp8_recipe "$RECIPE" --fp8_fast_accum
  else run "loss200_d24_fp8_$RECIPE" 330 $LOSS --precision fp8 --fp8_recipe "$RECIPE"; fi
  ;;
stable_losses)
  # d20, 200 steps of 32k tokens at a quarter of the default learning rates: current, triton, liger (issue 5's
  # parity; current vs liger is the yardstick), and fp8 (issue 7's "within 1% of bf16"); ~590 s in all
  LOSS="$TRAIN --depth 20 --num_iterations 200 --warmup_steps 10 --device_batch_size 16 --max_seq_len 2048 \
      --total_batch_size 32768 --eval_every 200 --eval_tokens 1048576 $LR_QUARTER"
  for k in ${STABLE:-current triton liger fp8}; do
    if [ "$k" = fp8 ]; then run "stable200_d20_fp8_${RECIPE:-tensorwise}" 280 $LOSS --kernel triton --precision fp8 \
        --fp8_recipe "${RECIPE:-tensorwise}" $([ "${FAST:-0}" = 1 ] && echo --fp8_fast_accum) --model_tag s_fp8
    else run "stable200_d20_$k" 170 $LOSS --kernel "$k" --model_tag "s_$k"; fi
  done
  ;;
fp8_loss20)
  # d20, 200 steps after a 10-step warm-up (without it the first steps jump: session 3): triton bf16 vs fp8
  # (issue 7), and triton vs current in bf16 step by step (issue 5)
  LOSS="$TRAIN --depth 20 --num_iterations 200 --warmup_steps 10 --device_batch_size 16 --max_seq_len 2048 \
      --total_batch_size 32768 --eval_every 200 --eval_tokens 1048576"
  run loss200_d20_bf16 150 $LOSS --kernel triton --precision bf16 --model_tag l_triton
  run loss200_d20_current 150 $LOSS --kernel current --precision bf16 --model_tag l_current
  run loss200_d20_fp8 270 $LOSS --kernel triton --precision fp8 --model_tag l_fp8
  ;;
parity)
  # fp8_loss20's bf16 setting again: run-to-run spread of `current`, and whether the triton kernel's gap to it
  # comes from its bf16 dW accumulation and fast tanh (the same kernel with an fp32 accumulator and precise
  # tanh) or is shared by Liger (bf16 chunked accumulation too)
  LOSS="--data_dir .carry/data --save_every 0 --sample_every 0 --depth 20 --num_iterations 200 --warmup_steps 10 \
      --device_batch_size 16 --max_seq_len 2048 --total_batch_size 32768 --eval_every 200 --eval_tokens 1048576"
  run loss200_d20_current2 150 python3 -m scripts.base_train $LOSS --kernel current --model_tag p_current
  run loss200_d20_triton_fp32acc 150 python3 -c "import runpy, sys; import nanochat.kernels.loss_triton as lt
lt.CONFIG.dw_accum, lt.CONFIG.fast_tanh, lt.CONFIG.chunk_rows = 'fp32', False, 2048
sys.argv = ['base_train'] + sys.argv[1:]; runpy.run_module('scripts.base_train', run_name='__main__')" \
      $LOSS --kernel triton --model_tag p_triton32
  run loss200_d20_liger 150 python3 -m scripts.base_train $LOSS --kernel liger --model_tag p_liger
  ;;
parity_large)
  # a steadier setting than 32k tokens per step (whose loss rises at step 4 and spikes later): 131k tokens per
  # step, 100 steps after a 10-step warm-up; current vs triton vs liger
  LOSS="$TRAIN --depth 20 --num_iterations 100 --warmup_steps 10 --device_batch_size 32 --max_seq_len 2048 \
      --total_batch_size 131072 --eval_every 100 --eval_tokens 1048576 --precision bf16"
  for k in current triton liger; do run "loss100_d20_b131k_$k" 160 $LOSS --kernel $k --model_tag "pl_$k"; done
  ;;
grads)
  TAIL=16 run train_grads 170 python3 -m benchmarks.check_train_grads --depth 20 --kernels current,triton,liger \
      --steps 12 --data_dir .carry/data
  TAIL=12 run train_grads_compiled 230 python3 -m benchmarks.check_train_grads --depth 20 --kernels current,triton \
      --steps 8 --compile true --data_dir .carry/data
  ;;
infer|web)
  [ "$PART" = infer ] && TAIL=10 run infer_bench 300 python3 -m scripts.infer_bench --batch_sizes 1,8,32,128
  [ "$PART" = web ] && TAIL=3 run web_gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_web.py \
      tests/test_engine.py -k gpu
  # a d20 checkpoint to serve (one uncompiled step: the server's speed does not depend on the weights)
  run ckpt_d20 90 $TRAIN --depth 20 --num_iterations 1 --device_batch_size 4 --max_seq_len 1024 \
      --total_batch_size 4096 --eval_every 0 --compile false --model_tag web --save_every -1
  python3 -m scripts.chat_web -i base --model_tag web --port 8011 --host 127.0.0.1 > "$OUT/chat_web.txt" 2>&1 &
  SERVER=$!
  for _ in $(seq 90); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
  TAIL=6 run web_load 120 python3 -m benchmarks.web_load --url http://127.0.0.1:8011 --clients 1,32 --duration_s 25
  # the same rows again: the 32-vs-1 ratio of one call is not enough to call it robust
  TAIL=6 run web_load_repeat 100 python3 -m benchmarks.web_load --url http://127.0.0.1:8011 --clients 1,32 \
      --duration_s 25 --warmup false
  kill $SERVER
  ;;
*) echo "unknown part $PART"; exit 2 ;;
esac

# the short table: every JSON last line of this part's logs, a few figures each
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
keys = ("tok_per_s", "median_tok_per_s", "peak_memory_gib", "mfu", "val_bpb", "speedup", "status", "rows", "tflops",
        "sm_mhz", "power_w", "throttle")
print("\n| log | figures |\n| --- | --- |")
for path in sorted(Path(sys.argv[1]).glob("*.txt")):
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.startswith("{")]
    try:
        last = json.loads(lines[-1]) if lines else {}
    except ValueError:
        last = {}
    figures = {k: last[k] for k in keys if k in last}
    print(f"| {path.stem} | {json.dumps(figures)[:400] if figures else '(no JSON line: see the log)'} |")

def step_losses(name):  # base_train's "step 00012/00200 | loss 5.1234 | ..." lines
    path = Path(sys.argv[1]) / f"{name}.txt"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return [float(ln.split("|")[1].split()[1]) for ln in lines if ln.startswith("step ") and "| loss " in ln]

for base_name, other in (("loss200_d20_bf16", "loss200_d20_current"), ("loss200_d20_bf16", "loss200_d20_fp8"),
                         ("loss100_d20_b131k_current", "loss100_d20_b131k_triton"),
                         ("loss100_d20_b131k_current", "loss100_d20_b131k_liger"),
                         ("stable200_d20_current", "stable200_d20_triton"),
                         ("stable200_d20_current", "stable200_d20_liger"), ("stable200_d20_current", "stable200_d20_fp8"),
                         ("loss200_d24_bf16", "loss200_d24_fp8"), ("loss200_d24_bf16", "loss200_d24_fp8_fast")):
    base, losses = step_losses(base_name), step_losses(other)
    n = min(len(base), len(losses), 50)
    if n:
        diff = max(abs(a - b) for a, b in zip(base[:n], losses[:n]))
        print(f"{other} vs {base_name}, first {n} steps: max |loss diff| {diff:.4f}; "
              f"step {n}: {losses[n - 1]:.4f} vs {base[n - 1]:.4f}")
PY

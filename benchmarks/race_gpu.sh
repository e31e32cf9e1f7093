#!/usr/bin/env bash
# The race on a GPU machine that reaches no registry, in calls of at most 10 minutes and 64 MiB of carry each. Make
# the carry folders here first with benchmarks/race_prepare.sh: .race_a (training shards 0-1, the validation shard,
# the token manifest, both tokenizers, the peer's checkout, rustbpe), .race_b (shards 2-3), .race_c (shards 4-5).
# Each call copies the folders it carries into /root/race; make the calls back to back, so that the machine stays
# warm between them (a fresh machine starts bare: stage again from .race_a). Carries that do not fit one call go one
# a call: `stage` copies any .race_[b-z] it is given and says which shards are still missing, and which carry
# brings them.
#   bash benchmarks/race_gpu.sh stage       carry [".race_a"]: its data, tokenizers and peer -> /root/race, rustbpe
#                                           installed and imported; carry [".whl_fa4"] (benchmarks/prepare_fa4.sh):
#                                           FlashAttention-4 unpacked, which our racers' auto attention then picks
#                                           (document masks on FA4's varlen kernels; nanochat's code does not use it)
#   bash benchmarks/race_gpu.sh train ARGS  one run of ours on what is staged (python -m scripts.base_train ARGS, the
#                                           race's data and our tokenizer, no checkpoints or samples), in this script's
#                                           environment: FA4 on the path where staged (an A/B of flags in one call)
#   bash benchmarks/race_gpu.sh run ARGS    carry [".race_b", ".race_c"] (57 MiB together; the limit is per call):
#                                           their shards, then, when /root/race/data holds every shard
#                                           the manifest names (else it stops, naming the missing ones and their
#                                           carries): python -m benchmarks.race ARGS; a run cut off at 10 minutes
#                                           goes on in the next `run` call, finished racers kept
# Results land in $OUT/race (race.json, race.png, each racer's logs). A d12 racer of the default 400 steps of 131,072
# tokens (or 100 of 524,288) takes ~3.3 minutes with its compile and evaluations, one of 400 steps of 524,288 8-9.5
# (two racers fit a 10-minute call): pass --save_every 100 and a racer cut off by the call's limit
# resumes from its newest checkpoint in the next call (on the same warm machine: /root/race_work) instead of starting
# over. The race prints each racer's epochs of the race data (6 shards: ~510 steps of 131,072 tokens an epoch) and
# warns past one.
# On a machine of several GPUs, pass --gpus all: one racer per GPU at a time, as many at once as there are GPUs
# (their timings side by side compare only roughly: shared CPU, PCIe and power).
set -euo pipefail
cd "$(dirname "$0")/.."
RACE="${RACE:-/root/race}"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:?usage: race_gpu.sh stage|train|run [flags]}"
shift
staged() {  # stops, naming each shard of the manifest that $RACE/data lacks and the carry that brings it
    python3 -c 'import sys; from benchmarks.race_data import check_staged; check_staged(sys.argv[1])' "$RACE"
}
mkdir -p "$RACE/data"
if [ -d .race_a ]; then
    cp .race_a/data/* "$RACE/data/" && cp .race_a/carries.txt "$RACE/"
    cp -r .race_a/tokenizer_ours .race_a/tokenizer_nanochat .race_a/peer "$RACE/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .race_a/whl/*.whl
fi
source benchmarks/fa4_env.sh  # FA4 from .whl_fa4, or as an earlier call unpacked it; else it says fa4 is unavailable
for carry in .race_[b-z]; do
    if [ -d "$carry" ]; then
        cp "$carry"/data/*.parquet "$RACE/data/" && echo "$carry: $(ls "$carry/data" | tr '\n' ' ')"
    fi
done
ls -la "$RACE/data"
nvidia-smi -L
case "$part" in
    stage)
        python3 -c "import rustbpe, tiktoken, pyarrow; print('rustbpe, tiktoken, pyarrow: ok')" || {
            echo "race_gpu.sh: stage .race_a first (it installs rustbpe; a fresh machine starts bare)"; exit 1; }
        staged || echo "race_gpu.sh: stage the carries named above next (one call each), then run"
        ;;
    run)
        staged
        # logs and race.json (rewritten after every racer) stream into $OUT, so a call cut off by its time limit
        # still brings back the racers it finished; checkpoints and logs stay in /root/race_work, where a racer that
        # already finished with the same settings is not run again by the next call on this warm machine, and one
        # cut off resumes from its newest checkpoint (--save_every N)
        python3 -m benchmarks.race --race_dir "$RACE" --peer "$RACE/peer" --out "${OUT:-out}/race" \
            --work /root/race_work "$@"
        ;;
    train)
        python3 -m scripts.base_train --data_dir "$RACE/data" --tokenizer_dir "$RACE/tokenizer_ours" --save_every -1 \
            --sample_every -1 "$@"
        ;;
    *) echo "race_gpu.sh: unknown part $part (stage|train|run)"; exit 2 ;;
esac

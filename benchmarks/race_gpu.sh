#!/usr/bin/env bash
# The race on a GPU machine that reaches no registry, in calls of at most 10 minutes and 64 MiB each:
#   bash benchmarks/race_gpu.sh stage       carry [".race_a"]  (2 training shards, validation, both tokenizers,
#                                           the peer's checkout, rustbpe) -> /root/race; a GPU smoke of both trainers
#   bash benchmarks/race_gpu.sh run ARGS    carry [".race_b"]  (the other 2 shards) within 30 s of the last call
#                                           (the machine stays warm), then: python -m benchmarks.race ARGS; a run
#                                           cut off at 10 minutes goes on in the next call, finished racers kept
# Make .race_a and .race_b here first with benchmarks/race_prepare.sh. Results land in $OUT/race (race.json,
# race.png, each racer's logs). A d12 racer of 100 steps takes ~3.5 minutes with its compile and evaluations, one of
# 400 steps 8-9.5: pass --save_every 100 and a racer cut off by the call's limit resumes from its newest checkpoint in
# the next call (on the same warm machine: /root/race_work) instead of starting over.
# On a machine of several GPUs, pass --gpus all: one racer per GPU at a time, as many at once as there are GPUs
# (their timings side by side compare only roughly: shared CPU, PCIe and power).
set -euo pipefail
cd "$(dirname "$0")/.."
RACE=/root/race
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:?usage: race_gpu.sh stage|run [race flags]}"
shift
if [ -d .race_a ]; then
    mkdir -p "$RACE/data"
    cp .race_a/data/*.parquet "$RACE/data/" && cp -r .race_a/tokenizer_ours .race_a/tokenizer_nanochat .race_a/peer "$RACE/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .race_a/whl/*.whl
fi
if [ -d .race_b ]; then
    mkdir -p "$RACE/data" && cp .race_b/data/*.parquet "$RACE/data/"
fi
ls -la "$RACE/data"
nvidia-smi -L
case "$part" in
    stage)
        python3 -c "import rustbpe, tiktoken, pyarrow; print('rustbpe, tiktoken, pyarrow: ok')"
        ;;
    run)
        n=$(ls "$RACE"/data/*.parquet | wc -l)
        [ "$n" -ge 5 ] || { echo "race_gpu.sh: $n shards in $RACE/data; stage .race_a and .race_b first"; exit 1; }
        # logs and race.json (rewritten after every racer) stream into $OUT, so a call cut off by its time limit
        # still brings back the racers it finished; checkpoints and logs stay in /root/race_work, where a racer that
        # already finished with the same settings is not run again by the next call on this warm machine, and one
        # cut off resumes from its newest checkpoint (--save_every N)
        python3 -m benchmarks.race --race_dir "$RACE" --peer "$RACE/peer" --out "${OUT:-out}/race" \
            --work /root/race_work "$@"
        ;;
    *) echo "race_gpu.sh: unknown part $part (stage|run)"; exit 2 ;;
esac

#!/usr/bin/env bash
# The shipped AdK model's training recipe (examples/adk/README.md,
# "Training"), three `digctl train` runs, each from the one before:
#   1. 7000 updates of batch 4 at the published noise schedule
#      (tr_sigma_max 35 Å): the model shipped until 2026-12-04, kept as
#      examples/adk/model-35A;
#   2. from it, batch 16 with a moving average of the weights and three
#      times as many draws at t >= 0.7: a 3000-update schedule stopped at
#      update 1600 (`--stop-at`);
#   3. from stage 2's averaged weights, the schedule's largest translation
#      noise raised to 200 Å (`--tr-sigma-max`; the README's "Mirror
#      images" says why): 2000 updates of batch 16, shipped 2026-12-04
#      to 2026-12-05;
#   4. from it, a 3000-update schedule at lr 4e-4 stopped at update 1000;
#   5. from stage 4's averaged weights, four times as many draws at
#      t >= 0.6 (`--high-t-weight 4 --high-t-from 0.6`): a 1000-update
#      schedule run to update 600, then stretched to 2000 updates
#      (`--resume --steps 2000`, as the shipped run was) and stopped at
#      update 1800, shipped 2026-12-05;
#   6. from stage 5's averaged weights, eight times as many draws at
#      t >= 0.5 (`--high-t-weight 8 --high-t-from 0.5`): a 3000-update
#      schedule stopped at update 1800 (updates 900 and 1500 were shipped
#      first, the same day), shipped 2026-12-05;
#   7. from stage 6's averaged weights, the orientation channel added
#      (`--orientation-features`, zero-started) at lr 4e-4, seed 13: a
#      1500-update schedule, then stretched to 4000 updates
#      (`--resume --steps 4000`, as the shipped run was) and stopped at
#      update 2700. Its model directory is examples/adk/model, sampled
#      with `--flow-above 0.8`.
# Every stage checkpoints every 100-500 updates; run the script again after
# any interruption and it resumes where it stopped (finished stages are
# kept). OUT (default train-adk) holds stage1/ ... stage7/. About 9 h
# on this 2-core machine (83 + 70 + 60 + 30 + 80 + 90 + 125 min). The first stage's initial
# weights were drawn before commit acfaaef, so the result is an equivalent
# model, not the shipped bytes; from stage 1's shipped weights on
# (STAGE1=examples/adk/model-35A skips it) the runs are bit-reproducible on
# one machine and thread count.
set -euo pipefail
DIGCTL=$(realpath "${DIGCTL:-target/release/digctl}")
OUT=$(realpath -m "${OUT:-train-adk}")
STAGE1=${STAGE1:+$(realpath "$STAGE1")}
mkdir -p "$OUT"
cd examples/adk

# train OUT ARGS...: a fresh run, or --resume when OUT holds a checkpoint.
train() {
    local out=$1
    shift
    local resume=()
    [[ -d $out/checkpoint ]] && resume=(--resume)
    echo "== $out"
    "$DIGCTL" train --data manifest.jsonl --out "$out" --schedule cosine \
        --min-lr-fraction 0.05 --clip 1.0 --dropout 0 --val-fraction 0.1 \
        "$@" "${resume[@]}"
}

if [[ -z $STAGE1 ]]; then
    STAGE1=$OUT/stage1
    train "$STAGE1" --size small --steps 7000 --batch-size 4 --lr 1e-3 --warmup 300 \
        --seed 0 --checkpoint-every 500 --val-every 1000 --log-every 100 --threads 1
fi
train "$OUT/stage2" --init "$STAGE1" --steps 3000 --stop-at 1600 --batch-size 16 \
    --lr 5e-4 --warmup 100 --seed 0 --checkpoint-every 100 --val-every 300 \
    --log-every 20 --threads 1 --ema 0.995 --model-weights ema \
    --high-t-weight 3 --high-t-from 0.7
train "$OUT/stage3" --init "$OUT/stage2" --tr-sigma-max 200 --steps 2000 --batch-size 16 \
    --lr 5e-4 --warmup 100 --seed 5 --checkpoint-every 100 --val-every 500 \
    --log-every 20 --threads 2 --ema 0.995 --model-weights ema
train "$OUT/stage4" --init "$OUT/stage3" --tr-sigma-max 200 --steps 3000 --stop-at 1000 \
    --batch-size 16 --lr 4e-4 --warmup 100 --seed 6 --checkpoint-every 100 --val-every 500 \
    --log-every 20 --threads 2 --ema 0.995 --model-weights ema
stage5=(--init "$OUT/stage4" --tr-sigma-max 200 --batch-size 16 --lr 3e-4 --warmup 50
    --seed 7 --checkpoint-every 100 --val-every 500 --log-every 20 --threads 1
    --ema 0.995 --model-weights ema --high-t-weight 4 --high-t-from 0.6)
done5=$(grep -o '"steps_done": *[0-9]*' "$OUT/stage5/training.json" 2>/dev/null | grep -o '[0-9]*$' || echo 0)
if (( done5 < 600 )); then
    train "$OUT/stage5" "${stage5[@]}" --steps 1000 --stop-at 600
fi
train "$OUT/stage5" "${stage5[@]}" --steps 2000 --stop-at 1800
train "$OUT/stage6" --init "$OUT/stage5" --tr-sigma-max 200 --steps 3000 --stop-at 1800 \
    --batch-size 16 --lr 3e-4 --warmup 50 --seed 8 --checkpoint-every 100 --val-every 500 \
    --log-every 20 --threads 1 --ema 0.995 --model-weights ema \
    --high-t-weight 8 --high-t-from 0.5
stage7=(--init "$OUT/stage6" --orientation-features --tr-sigma-max 200 --batch-size 16
    --lr 4e-4 --warmup 50 --seed 13 --checkpoint-every 100 --val-every 300 --log-every 20
    --threads 2 --ema 0.995 --model-weights ema --high-t-weight 8 --high-t-from 0.5)
done7=$(grep -o '"steps_done": *[0-9]*' "$OUT/stage7/training.json" 2>/dev/null | grep -o '[0-9]*$' || echo 0)
if (( done7 < 1500 )); then
    train "$OUT/stage7" "${stage7[@]}" --steps 1500
fi
train "$OUT/stage7" "${stage7[@]}" --steps 4000 --stop-at 2700
echo "model: $OUT/stage7 (config.json, model.safetensors, training.json: what examples/adk/model holds; sample it with --flow-above 0.8)"

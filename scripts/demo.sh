#!/usr/bin/env bash
# `make run`: the product's main flow on one machine with no servers.
# Starts `digctl standalone` (API + coordinator + worker in one process),
# uploads a protein's features and submits a job through the real HTTP API,
# follows it with a progress bar, downloads the results, scores them, stops.
#
# DIG_DEMO=adk (default): adenylate kinase from the model trained on its MD
#   frames (examples/adk/model), scored by `digctl evaluate` against the
#   closed and open crystal structures. DIG_DEMO_MODEL samples another
#   AdK model directory (e.g. examples/adk/model-35A, the one shipped before).
# DIG_DEMO=hp35: HP35 with an UNTRAINED random model (pipeline only).
set -euo pipefail

DIGCTL=${DIGCTL:-target/release/digctl}
DEMO=${DIG_DEMO:-adk}
DATA=${DIG_DEMO_DATA:-demo/data}
PORT=${DIG_DEMO_PORT:-8765}

case "$DEMO" in
adk)
    MODEL=${DIG_DEMO_MODEL:-examples/adk/model}
    FEATURES=examples/adk/features.npz
    FASTA=examples/adk/adk.fasta
    # The README's recommended setting (ab2, 50 steps: 50 network calls per
    # structure, the probability flow above t = 0.8) and enough samples for
    # the fractions to mean something: about 3 minutes of sampling on a
    # 2-core machine. DIG_DEMO_SAMPLES, DIG_DEMO_STEPS, DIG_DEMO_SOLVER and
    # DIG_DEMO_FLOW_ABOVE change them (euler and 500 steps with
    # DIG_DEMO_FLOW_ABOVE= is the published sampler).
    SAMPLES=${DIG_DEMO_SAMPLES:-128}
    STEPS=${DIG_DEMO_STEPS:-50}
    SOLVER=${DIG_DEMO_SOLVER:-ab2}
    FLOW_ABOVE=${DIG_DEMO_FLOW_ABOVE-0.8}
    OUT=demo/adk
    test -f "$MODEL/config.json" || {
        echo "error: $MODEL is missing; train it with the command in examples/adk/README.md" >&2
        exit 1
    }
    ;;
hp35)
    MODEL=demo/model
    FEATURES=examples/hp35/features.npz
    FASTA=examples/hp35/hp35.fasta
    SAMPLES=${DIG_DEMO_SAMPLES:-16}
    STEPS=${DIG_DEMO_STEPS:-500}
    SOLVER=${DIG_DEMO_SOLVER:-euler}
    FLOW_ABOVE=${DIG_DEMO_FLOW_ABOVE-}
    OUT=demo/hp35
    mkdir -p demo
    test -f demo/model/config.json || "$DIGCTL" demo-model demo/model --size small --seed 0
    ;;
*)
    echo "error: DIG_DEMO=$DEMO; use adk or hp35" >&2
    exit 1
    ;;
esac

mkdir -p demo
echo "demo: $DEMO, model $MODEL, $SAMPLES samples x $STEPS $SOLVER sampler steps${FLOW_ABOVE:+, probability flow above t = $FLOW_ABOVE} (published: 500 euler)"
echo "starting digctl standalone on 127.0.0.1:$PORT (log: demo/standalone.log, data: $DATA)"
"$DIGCTL" standalone --data-dir "$DATA" --listen "127.0.0.1:$PORT" --model "$MODEL" \
    >demo/standalone.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT

export DIG_API_URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 300); do
    if [ -s "$DATA/api-key" ] && DIG_API_KEY=$(cat "$DATA/api-key") "$DIGCTL" models >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 $PID 2>/dev/null; then
        echo "error: digctl standalone exited; its log:" >&2
        cat demo/standalone.log >&2
        exit 1
    fi
    sleep 0.2
done
export DIG_API_KEY
DIG_API_KEY=$(cat "$DATA/api-key")

JOB=$("$DIGCTL" submit --features "$FEATURES" --fasta "$FASTA" \
    --num-samples "$SAMPLES" --steps "$STEPS" --solver "$SOLVER" ${FLOW_ABOVE:+--flow-above "$FLOW_ABOVE"} \
    --seed 1 --shard-size 16 --name "$DEMO-demo")
"$DIGCTL" wait "$JOB"
rm -rf "$OUT"
"$DIGCTL" fetch "$JOB" --out "$OUT"
"$DIGCTL" fetch "$JOB" --out "$OUT" --format pdb
echo "demo done: job $JOB; results in $OUT/ (manifest.json, shards/*.npz, $JOB.pdb)"

if [ "$DEMO" = adk ]; then
    "$DIGCTL" evaluate --samples "$OUT" \
        --reference examples/adk/closed.pdb --reference examples/adk/open.pdb \
        --frames examples/adk/manifest.jsonl \
        --out "$OUT/evaluation.json" --plot "$OUT/evaluation.png" >/dev/null
    echo "evaluation: $OUT/evaluation.json, plot: $OUT/evaluation.png"
    echo "model: examples/adk/model, trained on the AdK DIMS frames (examples/adk/README.md)"
else
    echo "the model is UNTRAINED (demo/model/UNTRAINED.txt): the structures exercise the pipeline only"
fi

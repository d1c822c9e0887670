#!/usr/bin/env bash
# `make run`: the product's main flow on one machine with no servers.
# Starts `digctl standalone` (API + coordinator + worker in one process),
# uploads the demo protein's features and submits a job through the real
# HTTP API, follows it with a progress bar, downloads the results, stops.
set -euo pipefail

DIGCTL=${DIGCTL:-target/release/digctl}
DATA=${DIG_DEMO_DATA:-demo/data}
PORT=${DIG_DEMO_PORT:-8765}
SAMPLES=${DIG_DEMO_SAMPLES:-16}
OUT=demo/hp35

mkdir -p demo
test -f demo/model/config.json || "$DIGCTL" demo-model demo/model --size small --seed 0

echo "starting digctl standalone on 127.0.0.1:$PORT (log: demo/standalone.log, data: $DATA)"
"$DIGCTL" standalone --data-dir "$DATA" --listen "127.0.0.1:$PORT" --model demo/model \
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

JOB=$("$DIGCTL" submit --features examples/hp35/features.npz --fasta examples/hp35/hp35.fasta \
    --num-samples "$SAMPLES" --seed 1 --shard-size 8 --name hp35-demo)
"$DIGCTL" wait "$JOB"
"$DIGCTL" fetch "$JOB" --out "$OUT"
"$DIGCTL" fetch "$JOB" --out "$OUT" --format pdb
echo "demo done: job $JOB; results in $OUT/ (manifest.json, shards/*.npz, $JOB.pdb)"
echo "the model is UNTRAINED (demo/model/UNTRAINED.txt): the structures exercise the pipeline only"

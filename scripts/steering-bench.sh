#!/usr/bin/env bash
# The measurements of docs/steering.md on the shipped AdK model: 256
# returned samples per setting at the Euler update with 50 steps, scored by
# `digctl evaluate` against the closed and open crystal structures and the
# training frames. PARTS selects what runs (default: all):
#   det      unsteered, the published deterministic update
#   sde      unsteered, the stochastic update at the presets' noise 0.3
#   filter   unsteered deterministic with --filter physical
#   physical --steer physical (4 particles)
#   open     --steer examples/adk/steer-open.json (towards open.pdb)
#   cost     seconds and network calls per returned sample for K = 1, 2, 4, 8
# OUT (default steering-runs/), N (256), STEPS (50), THREADS (1), BATCH (16),
# COST_N (16) change the settings; MODEL (examples/adk/model) the model
# directory (docs/steering.md was measured on examples/adk/model-35A).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIGCTL=${DIGCTL:-$ROOT/target/release/digctl}
OUT=$(realpath -m "${OUT:-steering-runs}")
N=${N:-256}; STEPS=${STEPS:-50}; THREADS=${THREADS:-1}; BATCH=${BATCH:-16}; COST_N=${COST_N:-16}
PARTS=${PARTS:-det sde filter physical open cost}
MODEL=$(realpath "${MODEL:-examples/adk/model}")
mkdir -p "$OUT"
cd examples/adk

sample() { # name, args...
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$DIGCTL" sample --model "$MODEL" --features features.npz --fasta adk.fasta \
    --batch-size "$BATCH" --steps "$STEPS" --threads "$THREADS" --seed 0 \
    --out "$OUT/$name" "$@" 2>"$OUT/$name.log" >/dev/null || true
  local t1=$(date +%s.%N)
  echo "$name: $(echo "$t1 - $t0" | bc) s wall" | tee -a "$OUT/times.txt"
}
evaluate() { # name, extra args...
  local name=$1; shift
  "$DIGCTL" evaluate --samples "$OUT/$name" --reference closed.pdb --reference open.pdb \
    --frames manifest.jsonl "$@" > /dev/null 2> "$OUT/$name.eval.txt"
  cat "$OUT/$name.eval.txt"
}

for part in $PARTS; do
  case $part in
    det) sample det --num-samples "$N"; evaluate det --plot "$OUT/det.png" ;;
    sde) sample sde --num-samples "$N" --noise 0.3; evaluate sde --plot "$OUT/sde.png" ;;
    filter) sample filter --num-samples "$N" --filter physical; evaluate filter ;;
    physical)
      sample physical --num-samples "$N" --steer physical
      evaluate physical --plot "$OUT/physical.png" --overlay "$OUT/det"
      evaluate physical --out "$OUT/physical/evaluation-unsteered.json" --reweight unsteered ;;
    open)
      sample open --num-samples "$N" --steer steer-open.json
      evaluate open --plot "$OUT/open.png" --overlay "$OUT/sde"
      evaluate open --out "$OUT/open/evaluation-unsteered.json" --reweight unsteered ;;
    cost)
      for k in 1 2 4 8; do
        sed "s/\"particles\": 4/\"particles\": $k/" "$ROOT/examples/adk/steer-physical.json" > "$OUT/physical-k$k.json"
        sample "cost-k$k" --num-samples "$COST_N" --steer "$OUT/physical-k$k.json"
        evaluate "cost-k$k"
      done ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# The AdK model's quality, as examples/adk/README.md records it: 256 samples
# at the full 500 sampler steps (`digctl sample`), scored by `digctl evaluate`
# against the closed and open crystal structures and the training frames.
# MODEL, SAMPLES, STEPS, OUT, SOLVER, THREADS override the defaults;
# FLOW_ABOVE=T follows the probability flow above t = T (`--flow-above`;
# default 0.8, the shipped model's recommended setting; FLOW_ABOVE= for the
# published update throughout).
set -euo pipefail
DIGCTL=${DIGCTL:-target/release/digctl}
MODEL=${MODEL:-examples/adk/model}
SAMPLES=${SAMPLES:-256}
STEPS=${STEPS:-500}
OUT=${OUT:-demo/adk-eval}
SOLVER=${SOLVER:-euler}
THREADS=${THREADS:+--threads $THREADS}
FLOW_ABOVE=${FLOW_ABOVE-0.8}
FLOW_ABOVE=${FLOW_ABOVE:+--flow-above $FLOW_ABOVE}
mkdir -p "$OUT"
echo "sampling $SAMPLES structures x $STEPS $SOLVER steps ${FLOW_ABOVE:-(published update throughout)} from $MODEL into $OUT"
"$DIGCTL" sample --model "$MODEL" --features examples/adk/features.npz \
    --fasta examples/adk/adk.fasta --num-samples "$SAMPLES" --steps "$STEPS" \
    --batch-size 16 --seed 0 --solver "$SOLVER" $THREADS $FLOW_ABOVE --out "$OUT"
"$DIGCTL" evaluate --samples "$OUT" \
    --reference examples/adk/closed.pdb --reference examples/adk/open.pdb \
    --frames examples/adk/manifest.jsonl \
    --out "$OUT/evaluation.json" --plot "$OUT/evaluation.png" >/dev/null
echo "evaluation: $OUT/evaluation.json, plot: $OUT/evaluation.png"

#!/usr/bin/env bash
# Where an AdK model decides the handedness of its fold (examples/adk/README.md,
# "Mirror images"): partial diffusion (`digctl sample --from-structure`) from
# the closed crystal structure, and from its mirror image, noised to each
# diffusion time in TIMES and sampled back to t = 0; `digctl evaluate` counts
# the mirror images among the results. t = 1 is ordinary sampling from noise.
# MODEL, SAMPLES, TIMES, MIRROR_TIMES, SOLVER, STEPS, THREADS, OUT override
# the defaults.
set -euo pipefail
DIGCTL=${DIGCTL:-target/release/digctl}
MODEL=${MODEL:-examples/adk/model}
SAMPLES=${SAMPLES:-32}
TIMES=${TIMES:-"0.9 0.95 0.97 1"}
MIRROR_TIMES=${MIRROR_TIMES:-"0.9"}
SOLVER=${SOLVER:-ab2}
STEPS=${STEPS:-50}
OUT=${OUT:-demo/adk-chirality}
THREADS=${THREADS:+--threads $THREADS}
mkdir -p "$OUT"
adk=examples/adk
# The mirror image of closed.pdb: every z coordinate negated (PDB columns 47-54).
awk '/^(ATOM|HETATM)/ { z = substr($0, 47, 8) + 0; $0 = substr($0, 1, 46) sprintf("%8.3f", -z) substr($0, 55) } { print }' \
    "$adk/closed.pdb" >"$OUT/closed-mirror.pdb"

run() { # name start time
    local dir="$OUT/$1-t$3"
    "$DIGCTL" sample --model "$MODEL" --features "$adk/features.npz" --fasta "$adk/adk.fasta" \
        --num-samples "$SAMPLES" --batch-size 16 --seed 0 --solver "$SOLVER" --steps "$STEPS" $THREADS \
        --from-structure "$2" --from-time "$3" --out "$dir" >"$dir.log" 2>&1
    "$DIGCTL" evaluate --samples "$dir" --reference "$adk/closed.pdb" --reference "$adk/open.pdb" \
        --frames "$adk/manifest.jsonl" 2>>"$dir.log" | python3 -c '
import json, sys
v = json.load(sys.stdin); nf = v["nearest_frame"]; n = v["num_samples"]
print(f"{sys.argv[1]:<14} t = {sys.argv[2]:<5} {n} samples: {v['"'"'valid_fraction'"'"']:6.1%} valid, "
      f"{nf['"'"'fraction_farther_than_6A'"'"']:6.1%} farther than 6 Å, {nf['"'"'fraction_mirror_images'"'"']:6.1%} mirror images")
' "$1" "$3"
}
echo "model $MODEL, $SOLVER $STEPS steps, seed 0"
for t in $TIMES; do run closed "$adk/closed.pdb" "$t"; done
for t in $MIRROR_TIMES; do run closed-mirror "$OUT/closed-mirror.pdb" "$t"; done

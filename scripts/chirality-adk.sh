#!/usr/bin/env bash
# Why an AdK model folds mirror images (examples/adk/README.md, "Mirror
# images"). Two experiments, each scored by `digctl evaluate`, which counts
# the mirror images among the samples:
#  1. partial diffusion (`digctl sample --from-structure`) from the closed
#     crystal structure, and from its mirror image, noised to each diffusion
#     time in TIMES (snapped down to the sampler's grid; the start it used is
#     printed) and sampled back to t = 0;
#  2. sampling from t = 1 from the same initial states twice (`--init-state`):
#     pure noise N(0, tr_sigma_max^2) as the prior draws it, and that noise
#     plus the closed structure (randomly rotated), which is what the forward
#     process gives at t = 1 and what the model was trained on there.
# MODEL, SAMPLES, TIMES, MIRROR_TIMES, SOLVER, STEPS, THREADS, OUT override
# the defaults.
set -euo pipefail
DIGCTL=${DIGCTL:-target/release/digctl}
MODEL=${MODEL:-examples/adk/model}
SAMPLES=${SAMPLES:-32}
TIMES=${TIMES:-"0.9 0.94 0.96 0.98 1"}
MIRROR_TIMES=${MIRROR_TIMES:-"0.9"}
SOLVER=${SOLVER:-ab2}
STEPS=${STEPS:-50}
OUT=${OUT:-demo/adk-chirality}
THREADS=${THREADS:+--threads $THREADS}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
adk=examples/adk
# The mirror image of closed.pdb: every z coordinate negated (PDB columns 47-54).
awk '/^(ATOM|HETATM)/ { z = substr($0, 47, 8) + 0; $0 = substr($0, 1, 46) sprintf("%8.3f", -z) substr($0, 55) } { print }' \
    "$adk/closed.pdb" >"$OUT/closed-mirror.pdb"

score() { # dir label
    "$DIGCTL" evaluate --samples "$1" --reference "$adk/closed.pdb" --reference "$adk/open.pdb" \
        --frames "$adk/manifest.jsonl" 2>>"$1.log" | "$PYTHON" -c '
import json, sys
v = json.load(sys.stdin); nf = v["nearest_frame"]; n = v["num_samples"]
refs = {r["name"]: r["fraction_within_3A"] for r in v["references"]}
print(f"{sys.argv[1]:<34} {n} samples: {v['"'"'valid_fraction'"'"']:6.1%} valid, "
      f"{nf['"'"'fraction_farther_than_6A'"'"']:6.1%} farther than 6 Å, "
      f"{nf['"'"'fraction_mirror_images'"'"']:6.1%} mirror images; "
      f"within 3 Å: closed {refs['"'"'closed'"'"']:5.1%}, open {refs['"'"'open'"'"']:5.1%}")
' "$2"
}

partial() { # name start time
    local dir="$OUT/$1-t$3"
    "$DIGCTL" sample --model "$MODEL" --features "$adk/features.npz" --fasta "$adk/adk.fasta" \
        --num-samples "$SAMPLES" --batch-size 16 --seed 0 --solver "$SOLVER" --steps "$STEPS" $THREADS \
        --from-structure "$2" --from-time "$3" --out "$dir" >"$dir.log" 2>&1
    local start
    start=$("$PYTHON" -c 'import json, sys; f = json.load(open(sys.argv[1]))["from_structure"]; print(f["start_time"] if f["start_step"] else 1)' "$dir/run.json")
    score "$dir" "$1 from t = $start"
}

echo "model $MODEL, $SOLVER $STEPS steps, seed 0"
echo "1. partial diffusion"
for t in $TIMES; do partial closed "$adk/closed.pdb" "$t"; done
for t in $MIRROR_TIMES; do partial closed-mirror "$OUT/closed-mirror.pdb" "$t"; done

echo "2. from t = 1: pure noise against noise plus the structure (same noise, same rotations)"
"$PYTHON" - "$MODEL/config.json" "$adk/closed.pdb" "$OUT" "$SAMPLES" <<'PY'
import json, sys
import numpy as np
cfg, pdb, out, n = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4])
sigma = cfg.get("tr_sigma_max", 35.0)
ca = np.array([[float(l[30:38]), float(l[38:46]), float(l[46:54])]
               for l in open(pdb) if l.startswith("ATOM") and l[12:16].strip() == "CA"])
ca -= ca.mean(0)
rng = np.random.default_rng(11)
def rotations(k):  # uniform (Haar) rotations from unit quaternions
    q = rng.normal(size=(k, 4)); q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([1-2*(y*y+z*z), 2*(x*y-z*w), 2*(x*z+y*w), 2*(x*y+z*w), 1-2*(x*x+z*z),
                     2*(y*z-x*w), 2*(x*z-y*w), 2*(y*z+x*w), 1-2*(x*x+y*y)], -1).reshape(k, 3, 3)
l = len(ca)
noise = rng.normal(size=(n, l, 3)) * sigma
rot = rotations(n * l).reshape(n, l, 3, 3).astype(np.float32)
signal = np.einsum("nab,lb->nla", rotations(n), ca)
np.savez(f"{out}/init-noise.npz", tr=noise.astype(np.float32), rot_mat=rot)
np.savez(f"{out}/init-noise-plus-structure.npz", tr=(signal + noise).astype(np.float32), rot_mat=rot)
# The structure's share: how far the t = 1 marginal is from the prior.
print(f"  tr_sigma_max {sigma} Å: |x0|^2 / sigma^2 = {np.sum(ca**2) / sigma**2:.1f}")
PY
for k in noise noise-plus-structure; do
    dir="$OUT/t1-$k"
    "$DIGCTL" sample --model "$MODEL" --features "$adk/features.npz" --fasta "$adk/adk.fasta" \
        --init-state "$OUT/init-$k.npz" --batch-size 16 --solver "$SOLVER" --steps "$STEPS" $THREADS \
        --out "$dir" >"$dir.log" 2>&1
    score "$dir" "t = 1, $k"
done

#!/usr/bin/env bash
# docs/density.md: the density, partial-diffusion and interpolation
# measurements on the shipped AdK model. OUT (default density-runs/) holds
# every input and output; PARTS picks what runs (default: all):
#   roundtrip  encode then decode of every RT_EVERY-th training frame (1: all
#              100) along RT_ODE (flow) at RT_STEPS (100) Heun steps each way
#              (CA-RMSD)
#   rank       every RANK_EVERY-th (5: 20) training frame against itself
#              perturbed by 1 and 2 Å
#   states     closed.pdb, open.pdb and the demo ensemble's samples near each
#   partial    partial diffusion of the demo ensemble's invalid samples
#   path       the closed-to-open interpolation
# The demo ensemble is demo/adk (make run); STEPS (50) Heun steps of the ODE,
# PROBES (2) Hutchinson probes, THREADS (1) libtorch threads; MODEL
# (examples/adk/model) the model directory (docs/density.md was measured on
# examples/adk/model-35A, with a demo ensemble of that model).
set -euo pipefail
cd "$(dirname "$0")/.."
DIGCTL=${DIGCTL:-target/release/digctl}
OUT=${OUT:-density-runs}
PARTS=${PARTS:-roundtrip rank states partial path}
STEPS=${STEPS:-50}
PROBES=${PROBES:-2}
THREADS=${THREADS:-1}
DEMO=${DEMO:-demo/adk}
PY=.venv/bin/python
M=examples/adk
MODEL=${MODEL:-$M/model}
mkdir -p "$OUT"
common=(--model "$MODEL" --features $M/features.npz --flow-steps "$STEPS" --threads "$THREADS")
density() { # structures out.json [extra]
    local s=$1 o=$2; shift 2
    echo "density: $s -> $o"
    /usr/bin/time -f "  %e s" "$DIGCTL" density "${common[@]}" --structures "$s" \
        --divergence "hutchinson:$PROBES" --batch-size 4 --out "$o" "$@"
}
$PY scripts/density_inputs.py frames "$OUT/frames.pdb"
for part in $PARTS; do
    case $part in
    roundtrip)
        $PY scripts/density_inputs.py every "$OUT/frames.pdb" "$OUT/roundtrip.pdb" "${RT_EVERY:-1}"
        echo "round trip: $OUT/roundtrip.pdb"
        /usr/bin/time -f "  %e s" "$DIGCTL" density --model "$MODEL" --features $M/features.npz \
            --ode "${RT_ODE:-flow}" --flow-steps "${RT_STEPS:-100}" --threads "$THREADS" \
            --structures "$OUT/roundtrip.pdb" \
            --round-trip --no-density --batch-size 4 --out "$OUT/roundtrip.json"
        ;;
    rank)
        $PY scripts/density_inputs.py every "$OUT/frames.pdb" "$OUT/frames20.pdb" "${RANK_EVERY:-5}"
        $PY scripts/density_inputs.py perturb "$OUT/frames20.pdb" "$OUT/perturbed1.pdb" 1 1
        $PY scripts/density_inputs.py perturb "$OUT/frames20.pdb" "$OUT/perturbed2.pdb" 2 2
        for f in frames20 perturbed1 perturbed2; do density "$OUT/$f.pdb" "$OUT/rank-$f.json"; done
        ;;
    states)
        for s in closed open; do density "$M/$s.pdb" "$OUT/state-$s.json"; done
        $DIGCTL evaluate --samples "$DEMO" --reference $M/closed.pdb --reference $M/open.pdb \
            --frames $M/manifest.jsonl --out "$OUT/demo-evaluation.json" >/dev/null
        for s in closed open; do
            $PY scripts/density_inputs.py select "$DEMO" "$OUT/demo-evaluation.json" "$OUT/near-$s.pdb" $s "${NEAR_MAX:-8}"
            density "$OUT/near-$s.pdb" "$OUT/near-$s.json"
        done
        ;;
    partial)
        test -f "$OUT/demo-evaluation.json" || $DIGCTL evaluate --samples "$DEMO" --reference $M/closed.pdb \
            --reference $M/open.pdb --frames $M/manifest.jsonl --out "$OUT/demo-evaluation.json" >/dev/null
        $PY scripts/density_inputs.py select "$DEMO" "$OUT/demo-evaluation.json" "$OUT/invalid.pdb" invalid
        n=$(grep -c '^MODEL' "$OUT/invalid.pdb")
        for t in ${TIMES:-0.1 0.2 0.3}; do
            echo "partial diffusion of $n invalid samples from t = $t"
            $DIGCTL sample --model "$MODEL" --features $M/features.npz --solver ab2 --steps 50 \
                --from-structure "$OUT/invalid.pdb" --from-time "$t" --num-samples "$n" --seed 0 \
                --threads "$THREADS" --out "$OUT/partial-$t" >/dev/null
            $DIGCTL evaluate --samples "$OUT/partial-$t" --reference $M/closed.pdb --reference $M/open.pdb \
                --frames $M/manifest.jsonl --out "$OUT/partial-$t/evaluation.json" | tail -4
        done
        ;;
    path)
        $DIGCTL interpolate "${common[@]}" --from $M/closed.pdb --to $M/open.pdb --frames 21 \
            --divergence "hutchinson:$PROBES" --out "$OUT/path"
        $DIGCTL evaluate --samples "$OUT/path" --reference $M/closed.pdb --reference $M/open.pdb \
            --frames $M/manifest.jsonl --out "$OUT/path/evaluation.json" --plot "$OUT/path/path.png" | tail -4
        ;;
    *) echo "unknown part $part" >&2; exit 1 ;;
    esac
done
$PY scripts/density_report.py "$OUT"

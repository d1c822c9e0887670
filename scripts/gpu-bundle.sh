#!/usr/bin/env bash
# make gpu-bundle: a self-contained folder (at most 60 MiB) that checks a GPU
# machine with PyTorch 2.11 and no Rust toolchain in one command:
#   dist/gpu-bundle/gpu-check.sh   (the table: parity, speed, a standalone job)
#   dist/gpu-bundle/digctl         (linked against PyTorch 2.11's libtorch,
#                                   loaded from LD_LIBRARY_PATH at run time)
#   dist/gpu-bundle/fixtures/      (the published fixtures it checks against)
#
# How: PyPI's torch 2.11 wheel (downloaded once into target/gpu-bundle/) is
# the libtorch to link against. tch 0.26 is generated for PyTorch 2.13, so
# its C++ shim calls 15 ops that 2.11 lacks (found by compiling the shim
# against 2.11's headers); a copy of torch-sys has exactly those bodies
# replaced by an error ("... is not in this libtorch"), and a copy of the
# source tree builds digctl with that torch-sys patched in. None of those ops
# is used by dig-cluster.
#
# TORCH_VERSION=2.11.0 (default) picks the wheel; OUT=dir the bundle folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
OUT=${OUT:-dist/gpu-bundle}
WORK=target/gpu-bundle
LIMIT_MIB=60
mkdir -p "$WORK"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# 1. libtorch: the wheel's torch/ folder (lib, include, share).
TORCH="$ROOT/$WORK/torch-$TORCH_VERSION/torch"
if [ ! -f "$TORCH/lib/libtorch_cpu.so" ]; then
    echo "gpu-bundle: downloading PyPI's torch==$TORCH_VERSION wheel (about 530 MB, once)"
    "$PY" -m pip download --disable-pip-version-check -q "torch==$TORCH_VERSION" --no-deps \
        --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$WORK/wheels"
    rm -rf "$WORK/torch-$TORCH_VERSION"
    "$PY" - "$WORK/wheels" "$WORK/torch-$TORCH_VERSION" "$TORCH_VERSION" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/torch-{sys.argv[3]}-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if n.startswith(("torch/lib/", "torch/include/", "torch/share/")) or n == "torch/version.py":
            z.extract(n, sys.argv[2])
PYEOF
    chmod +x "$TORCH"/lib/*.so*
fi
echo "gpu-bundle: libtorch $(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$TORCH/version.py") at $TORCH"

# 2. torch-sys, with the shim's functions that this libtorch lacks stubbed.
TS_SRC=$(cargo metadata --format-version 1 --locked 2>/dev/null | "$PY" -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "torch-sys").rsplit("/", 1)[0])')
TS="$ROOT/$WORK/torch-sys-$TORCH_VERSION"
if [ ! -f "$TS/.stubbed" ]; then
    rm -rf "$TS" && cp -r "$TS_SRC" "$TS" && chmod -R u+w "$TS"
    for round in 1 2 3; do
        echo "gpu-bundle: checking tch's C++ shim against libtorch $TORCH_VERSION (round $round, about a minute)"
        if LC_ALL=C c++ -fsyntax-only -w -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -DGLOG_USE_GLOG_EXPORT \
            -I "$TORCH/include" -I "$TORCH/include/torch/csrc/api/include" \
            "$TS/libtch/torch_api_generated.cpp" 2>"$WORK/shim-errors.txt"; then
            touch "$TS/.stubbed"
            break
        fi
        "$PY" - "$TS/libtch/torch_api_generated.cpp" "$WORK/shim-errors.txt" <<'PYEOF'
import re, sys
src_path, errors_path = sys.argv[1], sys.argv[2]
errors = open(errors_path).read()
bad = sorted(set(re.findall(r"In function ['‘][^'’]*?\b(atg_\w+)\(", errors)))
if not bad:
    sys.exit("gpu-bundle: the shim fails to compile for reasons other than missing ops:\n" + errors[-3000:])
src = open(src_path).read()
for name in bad:
    pat = re.compile(r"(\n[^\n]*\b" + name + r"\([^\n]*\) \{\n)(.*?)(\n\}\n)", re.S)
    m = pat.search(src)
    if not m or not m.group(1).lstrip().startswith("void"):
        sys.exit(f"gpu-bundle: cannot stub {name}")
    body = f'  PROTECT(\n    throw std::runtime_error("{name[4:]} is not in this libtorch");\n  )'
    src = src[: m.start(2)] + body + src[m.end(2):]
open(src_path, "w").write(src)
print(f"gpu-bundle: stubbed {len(bad)} ops this libtorch lacks: " + ", ".join(n[4:] for n in bad))
PYEOF
    done
    [ -f "$TS/.stubbed" ] || { echo "error: tch's shim still fails against libtorch $TORCH_VERSION: $WORK/shim-errors.txt" >&2; exit 1; }
fi

# 3. digctl from a copy of this tree (tracked and untracked files), with the
#    stubbed torch-sys patched in; the repository's Cargo.lock stays as it is.
SRC="$WORK/src"
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
printf '\n[patch.crates-io]\ntorch-sys = { path = "%s" }\n' "$TS" >>"$SRC/Cargo.toml"
echo "gpu-bundle: building digctl against libtorch $TORCH_VERSION (release; the first build takes 10-20 min)"
(cd "$SRC" && LIBTORCH="$TORCH" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1 \
    CARGO_TARGET_DIR="$ROOT/$WORK/target" cargo build --release -p digctl)

# 4. The folder.
rm -rf "$OUT" && mkdir -p "$OUT/fixtures"
strip -o "$OUT/digctl" "$WORK/target/release/digctl"
cp scripts/gpu-check.sh "$OUT/gpu-check.sh"
for f in config.json model.safetensors features.npz forward.npz init_state.npz final_state.npz; do
    cp model/tests/data/$f "$OUT/fixtures/"
done
echo "${TORCH_VERSION}" >"$OUT/TORCH_VERSION"
cat >"$OUT/README.txt" <<TXT
dig-cluster GPU check ($(git describe --always --dirty), libtorch $TORCH_VERSION)

On a machine with an NVIDIA GPU and PyTorch $TORCH_VERSION (no Rust needed):
    ./gpu-check.sh                      # libtorch found through python3's torch
    ./gpu-check.sh --torch-lib DIR      # or given: the folder holding libtorch_cpu.so
    ./gpu-check.sh --precision tf32     # TensorFloat-32 matrix products, parity error stated
Prints one table: parity against the published DiG fixtures on the GPU, seconds
per sample-step of the published architecture at L = 128, 256, 512 with batches
up to the memory, and a digctl standalone job whose worker samples on the GPU.
Options: ./digctl gpu-check --help (after exporting LD_LIBRARY_PATH).
TXT
SIZE=$(du -sb "$OUT" | cut -f1)
MIB=$(( (SIZE + 1048575) / 1048576 ))
echo "gpu-bundle: $OUT, $MIB MiB (limit $LIMIT_MIB): $(ls "$OUT" | tr '\n' ' ')"
[ "$SIZE" -le $((LIMIT_MIB * 1048576)) ] || { echo "error: the bundle is $MIB MiB, over $LIMIT_MIB MiB" >&2; exit 1; }

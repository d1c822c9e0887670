#!/usr/bin/env bash
# gpu-check.sh: is this machine's GPU fit to run dig-cluster workers?
# One command, one table (digctl gpu-check): parity against the published
# DiG fixtures on the device, seconds per sample-step of the published
# architecture at L = 128, 256 and 512 with batches up to the memory, and a
# `digctl standalone` job whose worker samples on the device, compared with
# `digctl sample`. About 2-5 minutes on one GPU.
#
#   ./gpu-check.sh                         # CUDA, libtorch from python3's torch
#   ./gpu-check.sh --torch-lib DIR         # libtorch's lib/ given (PyTorch 2.11's torch/lib)
#   ./gpu-check.sh --precision tf32        # TensorFloat-32 products: parity error stated
#   ./gpu-check.sh --device cpu            # the same checks on the CPU, small sizes
#
# Other options go to `digctl gpu-check` (--lengths, --max-batch,
# --job-samples, --json FILE ...; `digctl gpu-check --help`).
#
# In the bundle (make gpu-bundle) digctl and fixtures/ lie beside this script
# and digctl was linked against PyTorch 2.11's libtorch, which it loads from
# LD_LIBRARY_PATH (set here). In the repository it uses DIGCTL (default
# target/release/digctl, else target/debug/digctl) and model/tests/data, and
# the libtorch the build baked in.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

DEVICE=cuda
TORCH_LIB=${DIG_TORCH_LIB:-}
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --torch-lib) TORCH_LIB=$2; shift 2 ;;
    --torch-lib=*) TORCH_LIB=${1#--torch-lib=}; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) PASS+=("$1"); shift ;;
    esac
done

if [ -x "$HERE/digctl" ] && [ -d "$HERE/fixtures" ]; then
    BUNDLE=1
    DIGCTL="$HERE/digctl"
    FIXTURES="$HERE/fixtures"
else
    BUNDLE=0
    ROOT=$(cd "$HERE/.." && pwd)
    if [ -z "${DIGCTL:-}" ]; then
        DIGCTL="$ROOT/target/release/digctl"
        [ -x "$DIGCTL" ] || DIGCTL="$ROOT/target/debug/digctl"
    fi
    FIXTURES=${DIG_FIXTURES:-$ROOT/model/tests/data}
fi
[ -x "$DIGCTL" ] || { echo "error: no digctl at $DIGCTL (build it, or set DIGCTL)" >&2; exit 2; }

# The bundle's digctl needs a libtorch at run time: PyTorch 2.11's torch/lib.
if [ -z "$TORCH_LIB" ] && [ "$BUNDLE" = 1 ]; then
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            TORCH_LIB=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) && break
        fi
    done
    [ -n "$TORCH_LIB" ] || {
        echo "error: no libtorch found: install PyTorch 2.11 for python3, or pass --torch-lib DIR (the folder holding libtorch_cpu.so)" >&2
        exit 2
    }
fi
if [ -n "$TORCH_LIB" ]; then
    [ -f "$TORCH_LIB/libtorch_cpu.so" ] || { echo "error: --torch-lib $TORCH_LIB holds no libtorch_cpu.so" >&2; exit 2; }
    VERSION_PY="$TORCH_LIB/../version.py"
    if [ -f "$VERSION_PY" ]; then
        V=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$VERSION_PY")
        echo "libtorch: $TORCH_LIB (PyTorch $V)"
        if [ "$BUNDLE" = 1 ] && [ -f "$HERE/TORCH_VERSION" ] && [ "${V%%+*}" != "$(cat "$HERE/TORCH_VERSION")" ]; then
            echo "warning: this bundle was linked against PyTorch $(cat "$HERE/TORCH_VERSION"), not ${V%%+*}; it may fail to load" >&2
        fi
    fi
    export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if command -v nvidia-smi >/dev/null 2>&1 && [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' || true
fi

# On the CPU the published architecture at L = 512 would take hours: the
# fixture model at small lengths exercises the same code.
# Each default applies unless the option was given.
DEFAULTS=()
given() { local a; for a in "${PASS[@]}"; do [ "${a%%=*}" = "$1" ] && return 0; done; return 1; }
if [ "$DEVICE" = cpu ]; then
    given --fixture-arch || DEFAULTS+=(--fixture-arch)
    for kv in --lengths=24,48 --max-batch=8 --steps=1 --job-samples=16 --job-steps=50; do
        given "${kv%%=*}" || DEFAULTS+=("$kv")
    done
fi
exec "$DIGCTL" gpu-check --device "$DEVICE" --fixtures "$FIXTURES" "${DEFAULTS[@]}" "${PASS[@]}"

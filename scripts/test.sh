#!/usr/bin/env bash
# `make test` after `make setup`: every test of the workspace, in stages
# that print their time (scripts/stage.sh):
#   fmt            cargo fmt --check
#   build+clippy   one build of every test target, linted as it compiles;
#                  meanwhile the services start (stages services, deploy-tools)
#   tests          every test, in two lanes at first (below)
#
# The lanes. `cargo test` runs the test binaries one after another, and a few
# long ones leave a core idle: the Schemathesis run uses about 1.25 cores
# (126 s alone, 124 % CPU), the trainer test one thread (168 s alone), both
# measured on the same slow afternoon (2026-12-04), when side by side, with
# the flow tests after the trainer's, they took 269 s.
# So the tests stage starts with those two groups side by side, then runs
# every other target (the list comes from cargo metadata, so a new test
# file is never left out). Every test still runs exactly once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v clippy-driver >/dev/null || { echo "error: clippy-driver not found; rustup component add clippy" >&2; exit 1; }

# The same build lints: clippy-driver wraps rustc for the workspace's own
# crates (what `cargo clippy` does, but in a real build instead of a check),
# with -D warnings, so the dependencies compile once instead of once for
# clippy and once for the tests. The tests keep the same wrapper, or cargo
# would rebuild the workspace's crates for the changed fingerprint. One
# build of the graph: `cargo test --workspace --no-run` builds every test
# target and target/debug/digctl (digctl/tests/cli.rs makes cargo build the
# binary) with one feature resolution; every later cargo call here keeps
# --workspace, or features would resolve differently and rebuild crates.
export RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)"
export CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__

# This machine's speed at the time, for comparing the stage times of runs on
# shared hosts (2026-12-04 here: 4.1-4.9 s while the trainer test, 97 s on a
# quiet afternoon, took 168 s): one core, a fixed Python loop.
python3 - <<'PROBE' >&2
import time
t = time.perf_counter()
sum(i * i for i in range(30_000_000))
print(f"[make test] speed probe: {time.perf_counter() - t:.2f} s (one core, fixed Python loop; lower is faster)")
PROBE

scripts/stage.sh fmt cargo fmt --all -- --check

mkdir -p target
services_log=target/make-test-services.log
(
    scripts/stage.sh services scripts/services.sh >/dev/null
    scripts/stage.sh deploy-tools scripts/deploy-tools.sh
) >"$services_log" 2>&1 &
services=$!
build=0
scripts/stage.sh build+clippy cargo test --workspace --no-run || build=$?
started=0
wait "$services" || started=$?
cat "$services_log" >&2
((build == 0)) || exit "$build"
((started == 0)) || { echo "error: the services did not start ($services_log)" >&2; exit "$started"; }

set -a
. .services/env
set +a

# Lane A: no services, one thread each. Lane B: the Schemathesis run.
LANE_A=(trainer flow)
LANE_B=(schemathesis)

# Every other test target of the workspace (cargo metadata; a name that two
# packages share selects both, in the lanes as in the rest).
rest_targets() {
    cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
early = set(sys.argv[1:])
names = {t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if t["kind"] == ["test"]}
missing = early - names
if missing:
    sys.exit(f"error: scripts/test.sh names test targets that do not exist: {sorted(missing)}")
print("\n".join(sorted(names - early)))
' "${LANE_A[@]}" "${LANE_B[@]}"
}

tests() {
    local rest args=() lane_a=target/make-test-lane-a.log a=0 b=0 pid t
    rest=$(rest_targets) || return 1
    for t in $rest; do args+=(--test "$t"); done

    cargo test --workspace $(printf -- '--test %s ' "${LANE_A[@]}") >"$lane_a" 2>&1 &
    pid=$!
    cargo test --workspace $(printf -- '--test %s ' "${LANE_B[@]}") || b=$?
    wait "$pid" || a=$?
    cat "$lane_a"
    ((a == 0)) || { echo "error: the tests of lane A (${LANE_A[*]}) failed" >&2; return "$a"; }
    ((b == 0)) || return "$b"
    # The rest, as a plain `cargo test --workspace` would run them: libraries'
    # and binaries' unit tests, the other test targets, then doc tests.
    cargo test --workspace --lib --bins "${args[@]}" && cargo test --workspace --doc
}

start=$(date +%s)
status=0
tests || status=$?
echo "[make test] stage tests: $(($(date +%s) - start)) s (exit ${status})" >&2
exit "$status"

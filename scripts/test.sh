#!/usr/bin/env bash
# `make test` after `make setup`: every test of the workspace, in stages
# that print their time (scripts/stage.sh):
#   fmt            cargo fmt --check
#   build+clippy   one build of every test target, linted as it compiles;
#                  meanwhile the services start (stages services, deploy-tools)
#   tests          every test, in two phases of two lanes each (below)
#
# The lanes. `cargo test` runs the test binaries one after another, and most
# leave a core idle: measured one by one on a quiet machine (2026-12-04, the
# speed probe at 3.1-3.3 s), the tests took 1060 s of wall time for 1348 s
# of CPU time on two cores (chaos 255 s at 1.5 cores, the trainer 125 s at
# one, the Schemathesis run 101 s at 1.4, most cluster tests 0.8-1.4).
# The cluster tests keep to their own namespaces on the shared servers
# (dig_tests::Cluster), so test binaries can run side by side, except the
# three that stop or restart RabbitMQ or Redis (OUTAGE): nothing else may use
# the servers while they run. So:
#   phase 1  the OUTAGE tests, one after another, beside the tests that use no
#            server (NO_SERVERS: the model's tests, the trainer, the CLI, the
#            standalone-only tests)
#   phase 2  every other test target (cargo metadata lists them, so a new test
#            file is never left out; it lands here) in two lanes: LANE_B and
#            the rest, with the unit and doc tests
# Every test runs exactly once. A new test that stops a server belongs in
# OUTAGE; one that needs none may go in NO_SERVERS.
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

# libtorch's OpenMP threads sleep when they wait instead of spinning. The
# tests run libtorch in several threads and processes at once (cargo's two
# test threads, the lanes, the cluster's workers), and spinning threads
# burned the cores the others needed: model/tests/flow.rs alone took 21.6 s
# (42.6 s of CPU) spinning and 13.6 s (22.7 s) passive; two copies side by
# side 68.7 s spinning and 23.1 s passive (2026-12-04). Results do not
# change: only how idle threads wait.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

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

# Phase 1: the tests that stop servers, beside the tests that need none.
OUTAGE=(chaos lifecycle_recovery queue)
NO_SERVERS=(trainer flow backbone cli gpu_check bad_input deploy evaluate train
    checkpoint network potentials resume sampler so3 solvers structure training
    xtc hostile shard)
# Phase 2: LANE_B beside every other target (mostly waiting on the servers
# and the HTTP clients, the first four: 1.2 cores together).
LANE_B=(schemathesis lifecycle_api observability api batches)

# Every test target of the workspace not named in the arguments (cargo
# metadata; a name that two packages share selects both).
other_targets() {
    cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
named = set(sys.argv[1:])
names = {t["name"] for p in json.load(sys.stdin)["packages"] for t in p["targets"] if t["kind"] == ["test"]}
missing = named - names
if missing:
    sys.exit(f"error: scripts/test.sh names test targets that do not exist: {sorted(missing)}")
print("\n".join(sorted(names - named)))
' "$@"
}

# `--test A --test B ...`
tests_args() { printf -- '--test %s ' "$@"; }

# side_by_side PHASE NAME1 FUNCTION1 NAME2 FUNCTION2: both at once; the first
# prints as it goes, the second into target/make-test-PHASE-NAME2.log, shown
# when both have ended. Prints each lane's time; fails if either failed.
side_by_side() {
    local phase=$1 n1=$2 f1=$3 n2=$4 f2=$5 log start a=0 b=0 pid t1 t2
    log=target/make-test-$phase-$n2.log
    start=$(date +%s)
    ( "$f2"; s=$?; echo "[make test] lane $phase/$n2: $(($(date +%s) - start)) s (exit $s)" >&2; exit $s ) >"$log" 2>&1 &
    pid=$!
    "$f1" || a=$?
    t1=$(($(date +%s) - start))
    wait "$pid" || b=$?
    t2=$(($(date +%s) - start))
    cat "$log"
    echo "[make test] lane $phase/$n1: $t1 s (exit $a); phase $phase: $t2 s" >&2
    ((a == 0)) || { echo "error: the tests of lane $phase/$n1 failed" >&2; return "$a"; }
    ((b == 0)) || { echo "error: the tests of lane $phase/$n2 failed (above, and $log)" >&2; return "$b"; }
}

outage() { cargo test --workspace $(tests_args "${OUTAGE[@]}"); }
no_servers() { cargo test --workspace $(tests_args "${NO_SERVERS[@]}"); }
lane_b() { cargo test --workspace $(tests_args "${LANE_B[@]}"); }
# The rest, as a plain `cargo test --workspace` would run them: libraries'
# and binaries' unit tests, the other test targets, then doc tests.
lane_c() {
    local rest
    rest=$(other_targets "${OUTAGE[@]}" "${NO_SERVERS[@]}" "${LANE_B[@]}") || return 1
    # shellcheck disable=SC2086
    cargo test --workspace --lib --bins $(tests_args $rest) && cargo test --workspace --doc
}

tests() {
    side_by_side 1 outage outage no-servers no_servers &&
        side_by_side 2 rest lane_c b lane_b
}
start=$(date +%s)
status=0
tests || status=$?
echo "[make test] stage tests: $(($(date +%s) - start)) s (exit ${status})" >&2
exit "$status"

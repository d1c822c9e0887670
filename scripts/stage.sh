#!/usr/bin/env bash
# Runs one stage of `make test` and prints how long it took:
#   scripts/stage.sh NAME COMMAND...
# (a failing stage prints its time too, then fails with the command's status).
name=$1; shift
start=$(date +%s)
"$@"; status=$?
echo "[make test] stage ${name}: $(( $(date +%s) - start )) s (exit ${status})" >&2
exit $status

#!/usr/bin/env bash
# Install the tools tests/tests/deploy.rs checks the deployment files with,
# when they are absent (Debian packages; root or sudo for apt):
#   docker-compose   `docker-compose config` validates docker-compose.yml (no engine needed)
#   promtool         (package prometheus) validates deploy/prometheus/prometheus.yml
# Idempotent and quiet when everything is there. (helm has no Debian package
# and cannot be downloaded here; the chart is checked without it.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v promtool >/dev/null || need+=(prometheus)
((${#need[@]})) || exit 0

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "[deploy-tools] ERROR: need root or sudo to install ${need[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
command -v apt-get >/dev/null || { echo "[deploy-tools] ERROR: apt-get not found; install ${need[*]} by hand" >&2; exit 1; }

mkdir -p .services
log=.services/deploy-tools.log
echo "[deploy-tools] apt-get install ${need[*]} ..." >&2
# apt-get update only when the plain install fails (stale or missing lists).
if "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >"$log" 2>&1 ||
   { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$log" 2>&1 &&
     "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$log" 2>&1; }; then
  hash -r
  for c in docker-compose promtool; do
    command -v "$c" >/dev/null || { echo "[deploy-tools] ERROR: $c still missing after installing ${need[*]} (log: $log)" >&2; exit 1; }
  done
  echo "[deploy-tools] installed ${need[*]}" >&2
else
  tail -n 30 "$log" >&2
  echo "[deploy-tools] ERROR: apt-get install ${need[*]} failed (log: $log)" >&2
  exit 1
fi

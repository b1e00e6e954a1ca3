#!/usr/bin/env bash
# The run command of README.md: the article's demo on a fresh machine.
# Installs gearmand from Debian's packages when it is missing, builds gearsock, then runs
# gearmand, `gearsock serve` and `gearsock worker` together until Ctrl-C (or SIGTERM), which
# stops all three within 2 s and leaves nothing running.
#
# environment: GEARMAND_PORT [4730]  LISTEN [127.0.0.1:8080]  LOG_DIR [target/demo] (gearmand's
#   log)  SKIP_BUILD=1 (use BIN as it is)  BIN [$CARGO_TARGET_DIR or target, /release/gearsock]
set -euo pipefail
cd "$(dirname "$0")/.."

GEARMAND_PORT="${GEARMAND_PORT:-4730}"
LISTEN="${LISTEN:-127.0.0.1:8080}"
LOG_DIR="${LOG_DIR:-target/demo}"
bin="${BIN:-${CARGO_TARGET_DIR:-target}/release/gearsock}"

if [ ! -x /usr/sbin/gearmand ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "== installing gearmand (Debian package gearman-job-server)"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends gearman-job-server
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== building gearsock"
  cargo build --release --quiet
fi
[ -x "$bin" ] || { echo "demo.sh: $bin is missing" >&2; exit 1; }

# Every program we start, by its own PID (never a pipeline's last stage), so that the stop
# reaches each of them. `ours` are the gearsock programs: a terminal's Ctrl-C reaches them
# too (they handle SIGINT themselves: close the clients, fail the running job), so on Ctrl-C
# they get a moment to finish before anything else is sent; gearmand, a background child of
# this script, ignores SIGINT and always gets SIGTERM.
pids=()
ours=()
stopping=0
alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
stop_all() {
  local grace=$1
  [ "$stopping" = 0 ] || return 0
  stopping=1
  [ ${#pids[@]} -gt 0 ] || return 0
  if [ "$grace" = 1 ] && [ ${#ours[@]} -gt 0 ]; then
    for _ in $(seq 12); do alive "${ours[@]}" || break; sleep 0.1; done
  fi
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 8); do alive "${pids[@]}" || break; sleep 0.1; done   # 2 s in all, then KILL
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap 'echo; echo "== stopping"; stop_all 1; exit 130' INT
trap 'stop_all 0; exit 143' TERM
trap 'stop_all 0' EXIT

mkdir -p "$LOG_DIR"
if (exec 3<>"/dev/tcp/127.0.0.1/$GEARMAND_PORT") 2>/dev/null; then
  echo "== using the gearmand already listening on 127.0.0.1:$GEARMAND_PORT"
else
  echo "== starting gearmand on 127.0.0.1:$GEARMAND_PORT (its log: $LOG_DIR/gearmand.log)"
  /usr/sbin/gearmand --listen=127.0.0.1 --port="$GEARMAND_PORT" --log-file="$LOG_DIR/gearmand.log" &
  pids+=($!)
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$GEARMAND_PORT") 2>/dev/null && break; sleep 0.1; done
fi

echo "== starting the server"
serve_out="$LOG_DIR/serve.out"
: >"$serve_out"
# The functions the demo page offers (its datalist); anything else is `forbidden`.
"$bin" serve --listen "$LISTEN" --gearmand "127.0.0.1:$GEARMAND_PORT" \
  --allow-function ping --allow-function echo --allow-function reverse \
  --allow-function fail --allow-function boom >"$serve_out" &
serve_pid=$!
pids+=("$serve_pid")
ours+=("$serve_pid")
# The server prints `listening on ws://ADDR` once it is bound: wait for it, and stop with the
# reason if it ends instead (a taken port, a bad flag: its error is on this terminal already).
for _ in $(seq 100); do
  grep -q '^listening on ' "$serve_out" && break
  if ! kill -0 "$serve_pid" 2>/dev/null; then
    echo "demo.sh: the server did not start (is $LISTEN taken by another program?)" >&2
    exit 1
  fi
  sleep 0.1
done
grep -q '^listening on ' "$serve_out" || { echo "demo.sh: the server did not say it was listening" >&2; exit 1; }
cat "$serve_out"

echo "== starting the article's worker (its lines are prefixed with 'worker |')"
# The prefixing sed ignores Ctrl-C, so that it passes on the worker's last lines; it ends when
# the worker's output does.
"$bin" worker --gearmand "127.0.0.1:$GEARMAND_PORT" --report "ws://$LISTEN" > >(trap '' INT; exec sed -u 's/^/worker | /') 2>&1 &
pids+=($!)
ours+=($!)

cat <<EOT

Try it:
  - open http://$LISTEN/ and press "ping" (the article's flow, live), or start a stream job;
  - or paste the article's console snippet in any browser console:
      var socket = new WebSocket("ws://$LISTEN");
      socket.addEventListener("message", function(e) { console.log(e.data) });
      socket.addEventListener("open", function() { socket.send(JSON.stringify({type: "ping"})) });
    -> before the 'received' message ... job: H:... ... value: done
  - or, in another terminal, the article's gearman-client:
      $bin submit ping --gearmand 127.0.0.1:$GEARMAND_PORT
  - health and metrics: curl http://$LISTEN/healthz ; curl http://$LISTEN/metrics
Ctrl-C stops everything.

EOT
# Until one of them ends on its own (or a signal's trap runs).
while true; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo.sh: a program ended (PID $pid); stopping the others" >&2
      exit 1
    fi
  done
  sleep 0.5
done

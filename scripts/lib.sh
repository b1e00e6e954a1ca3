# Sourced by scripts/bench.sh, scripts/bench-uws.sh and scripts/servers.sh (not run on its own): the few process
# helpers both need. The caller defines `die MESSAGE`.
#
#   stop_pid PID                 TERM, up to 5 s, then KILL (nothing for an empty PID)
#   free_port                    a loopback port nobody listens on now
#   wait_for_port PORT PID LOG   until 127.0.0.1:PORT accepts; dies with LOG if PID ends first
#                                or 10 s pass
#   wait_for_line OUT PID        prints ADDR once OUT has `listening on ws://ADDR`; returns 1
#                                if PID ends first or 10 s pass
#   build_gearsock               cargo build --release (unless SKIP_BUILD=1); sets `bin` to the
#                                binary, and dies when it is missing

stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() {
  local port=$1 pid=$2 log=$3
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$log" >&2
  die "gearmand did not come up on 127.0.0.1:$port"
}

wait_for_line() {
  local out=$1 pid=$2 addr
  for _ in $(seq 100); do
    addr=$(sed -n 's#^listening on ws://##p' "$out" | head -n 1)
    [ -z "$addr" ] || { echo "$addr"; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}

build_gearsock() {
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "== building gearsock"
    cargo build --release --quiet
  fi
  bin=target/release/gearsock
  [ -x "$bin" ] || die "$bin is missing"
}

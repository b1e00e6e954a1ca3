# Sourced by scripts/churn.sh, scripts/flood.sh, scripts/scaling.sh and scripts/jobs-ab.sh (not run on its own): installs gearmand
# when it is missing, builds gearsock, starts a private gearmand and a `gearsock serve` on free
# loopback ports, and stops them on exit. Expects `set -euo pipefail` and the repository root
# as the working directory; OUT_DIR must be set (logs go there).
#
#   start_gearmand             sets gearmand_pid, gearmand_port; GEARMAND_THREADS [1] threads,
#                              pinned to GEARMAND_CPU if set
#   start_server [flags...]    sets server_pid, ws (HOST:PORT); pinned to SERVER_CPU if set;
#                              the build is $bin (set it to run another)
#   stop_server                stops it (every process of a group), keeps gearmand
#   machine_line               nproc, kernel, rustc, load average: one line for the report
#   run_bench JSON             runs "${bench[@]}" (pinned to BENCH_CPU if set) within TIMEOUT
#                              seconds into JSON, sets rc, then stops the servers

gearmand_pid="" gearmand_port="" server_pid="" ws=""
bin="${bin:-${CARGO_TARGET_DIR:-target}/release/gearsock}"

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

stop_server() { stop_pid "$server_pid"; server_pid=""; }
stop_servers() { stop_server; stop_pid "$gearmand_pid"; gearmand_pid=""; }
trap stop_servers EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

if [ ! -x /usr/sbin/gearmand ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "== installing gearmand (Debian package gearman-job-server)"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends gearman-job-server
fi
for tool in python3 timeout; do command -v "$tool" >/dev/null || die "$tool is needed"; done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== building gearsock (release)"
  cargo build --release --quiet
fi
[ -x "$bin" ] || die "$bin is missing"
mkdir -p "$OUT_DIR"
# The server holds a descriptor per connection, the bench children theirs: the hard limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

start_gearmand() {
  local pin=()
  [ -z "${GEARMAND_CPU:-}" ] || pin=(taskset -c "$GEARMAND_CPU")
  gearmand_port=$(free_port)
  "${pin[@]}" /usr/sbin/gearmand --listen=127.0.0.1 --port="$gearmand_port" --log-file=stderr \
    --threads="${GEARMAND_THREADS:-1}" >"$OUT_DIR/gearmand.log" 2>&1 </dev/null &
  gearmand_pid=$!
  wait_for_port "$gearmand_port" "$gearmand_pid" "$OUT_DIR/gearmand.log"
}

start_server() {  # [serve flags...]
  local prefix=()
  [ -z "${SERVER_CPU:-}" ] || prefix=(taskset -c "$SERVER_CPU")
  server_cmd=("${prefix[@]}" "$bin" serve --listen 127.0.0.1:0 --gearmand "127.0.0.1:$gearmand_port"
    --log-level warn
    # the functions the bench modes submit (submit is denied by default)
    --allow-function echo --allow-function reverse --allow-function ping --allow-function fail --allow-function boom "$@")
  "${server_cmd[@]}" >"$OUT_DIR/server.out" 2>"$OUT_DIR/server.err" </dev/null &
  server_pid=$!  # taskset execs the server: same pid
  if ws=$(wait_for_line "$OUT_DIR/server.out" "$server_pid"); then
    # Until the gearmand link is up the server is still settling (descriptors, buffers).
    for _ in $(seq 100); do
      python3 - "$ws" <<'PY' && return 0
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://{sys.argv[1]}/healthz", timeout=2)
except Exception:
    sys.exit(1)
PY
      sleep 0.1
    done
    die "the server's gearmand link did not come up"
  fi
  cat "$OUT_DIR/server.err" >&2
  die "the server did not report 'listening on ws://...'"
}

machine_line() {
  printf '%s CPUs, kernel %s, %s, load average %s\n' "$(nproc --all)" "$(uname -r)" \
    "$(rustc -V 2>/dev/null || echo 'rustc unknown')" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

run_bench() {  # JSON
  [ -z "$BENCH_CPU" ] || bench=(taskset -c "$BENCH_CPU" "${bench[@]}")
  echo "== server: ${server_cmd[*]}"
  echo "== bench:  ${bench[*]}"
  echo "== started $(date -u +'%Y-%m-%d %H:%M:%S UTC')"
  rc=0
  timeout -k 5 "$TIMEOUT" "${bench[@]}" >"$1" || rc=$?
  [ "$rc" != 124 ] || die "the bench did not finish within $TIMEOUT s"
  stop_servers
}

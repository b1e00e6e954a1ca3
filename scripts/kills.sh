#!/usr/bin/env bash
# Kills under load (issue 9, item 6). Steady mixed load (stream and background jobs, the
# article's pings, failing and throwing jobs) through a real `gearsock serve` against a real
# gearmand with `gearsock worker`s, while gearmand is SIGKILLed and restarted on its port
# three times and a worker is SIGKILLed mid-job; at the end the bench sends gearsock SIGTERM.
# Prints the reconcile and a verdict; exits 1 when any check fails.
#
#   scripts/kills.sh                 # about 30 s
#   DURATION=40 CONNECTIONS=50 scripts/kills.sh
#
# Everything runs on 127.0.0.1, every process started here is stopped by its pid on exit, and
# the run ends by itself (the bench has a hard bound; each wait below has a time limit).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30}          # seconds of load; SIGTERM comes at SIGTERM_AT, under load
SIGTERM_AT=${SIGTERM_AT:-20}
CONNECTIONS=${CONNECTIONS:-20}
IN_FLIGHT=${IN_FLIGHT:-2}
KILLS_AT=${KILLS_AT:-"3 8 13"}    # seconds into the load: gearmand SIGKILL + restart
DOWN_MS=${DOWN_MS:-500}           # how long gearmand stays dead each time
WORKER_KILL_AT=${WORKER_KILL_AT:-16}
WORKER_THREADS=${WORKER_THREADS:-12}  # per `gearsock worker` (two, and a third after the worker kill)
OUT=${OUT:-$(mktemp -d /tmp/gearsock-kills.XXXXXX)}
mkdir -p "$OUT"

# shellcheck source=scripts/processes.sh
source scripts/processes.sh

# True once gearmand on $GPORT answers its admin `version`.
gearmand_answers() {
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$GPORT" 2>/dev/null || return 1
  printf 'version\n' >&3
  read -r -t 2 reply <&3 || true
  exec 3>&- 3<&-
  [[ "$reply" == OK* ]]
}

start_gearmand() {
  /usr/sbin/gearmand --listen=127.0.0.1 --port="$GPORT" --log-file=stderr --threads=1 \
    >>"$OUT/gearmand.log" 2>&1 &
  GPID=$!
  pids+=("$GPID")
  for _ in $(seq 500); do gearmand_answers && return; sleep 0.02; done
  echo "kills.sh: gearmand did not come up on $GPORT" >&2; exit 1
}

start_worker() { # $1: name; the pid goes to $WPID (not printed: a subshell would lose pids)
  "$GEARSOCK" worker --gearmand "127.0.0.1:$GPORT" --report "ws://$ADDR" --count 3 --interval-ms 20 \
    --concurrency "$WORKER_THREADS" >"$OUT/$1.out" 2>"$OUT/$1.log" &
  WPID=$!
  pids+=("$WPID")
}

now_s() { date +%s.%N; }
# Sleeps until $1 seconds after the load started.
at() { local wait; wait=$(echo "$LOAD_T0 + $1 - $(now_s)" | bc); if [ "${wait:0:1}" != "-" ]; then sleep "$wait"; fi; }

GPORT=$(free_port)
start_gearmand
"$GEARSOCK" serve --listen 127.0.0.1:0 --gearmand "127.0.0.1:$GPORT" --reconnect-min-ms 50 \
  --reconnect-max-ms 500 --poll-interval-ms 50 --allow-function echo --allow-function reverse --allow-function ping --allow-function fail --allow-function boom \
  >"$OUT/serve.out" 2>"$OUT/serve.log" &
SPID=$!
pids+=("$SPID")
for _ in $(seq 500); do grep -q '^listening on' "$OUT/serve.out" 2>/dev/null && break; sleep 0.01; done
ADDR=$(sed -n 's|^listening on ws://||p' "$OUT/serve.out")
[ -n "$ADDR" ] || { echo "kills.sh: gearsock serve did not start" >&2; cat "$OUT/serve.log" >&2; exit 1; }
start_worker worker1
W1=$WPID
start_worker worker2

"$GEARSOCK" bench mixed --url "ws://$ADDR" --connections "$CONNECTIONS" --in-flight "$IN_FLIGHT" \
  --duration-s "$DURATION" --sigterm-after-s "$SIGTERM_AT" --pid "$SPID" --spawn-workers 1 \
  --gearmand "127.0.0.1:$GPORT" --interval-s 1 --settle-s 15 --json >"$OUT/bench.json" 2>"$OUT/bench.log" &
BPID=$!
pids+=("$BPID")
for _ in $(seq 1000); do grep -q 'load started' "$OUT/bench.log" 2>/dev/null && break; sleep 0.01; done
grep -q 'load started' "$OUT/bench.log" || { echo "kills.sh: the bench did not start" >&2; cat "$OUT/bench.log" >&2; exit 1; }
LOAD_T0=$(now_s)
echo "kills.sh: gearmand 127.0.0.1:$GPORT, gearsock ws://$ADDR (pid $SPID), load started; logs in $OUT"

restarts=0
for t in $KILLS_AT; do
  at "$t"
  kill -KILL "$GPID"
  wait "$GPID" 2>/dev/null || true
  sleep "$(echo "$DOWN_MS / 1000" | bc -l)"
  start_gearmand
  restarts=$((restarts + 1))
  LAST_RESTART_S=$(echo "$(now_s) - $LOAD_T0" | bc)
  echo "kills.sh: $(printf '%.1f' "$(echo "$(now_s) - $LOAD_T0" | bc)") s: gearmand SIGKILLed and restarted ($restarts)"
done

at "$WORKER_KILL_AT"
# Mid-job: gearmand says worker1 holds jobs (its connections list functions while it works;
# `gearadmin --status` shows running jobs); the worker's last line is not `waiting`.
mid_job=no
for _ in $(seq 100); do
  last=$(tail -n 1 "$OUT/worker1.out" 2>/dev/null || true)
  if [[ "$last" == ping* || "$last" == received* ]]; then mid_job=yes; break; fi
  sleep 0.01
done
kill -KILL "$W1"
echo "kills.sh: $(printf '%.1f' "$(echo "$(now_s) - $LOAD_T0" | bc)") s: worker1 SIGKILLed (last line: ${last:-none}; mid-job: $mid_job)"
start_worker worker3

# The bench sends SIGTERM at $SIGTERM_AT s and ends once every connection is closed.
bench_rc=0
wait "$BPID" || bench_rc=$?
serve_rc=""
for _ in $(seq 1000); do
  if ! kill -0 "$SPID" 2>/dev/null; then break; fi
  sleep 0.01
done
if kill -0 "$SPID" 2>/dev/null; then serve_rc="still running"; else wait "$SPID" && serve_rc=0 || serve_rc=$?; fi

j() { jq -r "$1" "$OUT/bench.json"; }
echo
echo "== kills under load: reconcile =="
echo "  $(j '.reconcile.formula')"
echo "  sent by kind: $(j '.sent | to_entries | map("\(.key) \(.value)") | join(", ")')"
echo "  ended by kind: $(j '.ended_by_kind | tojson')"
echo "  terminal details:"
j '.terminal_details | to_entries[] | "    \(.value)  \(.key)"'
echo "  anomalies (duplicates, strays): $(j '.anomalies | tojson'); missing: $(j '.missing | tojson')"
echo "  clients: $(j '.clients.established') up, closed by server $(j '.clients.closed_by_server | tojson'), closed before SIGTERM $(j '.clients.closed_before_sigterm'), dropped $(j '.clients.dropped')"
echo "  SIGTERM at $(j '.sigterm.at_s') s: $(j '.sigterm.replies_after') replies after it ($(j '.sigterm.terminal_replies_after') terminal), closes $(j '.sigterm.first_close_after_ms')-$(j '.sigterm.last_close_after_ms') ms after it, $(j '.unread_at_close') jobs unread at close"
echo "  gearsock: exit $serve_rc; gearmand links lost $(grep -c ' lost (' "$OUT/serve.log" || true), back $(grep -cE 'back after|connected$' "$OUT/serve.log" || true)"
echo "  job latency (ms, every kind): $(j '.latency_ms.all | tojson'); slowest: $(j '.latency_ms.slowest | tojson')"
echo "  by kind: $(j '.latency_ms.by_kind | to_entries | map("\(.key) p50 \(.value.p50) p99 \(.value.p99)") | join(", ")')"
echo "  last normal end per kind (s): $(j '.last_normal_end_s | tojson'); last gearmand restart at $(printf '%.1f' "$LAST_RESTART_S") s"

problems=()
[ "$bench_rc" = 0 ] || problems+=("the bench's verdict: $(j '.verdict.problems | join("; ")')")
[ "$serve_rc" = 0 ] || problems+=("gearsock serve exit status after SIGTERM: $serve_rc")
[ "$restarts" = "$(echo $KILLS_AT | wc -w)" ] || problems+=("gearmand restarts: $restarts")
[ "$mid_job" = yes ] || problems+=("worker1 was not seen mid-job when it was killed")
lost=$(grep -c ' lost (' "$OUT/serve.log" || true)
[ "$lost" -ge "$restarts" ] || problems+=("gearsock noticed $lost gearmand losses for $restarts kills")
[ "$(j '.terminal."job.lost" + .terminal."job.failed"')" -gt 0 ] || problems+=("no job ended lost or failed: the kills did not hit jobs in flight")
# Every kind of job recovers: one of each ends as it should after the last gearmand restart.
for kind in $(j '.sent | keys[] | select(. != "total")'); do
  last=$(j ".last_normal_end_s.\"$kind\" // -1")
  if [ "$(echo "$last < $LAST_RESTART_S" | bc)" = 1 ]; then
    problems+=("no $kind job ended as it should after the last gearmand restart (at $LAST_RESTART_S s; last: $last s)")
  fi
done
echo
if [ ${#problems[@]} -eq 0 ]; then
  echo "verdict: ok (every job sent got exactly one terminal reply or was unread at the 1001 close; no client dropped)"
else
  echo "verdict: FAILED"
  for p in "${problems[@]}"; do echo "  - $p"; done
  exit 1
fi

#!/usr/bin/env bash
# Scale-out figures for docs/SCALING.md: what 1, 2 and 4 `gearsock serve` processes hold and do on
# this machine.
#
#   held   for each process count P: P x PER_PROCESS idle connections at once, opened by
#          several `gearsock bench connect` processes (each its own source addresses
#          127.0.K.1-4: one process opens at most ~19,000), then held; prints how many each
#          server process held (the group's /metrics) and the group's RSS per connection
#   rates  for each P: round trips (100 connections x 16 in flight) and handshakes (10,000
#          connections, 100 at a time), bench with 2 event loops, nothing pinned
#   jobs   stream jobs (echo, 16 bytes, 50 x 4) through 1 process, then through 2 instances
#          (--processes 2) sharing one gearmand, and a direct Gearman client as the baseline
#
# usage: scripts/scaling.sh [held|rates|jobs|all]          (default all; about 6 minutes)
# environment: PROCESS_COUNTS ["1 2 4"]  PER_PROCESS [19000] connections per server process
#   HOLD [40] s the held connections stay open  DURATION [5] s per timed run  SKIP_BUILD=1
#   JOBS_SERVE_FLAGS [--sched-batch] extra `serve` flags for the jobs runs
# Raw JSON and logs go to target/scaling/.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
WHAT="${1:-all}"
PROCESS_COUNTS="${PROCESS_COUNTS:-1 2 4}"
PER_PROCESS="${PER_PROCESS:-19000}"
HOLD="${HOLD:-40}"
DURATION="${DURATION:-5}"
JOBS_SERVE_FLAGS="${JOBS_SERVE_FLAGS---sched-batch}"
OUT_DIR=target/scaling
SERVER_CPU="" BENCH_CPU=""  # a group needs both cores; nothing is pinned
case "$WHAT" in held|rates|jobs|all) ;; *) echo "unknown part '$WHAT' (held, rates, jobs, all)" >&2; exit 2 ;; esac

# shellcheck source=scripts/servers.sh
. scripts/servers.sh

# The event-loop processes of the running server: its children in a group, or itself.
loop_pids() {
  local kids
  kids=$(pgrep -P "$server_pid" -d ' ' || true)
  echo "${kids:-$server_pid}"
}

# Sum of VmRSS (KiB) of the given pids.
rss_kib() {
  local total=0 pid kib
  for pid in "$@"; do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kib:-0}))
  done
  echo "$total"
}

# The group's open connections per process, e.g. "0=19003 1=18998" (from any process's /metrics;
# the request's own connection is among them).
held_per_process() {
  python3 - "$ws" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
counts = {}
for line in text.splitlines():
    m = re.match(r'gearsock_connections_open(?:\{(.*)\})? (\d+)', line)
    if m:
        p = re.search(r'process="(\d+)"', m.group(1) or "")
        counts[p.group(1) if p else "0"] = int(m.group(2))
print(" ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))))
PY
}

# Connections the bench holds: the sum of the counts, less the /metrics request's own.
# The kernel's slab memory (KiB): socket structures of both ends of every loopback connection.
slab_kib() { awk '/^Slab:/ {print $2}' /proc/meminfo; }

sum_counts() { local t=-1 kv; for kv in $1; do t=$((t + ${kv#*=})); done; echo "$t"; }

json_field() {  # FILE KEY... : prints d[KEY][KEY]...
  python3 - "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    d = d[k]
print(round(d) if isinstance(d, float) else d)
PY
}

echo "== machine: $(machine_line), open-file limit $(ulimit -n) per process"
start_gearmand
summary=()

held() {
  local p=$1 total=$((p * PER_PROCESS)) benches pids rss0 rss1 counts k per deadline
  start_server --processes "$p" --max-connections $((PER_PROCESS + 800))
  pids=$(loop_pids)
  # shellcheck disable=SC2086
  rss0=$(rss_kib $pids)
  local slab0 slab1
  slab0=$(slab_kib)
  benches=$(( (total + 18999) / 19000 ))
  per=$(( (total + benches - 1) / benches ))
  echo "== held: $p process(es), $total connections from $benches bench processes"
  local bench_pids=()
  for k in $(seq "$benches"); do
    "$bin" bench connect --url "ws://$ws" --connections "$per" --concurrency 100 --hold "$HOLD" \
      --source-base "127.0.$k.1" --source-ips 4 --timeout-s 30 --json \
      >"$OUT_DIR/held-$p-$k.json" 2>"$OUT_DIR/held-$p-$k.err" &
    bench_pids+=($!)
  done
  # Every connection open at once: read the group's memory then.
  deadline=$((SECONDS + HOLD))
  counts=""
  while [ $SECONDS -lt $deadline ]; do
    counts=$(held_per_process)
    [ "$(sum_counts "$counts")" -lt $((per * benches)) ] || break
    sleep 1
  done
  # shellcheck disable=SC2086
  rss1=$(rss_kib $pids)
  slab1=$(slab_kib)
  local held_now
  held_now=$(sum_counts "$counts")
  local ok=0
  for b in "${bench_pids[@]}"; do wait "$b" || ok=1; done
  stop_server
  local per_conn kernel
  per_conn=$(( held_now > 0 ? (rss1 - rss0) * 1024 / held_now : 0 ))
  kernel=$(( held_now > 0 ? (slab1 - slab0) * 1024 / held_now : 0 ))
  echo "   held $held_now at once (per process: $counts); group RSS $((rss0 / 1024)) -> $((rss1 / 1024)) MiB, $per_conn bytes per connection; kernel slab +$(( (slab1 - slab0) / 1024 )) MiB, $kernel bytes per connection (both ends); benches $([ $ok = 0 ] && echo ok || echo 'FAILED')"
  summary+=("held P=$p: $held_now connections ($counts), $per_conn B/conn in the group's RSS, $kernel B/conn kernel slab (both ends), group RSS $((rss1 / 1024)) MiB")
}

rates() {
  local p=$1 rt hs
  start_server --processes "$p"
  echo "== rates: $p process(es)"
  "$bin" bench roundtrip --url "ws://$ws" --connections 100 --in-flight 16 --duration-s "$DURATION" \
    --warmup-s 1 --threads 2 --json >"$OUT_DIR/roundtrip-$p.json" 2>"$OUT_DIR/roundtrip-$p.err" || true
  "$bin" bench connect --url "ws://$ws" --connections 10000 --concurrency 100 --threads 2 --json \
    >"$OUT_DIR/connect-$p.json" 2>"$OUT_DIR/connect-$p.err" || true
  stop_server
  rt=$(json_field "$OUT_DIR/roundtrip-$p.json" websocket messages_per_s)
  hs=$(json_field "$OUT_DIR/connect-$p.json" handshakes_per_s)
  echo "   round trips $rt msg/s, handshakes $hs /s"
  summary+=("rates P=$p: $rt round trips/s, $hs handshakes/s")
}

jobs() {
  local p=$1 bridge direct
  # shellcheck disable=SC2086
  start_server --processes "$p" $JOBS_SERVE_FLAGS
  echo "== jobs: $p instance(s) on one gearmand (serve flags: ${JOBS_SERVE_FLAGS:-none})"
  "$bin" bench jobs --url "ws://$ws" --function echo --payload-bytes 16 --connections 50 --in-flight 4 \
    --duration-s "$DURATION" --warmup-s 1 --spawn-workers 2 --gearmand "127.0.0.1:$gearmand_port" \
    --baseline --json >"$OUT_DIR/jobs-$p.json" 2>"$OUT_DIR/jobs-$p.err" || true
  stop_server
  bridge=$(json_field "$OUT_DIR/jobs-$p.json" bridge jobs_per_s)
  direct=$(json_field "$OUT_DIR/jobs-$p.json" baseline jobs_per_s)
  echo "   through gearsock $bridge jobs/s, direct Gearman client $direct jobs/s"
  summary+=("jobs P=$p: $bridge jobs/s through gearsock, $direct direct")
}

for p in $PROCESS_COUNTS; do
  case "$WHAT" in held|all) held "$p" ;; esac
done
for p in $PROCESS_COUNTS; do
  case "$WHAT" in rates|all) rates "$p" ;; esac
done
case "$WHAT" in jobs|all) jobs 1; jobs 2 ;; esac

echo "== summary"
printf '   %s\n' "${summary[@]}"

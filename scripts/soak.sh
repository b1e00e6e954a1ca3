#!/usr/bin/env bash
# Soak (issue 9, item 7): steady mixed load (stream and background jobs, the article's pings,
# failing and throwing jobs) through a real `gearsock serve` against a real gearmand and
# `gearsock worker`s for SECONDS (default 600). Every 30 s the bench samples the server's RSS
# (VmRSS), its open descriptors (/proc/PID/fd) and the p50/p99 job latency of that interval
# (from sending a job to its terminal reply, every kind of job). Prints the table and a verdict;
# exits 1 when the run is not flat or the reconcile fails.
#
# Flat means, with the first sample (30 s in) as the reference once everything is warm:
#   - RSS: no sample more than 10 % above the reference, and the last within 5 %;
#   - descriptors: every sample within 2 of the reference (the count of clients, workers' report
#     connections and gearmand links does not change in a steady run);
#   - p99 latency: no trend: the median p99 of the second half of the samples is at most 1.5x
#     that of the first half (the machine is shared; single intervals may spike).
#
#   scripts/soak.sh          # 10 minutes
#   scripts/soak.sh 120      # 2 minutes
#   SERVE_FLAGS='--processes 2' scripts/soak.sh 120   # through a group: the workers' reports
#       then often land in the process that does not hold the ping and are forwarded (the RSS
#       and descriptors sampled are the supervisor's; the reconcile is what counts)
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TOTAL=${1:-600}
INTERVAL=${INTERVAL:-30}
CONNECTIONS=${CONNECTIONS:-20}
IN_FLIGHT=${IN_FLIGHT:-2}
WORKER_THREADS=${WORKER_THREADS:-24}  # per `gearsock worker` (two of them): more than the jobs out, so
                                     # latency is the system's, not a queue for workers
OUT=${OUT:-$(mktemp -d /tmp/gearsock-soak.XXXXXX)}
mkdir -p "$OUT"
if [ "$SECONDS_TOTAL" -lt $((INTERVAL * 4)) ]; then
  echo "soak.sh: run at least $((INTERVAL * 4)) s (four samples) to judge a trend" >&2
  exit 2
fi

# shellcheck source=scripts/processes.sh
source scripts/processes.sh

GPORT=$(free_port)
/usr/sbin/gearmand --listen=127.0.0.1 --port="$GPORT" --log-file=stderr --threads=1 >"$OUT/gearmand.log" 2>&1 &
pids+=($!)
for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$GPORT") 2>/dev/null && break; sleep 0.02; done
# shellcheck disable=SC2086
"$GEARSOCK" serve --listen 127.0.0.1:0 --gearmand "127.0.0.1:$GPORT" --poll-interval-ms 50 ${SERVE_FLAGS:-} \
  --allow-function echo --allow-function reverse --allow-function ping --allow-function fail --allow-function boom \
  >"$OUT/serve.out" 2>"$OUT/serve.log" &
SPID=$!
pids+=("$SPID")
for _ in $(seq 500); do grep -q '^listening on' "$OUT/serve.out" 2>/dev/null && break; sleep 0.01; done
ADDR=$(sed -n 's|^listening on ws://||p' "$OUT/serve.out")
[ -n "$ADDR" ] || { echo "soak.sh: gearsock serve did not start" >&2; cat "$OUT/serve.log" >&2; exit 1; }
for w in 1 2; do
  "$GEARSOCK" worker --gearmand "127.0.0.1:$GPORT" --report "ws://$ADDR" --count 3 --interval-ms 20 \
    --concurrency "$WORKER_THREADS" >"$OUT/worker$w.out" 2>"$OUT/worker$w.log" &
  pids+=($!)
done

echo "soak.sh: ${SECONDS_TOTAL} s of mixed load on ws://$ADDR (pid $SPID), a sample every ${INTERVAL} s; logs in $OUT"
bench_rc=0
timeout $((SECONDS_TOTAL + 120)) "$GEARSOCK" bench mixed --url "ws://$ADDR" --connections "$CONNECTIONS" \
  --in-flight "$IN_FLIGHT" --duration-s "$SECONDS_TOTAL" --interval-s "$INTERVAL" --pid "$SPID" \
  --spawn-workers 1 --gearmand "127.0.0.1:$GPORT" --json >"$OUT/bench.json" 2> >(tee "$OUT/bench.log" >&2) \
  || bench_rc=$?
# The server's own figures at the end of the load (of the whole group with --processes).
python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
  "http://$ADDR/metrics" >"$OUT/metrics.txt" 2>/dev/null || true
kill -TERM "$SPID"
serve_rc=""
for _ in $(seq 1000); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.01; done
if kill -0 "$SPID" 2>/dev/null; then serve_rc="still running"; else wait "$SPID" && serve_rc=0 || serve_rc=$?; fi

j() { jq -r "$1" "$OUT/bench.json"; }
echo
echo "== soak: ${SECONDS_TOTAL} s, $CONNECTIONS connections x $IN_FLIGHT jobs + 1 ping, $(nproc) CPUs =="
printf '%8s  %10s  %8s  %10s  %10s  %9s  %5s\n' "t (s)" "jobs ended" "jobs/s" "p50 (ms)" "p99 (ms)" "RSS (KiB)" "fds"
j ".intervals[] | [.t_s, .jobs_ended, (.jobs_ended / $INTERVAL), .latency_ms.p50, .latency_ms.p99, .rss_kib, .fds] | @tsv" |
  while IFS=$'\t' read -r t n rate p50 p99 rss fds; do
    printf '%8.0f  %10d  %8.1f  %10.2f  %10.2f  %9d  %5d\n' "$t" "$n" "$rate" "$p50" "$p99" "$rss" "$fds"
  done
echo "  reconcile: $(j '.reconcile.formula')"
echo "  anomalies: $(j '.anomalies | tojson'); missing: $(j '.missing | tojson'); clients dropped: $(j '.clients.dropped'), closed by server: $(j '.clients.closed_by_server | tojson')"
echo "  job latency over the whole run (ms): $(j '.latency_ms.all | tojson')"

# The verdict, from the samples (the first one is the reference).
verdict=$(jq -r '
  def median: sort | if length == 0 then 0 else .[(length - 1) / 2 | floor] end;
  .intervals as $s | $s[0] as $ref | ($s | length) as $n |
  ($s | map(.rss_kib) | max) as $rss_max | $s[-1].rss_kib as $rss_last |
  ($s | map(.fds - $ref.fds | fabs) | max) as $fd_dev |
  ($s[: ($n / 2 | floor)] | map(.latency_ms.p99) | median) as $p99_first |
  ($s[($n / 2 | floor) :] | map(.latency_ms.p99) | median) as $p99_second |
  [
    (if $rss_max > $ref.rss_kib * 1.10 then "RSS peaked at \($rss_max) KiB, over 10 % above the reference \($ref.rss_kib) KiB" else empty end),
    (if $rss_last > $ref.rss_kib * 1.05 then "RSS ended at \($rss_last) KiB, over 5 % above the reference \($ref.rss_kib) KiB" else empty end),
    (if $fd_dev > 2 then "descriptors moved by \($fd_dev) from the reference \($ref.fds)" else empty end),
    (if $p99_second > $p99_first * 1.5 then "p99 grew: median \($p99_first) ms in the first half, \($p99_second) ms in the second" else empty end),
    "summary: RSS \($ref.rss_kib) -> \($rss_last) KiB (max \($rss_max)); fds \($ref.fds) (max deviation \($fd_dev)); median p99 \($p99_first) -> \($p99_second) ms"
  ] | .[]' "$OUT/bench.json")
problems=()
while IFS= read -r line; do
  case "$line" in
    summary:*) echo "  $line" ;;
    ?*) problems+=("$line") ;;
  esac
done <<<"$verdict"
[ "$bench_rc" = 0 ] || problems+=("the bench's verdict (exit $bench_rc): $(j '.verdict.problems | join("; ")' 2>/dev/null || echo none)")
[ "$serve_rc" = 0 ] || problems+=("gearsock serve exit status after SIGTERM: $serve_rc")
echo
if [ ${#problems[@]} -eq 0 ]; then
  echo "verdict: flat (RSS, descriptors and p99 latency as defined above), every job accounted for"
else
  echo "verdict: FAILED"
  for p in "${problems[@]}"; do echo "  - $p"; done
  exit 1
fi

#!/usr/bin/env bash
# Same-run A/B of two gearsock builds on the job path (`gearsock bench jobs`, bridge only).
#
# One private gearmand serves both builds. PAIRS times, for 50 × 4 and then 50 × 16 in flight,
# each build gets a fresh `gearsock serve` and a short bench run; the order inside a pair
# alternates (A B, then B A), so a machine that gets busier or quieter favours neither. Prints
# each pair and, per scenario, the median of B ÷ A with its quartiles: on a shared machine
# absolute rates swing 2× from one minute to the next, and only such same-run ratios mean
# something. The bench and the workers it spawns come from build B.
#
# usage: scripts/jobs-ab.sh A_BINARY B_BINARY [PAIRS]     (default 10 pairs: about 2.5 minutes)
# environment (defaults in brackets):
#   FLAGS_A, FLAGS_B []      extra `serve` flags per build (e.g. FLAGS_B=--sched-batch)
#   DURATION [2], WARMUP [0.5]  measured and warm-up seconds of each run
#   SERVER_CPU [0], BENCH_CPU [1]  taskset CPUs of the server and the bench
#   GEARMAND_CPU []          gearmand's CPU; empty: left to the scheduler (issue 22, goal 5)
#   GEARMAND_THREADS [1]     gearmand --threads (scripts/bench.sh keeps 1 on this machine)
#   LOCK [/tmp/gearsock-bench.lock]  each pair runs under `flock LOCK` (empty: no lock)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
[ $# -ge 2 ] || { usage >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2") PAIRS="${3:-10}"
[ -x "$A" ] && [ -x "$B" ] || { echo "jobs-ab.sh: both builds must be executable files" >&2; exit 2; }
[[ $PAIRS =~ ^[1-9][0-9]*$ ]] || { echo "jobs-ab.sh: PAIRS must be a whole number, not '$PAIRS'" >&2; exit 2; }
read -r -a flags_a <<<"${FLAGS_A:-}"
read -r -a flags_b <<<"${FLAGS_B:-}"
DURATION="${DURATION:-2}" WARMUP="${WARMUP:-0.5}"
SERVER_CPU="${SERVER_CPU:-0}" BENCH_CPU="${BENCH_CPU:-1}" GEARMAND_CPU="${GEARMAND_CPU:-}"
GEARMAND_THREADS="${GEARMAND_THREADS:-1}" LOCK="${LOCK-/tmp/gearsock-bench.lock}"

OUT_DIR=target/jobs-ab SKIP_BUILD=1 bin=$B
# shellcheck source=scripts/servers.sh
. scripts/servers.sh
rows="$OUT_DIR/pairs.txt"
: >"$rows"
start_gearmand

one() {  # BINARY IN_FLIGHT [serve flags...]: sets rate, the bridge's jobs/s (0 when the run failed)
  local in_flight=$2
  bin=$1
  shift 2
  start_server "$@"
  rate=$(taskset -c "$BENCH_CPU" "$B" bench jobs --url "ws://$ws" --gearmand "127.0.0.1:$gearmand_port" \
    --function echo --payload-bytes 16 --spawn-workers 2 --connections 50 --in-flight "$in_flight" \
    --duration-s "$DURATION" --warmup-s "$WARMUP" --json 2>>"$OUT_DIR/bench.err" </dev/null |
    python3 -c 'import json, sys; print(round(json.load(sys.stdin)["bridge"]["jobs_per_s"]))' 2>/dev/null) || rate=0
  stop_server
  rate=${rate:-0}
}

pair() {  # ROUND IN_FLIGHT: one run of each build, in the order the round asks
  local a b
  if [ $(($1 % 2)) = 1 ]; then one "$A" "$2" "${flags_a[@]}"; a=$rate; one "$B" "$2" "${flags_b[@]}"; b=$rate
  else one "$B" "$2" "${flags_b[@]}"; b=$rate; one "$A" "$2" "${flags_a[@]}"; a=$rate; fi
  echo "$2 $a $b" | tee -a "$rows" | awk '{ printf "50x%-3s A %7d  B %7d  B/A %s\n", $1, $2, $3, ($2 > 0 ? sprintf("%.3f", $3 / $2) : "-") }'
}

for round in $(seq "$PAIRS"); do
  for in_flight in 4 16; do
    if [ -n "$LOCK" ]; then exec 9>"$LOCK"; flock 9; pair "$round" "$in_flight"; flock -u 9
    else pair "$round" "$in_flight"; fi
  done
done

python3 - "$rows" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for in_flight in ("4", "16"):
    r = [int(b) / int(a) for i, a, b in rows if i == in_flight and int(a) > 0 and int(b) > 0]
    if len(r) >= 2:
        q = statistics.quantiles(r, n=4)
        print(f"50x{in_flight}: B/A median {statistics.median(r):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}, "
              f"B ahead in {sum(x > 1 for x in r)} of {len(r)} pairs")
PY

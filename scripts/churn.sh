#!/usr/bin/env bash
# Connection churn: does the server give back what each connection took?
#
# Starts a private gearmand and a fresh `gearsock serve`, then runs `gearsock bench churn`:
# CYCLES whole connections, CONNECTIONS at a time, each one connect, WebSocket upgrade, the
# article's {"type":"worker.complete","id":1,"value":"done"} answered `got it!`, and the close
# handshake. The server's RSS and open descriptors are read before the first cycle, after
# every tenth and at the end, each time once it has reaped the closed connections. Prints the
# figures and the verdict; exits nonzero if a criterion fails:
#   - every cycle completed (upgrade, reply, the server's close frame and FIN);
#   - RSS after the last 90 % of the cycles is at most MAX_GROWTH_PCT (1) % above RSS after the
#     first 10 % (the first tenth is where the allocator's heap, buffers and tables settle);
#   - the server's descriptors are back at the baseline.
#
# usage: scripts/churn.sh [CYCLES]      (default 100000; about 30 s on 2 busy cores)
# environment: CONNECTIONS [50]  MAX_GROWTH_PCT [1]  TIMEOUT [300] s for the whole run
#   SERVER_CPU [0], BENCH_CPU [1] (taskset CPUs; empty: not pinned)  SKIP_BUILD=1
# The raw JSON is kept in target/churn/churn-CYCLES.json.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
CYCLES="${1:-100000}"
CONNECTIONS="${CONNECTIONS:-50}"
MAX_GROWTH_PCT="${MAX_GROWTH_PCT:-1}"
TIMEOUT="${TIMEOUT:-300}"
SERVER_CPU="${SERVER_CPU-0}"
BENCH_CPU="${BENCH_CPU-1}"
OUT_DIR=target/churn
[[ $CYCLES =~ ^[1-9][0-9]*$ ]] || { echo "CYCLES must be a whole number, not '$CYCLES'" >&2; exit 2; }
if [ "$(nproc --all)" -lt 2 ]; then SERVER_CPU="" BENCH_CPU=""; fi

# shellcheck source=scripts/servers.sh
. scripts/servers.sh

echo "== machine: $(machine_line)"
start_gearmand
start_server
json="$OUT_DIR/churn-$CYCLES.json"
bench=("$bin" bench churn --url "ws://$ws" --cycles "$CYCLES" --connections "$CONNECTIONS"
  --pid "$server_pid" --max-growth-pct "$MAX_GROWTH_PCT" --json)
run_bench "$json"  # sets rc

python3 - "$json" <<'PY' || rc=$((rc == 0 ? 1 : rc))
import json, sys
d = json.load(open(sys.argv[1]))
kib = lambda b: f"{b / 1024:,.0f} KiB"
print(f"cycles: {d['completed']:,} completed, {d['failed']:,} failed of {d['cycles']:,}, "
      f"{d['connections']} at a time, in {d['elapsed_s']:.1f} s: {d['cycles_per_s']:,.0f} cycles/s")
lat = d["cycle_latency_us"]
print(f"cycle (connect to the server's FIN): p50 {lat['p50']:,.0f} µs, p99 {lat['p99']:,.0f} µs, "
      f"max {lat['max']:,.0f} µs")
for reason, n in d["failures"].items():
    print(f"  failed: {reason}: {n:,}")
s = d["server"]
for c in s["checkpoints"]:
    heap = f", heap {kib(c['heap_resident_bytes'])} of {kib(c['heap_bytes'])}" if c.get("heap_bytes") else ""
    print(f"after {c['cycles']:>9,} cycles: RSS {kib(c['rss_bytes'])} ({kib(c['rss_anon_bytes'])} anon, "
          f"{kib(c['rss_file_bytes'])} file{heap}), {c['fds']} descriptors")
crit = d["criteria"]
verdict = lambda ok: "met" if ok else "NOT MET"
g = crit["rss_growth"]
print(f"every cycle completed: {verdict(crit['every_cycle_completed']['ok'])}")
print(f"RSS growth from {g['from_cycles']:,} cycles to the end: {g['growth_pct']:+.3f} % "
      f"(at most {g['max_pct']} %): {verdict(g['ok'])}")
f = crit["fds_back_to_baseline"]
print(f"descriptors back to the baseline: {f['baseline']} -> {f['end']}: {verdict(f['ok'])}")
first, end = s["checkpoints"][1], s["checkpoints"][-1]
if not g["ok"] and first.get("heap_bytes") and first["heap_bytes"] == end["heap_bytes"]:
    print(f"  note: glibc's [heap] kept its size ({kib(end['heap_bytes'])}) from {first['cycles']:,} cycles "
          f"to the end; its resident part grew {kib(end['heap_resident_bytes'] - first['heap_resident_bytes'])} "
          f"and anonymous RSS {kib(end['rss_anon_bytes'] - first['rss_anon_bytes'])}: pages of a heap the "
          f"allocator already had, touched for the first time (docs/RELIABILITY.md)")
print("verdict:", "PASS" if d["ok"] else "FAIL")
sys.exit(0 if d["ok"] else 1)
PY
exit "$rc"

#!/usr/bin/env bash
# A half-open flood at the connection limit: are real clients still served, do the slow
# connections time out and the surplus get refused, and do the slots come back?
#
# Starts a private gearmand and `gearsock serve --max-connections SLOTS --handshake-timeout-ms
# HANDSHAKE_MS`, then runs `gearsock bench flood`: CLIENTS real clients do a round trip every
# INTERVAL_MS; child processes (at most PER_PROCESS connections each, SOURCE_IPS loopback
# addresses each from 127.0.0.2 on) open SLOTS - CLIENTS connections and BEYOND more, each
# sending a valid upgrade request one byte every 500 ms, so none finishes before the timeout.
# Prints the figures and the verdict; exits nonzero if a criterion fails:
#   - the real clients are served throughout (none lost, every reply right, each gets replies
#     during the flood, none waits a whole handshake timeout);
#   - every trickler the server took gets 408 at the timeout (at least SLOTS - CLIENTS), the
#     ones beyond the limit 503, and nothing else happens to any of them;
#   - the server's CPU over the flood stays at most MAX_CPU_PCT (50) % of one core;
#   - afterwards SLOTS - CLIENTS new connections open and are held at once;
#   - the server's descriptors are back at the baseline.
#
# usage: scripts/flood.sh [SLOTS [HANDSHAKE_MS]]      (defaults 5000 and 2000; about 10 s)
# environment: CLIENTS [100]  BEYOND [50]  INTERVAL_MS [10]  PER_PROCESS [4000]  SOURCE_IPS [4]
#   MAX_CPU_PCT [50]  TIMEOUT [300] s for the whole run
#   SERVER_CPU [0], BENCH_CPU [1] (taskset CPUs; empty: not pinned)  SKIP_BUILD=1
# The raw JSON is kept in target/flood/flood-SLOTS.json.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
SLOTS="${1:-5000}"
HANDSHAKE_MS="${2:-2000}"
CLIENTS="${CLIENTS:-100}"
BEYOND="${BEYOND:-50}"
INTERVAL_MS="${INTERVAL_MS:-10}"
PER_PROCESS="${PER_PROCESS:-4000}"
SOURCE_IPS="${SOURCE_IPS:-4}"
MAX_CPU_PCT="${MAX_CPU_PCT:-50}"
TIMEOUT="${TIMEOUT:-300}"
SERVER_CPU="${SERVER_CPU-0}"
BENCH_CPU="${BENCH_CPU-1}"
OUT_DIR=target/flood
for v in SLOTS HANDSHAKE_MS CLIENTS BEYOND PER_PROCESS SOURCE_IPS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, not '${!v}'" >&2; exit 2; }
done
[ "$CLIENTS" -lt "$SLOTS" ] || { echo "CLIENTS ($CLIENTS) must be below SLOTS ($SLOTS)" >&2; exit 2; }
if [ "$(nproc --all)" -lt 2 ]; then SERVER_CPU="" BENCH_CPU=""; fi

# shellcheck source=scripts/servers.sh
. scripts/servers.sh

echo "== machine: $(machine_line)"
start_gearmand
start_server --max-connections "$SLOTS" --handshake-timeout-ms "$HANDSHAKE_MS"
json="$OUT_DIR/flood-$SLOTS.json"
bench=("$bin" bench flood --url "ws://$ws" --pid "$server_pid" --slots "$SLOTS"
  --handshake-timeout-ms "$HANDSHAKE_MS" --connections "$CLIENTS" --beyond "$BEYOND"
  --interval-ms "$INTERVAL_MS" --per-process "$PER_PROCESS" --source-ips "$SOURCE_IPS"
  --max-cpu-pct "$MAX_CPU_PCT" --json)
run_bench "$json"  # sets rc

python3 - "$json" <<'PY' || rc=$((rc == 0 ? 1 : rc))
import json, sys
d = json.load(open(sys.argv[1]))
f, c, t = d["flood"], d["real_clients"], d["trickle_answers"]
print(f"flood: {d['tricklers']:,} trickling connections ({d['tricklers'] - d['slots'] + d['clients']} beyond "
      f"the {d['slots']:,} slots) from {d['trickle_processes']} processes and "
      f"{d['trickle_source_addresses']} source addresses, lasting {f['duration_s']} s")
lat = c["latency_us"]
print(f"real clients: {c['connected']} connected, {c['round_trips']:,} round trips during the flood "
      f"({c['round_trips_per_s']:,.0f}/s), p50 {lat['p50']:,.0f} µs, p99 {lat['p99']:,.0f} µs, "
      f"max {lat['max']:,.0f} µs; longest wait {c['max_gap_ms']:,.0f} ms (from {c['max_gap_from_ms']:,.0f} ms into "
      f"the flood); failures {c['failures'] or 'none'}")
print(f"tricklers: {t['408']:,} got 408 (after {t['to_408_ms']['min']:,.0f} to {t['to_408_ms']['max']:,.0f} ms), "
      f"{t['503']:,} got 503; other answers {dict((k, v) for k, v in t['statuses'].items() if k not in ('408', '503')) or 'none'}, "
      f"failures {t['failures'] or 'none'}")
print(f"server: {f['server_cpu_pct']} % of one core during the flood; descriptors {f['server_fds_baseline']} "
      f"before, {f['server_fds_peak']} at the peak, {f['server_fds_after']} after, {d['fds_end']} at the end")
sb = d["slots_back"]
print(f"slots back: {sb['established']:,} of {sb['wanted']:,} new connections held at once")
for trouble in d["trouble"]:
    print(f"trouble: {trouble}")
for name, crit in d["criteria"].items():
    print(f"{name}: {'met' if crit['ok'] else 'NOT MET'} ({crit['detail']})")
print("verdict:", "PASS" if d["ok"] else "FAIL")
sys.exit(0 if d["ok"] else 1)
PY
exit "$rc"

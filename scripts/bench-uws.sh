#!/usr/bin/env bash
# gearsock beside uWebSockets, same run: writes the "Beside uWebSockets" section of
# docs/BENCHMARKS.md (between its markers; the rest of the file is left as it is).
#
# The peer is the uWebSockets server in UWS_DIR (`run.sh PORT [echo]`: one thread, epoll;
# without `echo` it answers `got it!` to every text message, with `echo` it sends each back).
# For every scenario and repetition the two servers run one after the other, each fresh and
# pinned to SERVER_CPU, with `gearsock bench` pinned to BENCH_CPU; the table gives the range
# over the repetitions and the ratio gearsock / uWebSockets of each same-run pair.
#   job mode:  `gearsock serve --gearmand ...` (`worker.complete` -> `got it!`) beside uWS `got it!`
#   echo mode: `gearsock serve --echo` beside uWS `echo`
#
# usage: scripts/bench-uws.sh [-h]         (also: scripts/bench.sh uws)
# environment (defaults in brackets):
#   UWS_DIR [../shared/peers/uws, beside the repository]  the peer; missing: skipped with a note
#   REPS [2]  repetitions;  DURATION [4], WARMUP [1]  seconds of the timed scenarios
#   CONNECT_SMALL [10000], CONNECT_LARGE [19000]  idle connections of the connect scenarios
#   SERVER_CPU [0], BENCH_CPU [1];  UWS_SCENARIOS  a subset, e.g. "echo-100x16 connect-10000"
#   OUT [docs/BENCHMARKS.md];  SKIP_BUILD=1  use target/release/gearsock as it is
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "bench-uws.sh: $*" >&2; exit 1; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

UWS_DIR="${UWS_DIR:-../shared/peers/uws}"
REPS="${REPS:-2}"
DURATION="${DURATION:-4}"
WARMUP="${WARMUP:-1}"
CONNECT_SMALL="${CONNECT_SMALL:-10000}"
CONNECT_LARGE="${CONNECT_LARGE:-19000}"
SERVER_CPU="${SERVER_CPU:-0}"
BENCH_CPU="${BENCH_CPU:-1}"
OUT="${OUT:-docs/BENCHMARKS.md}"
OUT_DIR=target/bench/uws
ALL=(roundtrip-100x16 roundtrip-1000x1 echo-1x1 echo-100x1 echo-100x16 echo-1000x1
  connect-10000 connect-10000-echo connect-19000)
read -r -a scenarios <<<"${UWS_SCENARIOS:-${ALL[*]}}"
for s in "${scenarios[@]}"; do
  printf '%s\n' "${ALL[@]}" | grep -qx -- "$s" || die "unknown scenario: $s (known: ${ALL[*]})"
done
for v in REPS CONNECT_SMALL CONNECT_LARGE SERVER_CPU BENCH_CPU; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
for v in DURATION WARMUP; do
  [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds, not '${!v}'"
done

if [ ! -x "$UWS_DIR/run.sh" ]; then
  echo "bench-uws.sh: no uWebSockets peer at $UWS_DIR (run.sh missing; set UWS_DIR):" \
    "the comparison is skipped and $OUT is left as it is." >&2
  exit 0
fi
UWS_DIR="$(cd "$UWS_DIR" && pwd)"
[ -x /usr/sbin/gearmand ] || die "gearmand is needed (scripts/bench.sh installs it)"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
build_gearsock
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json "$OUT_DIR"/*.err
started_at=$(date -u +"%Y-%m-%d %H:%M:%S UTC")

gearmand_pid="" server_pid=""
cleanup() { stop_pid "$server_pid"; stop_pid "$gearmand_pid"; server_pid="" gearmand_pid=""; }
trap cleanup EXIT
trap 'echo "bench-uws.sh: interrupted" >&2; exit 130' INT

gearmand_port=$(free_port)
/usr/sbin/gearmand --listen=127.0.0.1 --port="$gearmand_port" --log-file=stderr \
  >"$OUT_DIR/gearmand.log" 2>&1 </dev/null &
gearmand_pid=$!
wait_for_port "$gearmand_port" "$gearmand_pid" "$OUT_DIR/gearmand.log"

ws=""
start() {  # WHO MODE MAX: a fresh server (gearsock|uws, job|echo); sets ws and server_pid
  local who=$1 mode=$2 max=$3 out="$OUT_DIR/server.out"
  stop_pid "$server_pid"; server_pid=""
  : >"$out"
  if [ "$who" = uws ]; then
    local echo=(); [ "$mode" = echo ] && echo=(echo)
    taskset -c "$SERVER_CPU" "$UWS_DIR/run.sh" "$(free_port)" "${echo[@]}" >"$out" 2>&1 </dev/null &
  else
    local flags=(--gearmand "127.0.0.1:$gearmand_port"); [ "$mode" = echo ] && flags=(--echo)
    taskset -c "$SERVER_CPU" "$bin" serve --listen 127.0.0.1:0 --log-level warn \
      --max-connections "$max" "${flags[@]}" >"$out" 2>&1 </dev/null &
  fi
  server_pid=$!  # taskset and run.sh exec: the server's own pid
  ws=$(wait_for_line "$out" "$server_pid") || { cat "$out" >&2; die "$who did not start"; }
}

measure() {  # SCENARIO WHO REP
  local s=$1 who=$2 rep=$3 mode=job max=$((CONNECT_LARGE + 500)) args=()
  [[ $s == echo-* || $s == *-echo ]] && mode=echo
  local timed=(--duration-s "$DURATION" --warmup-s "$WARMUP")
  local echo=(--expect echo --message-bytes 16)
  case $s in
    roundtrip-100x16) args=(roundtrip --connections 100 --in-flight 16 "${timed[@]}") ;;
    roundtrip-1000x1) args=(roundtrip --connections 1000 --in-flight 1 "${timed[@]}") ;;
    echo-*x*) local cw=${s#echo-}
      args=(roundtrip --connections "${cw%x*}" --in-flight "${cw#*x}" "${echo[@]}" "${timed[@]}") ;;
    connect-10000*) args=(connect --connections "$CONNECT_SMALL" --concurrency 100 --hold 1) ;;
    connect-19000) args=(connect --connections "$CONNECT_LARGE" --concurrency 100 --hold 1 --source-ips 4) ;;
  esac
  start "$who" "$mode" "$max"
  local name="$OUT_DIR/$s.$who.$rep"
  timeout -k 5 300 taskset -c "$BENCH_CPU" "$bin" bench "${args[@]}" --url "ws://$ws" --pid "$server_pid" \
    --json >"$name.json" 2>"$name.err" </dev/null || echo "   $who: exit status $? (see $name.err)" >&2
  stop_pid "$server_pid"; server_pid=""
}

for rep in $(seq "$REPS"); do
  for s in "${scenarios[@]}"; do
    echo "== $s, repetition $rep of $REPS"
    # Alternate which goes first, so neither always runs on the warmer machine.
    if [ $((rep % 2)) = 1 ]; then order=(gearsock uws); else order=(uws gearsock); fi
    for who in "${order[@]}"; do measure "$s" "$who" "$rep"; done
  done
done
cleanup

echo "== writing the uWebSockets section of $OUT"
STARTED_AT="$started_at" SCENARIO_LIST="${scenarios[*]}" REPS="$REPS" DURATION="$DURATION" WARMUP="$WARMUP" \
  SERVER_CPU="$SERVER_CPU" BENCH_CPU="$BENCH_CPU" OUT="$OUT" OUT_DIR="$OUT_DIR" UWS_DIR="$UWS_DIR" \
  python3 - <<'PY'
import json, os, re, subprocess
from pathlib import Path

env = os.environ
out_dir, reps = Path(env["OUT_DIR"]), int(env["REPS"])
scenarios = env["SCENARIO_LIST"].split()


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "unknown"


def load(s, who, rep):
    try:
        return json.loads((out_dir / f"{s}.{who}.{rep}.json").read_text())
    except Exception:
        return None


def figure(d, key):
    if d is None:
        return None
    if d["mode"] == "roundtrip":
        w = d["websocket"]
        if w.get("errors") or w.get("mismatches"):
            return None
        return {"rate": w["messages_per_s"], "p99": w["latency_us"]["p99"]}[key]
    if d.get("established") != d.get("attempted"):
        return None
    return {"rate": d["handshakes_per_s"], "p99": d["handshake_latency_us"]["p99"],
            "rss": (d.get("rss") or {}).get("per_connection_bytes")}[key]


def span(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"


count = lambda v: f"{v:,.0f}"
ms = lambda v: f"{v / 1000:.1f}"
times = lambda v: f"{v:.2f}×"

titles = {
    "roundtrip-100x16": "`worker.complete` → `got it!`, 100 × 16 (msg/s)",
    "roundtrip-1000x1": "`worker.complete` → `got it!`, 1,000 × 1 (msg/s)",
    "echo-1x1": "echo, 1 × 1 (msg/s)",
    "echo-100x1": "echo, 100 × 1 (msg/s)",
    "echo-100x16": "echo, 100 × 16 (msg/s)",
    "echo-1000x1": "echo, 1,000 × 1 (msg/s)",
}
rows = []
for s in scenarios:
    pairs = [(load(s, "gearsock", r), load(s, "uws", r)) for r in range(1, reps + 1)]
    def line(label, key, fmt, ratio_of=lambda a, b: a / b):
        g = [figure(a, key) for a, _ in pairs]
        u = [figure(b, key) for _, b in pairs]
        ratios = [ratio_of(a, b) if a is not None and b else None for a, b in zip(g, u)]
        rows.append([label, span(g, fmt), span(u, fmt), span(ratios, times)])
    if s in titles:
        line(titles[s], "rate", count)
    else:
        n = s.split("-")[1]
        what = "echo" if s.endswith("-echo") else "job mode / `got it!`"
        line(f"handshakes/s, {int(n):,} connections, 100 in flight ({what})", "rate", count)
        line(f"handshake p99 (ms), {int(n):,} connections ({what})", "p99", ms)
        line(f"server RSS per idle connection (bytes), {int(n):,} ({what})", "rss", count)

cpu = next((l.split(":", 1)[1].strip() for l in sh("lscpu").splitlines() if l.startswith("Model name:")),
           "unknown CPU")
md = ["<!-- uws:begin (written by scripts/bench-uws.sh; edits here are replaced) -->",
      "## Beside uWebSockets (same run)\n",
      f"Made by `scripts/bench.sh uws` (`scripts/bench-uws.sh`) on {env['STARTED_AT']}, commit "
      f"{sh('git', 'rev-parse', '--short', 'HEAD')}, on this machine: {cpu}, "
      f"{sh('nproc', '--all')} CPUs, kernel {sh('uname', '-r')}, load average after the run "
      f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}. "
      f"The peer is uWebSockets' own server (`{Path(env['UWS_DIR']).name}/run.sh`, one thread, epoll): "
      "`got it!` to every text message beside gearsock's job mode, `echo` beside `gearsock serve --echo`. "
      f"Each server ran fresh on CPU {env['SERVER_CPU']}, `gearsock bench` on CPU {env['BENCH_CPU']}; "
      f"{reps} repetitions, the two servers one after the other in each (alternating which went first), "
      f"timed scenarios {env['WARMUP']} s warm-up then {env['DURATION']} s measured. Ranges are over the "
      "repetitions; the ratio is gearsock ÷ uWebSockets within each pair (for the p99 and the bytes "
      "lower is better). A run with errors, mismatched replies or failed connections shows as –. "
      f"The raw JSON is in `{out_dir}/`.\n",
      "| | gearsock | uWebSockets | gearsock ÷ uWS |",
      "|:---|---:|---:|---:|"]
md += ["| " + " | ".join(r) + " |" for r in rows]
md.append("<!-- uws:end -->")
section = "\n".join(md)

out = Path(env["OUT"])
text = out.read_text() if out.exists() else "# Benchmarks\n"
pattern = re.compile(r"<!-- uws:begin.*?<!-- uws:end -->", re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
elif "\n## Reproduce" in text:
    text = text.replace("\n## Reproduce", "\n" + section + "\n\n## Reproduce", 1)
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
out.write_text(text)
print(section)
PY
echo "== done: $OUT (raw JSON in $OUT_DIR/)"

#!/usr/bin/env bash
# The end-to-end benchmark suite: writes docs/BENCHMARKS.md.
#
# Installs gearmand from Debian's packages when it is missing, builds gearsock, starts a private
# gearmand and a fresh `gearsock serve` (pinned to SERVER_CPU) for every scenario, runs
# `gearsock bench ... --json` pinned to BENCH_CPU, keeps the raw JSON under target/bench/ and
# renders the tables, the baselines measured in the same run and the targets. Every scenario has a
# same-run baseline: a TCP line echo inside the bench process (roundtrip), a direct Gearman client
# (jobs), a minimal WebSocket upgrade acceptor in a child of the bench process (connect).
#
# usage: scripts/bench.sh [-h] [SCENARIO|GROUP ...]        (default: all)
#   scenarios: roundtrip-100x16 roundtrip-1000x1 jobs-50x4 jobs-50x16 jobs-1x1 connect-10000
#              connect-19000
#   groups:    roundtrip jobs connect all
#   uws        gearsock beside the uWebSockets peer in UWS_DIR [../shared/peers/uws], same run:
#              scripts/bench-uws.sh (its own section of the report; `all` includes it; skipped
#              with a note when the peer is missing; see `scripts/bench-uws.sh -h`)
# environment (defaults in brackets):
#   DURATION [10]  measured seconds of the timed scenarios   WARMUP [2]  their warm-up seconds
#   HOLD [1]       connect: seconds the idle connections are held
#   CONNECT_SMALL [10000], CONNECT_LARGE [19000], MAX_CONNECTIONS [19500]  connect scenarios
#   SERVER_CPU [0], BENCH_CPU [1]  taskset CPUs
#   GEARMAND_CPU [SERVER_CPU]  gearmand's CPU, the same in the bridge and the direct run; set it
#                  empty to leave gearmand to the scheduler
#   JOBS_SERVE_FLAGS [--sched-batch]  extra `serve` flags for the jobs scenarios
#   GEARMAND_THREADS [auto]  auto: measure the default (4) and --threads=1 with the direct
#                  Gearman client for PROBE_DURATION [2] s each and keep the faster; or a number
#   SCENARIOS      the scenarios, when no arguments are given
#   OUT [docs/BENCHMARKS.md]  the report;  SKIP_BUILD=1  use target/release/gearsock as it is
# A quick try: DURATION=1 WARMUP=0.5 scripts/bench.sh roundtrip
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
HOLD="${HOLD:-1}"
CONNECT_SMALL="${CONNECT_SMALL:-10000}"
CONNECT_LARGE="${CONNECT_LARGE:-19000}"
MAX_CONNECTIONS="${MAX_CONNECTIONS:-19500}"
SERVER_CPU="${SERVER_CPU:-0}"
BENCH_CPU="${BENCH_CPU:-1}"
# gearmand shares the server's CPU (see docs/BENCHMARKS.md, "The job path at full speed"): in the
# direct run it has that CPU to itself, in the bridge run the server (under --sched-batch) yields
# to it. Left to the scheduler, it shared a CPU with the server or the workers and waited behind
# them for 44 % of the bridge run while the other CPU idled.
GEARMAND_CPU="${GEARMAND_CPU-$SERVER_CPU}"
JOBS_SERVE_FLAGS="${JOBS_SERVE_FLAGS---sched-batch}"
GEARMAND_THREADS="${GEARMAND_THREADS:-auto}"
PROBE_DURATION="${PROBE_DURATION:-2}"
OUT="${OUT:-docs/BENCHMARKS.md}"
OUT_DIR=target/bench
ALL=(roundtrip-100x16 roundtrip-1000x1 jobs-50x4 jobs-50x16 jobs-1x1 connect-10000 connect-19000)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "bench.sh: $*" >&2; exit 1; }

# ---- which scenarios ----------------------------------------------------------------------

args=("$@")
[ ${#args[@]} -gt 0 ] || read -r -a args <<<"${SCENARIOS:-all}"
selected=() want_uws=0
for a in "${args[@]}"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    all) selected+=("${ALL[@]}"); want_uws=1 ;;
    uws) want_uws=1 ;;
    roundtrip|jobs|connect) for s in "${ALL[@]}"; do [[ $s == "$a"-* ]] && selected+=("$s"); done ;;
    *) printf '%s\n' "${ALL[@]}" | grep -qx -- "$a" || { usage >&2; die "unknown scenario: $a"; }
       selected+=("$a") ;;
  esac
done
# Keep the suite's order, drop duplicates.
scenarios=()
for s in "${ALL[@]}"; do printf '%s\n' "${selected[@]}" | grep -qx -- "$s" && scenarios+=("$s"); done
wants_jobs=0
for s in "${scenarios[@]}"; do [[ $s == jobs-* ]] && wants_jobs=1; done
# Only the peer: its script alone (it leaves the rest of the report as it is).
[ ${#scenarios[@]} -gt 0 ] || exec scripts/bench-uws.sh

for v in DURATION WARMUP HOLD PROBE_DURATION; do
  [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds, not '${!v}'"
done
[[ -z $GEARMAND_CPU || $GEARMAND_CPU =~ ^[0-9]+$ ]] || die "GEARMAND_CPU must be a CPU number or empty"
read -r -a jobs_flags <<<"$JOBS_SERVE_FLAGS"
for v in CONNECT_SMALL CONNECT_LARGE MAX_CONNECTIONS SERVER_CPU BENCH_CPU; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
[[ $GEARMAND_THREADS == auto || $GEARMAND_THREADS =~ ^[0-9]+$ ]] || die "GEARMAND_THREADS: auto or a number"

# ---- prerequisites --------------------------------------------------------------------------

if [ ! -x /usr/sbin/gearmand ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "== installing gearmand (Debian package gearman-job-server)"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends gearman-job-server
fi
for tool in python3 taskset timeout; do command -v "$tool" >/dev/null || die "$tool is needed"; done
cpus=$(nproc --all)
[ "$SERVER_CPU" -lt "$cpus" ] && [ "$BENCH_CPU" -lt "$cpus" ] || die "CPUs $SERVER_CPU and $BENCH_CPU: this machine has $cpus"
[ -z "$GEARMAND_CPU" ] || [ "$GEARMAND_CPU" -lt "$cpus" ] || die "GEARMAND_CPU $GEARMAND_CPU: this machine has $cpus"

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
build_gearsock

mkdir -p "$OUT_DIR"
for s in "${scenarios[@]}" probe-gearmand-default probe-gearmand-1; do
  rm -f "$OUT_DIR/$s".{json,err,rc,cmd,sh} "$OUT_DIR/server-$s".{out,err}
done
started_at=$(date -u +"%Y-%m-%d %H:%M:%S UTC")

# ---- processes ------------------------------------------------------------------------------

gearmand_pid="" server_pid="" bench_pid="" ws=""
gearmand_port="" gearmand_args=()

cleanup() {
  stop_pid "$bench_pid"; stop_pid "$server_pid"; stop_pid "$gearmand_pid"
  bench_pid="" server_pid="" gearmand_pid=""
}
trap cleanup EXIT
trap 'echo "bench.sh: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

pin() {  # CPU: the taskset prefix, or nothing for an empty CPU
  [ -z "$1" ] || printf '%s\n' taskset -c "$1"
}

start_gearmand() {  # THREADS: "default" or a number
  stop_pid "$gearmand_pid"; gearmand_pid=""
  gearmand_port=$(free_port)
  gearmand_args=(/usr/sbin/gearmand --listen=127.0.0.1 --port="$gearmand_port" --log-file=stderr)
  [ "$1" = default ] || gearmand_args+=(--threads="$1")
  local prefix; mapfile -t prefix < <(pin "$GEARMAND_CPU")
  "${prefix[@]}" "${gearmand_args[@]}" >"$OUT_DIR/gearmand.log" 2>&1 </dev/null &
  gearmand_pid=$!
  wait_for_port "$gearmand_port" "$gearmand_pid" "$OUT_DIR/gearmand.log"
}

server_cmd=()
start_server() {  # TAG [serve flags...]: a fresh server; sets ws and server_pid
  local tag=$1; shift
  stop_pid "$server_pid"; server_pid=""
  server_cmd=(taskset -c "$SERVER_CPU" "$bin" serve --listen 127.0.0.1:0
    --gearmand "127.0.0.1:$gearmand_port" --log-level warn
    # the functions the bench modes submit (submit is denied by default)
    --allow-function echo --allow-function reverse --allow-function ping --allow-function fail --allow-function boom "$@")
  local out="$OUT_DIR/server-$tag.out"
  "${server_cmd[@]}" >"$out" 2>"$OUT_DIR/server-$tag.err" </dev/null &
  server_pid=$!  # taskset execs the server: same pid
  ws=$(wait_for_line "$out" "$server_pid") && return 0
  cat "$OUT_DIR/server-$tag.err" >&2
  die "the server did not report 'listening on ws://...'"
}

limit_for() {  # the timeout of a timed run (measured + baseline, both with warm-up) and slack
  awk -v d="$1" -v w="$2" 'BEGIN { printf "%d", 2 * (d + w) + 60 }'
}

run_bench() {  # NAME LIMIT_S bench-args...: JSON to $OUT_DIR/NAME.json, exit status to NAME.rc
  local name=$1 limit=$2; shift 2
  local cmd=(taskset -c "$BENCH_CPU" "$bin" bench "$@" --json)
  # As run, then with the per-run ports and pids as shell variables (for the report).
  local serve run
  serve=$(printf '%q ' "${server_cmd[@]}"); run=$(printf '%q ' "${cmd[@]}")
  printf '%s&\n%s\n' "$serve" "${run% }" >"$OUT_DIR/$name.cmd"
  serve=${serve//"127.0.0.1:$gearmand_port"/'127.0.0.1:$GEARMAND_PORT'}
  run=${run//"127.0.0.1:$gearmand_port"/'127.0.0.1:$GEARMAND_PORT'}
  run=${run//"ws://$ws"/'ws://$WS_ADDR'}
  run=${run//"--pid $server_pid "/'--pid $SERVER_PID '}
  run=${run//"--gearmand-pid $gearmand_pid "/'--gearmand-pid $GEARMAND_PID '}
  printf '%s\n' "$serve>server.out & SERVER_PID=\$!" \
    'sleep 0.5; WS_ADDR=$(sed -n "s#^listening on ws://##p" server.out)' \
    "${run% }" 'kill $SERVER_PID' >"$OUT_DIR/$name.sh"
  local rc=0
  timeout -k 5 "$limit" "${cmd[@]}" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.err" </dev/null &
  bench_pid=$!
  wait "$bench_pid" || rc=$?
  bench_pid=""
  echo "$rc" >"$OUT_DIR/$name.rc"
  if [ "$rc" != 0 ]; then
    echo "   exit status $rc$( [ "$rc" = 124 ] && echo ' (timed out)')" >&2
    tail -n 5 "$OUT_DIR/$name.err" >&2 || true
  fi
}

summary() {  # NAME: one line from the JSON
  python3 - "$OUT_DIR/$1.json" <<'PY' || true
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:
    print("   no JSON"); sys.exit()
if d["mode"] == "connect":
    rss = d.get("rss") or {}
    base = d.get("baseline") or {}
    print(f"   {d['established']:,} of {d['attempted']:,} up, {d['handshakes_per_s']:,.0f} handshakes/s, "
          f"{rss.get('per_connection_bytes', float('nan')):,.0f} bytes RSS per connection"
          + (f"; baseline acceptor {base['handshakes_per_s']:,.0f}/s, ratio {d['ratio']}" if base else ""))
else:
    main, noun = (d["websocket"], "messages") if d["mode"] == "roundtrip" else (d["bridge"], "jobs")
    base = d.get("baseline") or {}
    print(f"   {main[noun + '_per_s']:,.0f} {noun}/s, p50 {main['latency_us']['p50']} µs"
          + (f"; baseline {base[noun + '_per_s']:,.0f}/s, ratio {d['ratio']}" if base else ""))
PY
}

timed_limit=$(limit_for "$DURATION" "$WARMUP")

# ---- gearmand: default threads or one ---------------------------------------------------------

gearmand_choice="$GEARMAND_THREADS"
if [ "$GEARMAND_THREADS" = auto ]; then
  gearmand_choice=default
  if [ "$wants_jobs" = 1 ]; then
    best=-1
    for t in default 1; do
      echo "== gearmand probe: --threads=$t ($PROBE_DURATION s of jobs 50x4, direct client)"
      start_gearmand "$t"
      start_server "probe-gearmand-$t" "${jobs_flags[@]}"
      run_bench "probe-gearmand-$t" "$(limit_for "$PROBE_DURATION" 0.5)" jobs --url "ws://$ws" \
        --function echo --payload-bytes 16 --connections 50 --in-flight 4 \
        --duration-s "$PROBE_DURATION" --warmup-s 0.5 --spawn-workers 2 \
        --gearmand "127.0.0.1:$gearmand_port" --baseline
      rate=$(python3 -c 'import json,sys
try: print(int(json.load(open(sys.argv[1]))["baseline"]["jobs_per_s"]))
except Exception: print(-1)' "$OUT_DIR/probe-gearmand-$t.json")
      echo "   direct client: $rate jobs/s"
      if [ "$rate" -gt "$best" ]; then best=$rate; gearmand_choice=$t; fi
    done
    stop_pid "$server_pid"; server_pid=""
  fi
fi
echo "== starting gearmand (threads: $gearmand_choice)"
start_gearmand "$gearmand_choice"

# ---- the scenarios ------------------------------------------------------------------------------

gm="127.0.0.1:$gearmand_port"
for s in "${scenarios[@]}"; do
  echo "== $s"
  case "$s" in
    roundtrip-100x16)
      start_server "$s"
      run_bench "$s" "$timed_limit" roundtrip --url "ws://$ws" --connections 100 --in-flight 16 \
        --duration-s "$DURATION" --warmup-s "$WARMUP" --baseline --pid "$server_pid" ;;
    roundtrip-1000x1)
      start_server "$s"
      run_bench "$s" "$timed_limit" roundtrip --url "ws://$ws" --connections 1000 --in-flight 1 \
        --duration-s "$DURATION" --warmup-s "$WARMUP" --baseline --pid "$server_pid" ;;
    jobs-50x4|jobs-50x16)
      start_server "$s" "${jobs_flags[@]}"
      run_bench "$s" "$timed_limit" jobs --url "ws://$ws" --function echo --payload-bytes 16 \
        --connections 50 --in-flight "${s#jobs-50x}" --duration-s "$DURATION" --warmup-s "$WARMUP" \
        --spawn-workers 2 --gearmand "$gm" --baseline --pid "$server_pid" --gearmand-pid "$gearmand_pid" ;;
    jobs-1x1)
      start_server "$s" "${jobs_flags[@]}"
      run_bench "$s" "$timed_limit" jobs --url "ws://$ws" --function echo --payload-bytes 16 \
        --connections 1 --in-flight 1 --duration-s "$DURATION" --warmup-s "$WARMUP" \
        --spawn-workers 2 --gearmand "$gm" --baseline --pid "$server_pid" --gearmand-pid "$gearmand_pid" ;;
    connect-10000)
      start_server "$s"  # fresh: RSS is measured per idle connection
      run_bench "$s" "$(limit_for "$HOLD" 120)" connect --url "ws://$ws" --connections "$CONNECT_SMALL" \
        --concurrency 100 --pid "$server_pid" --hold "$HOLD" --baseline ;;
    connect-19000)
      start_server "$s" --max-connections "$MAX_CONNECTIONS"
      run_bench "$s" "$(limit_for "$HOLD" 120)" connect --url "ws://$ws" --connections "$CONNECT_LARGE" \
        --concurrency 100 --pid "$server_pid" --hold "$HOLD" --source-ips 4 --baseline ;;
  esac
  summary "$s"
  stop_pid "$server_pid"; server_pid=""
done
cleanup

# ---- the report -----------------------------------------------------------------------------------

echo "== writing $OUT"
export STARTED_AT="$started_at" SCENARIO_LIST="${scenarios[*]}" GEARMAND_CHOICE="$gearmand_choice"
export GEARMAND_SETTING="$GEARMAND_THREADS" GEARMAND_ARGS="${gearmand_args[*]}" OUT_DIR OUT
export DURATION WARMUP HOLD SERVER_CPU BENCH_CPU GEARMAND_CPU PROBE_DURATION MAX_CONNECTIONS
export JOBS_SERVE_FLAGS
python3 - <<'PY'
import json, os, re, subprocess
from pathlib import Path

env = os.environ
out_dir = Path(env["OUT_DIR"])
scenarios = env["SCENARIO_LIST"].split()


def sh(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip()
    except Exception as e:
        return f"unknown ({e})"


def load(name):
    """(json or None, exit status or None, stderr tail)"""
    p = out_dir / f"{name}.json"
    try:
        data = json.loads(p.read_text())
    except Exception:
        data = None
    rc_path = out_dir / f"{name}.rc"
    rc = int(rc_path.read_text().strip()) if rc_path.exists() else None
    err_path = out_dir / f"{name}.err"
    err = err_path.read_text().strip().splitlines()[-5:] if err_path.exists() else []
    return data, rc, err


def n(v, places=0):
    if v is None:
        return "–"
    return f"{v:,.{places}f}"


def us(v):
    if v is None:
        return "–"
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def ratio(a, b):
    if a is None or b is None or not b:
        return ""
    return f"{a / b:.2f}×"


def table(head, rows, align=None):
    align = align or [":---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model():
    for line in sh("lscpu").splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def gearmand_version():
    text = sh("/usr/sbin/gearmand", "--version")
    m = re.search(r"gearmand\s+(\S+)", text)
    return m.group(1) if m else text


def commit():
    rev = sh("git", "rev-parse", "--short", "HEAD")
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0
    return rev + (" with uncommitted changes" if dirty else "")


def status_note(name, data, rc, err):
    if data is None:
        why = f"exit status {rc}" + (" (timed out)" if rc == 124 else "") if rc is not None else "not run"
        return f"**No result** ({why}).\n\n```\n" + "\n".join(err) + "\n```\n" if err else f"**No result** ({why}).\n"
    if rc:
        return (f"The bench exited with status {rc}: it counted errors, mismatched replies or failed "
                f"connections (see the table and `{out_dir}/{name}.err`).\n")
    return ""


def cpu_rows(runs):
    keys = sorted({k for r in runs if r for k in (r.get("cpu_pct") or {})})
    rows = []
    for k in keys:
        cells = [f"{k} CPU (% of a core)"]
        for r in runs:
            v = (r or {}).get("cpu_pct", {}).get(k) if r else None
            cells.append("–" if v is None else f"{v:.0f}%")
        if len(runs) == 2:
            cells.append("")
        rows.append(cells)
    return rows


def timed_table(d, main_key, noun, heads):
    main, base = d[main_key], d.get("baseline")
    runs = [main] + ([base] if base else [])
    head = [""] + heads[: len(runs)] + ([heads[2]] if base else [])

    def row(label, get, show, with_ratio=True):
        a = get(main)
        cells = [label, show(a)]
        if base:
            b = get(base)
            cells += [show(b), ratio(a, b) if with_ratio else ""]
        return cells

    lat = lambda q: (lambda r: r["latency_us"][q])
    rows = [
        row(f"**{noun}/s**", lambda r: r[f"{noun}_per_s"], n),
        row("latency p50 (µs)", lat("p50"), us),
        row("latency p90 (µs)", lat("p90"), us),
        row("latency p99 (µs)", lat("p99"), us),
        row("latency p99.9 (µs)", lat("p99_9"), us),
        row("latency max (µs)", lat("max"), us),
        row(f"{noun} measured", lambda r: r[noun], n, False),
        row("errors (mismatches)", lambda r: (r["errors"], r["mismatches"]),
            lambda t: f"{n(t[0])} ({n(t[1])})", False),
        row("connections up / failed / lost",
            lambda r: (r["connections"]["established"], r["connections"]["failed"],
                       sum(r["connections"]["lost"].values()) if isinstance(r["connections"]["lost"], dict)
                       else r["connections"]["lost"]),
            lambda t: " / ".join(n(x) for x in t), False),
        row("measured window (s)", lambda r: r["window_s"], lambda v: n(v, 2), False),
    ]
    rows += cpu_rows(runs)
    return table(head, rows)


results = {s: load(s) for s in scenarios}

def get(name, *path):
    d = results.get(name, (None,))[0]
    for p in path:
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else None
    return d


md = []
md.append("# Benchmarks\n")
md.append(f"Generated by `scripts/bench.sh` on {env['STARTED_AT']}, commit {commit()}. "
          f"The raw JSON of every run is kept in `{out_dir}/`.\n")
if set(scenarios) != {"roundtrip-100x16", "roundtrip-1000x1", "jobs-50x4", "jobs-50x16", "jobs-1x1",
                      "connect-10000", "connect-19000"}:
    md.append(f"This run covered only: {', '.join(f'`{s}`' for s in scenarios)}.\n")

md.append("## Machine\n")
md.append(table(["", ""], [
    ["CPU", cpu_model()],
    ["CPUs", sh("nproc", "--all")],
    ["kernel", sh("uname", "-r")],
    ["rustc", sh("rustc", "--version")],
    ["gearmand", gearmand_version()],
    ["open-file limit", sh("sh", "-c", "ulimit -n")],
    ["load average after the run", " ".join(Path("/proc/loadavg").read_text().split()[:3])],
], [":---", ":---"]))
md.append("")

md.append("## Setup\n")
gm_cpu = env.get("GEARMAND_CPU") or ""
choice = env["GEARMAND_CHOICE"]
jobs_flags = env.get("JOBS_SERVE_FLAGS", "").strip()
md.append(f"- `gearsock serve` runs on CPU {env['SERVER_CPU']} (`taskset -c {env['SERVER_CPU']}`), "
          f"a fresh server for every scenario, `--log-level warn`"
          + (f"; in the jobs scenarios also `{jobs_flags}`." if jobs_flags else "."))
md.append(f"- `gearsock bench` runs on CPU {env['BENCH_CPU']} (`taskset -c {env['BENCH_CPU']}`), with one "
          f"client event loop; the jobs scenarios' demo workers (`--spawn-workers 2`) are threads of the "
          f"bench process, so they share that CPU.")
md.append(f"- The roundtrip baseline (a plain TCP line-echo server inside the bench process) runs on the "
          f"server's CPUs ({env['SERVER_CPU']}, from `--pid`); the jobs baseline is a direct Gearman client "
          f"to the same gearmand with the same connections and in-flight count. Each baseline runs right "
          f"after its measured run, with the same warm-up and duration.")
md.append(f"- The connect baseline is a minimal WebSocket upgrade acceptor in a child of the bench process "
          f"(`gearsock bench acceptor`, so that its end of the connections does not count against the "
          f"bench's open-file limit), on the server's CPUs ({env['SERVER_CPU']}, from `--pid`): one mio "
          f"thread that accepts, reads the upgrade "
          f"request to its blank line, answers a canned `101 Switching Protocols` with the right "
          f"`Sec-WebSocket-Accept` and keeps the connection open, idle. Right after the measured run, the "
          f"bench opens the same connections against it (same concurrency, thread and source addresses), "
          f"so its handshakes/s are what this machine and the bench allow; the server's RSS is not read "
          f"for it.")
md.append(f"- gearmand: `{env['GEARMAND_ARGS']}`, "
          + (f"pinned to CPU {gm_cpu} (`taskset -c {gm_cpu}`) for the whole run, in the bridge and the "
             f"direct runs alike." if gm_cpu else "not pinned (the scheduler places it on either CPU)."))
md.append(f"- Timed scenarios: {env['WARMUP']} s warm-up, then {env['DURATION']} s measured; connect scenarios "
          f"hold their idle connections {env['HOLD']} s.")
md.append("")

# gearmand threads
probes = [(t, load(f"probe-gearmand-{t}")[0]) for t in ("default", "1")]
probes = [(t, d) for t, d in probes if d]
md.append("### gearmand threads\n")
if env["GEARMAND_SETTING"] == "auto" and probes:
    rows = []
    for t, d in probes:
        label = "default (4)" if t == "default" else f"`--threads={t}`"
        rows.append([label, n(d["baseline"]["jobs_per_s"]), n(d["bridge"]["jobs_per_s"]),
                     "**kept**" if t == choice else ""])
    md.append(f"Both settings were measured in this run ({env['PROBE_DURATION']} s each, 50 connections × 4 "
              f"in flight, echo, 16 bytes); the one with more direct-client jobs/s was kept.\n")
    md.append(table(["gearmand threads", "direct client jobs/s", "bridge jobs/s", ""], rows))
elif env["GEARMAND_SETTING"] == "auto":
    md.append("No jobs scenario ran, so the thread settings were not compared; gearmand ran with its "
              "default threads.")
else:
    md.append(f"Set by `GEARMAND_THREADS={env['GEARMAND_SETTING']}`; not compared in this run.")
md.append("")

# ---- targets
def verdict(value, ok, clean=True):
    if value is None:
        return "not measured"
    return ("met" if ok else "**not met**") + ("" if clean else " (run had errors)")


def clean(name):
    rc = results.get(name, (None, None))[1]
    return rc == 0


targets = []
v = get("roundtrip-100x16", "websocket", "messages_per_s")
targets.append(["roundtrip 100 connections × 16 in flight", "≥ 440,000 msg/s",
                f"{n(v)} msg/s" if v is not None else "–",
                verdict(v, v is not None and v >= 440_000, clean("roundtrip-100x16"))])
v = get("roundtrip-1000x1", "websocket", "messages_per_s")
targets.append(["roundtrip 1,000 connections × 1 in flight", "≥ 106,000 msg/s",
                f"{n(v)} msg/s" if v is not None else "–",
                verdict(v, v is not None and v >= 106_000, clean("roundtrip-1000x1"))])
v = get("connect-19000", "rss", "per_connection_bytes")
count = get("connect-19000", "connections") or 19_000
targets.append([f"RSS per idle connection at {n(count)} connections", "≤ 4 KiB (4,096 bytes)",
                f"{n(v)} bytes ({v / 1024:.2f} KiB)" if v is not None else "–",
                verdict(v, v is not None and v <= 4096, clean("connect-19000"))])
for s in ("connect-10000", "connect-19000"):
    v = get(s, "handshakes_per_s")
    count = get(s, "connections") or int(s.split("-")[1])
    base = get(s, "baseline", "handshakes_per_s")
    measured = "–" if v is None else f"{n(v)}/s" + (f" (baseline acceptor {n(base)}/s)" if base is not None else "")
    targets.append([f"connect handshakes/s at concurrency 100, {n(count)} "
                    f"connections", "≥ 25,000/s", measured,
                    verdict(v, v is not None and v >= 25_000, clean(s))])
v = get("jobs-50x4", "ratio")
targets.append(["jobs 50 × 4: bridge jobs/s vs direct Gearman client", "≥ 90%",
                f"{v * 100:.1f}% ({n(get('jobs-50x4', 'bridge', 'jobs_per_s'))} vs "
                f"{n(get('jobs-50x4', 'baseline', 'jobs_per_s'))} jobs/s)" if v is not None else "–",
                verdict(v, v is not None and v >= 0.9, clean("jobs-50x4"))])
v = get("jobs-50x16", "ratio")
targets.append(["jobs 50 × 16: bridge jobs/s vs direct Gearman client", "≥ 90%",
                f"{v * 100:.1f}% ({n(get('jobs-50x16', 'bridge', 'jobs_per_s'))} vs "
                f"{n(get('jobs-50x16', 'baseline', 'jobs_per_s'))} jobs/s)" if v is not None else "–",
                verdict(v, v is not None and v >= 0.9, clean("jobs-50x16"))])
v = get("jobs-1x1", "added_p50_us")
targets.append(["jobs 1 × 1: latency the bridge adds at p50", "< 200 µs",
                f"{us(v)} µs (p50 {us(get('jobs-1x1', 'bridge', 'latency_us', 'p50'))} vs "
                f"{us(get('jobs-1x1', 'baseline', 'latency_us', 'p50'))} µs)" if v is not None else "–",
                verdict(v, v is not None and v < 200, clean("jobs-1x1"))])
md.append("## Targets\n")
md.append("The targets of the issue, checked against the figures below.\n")
md.append(table(["target", "wanted", "measured", "verdict"], targets, [":---", ":---", "---:", ":---"]))
md.append("")

# ---- scenario tables
titles = {
    "roundtrip-100x16": "roundtrip: 100 connections × 16 in flight",
    "roundtrip-1000x1": "roundtrip: 1,000 connections × 1 in flight",
    "jobs-50x4": "jobs: 50 connections × 4 in flight (echo, 16 bytes)",
    "jobs-50x16": "jobs: 50 connections × 16 in flight (echo, 16 bytes)",
    "jobs-1x1": "jobs: 1 connection × 1 in flight (the latency the bridge adds)",
    "connect-10000": "connect: {n} connections, 100 handshakes in flight",
    "connect-19000": "connect: {n} connections, 100 handshakes in flight, 4 source addresses",
}
blurbs = {
    "roundtrip": "Each connection keeps its in-flight count of the article's `worker.complete` messages "
                 "outstanding; every reply (`got it!`) is checked. The baseline is a plain TCP line-echo "
                 "server doing the same exchange, on the same CPU; the ratio is WebSocket / TCP.",
    "jobs": "Stream jobs `{\"type\":\"submit\",\"function\":\"echo\",...}` kept in flight per connection, each "
            "waiting for its `job.complete`, answered by two demo workers; the baseline is a direct Gearman "
            "client (SUBMIT_JOB / WORK_COMPLETE) through the same gearmand and workers. The ratio is "
            "bridge / direct.",
    "connect": "A freshly started server; the bench opens the connections with 100 WebSocket handshakes in "
               "flight, holds them idle, and reads the server's VmRSS before connecting and once every "
               "connection is up (after a 1 s settle). The baseline is the bench's upgrade acceptor "
               "(a canned 101, then idle) on the same CPU, opened the same way right after; the ratio is "
               "gearsock / acceptor.",
}
md.append("## Results\n")
for s in scenarios:
    data, rc, err = results[s]
    kind = s.split("-")[0]
    title = titles[s]
    if kind == "connect":
        title = title.format(n=n(data["connections"]) if data else s.split("-")[1])
    md.append(f"### {title}\n")
    md.append(blurbs[kind] + "\n")
    note = status_note(s, data, rc, err)
    if note:
        md.append(note)
    if data is None:
        continue
    if kind == "roundtrip":
        md.append(timed_table(data, "websocket", "messages",
                              ["gearsock (WebSocket)", "TCP line echo (baseline)", "ratio"]))
    elif kind == "jobs":
        md.append(timed_table(data, "bridge", "jobs",
                              ["bridge (WebSocket → Gearman)", "direct Gearman client (baseline)", "ratio"]))
        added = data.get("added_p50_us")
        if added is not None:
            md.append("")
            md.append(f"The bridge adds {us(added)} µs at p50." if added >= 0 else
                      f"The bridge adds nothing measurable at p50 ({us(-added)} µs less, within the noise).")
    else:
        base = data.get("baseline")
        runs = [data] + ([base] if base else [])

        def lost_count(r):
            lost = r["lost"]
            return sum(lost.values()) if isinstance(lost, dict) else lost

        def crow(label, get, show, with_ratio=True):
            """label, gearsock's cell and, with a baseline, the acceptor's and gearsock / acceptor"""
            a = get(data)
            cells = [label, show(a)]
            if base:
                b = get(base)
                cells += [show(b), ratio(a, b) if with_ratio else ""]
            return cells

        lat = lambda q: (lambda r: r["handshake_latency_us"][q])
        rows = [
            crow("connections established", lambda r: (r["established"], r["attempted"]),
                 lambda t: f"{n(t[0])} of {n(t[1])}", False),
            crow("failed", lambda r: r["failed"], n, False),
            crow("**handshakes/s**", lambda r: r["handshakes_per_s"], n),
            crow("connecting time (s)", lambda r: r["elapsed_s"], lambda v: f"{v:.3f}", False),
            crow("handshake latency p50 (µs)", lat("p50"), us),
            crow("handshake latency p90 (µs)", lat("p90"), us),
            crow("handshake latency p99 (µs)", lat("p99"), us),
            crow("handshake latency max (µs)", lat("max"), us),
            crow("lost while held", lost_count, n, False),
        ]
        if base:
            rows[-1][2] = "not held"
        rss = data.get("rss")
        if rss:
            mib = lambda b: f"{b / 1048576:.1f} MiB"
            not_read = ["not read", ""] if base else []
            rows += [
                ["server RSS before / with every connection up",
                 f"{mib(rss['before_bytes'])} / {mib(rss['after_bytes'])}"] + not_read,
                ["**RSS per idle connection**",
                 f"{n(rss['per_connection_bytes'])} bytes ({rss['per_connection_kib']:.2f} KiB)"] + not_read,
            ]
        head = ["", "gearsock"] + (["upgrade acceptor (baseline)", "ratio"] if base else [])
        md.append(table(head, rows))
        if base:
            cpus = base.get("cpus")
            md.append("\nThe acceptor held its connections only until all were up (they are not held, and "
                      "its RSS is not read)" + (f"; it ran on CPU{'s' if len(cpus) > 1 else ''} {', '.join(map(str, cpus))}." if cpus else "."))
        for who, r in [("Connect failures", data)] + ([("Baseline acceptor connect failures", base)] if base else []):
            failures = r.get("failures") or {}
            if failures:
                md.append(f"\n{who}: " + ", ".join(f"{k}: {v}" for k, v in failures.items()) + ".")
    md.append("")

# ---- reproduce
md.append("## Reproduce\n")
md.append("The whole suite (about two minutes at the default durations; gearmand is installed if missing):\n")
md.append("```sh\nscripts/bench.sh                                  # everything, writes docs/BENCHMARKS.md\n"
          "DURATION=2 WARMUP=1 scripts/bench.sh roundtrip    # a quick subset\n```\n")
md.append("Or by hand: a private gearmand, then for each scenario a fresh server on CPU "
          f"{env['SERVER_CPU']} and the bench on CPU {env['BENCH_CPU']}. These are the commands this run "
          "used, with its ports and pids as shell variables (the server prints `listening on ws://ADDR`; "
          f"the exact lines, numbers included, are in `{out_dir}/SCENARIO.cmd`):\n")
gm_args = env["GEARMAND_ARGS"].split()
gm_args = ["--port=$GEARMAND_PORT" if a.startswith("--port=") else a for a in gm_args]
md.append("```sh")
md.append("cargo build --release")
md.append("GEARMAND_PORT=4730   # any free port")
md.append(("taskset -c " + gm_cpu + " " if gm_cpu else "") + " ".join(gm_args) + " 2>gearmand.log & GEARMAND_PID=$!")
for s in scenarios:
    cmd = out_dir / f"{s}.sh"
    if cmd.exists():
        md.append(f"\n# {s}")
        md.append(cmd.read_text().rstrip())
md.append("\nkill $GEARMAND_PID")
md.append("```\n")

# ---- profile
md.append("## Profile\n")
if Path("docs/PROFILE.md").exists():
    md.append("The profile notes are kept in [PROFILE.md](PROFILE.md).")
else:
    md.append("The profile notes are kept in docs/PROFILE.md; none had been written when this report was generated.")
md.append("")

Path(env["OUT"]).write_text("\n".join(md))
PY
echo "== done: $OUT (raw JSON in $OUT_DIR/)"
if [ "$want_uws" = 1 ]; then SKIP_BUILD=1 OUT="$OUT" scripts/bench-uws.sh; fi

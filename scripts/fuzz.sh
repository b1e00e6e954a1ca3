#!/usr/bin/env bash
# Fuzzes gearsock's parsers with cargo-fuzz (libFuzzer): every target under fuzz/ for SECONDS
# each (default 60), one after another, and prints per target the executions, executions per
# second, coverage (cov = edges, ft = features), peak RSS and whether it crashed.
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="http_head ws_input" scripts/fuzz.sh 30    # only some targets
#
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. Not part of CI.
# New inputs a run finds go to a temporary directory: the committed seeds in fuzz/corpus/ are
# only read. A crash, leak, timeout or out-of-memory stops that target; the script goes on with
# the next, then exits nonzero and names each artefact (under fuzz/artifacts/, not committed).
# Replay one with: cargo +nightly fuzz run --debug-assertions TARGET fuzz/artifacts/TARGET/crash-…
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
rss_mb="${FUZZ_RSS_MB:-1024}"
read -ra targets <<<"${FUZZ_TARGETS:-gearman_decode gearman_session http_head client_message ws_input jwt_verify}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz
fi

# Longest input per target: frames up to the larger limits ws_input tries. (http_head reaches
# the 8 KiB head limit with a filler header of its own.)
max_len() {
  case "$1" in
    ws_input) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

# Overflow checks and debug assertions on: an overflow is a bug even where release wraps.
build=(--debug-assertions)
cargo +nightly fuzz build "${build[@]}"

work="$(mktemp -d "${TMPDIR:-/tmp}/gearsock-fuzz.XXXXXX")"
echo "fuzz.sh: ${seconds}s per target, rss limit ${rss_mb} MB, new inputs and logs in $work"
printf '%-16s %8s %12s %8s %6s %6s %8s  %s\n' target seconds executions exec/s cov ft rss_mb result
failed=0
for target in "${targets[@]}"; do
  mkdir -p "$work/$target"
  args=(-max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout=10 -max_len="$(max_len "$target")"
    -print_final_stats=1)
  [ -f "fuzz/dict/$target.dict" ] && args+=(-dict="fuzz/dict/$target.dict")
  log="$work/$target.log"
  start=$(date +%s)
  status=0
  cargo +nightly fuzz run "${build[@]}" "$target" "$work/$target" "fuzz/corpus/$target" -- "${args[@]}" \
    >"$log" 2>&1 || status=$?
  took=$(($(date +%s) - start))
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  execs="$(stat number_of_executed_units)"
  rate="$(stat average_exec_per_sec)"
  rss="$(stat peak_rss_mb)"
  progress="$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)"
  cov="$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$progress")"
  ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$progress")"
  [ -n "$execs" ] || execs="$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$progress")"
  artefact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)"
  if [ "$status" -eq 0 ] && [ -z "$artefact" ]; then
    result=ok
  else
    failed=1
    kind="$(grep -oE 'ERROR: libFuzzer: [a-z-]+|panicked at [^ ]+' "$log" | head -1 || true)"
    result="CRASH (exit $status; ${kind:-see log}) artefact: ${artefact:-none} log: $log"
  fi
  printf '%-16s %8s %12s %8s %6s %6s %8s  %s\n' "$target" "$took" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
    "${ft:-?}" "${rss:-?}" "$result"
done
exit "$failed"

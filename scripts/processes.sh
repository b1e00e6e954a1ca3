# Sourced by scripts/kills.sh and scripts/soak.sh (not run on its own): the gearsock binary
# (built unless GEARSOCK names one), gearmand's presence, the pids to stop on exit, and a free
# loopback port. Expects `set -euo pipefail` and the repository root as the working directory.

target=${CARGO_TARGET_DIR:-target}
if [ -z "${GEARSOCK:-}" ]; then
  cargo build --release --quiet
  GEARSOCK=$target/release/gearsock
fi
[ -x /usr/sbin/gearmand ] || { echo "$(basename "$0"): /usr/sbin/gearmand is missing (apt-get install gearman-job-server)" >&2; exit 2; }

# Every process started is added here and SIGKILLed on exit.
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# A port nobody answers on (a connect that fails), for gearmand: it must be the same on restarts.
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "$(basename "$0"): no free port found" >&2; exit 2
}

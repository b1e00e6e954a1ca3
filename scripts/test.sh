#!/usr/bin/env bash
# The test command of README.md: installs what the tests need on a fresh machine, then runs
# formatting, lints, every test (unit, integration against a real gearmand, browser, nginx) and
# the benchmarks in test mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/gearmand ] || need+=(gearman-job-server)
command -v gearman >/dev/null 2>&1 || need+=(gearman-tools)
[ -x /usr/bin/chromium ] || need+=(chromium)        # tests/browser.rs drives it headless
[ -x /usr/sbin/nginx ] || need+=(nginx-light)       # tests/deploy.rs proxies gearsock through it
/usr/bin/python3 -c "import jwt" 2>/dev/null || need+=(python3-jwt)  # tests/tokens.rs: PyJWT interop
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo check --no-default-features --all-targets   # the server builds without the load generator
cargo test --release --all-targets

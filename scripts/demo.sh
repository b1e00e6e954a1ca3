#!/usr/bin/env bash
# The run command of README.md: the article's demo on a fresh machine.
# Installs gearmand from Debian's packages when it is missing, builds gearsock, then runs
# gearmand, `gearsock serve` and `gearsock worker` together until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

GEARMAND_PORT="${GEARMAND_PORT:-4730}"
LISTEN="${LISTEN:-127.0.0.1:8080}"

if [ ! -x /usr/sbin/gearmand ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "== installing gearmand (Debian package gearman-job-server)"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends gearman-job-server
fi

echo "== building gearsock"
cargo build --release --quiet
bin=target/release/gearsock

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if (exec 3<>"/dev/tcp/127.0.0.1/$GEARMAND_PORT") 2>/dev/null; then
  echo "== using the gearmand already listening on 127.0.0.1:$GEARMAND_PORT"
else
  echo "== starting gearmand on 127.0.0.1:$GEARMAND_PORT"
  /usr/sbin/gearmand --listen=127.0.0.1 --port="$GEARMAND_PORT" --log-file=stderr 2>/dev/null &
  pids+=($!)
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$GEARMAND_PORT") 2>/dev/null && break; sleep 0.1; done
fi

echo "== starting the server"
"$bin" serve --listen "$LISTEN" --gearmand "127.0.0.1:$GEARMAND_PORT" &
pids+=($!)
sleep 0.5
echo "== starting the article's worker (its lines are prefixed with 'worker |')"
"$bin" worker --gearmand "127.0.0.1:$GEARMAND_PORT" --report "ws://$LISTEN" 2>&1 | sed -u 's/^/worker | /' &
pids+=($!)

cat <<EOT

Try it:
  - open http://$LISTEN/ and press "ping" (the article's flow, live), or start a stream job;
  - or paste the article's console snippet in any browser console:
      var socket = new WebSocket("ws://$LISTEN");
      socket.addEventListener("message", function(e) { console.log(e.data) });
      socket.addEventListener("open", function() { socket.send(JSON.stringify({type: "ping"})) });
    -> before the 'received' message ... job: H:... ... value: done
  - or, in another terminal, the article's gearman-client:
      $bin submit ping --gearmand 127.0.0.1:$GEARMAND_PORT
  - health and metrics: curl http://$LISTEN/healthz ; curl http://$LISTEN/metrics
Ctrl-C stops everything.

EOT
wait

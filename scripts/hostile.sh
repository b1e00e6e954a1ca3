#!/usr/bin/env bash
# What hostile clients can make the server and gearmand hold, with default flags: the figures
# behind the worst-case table of docs/RELIABILITY.md ("What a hostile client can make us hold").
#
# Each scenario starts its own gearmand and `gearsock serve` (default flags, plus FLAGS), runs
# one kind of abuse from raw sockets for a few seconds, and reads the resident memory (VmRSS)
# of both processes before and after; gearmand's queue is read with its admin `status`
# command. The scenarios:
#   idle        CONNS idle WebSockets: what a connection costs at rest
#   partial     CONNS connections each holding an unfinished fragmented message of 60 KiB,
#               kept alive with pongs
#   status      one client, one job nobody serves, `status` questions as fast as it can send
#               them for 3 s, each with a 200-byte `ref`
#   ref         4 connections x 64 submits whose 64 KiB message is mostly `"ref":[0,0,…]`
#   stored      3,000 id-only worker.complete reports with 65,000-byte ids and 1-byte values
#   unread      one client that sends bad messages and never reads the error replies
#   background  for 3 s: connect, 64 background jobs of 60 KB of a function nobody serves,
#               close; gearmand's queue afterwards
# Prints one line per scenario (JSON with --json). Exits 0; it measures, it does not judge.
#
# usage: scripts/hostile.sh [SCENARIO ...]    (default: all; about 40 s)
# environment: BIN [target/release/gearsock]  CONNS [500]  FLAGS (extra serve flags)
#   STATUS_REF [200] bytes of each status question's ref  SKIP_BUILD=1  JSON=1 (JSON lines)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
[ -x /usr/sbin/gearmand ] || { echo "hostile.sh: /usr/sbin/gearmand is missing (apt-get install gearman-job-server)" >&2; exit 1; }
if [ "${SKIP_BUILD:-0}" != 1 ] && [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
fi
export BIN="${BIN:-target/release/gearsock}" CONNS="${CONNS:-500}" FLAGS="${FLAGS:-}" JSON="${JSON:-0}"
exec python3 - "$@" <<'PY'
import base64, json, os, socket, struct, subprocess, sys, threading, time

STATUS_REF = int(os.environ.get("STATUS_REF", "200"))
BIN, CONNS, FLAGS, AS_JSON = os.environ["BIN"], int(os.environ["CONNS"]), os.environ["FLAGS"].split(), os.environ["JSON"] == "1"
ALL = ["idle", "partial", "status", "ref", "stored", "unread", "background"]

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

class Rig:
    """A private gearmand and server, stopped on exit."""
    def __init__(self):
        self.gport = free_port()
        self.gearmand = subprocess.Popen(["/usr/sbin/gearmand", "--listen=127.0.0.1", f"--port={self.gport}", "--log-file=/dev/null"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try: socket.create_connection(("127.0.0.1", self.gport), 0.2).close(); break
            except OSError: time.sleep(0.05)
        self.server = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:0", "--gearmand", f"127.0.0.1:{self.gport}", "--log-level", "error", *FLAGS],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.server.stdout.readline()
        host, port = line.strip().rsplit("ws://", 1)[1].rsplit(":", 1)
        self.addr = (host, int(port))
        time.sleep(0.3)  # the links come up
    def rss(self):
        return rss_kib(self.server.pid), rss_kib(self.gearmand.pid)
    def queued(self):
        """Jobs gearmand holds, summed over functions (admin `status`)."""
        s = socket.create_connection(("127.0.0.1", self.gport), 2); s.sendall(b"status\n"); data = b""
        while not data.endswith(b".\n"):
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
        s.close()
        return sum(int(l.split(b"\t")[1]) for l in data.split(b"\n") if l.count(b"\t") == 3)
    def healthz(self):
        s = socket.create_connection(self.addr, 2); s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk: break
            data += chunk
        s.close()
        return data.split(b"\r\n", 1)[0].decode(errors="replace")
    def stop(self):
        for p in (self.server, self.gearmand):
            p.terminate()
            try: p.wait(5)
            except subprocess.TimeoutExpired: p.kill()

def ws_connect(addr, src="127.0.0.1"):
    s = socket.socket(); s.bind((src, 0)); s.connect(addr)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET / HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk: raise OSError("closed during the handshake")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]: raise OSError(head.split(b"\r\n", 1)[0].decode())
    return s

def frame(payload, opcode=1, fin=True):
    mask = os.urandom(4); n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
    body = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big") if n else b""
    return head + mask + body

def text(s, msg): s.sendall(frame(msg.encode()))

def read_text(s, timeout=5):
    """One unfragmented server frame's payload (server frames are not masked)."""
    s.settimeout(timeout)
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk: raise OSError("closed")
            data += chunk
        return data
    b0, b1 = exact(2); n = b1 & 0x7F
    if n == 126: n = struct.unpack(">H", exact(2))[0]
    elif n == 127: n = struct.unpack(">Q", exact(8))[0]
    return exact(n).decode(errors="replace")

def drain(s, seconds):
    s.settimeout(seconds); got = 0
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk: break
            got += len(chunk)
    except OSError: pass
    return got

def sources(n):
    return [f"127.0.0.{2 + i % 200}" for i in range(n)]

def scenario(name):
    rig = Rig(); before = rig.rss(); held = []; note = {}
    try:
        if name == "idle":
            held = [ws_connect(rig.addr, src) for src in sources(CONNS)]
            time.sleep(1)
            note["connections"] = CONNS
        elif name == "partial":
            held = [ws_connect(rig.addr, src) for src in sources(CONNS)]
            for s in held: s.sendall(frame(b"x" * 60 * 1024, opcode=1, fin=False))
            for _ in range(2):
                time.sleep(1)
                for s in held:
                    try: s.sendall(frame(b"", opcode=0xA))
                    except OSError: pass
            note["connections"] = CONNS
        elif name == "status":
            s = ws_connect(rig.addr); held = [s]
            text(s, '{"type":"submit","function":"nobody_serves_this","payload":"x"}')
            handle = json.loads(read_text(s)).get("job", "")
            q = frame(json.dumps({"type": "status", "job": handle, "ref": "r" * STATUS_REF}).encode())
            replies = []
            reader = threading.Thread(target=lambda: replies.append(drain(s, 4)), daemon=True)
            reader.start()
            end = time.time() + 3; sent = 0
            while time.time() < end:
                try: s.sendall(q * 64); sent += 64
                except OSError: note["closed_by_server"] = True; break
            reader.join()
            note["questions_sent"] = sent
            note["reply_bytes_read"] = replies[0] if replies else 0
            note["healthz"] = rig.healthz()
        elif name == "ref":
            ref = "[" + ",".join(["0"] * 32000) + "]"
            held = [ws_connect(rig.addr) for _ in range(4)]
            for s in held:
                for _ in range(64):
                    text(s, '{"type":"submit","function":"nobody_serves_this","payload":"x","ref":' + ref + '}')
            time.sleep(1)
        elif name == "stored":
            s = ws_connect(rig.addr); held = [s]
            for i in range(3000):
                text(s, json.dumps({"type": "worker.complete", "id": f"H:{i}:" + "x" * 65000, "value": "v"}))
            drain(s, 1)
        elif name == "unread":
            s = ws_connect(rig.addr); held = [s]
            s.setblocking(False); bad = frame(b'{"type":"nonsense"}') * 256; sent = 0; end = time.time() + 3
            while time.time() < end:
                try: s.send(bad); sent += 256
                except BlockingIOError: time.sleep(0.001)
                except OSError: note["closed_by_server"] = True; break
            note["messages_sent"] = sent
        elif name == "background":
            payload = "p" * 60000; end = time.time() + 3; rounds = 0
            while time.time() < end:
                s = ws_connect(rig.addr)
                for i in range(64):
                    text(s, json.dumps({"type": "submit", "function": "nobody_serves_this", "mode": "background", "payload": payload}))
                drain(s, 0.05); s.close(); rounds += 1
            time.sleep(0.5)
            note["connections"] = rounds
            note["gearmand_queued"] = rig.queued()
        after = rig.rss()
        out = {"scenario": name, "server_kib": after[0] - before[0], "gearmand_kib": after[1] - before[1], **note}
        if name in ("idle", "partial"):
            out["server_bytes_per_connection"] = round((after[0] - before[0]) * 1024 / max(1, CONNS))
        return out
    finally:
        for s in held:
            try: s.close()
            except OSError: pass
        rig.stop()

chosen = sys.argv[1:] or ALL
for name in chosen:
    if name not in ALL: sys.exit(f"hostile.sh: unknown scenario {name} (one of {', '.join(ALL)})")
for name in chosen:
    r = scenario(name)
    if AS_JSON: print(json.dumps(r), flush=True)
    else:
        extra = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("scenario", "server_kib", "gearmand_kib"))
        print(f"{name:<11} server +{r['server_kib'] / 1024:8.1f} MiB   gearmand +{r['gearmand_kib'] / 1024:8.1f} MiB   {extra}", flush=True)
PY

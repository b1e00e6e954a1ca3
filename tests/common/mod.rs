//! Shared pieces of the integration tests: a private gearmand on a free loopback port, the
//! real `gearsock` binary, and WebSocket clients. Every process started here is killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub const BIN: &str = env!("CARGO_BIN_EXE_gearsock");

/// A port nobody listens on right now (the kernel's pick, released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Waits until `cond` holds, up to `limit`; panics with `what` otherwise.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A private gearmand, killed on drop.
pub struct Gearmand {
    pub child: Child,
    pub port: u16,
}

impl Gearmand {
    /// A gearmand on a free port. Another test may take the port between our pick and
    /// gearmand's bind, so this retries on a new port until gearmand itself answers.
    pub fn start() -> Gearmand {
        for _ in 0..5 {
            if let Some(g) = Self::try_start_on(free_port()) {
                return g;
            }
        }
        panic!("gearmand did not start on any of 5 free ports");
    }

    /// A gearmand on `port` (a restart on a port known to be ours).
    pub fn start_on(port: u16) -> Gearmand {
        Self::try_start_on(port).unwrap_or_else(|| panic!("gearmand did not start on port {port}"))
    }

    fn try_start_on(port: u16) -> Option<Gearmand> {
        let child = Command::new("/usr/sbin/gearmand")
            .args(["--listen=127.0.0.1", &format!("--port={port}"), "--log-file=stderr", "--threads=1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/gearmand (apt-get install gearman-job-server)");
        let mut g = Gearmand { child, port };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = g.child.try_wait() {
                return None; // it could not bind: someone else has the port
            }
            if g.answers_version() {
                return Some(g);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// True when the process on our port is a gearmand (its admin protocol answers `version`).
    fn answers_version(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = [0u8; 3];
        s.write_all(b"version\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"OK "
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `gearsock` process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Option<BufReader<ChildStdout>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gearsock");
        let stdout = child.stdout.take().map(BufReader::new);
        Proc { child, stdout }
    }

    /// The next line of standard output (panics at EOF).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stdout.as_mut().expect("stdout").read_line(&mut line).expect("read stdout");
        assert!(n > 0, "process ended its output");
        line.trim_end().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok =
            Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().expect("kill");
        assert!(ok.success());
    }

    /// Waits for the exit code, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `gearsock serve` on a free port; `addr` is what it printed.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(gearmand: &str, extra: &[&str]) -> Server {
        let mut args =
            vec!["serve", "--listen", "127.0.0.1:0", "--gearmand", gearmand, "--log-level", "warn"];
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&args);
        let line = proc.line();
        let addr = line.strip_prefix("listening on ws://").unwrap_or_else(|| panic!("unexpected: {line}"));
        let addr = addr.parse().expect("address");
        Server { proc, addr }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// A plain HTTP GET; returns (status, body).
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read answer");
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// Waits until /healthz says every gearmand is connected.
    pub fn wait_healthy(&self) {
        wait_for("gearmand link up", Duration::from_secs(10), || self.http("GET", "/healthz").0 == 200);
    }

    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http("GET", "/metrics");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }
}

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// A connected WebSocket client with a read timeout.
pub fn connect(url: &str) -> Ws {
    let (ws, _) = tungstenite::connect(url).expect("websocket connect");
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    ws
}

/// Sends a text frame.
pub fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

/// The next text frame (pings and pongs skipped).
pub fn recv(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// The next text frame parsed as JSON.
pub fn recv_json(ws: &mut Ws) -> serde_json::Value {
    let text = recv(ws);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

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
    /// True between `stop()` and `cont()`: a stopped gearmand is continued before it is killed.
    stopped: bool,
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
        let mut g = Gearmand { child, port, stopped: false };
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

    /// SIGSTOP: the process keeps its sockets (the kernel still accepts connections and buffers
    /// bytes) but reads, writes and answers nothing: a stuck gearmand.
    pub fn stop(&mut self) {
        assert!(self.signal("STOP"), "kill -STOP gearmand");
        self.stopped = true;
    }

    /// SIGCONT: a stopped gearmand carries on.
    pub fn cont(&mut self) {
        if self.stopped {
            assert!(self.signal("CONT"), "kill -CONT gearmand");
            self.stopped = false;
        }
    }

    fn signal(&self, sig: &str) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill").args([&format!("-{sig}"), &pid]).status().is_ok_and(|s| s.success())
    }

    pub fn kill(&mut self) {
        if std::mem::take(&mut self.stopped) {
            self.signal("CONT");
        }
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
        Self::spawn_env(args, &[], Stdio::null())
    }

    /// `spawn` with extra environment variables and a choice for standard error.
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn gearsock");
        let stdout = child.stdout.take().map(BufReader::new);
        Proc { child, stdout }
    }

    /// Collects standard error (spawned with `Stdio::piped()`) line by line on a thread.
    pub fn collect_stderr(&mut self) -> LogLines {
        let lines = LogLines::default();
        let stderr = self.child.stderr.take().expect("stderr was piped");
        let sink = lines.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        lines
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

/// Lines a process wrote to standard error so far.
#[derive(Clone, Default)]
pub struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl LogLines {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// How many lines contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|l| l.contains(text)).count()
    }
}

/// A `gearsock serve` on a free port; `addr` is what it printed.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// Every function: the general helpers' tests are not about who may run what (issue 19:
/// deny by default); tests/access.rs starts its servers with [`Server::start_bare`] instead.
pub const ALLOW_ALL: [&str; 2] = ["--allow-function", "*"];

impl Server {
    pub fn start(gearmand: &str, extra: &[&str]) -> Server {
        let mut args = ALLOW_ALL.to_vec();
        args.extend_from_slice(extra);
        Self::start_bare(gearmand, &args)
    }

    /// A server with only the flags given: no function allowed unless `extra` says so.
    pub fn start_bare(gearmand: &str, extra: &[&str]) -> Server {
        let mut args =
            vec!["serve", "--listen", "127.0.0.1:0", "--gearmand", gearmand, "--log-level", "warn"];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// `gearsock serve --echo` (no gearmand) on a free port.
    pub fn start_echo(extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--echo", "--listen", "127.0.0.1:0", "--log-level", "warn"];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    fn spawn(args: &[&str]) -> Server {
        let mut proc = Proc::spawn(args);
        let line = proc.line();
        let addr = line.strip_prefix("listening on ws://").unwrap_or_else(|| panic!("unexpected: {line}"));
        let addr = addr.parse().expect("address");
        Server { proc, addr }
    }

    /// A server at the default log level (`info`) with `env` set, and its standard error.
    pub fn start_logged(gearmand: &str, extra: &[&str], env: &[(&str, &str)]) -> (Server, LogLines) {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--gearmand", gearmand];
        args.extend_from_slice(&ALLOW_ALL);
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn_env(&args, env, Stdio::piped());
        let log = proc.collect_stderr();
        let line = proc.line();
        let addr = line.strip_prefix("listening on ws://").unwrap_or_else(|| panic!("unexpected: {line}"));
        let addr = addr.parse().expect("address");
        (Server { proc, addr }, log)
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

    /// The sum of the samples of `name` whose labels include `label` (over a group's
    /// processes, whose `/metrics` carry a label per process).
    pub fn metric_sum(&self, name: &str, label: &str) -> f64 {
        let (_, body) = self.http("GET", "/metrics");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
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

/// Runs `gearsock bench ARGS... --json`; returns the exit status and the JSON it printed.
pub fn bench_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(BIN).arg("bench").args(args).arg("--json").output().expect("run gearsock bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), value)
}

/// The next text frame parsed as JSON.
pub fn recv_json(ws: &mut Ws) -> serde_json::Value {
    let text = recv(ws);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A WebSocket client whose upgrade request carries `headers` as well (Origin,
/// X-Forwarded-For, …), as a browser page or a reverse proxy would send them. Every read and
/// write, the handshake included, times out after 15 s.
pub fn connect_with(url: &str, headers: &[(&str, &str)]) -> Ws {
    try_connect_with(url, headers, Duration::from_secs(15)).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// `connect_with` that reports failure, with `limit` on the TCP connect and on each read and
/// write of the handshake.
pub fn try_connect_with(url: &str, headers: &[(&str, &str)], limit: Duration) -> Result<Ws, String> {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::http::{HeaderName, HeaderValue};
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        req.headers_mut().insert(name, HeaderValue::from_str(value).map_err(|e| e.to_string())?);
    }
    let host = req.uri().host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_string();
    let port = req.uri().port_u16().unwrap_or(80);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let stream = TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let (ws, _) = tungstenite::client(req, MaybeTlsStream::Plain(stream)).map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Sets the read timeout of a client's socket.
pub fn set_read_timeout(ws: &Ws, limit: Duration) {
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(limit)).unwrap();
    }
}

/// A plain HTTP request with `limit` on connect and on every read; returns the whole answer
/// (status line, headers and body) or why there was none.
pub fn http_raw(addr: SocketAddr, request: &str, limit: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    // Read to the end; a server that keeps the connection open ends the answer with a timeout.
    let mut text = Vec::new();
    if let Err(e) = s.read_to_end(&mut text)
        && text.is_empty()
    {
        return Err(e.to_string());
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// A job as a `RawWorker` received it.
#[derive(Clone, Debug)]
pub struct Grabbed {
    pub handle: String,
    pub unique: String,
    pub payload: Vec<u8>,
}

/// A tiny blocking Gearman worker on the crate's sans-IO codec, for workers that misbehave on
/// purpose: huge results, bursts of WORK_DATA, jobs held forever. It registers one function and
/// grabs with GRAB_JOB_UNIQ (sleeping on NO_JOB until NOOP); everything it sends is written at
/// once, so its pace is the test's. ERROR packets from gearmand are kept in `errors`.
pub struct RawWorker {
    stream: TcpStream,
    session: gearsock::gearman::worker::WorkerSession,
    input: gearsock::buf::InBuf,
    out: Vec<u8>,
    pub errors: Vec<String>,
}

impl RawWorker {
    /// Connects to gearmand at `addr` and registers `function` (CAN_DO).
    pub fn connect(addr: &str, function: &str) -> RawWorker {
        let stream = TcpStream::connect(addr).expect("worker connect to gearmand");
        stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut w = RawWorker {
            stream,
            session: gearsock::gearman::worker::WorkerSession::new(64 << 20),
            input: gearsock::buf::InBuf::new(64 << 20),
            out: Vec::new(),
            errors: Vec::new(),
        };
        w.session.can_do(function.as_bytes(), &mut w.out);
        w.flush();
        w
    }

    fn flush(&mut self) {
        self.stream.write_all(&self.out).expect("worker write to gearmand");
        self.out.clear();
    }

    /// The next job gearmand hands out, or `None` if none came within `limit`. A grab left
    /// waiting carries over to the next call.
    pub fn grab(&mut self, limit: Duration) -> Option<Grabbed> {
        use gearsock::gearman::worker::WorkerEvent;
        let deadline = Instant::now() + limit;
        self.session.grab(&mut self.out);
        loop {
            self.flush();
            while let Some(event) = self.session.poll_event() {
                match event {
                    WorkerEvent::Assignment(a) => {
                        return Some(Grabbed {
                            handle: String::from_utf8_lossy(&a.handle).into_owned(),
                            unique: String::from_utf8_lossy(&a.unique).into_owned(),
                            payload: a.payload,
                        });
                    }
                    WorkerEvent::Error { code, message } => self.errors.push(format!("{code}: {message}")),
                    WorkerEvent::EchoRes(_) => {}
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left.min(Duration::from_millis(100)))).unwrap();
            let mut buf = [0u8; 64 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("gearmand closed the worker's connection"),
                Ok(n) => {
                    self.input.extend(&buf[..n]);
                    self.session.handle_input(&mut self.input, &mut self.out).expect("gearmand packet");
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("worker read: {e}"),
            }
        }
    }

    /// Grabs one job, panicking if none comes within `limit`.
    pub fn must_grab(&mut self, limit: Duration) -> Grabbed {
        self.grab(limit).expect("a job for the raw worker")
    }

    /// WORK_DATA of any size.
    pub fn data(&mut self, handle: &str, data: &[u8]) {
        self.session.work_data(handle.as_bytes(), data, &mut self.out);
        self.flush();
    }

    /// WORK_STATUS.
    pub fn status(&mut self, handle: &str, numerator: u64, denominator: u64) {
        self.session.work_status(handle.as_bytes(), numerator, denominator, &mut self.out);
        self.flush();
    }

    /// WORK_COMPLETE with a result of any size.
    pub fn complete(&mut self, handle: &str, result: &[u8]) {
        self.session.work_complete(handle.as_bytes(), result, &mut self.out);
        self.flush();
    }

    /// `n` WORK_DATA packets `d1` … `dn`, `pause` apart, then WORK_COMPLETE `done`: a job whose
    /// events a client can count and check the order of.
    pub fn numbered(&mut self, handle: &str, n: usize, pause: Duration) {
        for i in 1..=n {
            self.data(handle, format!("d{i}").as_bytes());
            std::thread::sleep(pause);
        }
        self.complete(handle, b"done");
    }

    /// `total` bytes of WORK_DATA in packets of `chunk` bytes, all written in one go (as fast
    /// as gearmand takes them).
    pub fn burst(&mut self, handle: &str, total: usize, chunk: usize) {
        let piece = vec![b'x'; chunk];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk);
            self.session.work_data(handle.as_bytes(), &piece[..n], &mut self.out);
            left -= n;
        }
        self.flush();
    }

    /// `total` bytes of WORK_DATA in packets of `chunk` bytes, paced at `bytes_per_s`.
    pub fn paced(&mut self, handle: &str, total: usize, chunk: usize, bytes_per_s: f64) {
        let piece = vec![b'x'; chunk];
        let start = Instant::now();
        let mut sent = 0;
        while sent < total {
            let due = start + Duration::from_secs_f64(sent as f64 / bytes_per_s);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let n = (total - sent).min(chunk);
            self.data(handle, &piece[..n]);
            sent += n;
        }
    }
}

/// A client frame as raw bytes, for tests that write the wire themselves: `first` is the FIN
/// bit and the opcode, the payload is masked with `key` (a zero key leaves it readable), and
/// the length takes the shortest form RFC 6455 allows.
pub fn client_frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    f
}

/// The article's report and its answer on `ws`, which needs no gearmand: the loop is serving.
pub fn report_round_trip(ws: &mut Ws) {
    send(ws, r#"{"type":"worker.complete","id":"H:x:1","value":"done"}"#);
    assert_eq!(recv(ws), "got it!");
}

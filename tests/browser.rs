//! The demo page (`GET /`) in a real headless Chromium, against a real gearmand, the real
//! `gearsock` server and the article's worker. Chromium is driven through the DevTools protocol
//! over a WebSocket (tungstenite, as everywhere else in the tests): no browser-automation crate.
//!
//! Chromium comes from Debian's `chromium` package (`scripts/test.sh` installs it); set
//! `CHROMIUM` to use another binary. A screenshot of the page is saved to
//! `target/artifacts/demo-page.png`.
//!
//! The second test loads the page through a TCP relay it controls, cuts the connection while a
//! job streams, and checks that `/gearsock.js` re-attaches the job so that the page shows each
//! of its events once, in order (`target/artifacts/demo-page-reattached.png`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::stream::MaybeTlsStream;

/// How long one DevTools command may take to answer.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// How long the page may take to show what a step waits for.
const STEP_LIMIT: Duration = Duration::from_secs(10);

/// A headless Chromium with one page attached over the DevTools protocol. Dropping it kills
/// Chromium's whole process group and removes its profile directory.
struct Chromium {
    child: Child,
    profile: PathBuf,
    devtools: Ws,
    next_id: u64,
    session: Option<String>,
}

impl Chromium {
    fn launch() -> Chromium {
        let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
        assert!(
            Path::new(&bin).exists(),
            "Chromium is missing: {bin} does not exist. Install it with `apt-get install -y chromium` \
             (scripts/test.sh does), or point CHROMIUM at a Chromium binary."
        );
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let profile = std::env::temp_dir().join(format!("gearsock-chromium-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&profile).expect("create Chromium profile directory");
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        // Chromium names its DevTools endpoint on stderr. A thread keeps draining stderr so that
        // Chromium never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut said = Vec::new();
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => match line.split_once("DevTools listening on ") {
                    Some((_, url)) => break url.trim().to_string(),
                    None => said.push(line),
                },
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = std::fs::remove_dir_all(&profile);
                    panic!(
                        "Chromium did not name its DevTools endpoint ({e:?}); it said:\n{}",
                        said.join("\n")
                    );
                }
            }
        };
        let (devtools, _) = tungstenite::connect(url.as_str()).expect("connect to Chromium's DevTools");
        if let MaybeTlsStream::Plain(s) = devtools.get_ref() {
            s.set_read_timeout(Some(CALL_LIMIT)).expect("read timeout");
        }
        let mut chromium = Chromium { child, profile, devtools, next_id: 0, session: None };
        // A fresh page, attached with a flat session: its commands carry the session id.
        let target = chromium.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached =
            chromium.call("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        chromium.session = Some(attached["sessionId"].as_str().expect("sessionId").to_string());
        chromium.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 860, "deviceScaleFactor": 1, "mobile": false}),
        );
        chromium
    }

    /// Sends one DevTools command (to the page once attached) and returns its result; events
    /// that arrive meanwhile are skipped.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            msg["sessionId"] = json!(session);
        }
        self.devtools.send(Message::text(msg.to_string())).unwrap_or_else(|e| panic!("send {method}: {e}"));
        let deadline = Instant::now() + CALL_LIMIT;
        loop {
            assert!(Instant::now() < deadline, "Chromium did not answer {method} within {CALL_LIMIT:?}");
            let text = match self.devtools.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(e) => panic!("waiting for Chromium's answer to {method}: {e}"),
            };
            let reply: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
            if reply["id"].as_u64() != Some(id) {
                continue;
            }
            if !reply["error"].is_null() {
                panic!("{method} failed: {}", reply["error"]);
            }
            return reply["result"].clone();
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise); the value, or the exception's text.
    fn try_eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true, "userGesture": true}),
        );
        match r.get("exceptionDetails") {
            Some(ex) => Err(ex["exception"]["description"].as_str().unwrap_or(&ex.to_string()).to_string()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr).unwrap_or_else(|e| panic!("`{expr}` threw: {e}"))
    }

    /// Polls `expr` until `done` accepts its value; on timeout, saves a screenshot and panics
    /// with what the page showed.
    fn wait_until(&mut self, what: &str, expr: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP_LIMIT;
        loop {
            let got = self.try_eval(expr);
            if let Ok(v) = &got
                && done(v)
            {
                return v.clone();
            }
            if Instant::now() > deadline {
                let text = self.try_eval("document.body && document.body.innerText").unwrap_or_default();
                let shot = self.screenshot("demo-page-failure.png");
                panic!(
                    "timed out waiting for {what}; last value: {got:?}\nscreenshot: {}\npage text:\n{}",
                    shot.display(),
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r["errorText"].is_null(), "navigating to {url}: {}", r["errorText"]);
        self.wait_until("the page to load", "document.readyState", |v| v == "complete");
    }

    /// A real mouse click (pressed and released) in the middle of the element.
    fn click(&mut self, selector: &str) {
        let what = format!("{selector} to be enabled");
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); return !!e && !e.disabled; }})()",
            json!(selector)
        );
        self.wait_until(&what, &expr, |v| v == true);
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.scrollIntoView({{block: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        ));
        let (x, y) = (at[0].as_f64().expect("x"), at[1].as_f64().expect("y"));
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "buttons": 1, "clickCount": 1}),
            );
        }
    }

    /// Replaces a text field's content as typed text.
    fn type_into(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.focus(); e.select(); }})()",
            json!(selector)
        ));
        self.call("Input.insertText", json!({"text": text}));
        let value = self.eval(&format!("document.querySelector({}).value", json!(selector)));
        assert_eq!(value, text, "{selector} after typing");
    }

    /// Picks an option of a `<select>` as a user would (the value changes, `change` fires).
    fn choose(&mut self, selector: &str, value: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); e.value = {}; \
             e.dispatchEvent(new Event('change', {{bubbles: true}})); }})()",
            json!(selector),
            json!(value)
        ));
    }

    /// Saves a PNG of the viewport to `target/artifacts/NAME`; returns its path.
    fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("artifacts");
        std::fs::create_dir_all(&dir).expect("create target/artifacts");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Chromium runs helpers (zygote, renderers) in its own process group: end them all.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `gearsock worker` (the article's ping worker), reporting `worker.complete` to `server`.
fn ping_worker(g: &Gearmand, server: &Server, count: u32, interval_ms: u64) -> Proc {
    let (gearmand, url) = (g.addr(), server.url());
    let (count, interval) = (count.to_string(), interval_ms.to_string());
    let mut w = Proc::spawn(&[
        "worker",
        "--gearmand",
        &gearmand,
        "--report",
        &url,
        "--count",
        &count,
        "--interval-ms",
        &interval,
    ]);
    assert_eq!(w.line(), "waiting");
    w
}

/// A second worker serving `slow`: 50 pings 100 ms apart, a job to catch mid-way.
fn slow_worker(g: &Gearmand, server: &Server) -> Proc {
    let (gearmand, url) = (g.addr(), server.url());
    let slow = ["--function", "slow", "--count", "50", "--interval-ms", "100"];
    let mut w =
        Proc::spawn(&[["worker", "--gearmand", &gearmand, "--report", &url].as_slice(), &slow].concat());
    assert_eq!(w.line(), "waiting");
    w
}

/// `gearsock serve` again on the address a killed one had.
fn restart_server(addr: &str, g: &Gearmand) -> Server {
    let args = [
        "serve",
        "--listen",
        addr,
        "--gearmand",
        &g.addr(),
        "--log-level",
        "warn",
        "--poll-interval-ms",
        "100",
        "--allow-function",
        "*",
    ];
    let mut proc = Proc::spawn(&args);
    assert_eq!(proc.line(), format!("listening on ws://{addr}"));
    let server = Server { proc, addr: addr.parse().expect("address") };
    server.wait_healthy();
    server
}

/// The texts of the log panel's lines.
const LOG_LINES: &str = "Array.from(document.querySelectorAll('#log .msg'), e => e.textContent)";

/// What a job card shows, as JSON.
fn job_card(reference: u32) -> String {
    format!(
        "(() => {{ const j = document.querySelector('.job[data-ref=\"{reference}\"]'); if (!j) return null; \
         const q = s => j.querySelector(s); return {{ state: j.dataset.state, handle: j.dataset.job || null, \
         pct: q('.bar').dataset.pct, width: q('.bar').style.width, progress: q('.pct').textContent, \
         data: Array.from(j.querySelectorAll('.data > div'), e => e.textContent), \
         result: q('.result').textContent, problem: q('.problem').textContent }}; }})()"
    )
}

#[test]
fn demo_page_runs_the_article_and_stream_jobs_in_chromium() {
    let started = Instant::now();
    let g = Gearmand::start();
    let s = Server::start(&g.addr(), &["--poll-interval-ms", "100"]);
    s.wait_healthy();
    let _worker = ping_worker(&g, &s, 5, 100);
    let mut chromium = Chromium::launch();

    // 1. The page loads from the server and opens its WebSocket.
    chromium.navigate(&format!("http://{}/", s.addr));
    chromium.wait_until("the connection to open", "document.querySelector('#state').dataset.state", |v| {
        v == "open"
    });
    let health = chromium.wait_until(
        "the health panel to show the gearmand",
        "(() => { const h = document.querySelector('#health'); return [h.dataset.status, h.textContent]; })()",
        |v| v[0] == "ok",
    );
    let health_text = health[1].as_str().unwrap_or("");
    assert!(health_text.contains(&g.addr()) && health_text.contains("connected"), "{health_text}");

    // 2. The article's ping: its three plain-text lines, in order.
    chromium.click("#ping");
    let lines = chromium.wait_until("the ping's value in the log", LOG_LINES, |v| {
        v.as_array().is_some_and(|l| l.iter().any(|l| l.as_str().is_some_and(|l| l.starts_with("value: "))))
    });
    let lines: Vec<&str> = lines.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let at = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let ack = at(&|l| l == "before the 'received' message").unwrap_or_else(|| panic!("no ack: {lines:?}"));
    let job = at(&|l| l.starts_with("job: H:")).unwrap_or_else(|| panic!("no job line: {lines:?}"));
    let value = at(&|l| l == "value: done").unwrap_or_else(|| panic!("no `value: done`: {lines:?}"));
    assert!(ack < job && job < value, "{lines:?}");

    // 3. A stream job through the form: live data, a progress bar that reaches 100%, the result.
    chromium.type_into("#function", "ping");
    chromium.type_into("#payload", "noop");
    chromium.choose("#mode", "stream");
    chromium.choose("#priority", "high");
    chromium.click("#submit-form button[type=submit]");
    let card = chromium.wait_until("the stream job to complete", &job_card(1), |v| v["state"] == "complete");
    assert_eq!(card["pct"], "100", "{card}");
    assert_eq!(card["width"], "100%", "{card}");
    assert_eq!(card["progress"], "5/5 · 100%", "{card}");
    assert_eq!(card["data"], json!(["ping 1", "ping 2", "ping 3", "ping 4", "ping 5"]), "{card}");
    assert_eq!(card["result"], "result:done", "{card}");
    assert!(card["handle"].as_str().is_some_and(|h| h.starts_with("H:")), "{card}");

    // A background job through the same form: polled, then completed with the worker's value.
    chromium.choose("#mode", "background");
    chromium.choose("#priority", "normal");
    chromium.click("#submit-form button[type=submit]");
    let card =
        chromium.wait_until("the background job to complete", &job_card(2), |v| v["state"] == "complete");
    assert_eq!((card["pct"].as_str(), card["result"].as_str()), (Some("100"), Some("result:done")), "{card}");

    // 4. The article's console snippet, run inside the page.
    let snippet = format!(
        r#"new Promise((resolve, reject) => {{
            var socket = new WebSocket("ws://{addr}");
            socket.addEventListener("message", function(e) {{ resolve(e.data); socket.close(); }});
            socket.addEventListener("open", function() {{
                socket.send(JSON.stringify({{type: "worker.complete", id: 1, value: "foo"}}));
            }});
            socket.addEventListener("error", function() {{ reject(new Error("websocket error")); }});
            setTimeout(function() {{ reject(new Error("no reply within 5 s")); }}, 5000);
        }})"#,
        addr = s.addr
    );
    assert_eq!(chromium.eval(&snippet), "got it!");

    // 5. A screenshot of the page after the jobs, for people to look at (from the top, once the
    // bars' transitions are over).
    chromium.eval("window.scrollTo(0, 0); document.activeElement && document.activeElement.blur()");
    std::thread::sleep(Duration::from_millis(400));
    let shot = chromium.screenshot("demo-page.png");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "{}", shot.display());

    // 6. The server restarts while a job runs: the page shows the disconnect, marks the job, and
    // reconnects by itself to the new server on the same address.
    let _slow = slow_worker(&g, &s);
    chromium.type_into("#function", "slow");
    chromium.choose("#mode", "stream");
    chromium.click("#submit-form button[type=submit]");
    chromium.wait_until("the slow job to stream", &job_card(3), |v| v["state"] == "running");
    let addr = s.addr.to_string();
    drop(s);
    let state = chromium.wait_until(
        "the page to show the disconnect",
        "(() => { const s = document.querySelector('#state'); return [s.dataset.state, s.textContent]; })()",
        |v| v[0] == "reconnecting",
    );
    assert!(state[1].as_str().is_some_and(|t| t.contains("reconnecting in")), "{state}");
    let card =
        chromium.wait_until("the running job to be marked", &job_card(3), |v| v["state"] == "disconnected");
    assert!(card["problem"].as_str().is_some_and(|p| p.contains("re-attached when it is back")), "{card}");
    let health = "document.querySelector('#health').dataset.status";
    chromium.wait_until("the health panel to see the server gone", health, |v| v == "unreachable");
    chromium.eval("window.scrollTo(0, 0)");
    chromium.screenshot("demo-page-disconnected.png");
    let s = restart_server(&addr, &g);
    chromium.wait_until("the page to reconnect", "document.querySelector('#state').dataset.state", |v| {
        v == "open"
    });
    let lines = chromium.eval(LOG_LINES);
    assert!(lines.as_array().is_some_and(|l| l.contains(&json!("connection open again"))), "{lines}");
    // The new server never had the job: gearsock.js's re-attach is refused, and the job ends.
    let card = chromium.wait_until("the orphaned job to be lost", &job_card(3), |v| v["state"] == "lost");
    assert!(card["problem"].as_str().is_some_and(|p| p.contains("unknown_job")), "{card}");
    chromium.type_into("#function", "ping");
    chromium.click("#submit-form button[type=submit]");
    let card = chromium.wait_until("a job after the restart", &job_card(4), |v| v["state"] == "complete");
    assert_eq!(card["result"], "result:done", "{card}");
    chromium.wait_until("the health panel to recover", health, |v| v == "ok");
    chromium.eval("window.scrollTo(0, 0)");
    std::thread::sleep(Duration::from_millis(300));
    chromium.screenshot("demo-page-reconnected.png");

    // 7. A function the server does not allow (gearsock.* never is): the card says forbidden.
    chromium.type_into("#function", "gearsock.nope");
    chromium.click("#submit-form button[type=submit]");
    let card = chromium.wait_until("the refusal", &job_card(5), |v| v["state"] == "error");
    let problem = card["problem"].as_str().unwrap_or("");
    assert!(problem.starts_with("forbidden") && problem.contains("gearsock.nope"), "{card}");
    assert_eq!(card["progress"], "forbidden", "{card}");
    drop(s);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

/// A TCP relay on a loopback port of its own, between the browser and the server: it pipes
/// bytes both ways, and [`Relay::cut`] ends every connection it holds (both sides) while it
/// goes on accepting new ones, as a network that drops a page's connection and comes back.
struct Relay {
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    accepter: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Binds the relay's port (so that the server can be told its origin before it starts).
    fn bind() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        (listener, addr)
    }

    /// Relays what `listener` accepts to `target`.
    fn start(listener: TcpListener, target: SocketAddr) -> Relay {
        listener.set_nonblocking(true).expect("nonblocking listener");
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (held2, stop2) = (Arc::clone(&held), Arc::clone(&stop));
        let accepter = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let Ok(server) = TcpStream::connect(target) else { continue };
                let _ = client.set_nonblocking(false);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) =
                    (client.try_clone(), server.try_clone(), client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                held2.lock().unwrap().extend([c3, s3]);
                std::thread::spawn(move || pipe(client, s2));
                std::thread::spawn(move || pipe(server, c2));
            }
        });
        Relay { held, stop, accepter: Some(accepter) }
    }

    /// Ends every connection relayed so far; later ones are relayed as before.
    fn cut(&self) -> usize {
        let held: Vec<TcpStream> = self.held.lock().unwrap().drain(..).collect();
        for s in &held {
            let _ = s.shutdown(Shutdown::Both);
        }
        held.len() / 2
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accepter.take() {
            let _ = t.join();
        }
        self.cut();
    }
}

/// Copies `from` to `to` until either ends, then passes the end on.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// `gearsock.js` on its own, in the page, against a stand-in WebSocket the script drives: the
/// seq bookkeeping that the end-to-end test cannot force (a repeat, a gap, a refused
/// re-attach, a job the server never named). Returns what the application saw.
const CLIENT_UNIT: &str = r#"(async () => {
  const sockets = [];
  class FakeWs {
    constructor(url) { this.url = url; this.sent = []; sockets.push(this); setTimeout(() => this.onopen(), 0); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() {}
    hear(msg) { this.onmessage({ data: JSON.stringify(msg) }); }
    drop() { this.onclose({ code: 1006, reason: "" }); }
  }
  const tick = (ms) => new Promise((r) => setTimeout(r, ms || 0));
  // Timers run late on a busy machine: wait for the state, not for a time.
  const until = async (what, cond) => {
    for (let i = 0; i < 400 && !cond(); i++) await tick(5);
    if (!cond()) throw new Error("timed out waiting for " + what);
  };
  const openOn = (n) => () => sockets.length > n && gs.state === "open";
  const gs = new Gearsock({ url: "ws://x", token: "T", WebSocket: FakeWs,
    reconnect: { minDelayMs: 1, maxDelayMs: 2 } });
  const seen = [], states = [];
  gs.on("state", (s) => states.push(s.state));
  const a = gs.submit({ function: "f", payload: "p" });
  const b = gs.submit({ function: "g" });
  a.on("event", (m) => seen.push(m.type + ":" + (m.seq || m.from || "")));
  const iterated = [];
  const iterating = (async () => { for await (const m of a) iterated.push(m.type); })();
  await until("the first connection", openOn(0));
  const first = sockets[0].sent.map((m) => m.type);
  sockets[0].hear({ type: "job.created", job: "H:1", ref: 1, seq: 1, resume: "R" });
  sockets[0].hear({ type: "job.data", job: "H:1", ref: 1, seq: 2, data: "x" });
  sockets[0].drop();                     // b was sent and never named: lost
  const queuedOk = gs.send({ type: "status", job: "H:1" });
  await until("the second connection", openOn(1));
  const again = sockets[1].sent;
  sockets[1].hear({ type: "job.attached", job: "H:1", ref: 1, seq: 6 });
  sockets[1].hear({ type: "job.data", job: "H:1", ref: 1, seq: 2, data: "x" });   // a repeat
  sockets[1].hear({ type: "job.gap", job: "H:1", from: 3, to: 4 });
  sockets[1].hear({ type: "job.data", job: "H:1", ref: 1, seq: 4, data: "old" }); // inside the gap
  sockets[1].hear({ type: "job.status", job: "H:1", ref: 1, seq: 5, numerator: 1, denominator: 2, known: true, running: true });
  sockets[1].hear({ type: "job.complete", job: "H:1", ref: 1, seq: 6, result: "R6" });
  const result = await a.done;
  await iterating;
  const bOutcome = await b.done.then(() => "resolved", (e) => e.code);
  const c = gs.submit({ function: "h" });
  sockets[1].hear({ type: "job.created", job: "H:2", ref: 3, seq: 1, resume: "S" });
  sockets[1].drop();
  await until("the third connection", openOn(2));
  sockets[2].hear({ type: "error", code: "rate_limited", ref: 3, message: "slow down", retry_after_ms: 10 });
  await until("the attach again", () => sockets[2].sent.filter((m) => m.type === "attach").length === 2);
  const attaches = () => sockets[2].sent.filter((m) => m.type === "attach").length;
  // No gearmand to relay the attach through: asked again after a back-off.
  sockets[2].hear({ type: "error", code: "unavailable", ref: 3, message: "no gearmand is taking jobs" });
  await until("the attach after unavailable", () => attaches() === 3);
  // Attached through a relay that then broke: attached again on the same connection.
  sockets[2].hear({ type: "job.attached", job: "H:2", ref: 3, seq: 1 });
  sockets[2].hear({ type: "error", code: "unavailable", job: "H:2", ref: 3, message: "the relay broke" });
  await until("the attach after the relay broke", () => attaches() === 4);
  sockets[2].hear({ type: "error", code: "unknown_job", ref: 3, message: "no such job" });
  const cOutcome = await c.done.then(() => "resolved", (e) => e.code + ": " + e.message);
  gs.close();
  return { first, again, queuedOk, seen, iterated, result, bOutcome, cOutcome,
           reattached: a.reattached, states };
})()"#;

#[test]
fn demo_page_reattaches_a_job_across_a_cut_connection() {
    let started = Instant::now();
    let g = Gearmand::start();
    // The page comes from the relay, so its origin is the relay's: the only one allowed. Client
    // tokens are on, so that every connection must authenticate before it may re-attach.
    let (listener, relay_addr) = Relay::bind();
    let origin = format!("http://{relay_addr}");
    let dir = std::env::temp_dir().join(format!("gearsock-browser-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key_file = dir.join("keys");
    std::fs::write(&key_file, "a-browser-test-secret-of-at-least-32-bytes\n").expect("key file");
    let key_path = key_file.to_str().expect("UTF-8 path");
    let minted = Command::new(BIN)
        .args(["token", "--key-file", key_path, "--sub", "page-user", "--ttl", "10m"])
        .output()
        .expect("run gearsock token");
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let token = String::from_utf8(minted.stdout).expect("UTF-8").trim().to_string();
    let s = Server::start_bare(
        &g.addr(),
        &["--allow-function", "slow", "--allowed-origin", &origin, "--client-token-key-file", key_path],
    );
    s.wait_healthy();
    let relay = Relay::start(listener, s.addr);
    let (gearmand, url) = (g.addr(), s.url());
    let slow = ["--function", "slow", "--count", "20", "--interval-ms", "150"];
    let mut worker =
        Proc::spawn(&[["worker", "--gearmand", &gearmand, "--report", &url].as_slice(), &slow].concat());
    assert_eq!(worker.line(), "waiting");
    let mut chromium = Chromium::launch();

    // The library on its own first (a stand-in socket, in the same page).
    chromium.navigate(&format!("{origin}/"));
    let module = chromium.eval(
        "import('/gearsock.mjs').then(m => [m.default === m.Gearsock, typeof m.default.Job, \
         typeof m.default.bytes, typeof window.Gearsock])",
    );
    assert_eq!(
        module,
        json!([true, "function", "function", "function"]),
        "the module, and the script's global"
    );
    let unit = chromium.eval(CLIENT_UNIT);
    assert_eq!(unit["first"], json!(["auth", "submit", "submit"]), "{unit}");
    let again = &unit["again"];
    assert_eq!(again[0], json!({"type": "auth", "token": "T"}), "{unit}");
    assert_eq!(
        again[1],
        json!({"type": "attach", "job": "H:1", "resume": "R", "after": 2, "ref": 1}),
        "{unit}"
    );
    assert_eq!(again[2], json!({"type": "status", "job": "H:1"}), "queued while away: {unit}");
    assert_eq!(unit["queuedOk"], true, "{unit}");
    assert_eq!(
        unit["seen"],
        json!([
            "job.created:1",
            "job.data:2",
            "job.attached:6",
            "job.gap:3",
            "job.status:5",
            "job.complete:6"
        ]),
        "each event once, in order, and the gap: {unit}"
    );
    assert_eq!(
        unit["iterated"],
        json!(["job.created", "job.data", "job.attached", "job.gap", "job.status", "job.complete"]),
        "{unit}"
    );
    assert_eq!((unit["result"].as_str(), unit["reattached"].as_u64()), (Some("R6"), Some(1)), "{unit}");
    assert_eq!(unit["bOutcome"], "lost", "sent, never named: {unit}");
    assert!(
        unit["cOutcome"].as_str().is_some_and(|c| c.starts_with("lost: could not re-attach (unknown_job")),
        "{unit}"
    );
    let states = [
        "connecting",
        "open",
        "reconnecting",
        "connecting",
        "open",
        "reconnecting",
        "connecting",
        "open",
        "closed",
    ];
    assert_eq!(unit["states"], json!(states), "{unit}");

    // The demo page, through the relay, runs a job of 20 data events 150 ms apart.
    chromium.navigate(&format!("{origin}/"));
    chromium.wait_until("the connection to open", "document.querySelector('#state').dataset.state", |v| {
        v == "open"
    });
    chromium.type_into("#token", &token);
    chromium.click("#auth");
    chromium.wait_until("the token to be taken", LOG_LINES, |v| {
        v.as_array().is_some_and(|l| {
            l.iter().any(|l| l.as_str().is_some_and(|l| l.starts_with("authenticated as page-user")))
        })
    });
    chromium.type_into("#function", "slow");
    chromium.type_into("#payload", "noop");
    chromium.choose("#mode", "stream");
    chromium.click("#submit-form button[type=submit]");
    let card = chromium.wait_until("a few data events", &job_card(1), |v| {
        v["data"].as_array().is_some_and(|d| d.len() >= 4)
    });
    // Mid-job, the network drops every connection of the page.
    let before = card["data"].as_array().map_or(0, Vec::len);
    assert!(before < 20, "the job was over before the cut: {card}");
    assert!(relay.cut() >= 1, "the relay held the page's WebSocket");
    let card = chromium.wait_until("the job to end", &job_card(1), |v| {
        v["state"].as_str().is_some_and(|s| !matches!(s, "running" | "created" | "disconnected" | "queued"))
    });
    let expected: Vec<String> = (1..=20).map(|i| format!("ping {i}")).collect();
    assert_eq!(card["data"], json!(expected), "every event once, in order: {card}");
    assert_eq!(
        (card["state"].as_str(), card["result"].as_str()),
        (Some("complete"), Some("result:done")),
        "{card}"
    );
    assert_eq!(card["progress"], "20/20 · 100%", "{card}");
    let badge = chromium.eval(
        "(() => { const j = document.querySelector('.job[data-ref=\"1\"]'); \
         return [j.dataset.reattached || null, j.querySelector('.reattached').textContent]; })()",
    );
    assert_eq!(badge, json!(["1", "re-attached"]), "the card shows the re-attach");
    let lines = chromium.eval(LOG_LINES);
    let has = |text: &str| {
        lines.as_array().is_some_and(|l| l.iter().any(|l| l.as_str().is_some_and(|l| l.starts_with(text))))
    };
    assert!(has("connection closed (code 1006") && has("connection open again"), "{lines}");
    assert!(has("job #1 re-attached: "), "{lines}");
    let authenticated = lines.as_array().map_or(0, |l| {
        l.iter().filter(|l| l.as_str().is_some_and(|l| l.starts_with("authenticated as page-user"))).count()
    });
    assert_eq!(authenticated, 2, "the page's click, then gearsock.js on the new connection: {lines}");
    assert_eq!(chromium.eval("document.querySelector('#state').dataset.state"), "open");

    chromium.eval("window.scrollTo(0, 0); document.activeElement && document.activeElement.blur()");
    std::thread::sleep(Duration::from_millis(400));
    let shot = chromium.screenshot("demo-page-reattached.png");
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "{}", shot.display());
    drop(chromium);
    drop(relay);
    drop(worker);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

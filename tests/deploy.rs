//! The deployment of `deploy/`: a real nginx running the repo's site file
//! (`deploy/nginx-gearsock.conf`) in front of a real `gearsock serve` started with the
//! systemd unit's own command line and open-file limit (`deploy/gearsock.service`), a real
//! gearmand and the article's worker. Everything listens on 127.0.0.1, on free ports.
//!
//! nginx comes from Debian's `nginx-light`: `scripts/test.sh` installs it, and so does this test
//! when `/usr/sbin/nginx` is missing (set `NGINX` to use another binary). The unit is checked
//! with `systemd-analyze verify` and `systemd-analyze security` when systemd-analyze exists.

mod common;

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

const SITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx-gearsock.conf");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gearsock.service");
/// What the unit's ExecStart names; the test runs the binary cargo built instead.
const INSTALLED_BIN: &str = "/usr/local/bin/gearsock";
/// The token in this test's stand-in for /etc/gearsock/worker-token.
const TOKEN: &str = "deploy-test-token-5f3a";
/// How long any one wait of this test may last.
const LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

fn nginx_bin() -> String {
    std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".to_string())
}

/// Installs Debian's nginx-light when there is no nginx (once per test binary: the tests run
/// on several threads and apt takes one install at a time).
fn ensure_nginx() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let bin = nginx_bin();
        if Path::new(&bin).exists() {
            return;
        }
        eprintln!("note: {bin} is missing; installing Debian's nginx-light with apt-get");
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let apt = |args: &[&str]| {
            let mut cmd = if root { Command::new("apt-get") } else { Command::new("sudo") };
            if !root {
                cmd.args(["-n", "apt-get"]); // fail at once rather than wait for a password
            }
            // Wait for another apt run (another test binary, another engineer) instead of failing.
            cmd.args(["-o", "DPkg::Lock::Timeout=300"]).args(args).env("DEBIAN_FRONTEND", "noninteractive");
            let status = cmd.stdin(Stdio::null()).status();
            assert!(
                status.as_ref().is_ok_and(|s| s.success()),
                "apt-get {args:?} failed ({status:?}); install nginx with \
                 `apt-get install -y nginx-light` (scripts/test.sh does), or point NGINX at a binary"
            );
        };
        apt(&["update"]);
        apt(&["install", "-y", "--no-install-recommends", "nginx-light"]);
        assert!(Path::new(&bin).exists(), "apt-get installed nginx-light but {bin} is still missing");
    });
}

/// A fresh directory under the system temp dir, removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("gearsock-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The repo's site file with its two deployment-specific values replaced: `listen 80;` by
/// `listen 127.0.0.1:PORT;` and gearsock's address `127.0.0.1:8080` by `upstream`. Each must
/// sit on exactly one uncommented line, so the file under test is the file as shipped.
fn site_for_test(port: u16, upstream: SocketAddr, admin: SocketAddr) -> String {
    let site = std::fs::read_to_string(SITE).expect("read deploy/nginx-gearsock.conf");
    let (mut listens, mut upstreams, mut admins) = (0, 0, 0);
    let mut out = String::new();
    for line in site.lines() {
        let code = line.split('#').next().unwrap_or("");
        let line = if code.contains("listen 80;") {
            listens += 1;
            line.replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        } else if code.contains("127.0.0.1:8080") {
            upstreams += 1;
            line.replace("127.0.0.1:8080", &upstream.to_string())
        } else if code.contains("127.0.0.1:8081") {
            admins += 1;
            line.replace("127.0.0.1:8081", &admin.to_string())
        } else {
            line.to_string()
        };
        let code = line.split('#').next().unwrap_or("");
        assert!(
            !code.contains("listen ") || code.contains("127.0.0.1:"),
            "a listen the test cannot move to 127.0.0.1: {line}"
        );
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(
        (listens, upstreams, admins),
        (1, 1, 1),
        "the site file must have one `listen 80;`, one 127.0.0.1:8080 and one 127.0.0.1:8081"
    );
    out
}

/// nginx in the foreground (`daemon off`) with a minimal top-level nginx.conf in a temp dir that
/// includes the repo's site file, pointed at `upstream`. Dropping it stops nginx (its whole
/// process group if it does not stop) and removes the directory.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    /// Removed after `drop` has stopped nginx (fields drop after it).
    dir: TempDir,
}

impl Nginx {
    fn start(upstream: SocketAddr, admin: SocketAddr) -> Nginx {
        ensure_nginx();
        let mut why = String::new();
        for _ in 0..5 {
            match Self::try_start(upstream, admin, free_port()) {
                Ok(nginx) => return nginx,
                Err(e) => why = e, // most likely someone took the port: try another
            }
        }
        panic!("nginx did not start on any of 5 free ports; last time:\n{why}");
    }

    fn try_start(upstream: SocketAddr, admin: SocketAddr, port: u16) -> Result<Nginx, String> {
        let site = site_for_test(port, upstream, admin);
        let dir = TempDir::new("nginx");
        let d = dir.0.display();
        std::fs::write(dir.0.join("gearsock.conf"), site).expect("write site");
        // Temp paths of the modules this nginx was built with (builds differ: older nginx-light
        // packages had no uwsgi or scgi), all in `dir`, so that nothing outside it is written.
        let version = Command::new(nginx_bin()).arg("-V").output().expect("nginx -V");
        let built = String::from_utf8_lossy(&version.stderr).into_owned();
        let mut temps = format!("client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n");
        for module in ["fastcgi", "uwsgi", "scgi"] {
            if !built.contains(&format!("--without-http_{module}_module")) {
                temps.push_str(&format!("    {module}_temp_path {d}/{module};\n"));
            }
        }
        let conf = format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
             events {{\n    worker_connections 256;\n}}\n\
             http {{\n    access_log {d}/access.log;\n    {temps}    include {d}/gearsock.conf;\n}}\n"
        );
        std::fs::write(dir.0.join("nginx.conf"), conf).expect("write nginx.conf");
        let child = Command::new(nginx_bin())
            .args(["-p", &format!("{d}/"), "-c", &format!("{d}/nginx.conf"), "-e", &format!("{d}/error.log")])
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", nginx_bin()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut nginx = Nginx { child, dir, addr };
        let start = Instant::now();
        while start.elapsed() < LIMIT {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                return Err(format!("nginx exited ({status}):\n{}", nginx.error_log()));
            }
            // nginx writes its pid file only after binding every listen address, so a listener
            // on the port is ours (not a stranger's that made our bind fail) once the file is
            // there.
            if nginx.dir.0.join("nginx.pid").exists()
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(nginx);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("nginx did not listen on {addr} within {LIMIT:?}:\n{}", nginx.error_log()))
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("error.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        // SIGTERM: nginx's fast shutdown; the master stops its worker, then exits.
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        let stopped = loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break true;
            }
            if start.elapsed() > Duration::from_secs(5) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !stopped {
            // The master is not reaped yet, so its process group id is still this nginx's.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The unit
// ---------------------------------------------------------------------------------------------

fn unit_text() -> String {
    std::fs::read_to_string(UNIT).expect("read deploy/gearsock.service")
}

/// The value of the unit's one `KEY=` line.
fn unit_value(key: &str) -> String {
    let text = unit_text();
    let mut values = text.lines().filter_map(|l| l.strip_prefix(key)?.strip_prefix('='));
    let value = values.next().unwrap_or_else(|| panic!("the unit has no {key}="));
    assert!(values.next().is_none(), "the unit has more than one {key}=");
    value.to_string()
}

/// `gearsock serve` exactly as the unit's ExecStart runs it, with what systemd would put in:
/// the token file as a credential, and the unit's LimitNOFILE. Only the addresses are
/// moved to this test's free ports and gearmand. Returns the server and its admin address.
fn serve_as_the_unit_does(gearmand: &str) -> (Server, SocketAddr) {
    let exec = unit_value("ExecStart");
    assert!(!exec.contains(['"', '\'']), "the test splits ExecStart on spaces: {exec}");
    let mut words: Vec<String> = exec.split_whitespace().map(String::from).collect();
    assert_eq!(words.first().map(String::as_str), Some(INSTALLED_BIN), "{exec}");
    assert_eq!(words.get(1).map(String::as_str), Some("serve"), "{exec}");
    for i in 1..words.len() {
        match words[i - 1].as_str() {
            "--listen" => {
                // Only the proxy on the same host may reach gearsock.
                assert!(words[i].starts_with("127.0.0.1:"), "gearsock must listen on loopback: {exec}");
                words[i] = "127.0.0.1:0".into();
            }
            "--gearmand" => words[i] = gearmand.into(),
            "--admin-listen" => {
                assert!(words[i].starts_with("127.0.0.1:"), "the admin port must be on loopback: {exec}");
                words[i] = format!("127.0.0.1:{}", free_port());
            }
            _ => {}
        }
    }
    let admin_at = words.iter().position(|w| w == "--admin-listen").expect("ExecStart passes --admin-listen");
    let admin: SocketAddr = words[admin_at + 1].parse().expect("an admin address");
    assert!(words.iter().any(|w| w == "--no-demo-page"), "the unit serves no demo page: {exec}");
    let token_at =
        words.iter().position(|w| w == "--worker-token-file").expect("ExecStart passes --worker-token-file");
    assert_eq!(words[token_at + 1], "${CREDENTIALS_DIRECTORY}/worker-token", "the token is a credential");
    assert_eq!(unit_value("LoadCredential"), "worker-token:/etc/gearsock/worker-token");
    // What systemd would hand over: a credentials directory holding the file.
    let credentials = TempDir::new("credentials");
    let token_file = credentials.0.join("worker-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
    words[token_at + 1] = token_file.to_str().expect("UTF-8 temp path").into();

    let files: libc::rlim_t = unit_value("LimitNOFILE").parse().expect("LimitNOFILE is one number");
    let mut cmd = Command::new(BIN);
    cmd.args(&words[1..]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut hard = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
    if got == 0 && hard.rlim_max >= files {
        // SAFETY: setrlimit is async-signal-safe, as a pre_exec hook must be.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: files, rlim_max: files };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    } else {
        eprintln!(
            "note: this machine's hard open-file limit ({}) is below the unit's LimitNOFILE={files}; \
             gearsock runs with this machine's limit",
            hard.rlim_max
        );
    }
    let mut child = cmd.spawn().expect("spawn gearsock serve");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    // Only the `listening on` line is on standard output (the log goes to standard error;
    // under systemd both go to the journal); anything else there is kept for the panic message.
    let mut said = Vec::new();
    let addr = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gearsock serve ended before listening; it said:\n{}", said.join(""));
        }
        match line.trim_end().strip_prefix("listening on ws://") {
            Some(addr) => break addr.parse().expect("address"),
            None => said.push(line),
        }
    };
    // Keep reading whatever else comes on standard output.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (Server { addr, proc: Proc { child, stdout: None } }, admin)
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP
// ---------------------------------------------------------------------------------------------

/// An HTTP answer: status, head (status line and headers) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// `GET path` to `addr` from the source address `from` (any 127.x address is this machine).
fn get_from(from: Ipv4Addr, addr: SocketAddr, path: &str) -> Answer {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(IpAddr::V4(from), 0).into()).expect("bind source address");
    socket.connect_timeout(&addr.into(), LIMIT).expect("connect");
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: gearsock.example.com\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head: {text:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    Answer { status, head: head.to_string(), body: body.to_string() }
}

fn get(addr: SocketAddr, path: &str) -> Answer {
    get_from(Ipv4Addr::LOCALHOST, addr, path)
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer.head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------------------------
// WebSocket helpers
// ---------------------------------------------------------------------------------------------

/// Submits a background job and returns its handle once `job.created` arrives.
fn submit_background(ws: &mut Ws, function: &str) -> String {
    send(
        ws,
        &json!({"type": "submit", "function": function, "payload": "p", "mode": "background"}).to_string(),
    );
    let created = recv_json(ws);
    assert_eq!(created["type"], "job.created", "{created}");
    created["job"].as_str().expect("job handle").to_string()
}

/// Sends a `worker.complete` and returns the reply: `got it!` or an error object.
fn report(ws: &mut Ws, fields: Value) -> String {
    let mut msg = json!({"type": "worker.complete"});
    for (k, v) in fields.as_object().expect("fields") {
        msg[k] = v.clone();
    }
    send(ws, &msg.to_string());
    recv(ws)
}

fn error_code(reply: &str) -> String {
    let v: Value =
        serde_json::from_str(reply).unwrap_or_else(|_| panic!("expected an error object, got {reply:?}"));
    assert_eq!(v["type"], "error", "{v}");
    v["code"].as_str().unwrap_or("").to_string()
}

/// The `job.complete` of a background job (status replies before it are skipped).
fn background_result(ws: &mut Ws) -> Value {
    loop {
        let v = recv_json(ws);
        match v["type"].as_str() {
            Some("job.status") => continue,
            Some("job.complete") => return v["result"].clone(),
            _ => panic!("expected job.complete, got {v}"),
        }
    }
}

/// The deployment: gearmand, gearsock as the unit runs it, nginx with the repo's site file.
struct Deployment {
    gearmand: Gearmand,
    gearsock: Server,
    /// gearsock's admin listener (`--admin-listen`).
    admin: SocketAddr,
    nginx: Nginx,
}

impl Deployment {
    fn start() -> Deployment {
        let gearmand = Gearmand::start();
        let (gearsock, admin) = serve_as_the_unit_does(&gearmand.addr());
        wait_for("gearsock ready", LIMIT, || get(admin, "/readyz").status == 200);
        let nginx = Nginx::start(gearsock.addr, admin);
        Deployment { gearmand, gearsock, admin, nginx }
    }

    /// A figure of gearsock's `/metrics`, from its admin port.
    fn metric(&self, name: &str) -> f64 {
        let body = get(self.admin, "/metrics").body;
        let line = body.lines().find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ')));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no metric {name}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// No demo page, and the admin pages from gearsock's admin port through nginx, to 127.0.0.1
/// only; the client port has none of them.
#[test]
fn demo_page_health_and_metrics_through_nginx() {
    let d = Deployment::start();

    let page = get(d.nginx.addr, "/");
    assert_eq!(page.status, 404, "--no-demo-page: {}", page.head);
    for path in ["/", "/metrics", "/healthz", "/livez", "/readyz"] {
        assert_eq!(get(d.gearsock.addr, path).status, 404, "{path} on the client port");
    }
    for path in ["/livez", "/readyz"] {
        assert_eq!(get(d.nginx.addr, path).status, 200, "{path}");
        assert_eq!(get_from(Ipv4Addr::new(127, 0, 0, 2), d.nginx.addr, path).status, 403, "{path}");
    }

    let health = get(d.nginx.addr, "/healthz");
    assert_eq!(health.status, 200, "{}", health.head);
    let health: Value = serde_json::from_str(&health.body).expect("/healthz is JSON");
    assert!(health.to_string().contains("connected"), "{health}");
    assert!(health.to_string().contains(&d.gearmand.addr()), "our gearmand: {health}");

    let metrics = get(d.nginx.addr, "/metrics");
    assert_eq!(metrics.status, 200, "{}", metrics.head);
    assert!(metrics.body.contains("gearsock_connections_open "), "{}", metrics.body);
    assert!(
        header(&metrics, "Content-Type").is_some_and(|t| t.starts_with("text/plain")),
        "{}",
        metrics.head
    );
    // Another address of this machine is not 127.0.0.1: the site file keeps /metrics local.
    let outside = get_from(Ipv4Addr::new(127, 0, 0, 2), d.nginx.addr, "/metrics");
    assert_eq!(outside.status, 403, "{}", outside.head);
    assert!(!outside.body.contains("gearsock_"), "{}", outside.body);
}

/// The article's ping, by a client and a worker that both reach gearsock through nginx; the
/// worker's `worker.complete` carries the token, as the unit's server requires.
#[test]
fn article_ping_through_nginx_with_the_worker_token() {
    let d = Deployment::start();
    let url = d.nginx.url();
    let gearmand = d.gearmand.addr();
    let mut worker = Proc::spawn(&[
        "worker",
        "--gearmand",
        &gearmand,
        "--report",
        &url,
        "--worker-token",
        TOKEN,
        "--count",
        "3",
        "--interval-ms",
        "20",
    ]);
    assert_eq!(worker.line(), "waiting");

    let mut ws = connect(&url);
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    let job = recv(&mut ws);
    let handle = job.strip_prefix("job: ").unwrap_or_else(|| panic!("{job}"));
    assert!(handle.starts_with("H:"), "{job}");
    assert_eq!(recv(&mut ws), "value: done");

    assert_eq!(worker.line(), format!("received: {handle}"));
    for i in 1..=3 {
        assert_eq!(worker.line(), format!("ping {i}"));
    }
    assert_eq!(worker.line(), "response: got it!", "the worker's report through nginx was taken");
    assert_eq!(worker.line(), "waiting");
}

/// Behind nginx every client looks local to gearsock. With the unit's --worker-token only a
/// report carrying the token is taken; without a token gearsock would still refuse proxied
/// reports, because the site file marks them with X-Forwarded-For / X-Real-IP.
#[test]
fn proxied_reports_are_taken_only_with_the_token() {
    let d = Deployment::start();
    let f = "report-deploy-held"; // the unit allows report-*
    let mut held = RawWorker::connect(&d.gearmand.addr(), f);
    let mut client = connect(&d.nginx.url());
    submit_background(&mut client, f);
    let job = held.must_grab(LIMIT);
    let mut reporter = connect(&d.nginx.url());
    for token in [None, Some("wrong"), Some(&TOKEN[1..])] {
        let reply = report(
            &mut reporter,
            json!({"id": job.handle, "unique": job.unique, "value": "x", "token": token}),
        );
        assert_eq!(error_code(&reply), "forbidden", "token {token:?}: {reply}");
    }
    let reply =
        report(&mut reporter, json!({"id": job.handle, "unique": job.unique, "value": "v1", "token": TOKEN}));
    assert_eq!(reply, "got it!");
    held.complete(&job.handle, b"");
    assert_eq!(background_result(&mut client), "v1", "the client gets the token holder's value");

    // The same site in front of a gearsock without a token: a report straight from loopback is
    // taken, the same report through nginx is not.
    let open = Server::start(&d.gearmand.addr(), &["--poll-interval-ms", "20"]);
    open.wait_healthy();
    let nginx = Nginx::start(open.addr, open.addr); // no --admin-listen: its pages on one port
    let mut client = connect(&nginx.url());
    submit_background(&mut client, f);
    let job = held.must_grab(LIMIT);
    let through_nginx = report(
        &mut connect(&nginx.url()),
        json!({"id": job.handle, "unique": job.unique, "value": "proxied"}),
    );
    assert_eq!(error_code(&through_nginx), "forbidden", "{through_nginx}");
    let direct =
        report(&mut connect(&open.url()), json!({"id": job.handle, "unique": job.unique, "value": "local"}));
    assert_eq!(direct, "got it!");
    held.complete(&job.handle, b"");
    assert_eq!(background_result(&mut client), "local");
}

/// gearsock sees a client that leaves through nginx as gone, whether it closes cleanly or just
/// drops the connection; and on SIGTERM (the unit's KillSignal) a client behind nginx gets
/// close 1001 and gearsock exits well within the unit's TimeoutStopSec.
#[test]
fn closes_pass_through_nginx_both_ways() {
    let mut d = Deployment::start();
    let open = |d: &Deployment| d.metric("gearsock_connections_open");
    let before = open(&d);
    let closed_before = d.metric("gearsock_connections_closed_total");

    // A clean close (close frame, answered).
    let mut ws = connect(&d.nginx.url());
    wait_for("gearsock to see the proxied client", LIMIT, || open(&d) == before + 1.0);
    ws.close(None).expect("send close");
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("after our close: {e}"),
        }
    }
    wait_for("gearsock to see the clean close", LIMIT, || open(&d) == before);
    assert!(d.metric("gearsock_connections_closed_total") > closed_before);

    // A client that vanishes (a closed tab, a dead network): the socket to nginx just closes.
    let ws = connect(&d.nginx.url());
    wait_for("gearsock to see the second client", LIMIT, || open(&d) == before + 1.0);
    drop(ws);
    wait_for("gearsock to see the dropped client", LIMIT, || open(&d) == before);

    // systemctl stop: SIGTERM to gearsock; the client behind nginx hears 1001.
    let mut ws = connect(&d.nginx.url());
    wait_for("gearsock to see the third client", LIMIT, || open(&d) == before + 1.0);
    assert_eq!(unit_value("KillSignal"), "SIGTERM");
    let stop_limit = unit_value("TimeoutStopSec");
    let stop_limit: u64 = stop_limit.trim_end_matches('s').parse().expect("TimeoutStopSec in seconds");
    let t0 = Instant::now();
    d.gearsock.proc.signal("TERM");
    let close = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame through nginx, got {e}"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away), "1001 going away");
    drop(ws);
    let code = d.gearsock.proc.wait_exit(Duration::from_secs(stop_limit));
    assert_eq!(code, Some(0), "gearsock exits cleanly on SIGTERM");
    assert!(t0.elapsed() < Duration::from_secs(stop_limit), "stopped within TimeoutStopSec");
}

/// `systemd-analyze verify` on the unit as shipped, except that ExecStart names the binary cargo
/// built (verify refuses an ExecStart whose binary is missing, and /usr/local/bin/gearsock is
/// not installed here); `systemd-analyze security` keeps its exposure score low; and gearsock
/// refuses to start with the unit's token file missing or empty.
#[test]
fn unit_passes_systemd_analyze_and_refuses_an_empty_token() {
    let unit = unit_text();
    assert_eq!(unit.matches(INSTALLED_BIN).count(), 1, "the binary is named once, in ExecStart");

    // No token, no start: a missing or empty credential file stops gearsock before it listens.
    let dir = TempDir::new("token");
    let refused = |path: &Path| {
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--worker-token-file"])
            .arg(path)
            .output()
            .expect("run gearsock");
        assert!(!out.status.success(), "gearsock started with {path:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let empty = dir.0.join("empty");
    std::fs::write(&empty, "\n").expect("write");
    assert!(refused(&empty).contains("holds no token"));
    assert!(refused(&dir.0.join("missing")).contains("cannot read"));

    let analyze = "/usr/bin/systemd-analyze";
    if !Path::new(analyze).exists() {
        eprintln!("note: {analyze} is missing; the unit's syntax was not checked (install systemd)");
        return;
    }
    let dir = TempDir::new("unit");
    let copy = dir.0.join("gearsock.service");
    std::fs::write(&copy, unit.replace(INSTALLED_BIN, BIN)).expect("write the unit copy");
    let verify =
        Command::new(analyze).args(["verify", "--man=no"]).arg(&copy).output().expect("systemd-analyze");
    let said =
        String::from_utf8_lossy(&verify.stderr).into_owned() + &String::from_utf8_lossy(&verify.stdout);
    // Exposure out of 10, lower is safer: the unit scores 1.1 today; fail past 2.0.
    let security = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "systemd-analyze security: exposure above 2.0:\n{}",
        report.lines().filter(|l| l.contains('✗') || l.contains("Overall")).collect::<Vec<_>>().join("\n")
    );
}

/// The site file as shipped (port 80, 127.0.0.1:8080) where Debian's nginx.conf includes
/// sites-enabled/*, next to Debian's default site: `nginx -t` accepts it. This needs Debian's
/// /etc/nginx and root (nginx -t opens the log files nginx.conf names).
#[test]
fn site_file_as_shipped_passes_nginx_t_in_debians_layout() {
    ensure_nginx();
    let debian = "/etc/nginx/nginx.conf";
    let include = "include /etc/nginx/sites-enabled/*;";
    let conf = std::fs::read_to_string(debian).unwrap_or_default();
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !conf.contains(include) || !root {
        eprintln!("note: not root, or no Debian {debian} with `{include}`: nginx -t skipped");
        return;
    }
    let dir = TempDir::new("nginx-t");
    let copy = dir.0.join("nginx.conf");
    std::fs::write(&copy, conf.replace(include, &format!("{include}\n    include {SITE};"))).expect("write");
    let out = Command::new(nginx_bin()).arg("-t").arg("-c").arg(&copy).output().expect("nginx -t");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nginx -t with the site in Debian's nginx.conf:\n{said}");
    assert!(!said.contains("[warn]") && !said.contains("[emerg]"), "{said}");
}

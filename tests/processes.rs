//! `gearsock serve --processes N`: one port shared by N event-loop processes under a
//! supervisor. Real gearmand, the real binary, real WebSocket clients; the group's own
//! `/metrics` and `/healthz` say where the clients landed.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

/// The article's report, answered `got it!` by the loop itself (no worker needed).
const REPORT: &str = r#"{"type":"worker.complete","id":"H:x:1","value":"done"}"#;

/// `gearsock serve --processes N` at the default log level, with its standard error.
fn start_group(gearmand: &str, processes: usize) -> (Server, LogLines) {
    let n = processes.to_string();
    let args = ["serve", "--processes", &n, "--listen", "127.0.0.1:0", "--gearmand", gearmand];
    let mut proc = Proc::spawn_env(&args, &[], Stdio::piped());
    let log = proc.collect_stderr();
    let line = proc.line();
    let addr = line.strip_prefix("listening on ws://").unwrap_or_else(|| panic!("unexpected: {line}"));
    let addr = addr.parse().expect("address");
    (Server { proc, addr }, log)
}

/// A sample per process of `name` (a family with no other label), by slot.
fn per_process(s: &Server, name: &str) -> BTreeMap<usize, f64> {
    let (_, body) = s.http("GET", "/metrics");
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix("{process=\"")?;
            let (slot, value) = rest.split_once("\"} ")?;
            Some((slot.parse().ok()?, value.parse().ok()?))
        })
        .collect()
}

/// `/healthz` as JSON.
fn health(s: &Server) -> serde_json::Value {
    let (_, body) = s.http("GET", "/healthz");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("healthz is not JSON ({e}): {body}"))
}

/// Every process runs, publishes, and has its gearmand.
fn wait_all_ok(s: &Server) {
    wait_for("every process up and healthy", Duration::from_secs(20), || health(s)["status"] == "ok");
}

/// The pid the supervisor runs in `slot`, from `/healthz`.
fn pid_of(s: &Server, slot: usize) -> u32 {
    health(s)["processes"][slot]["pid"].as_u64().expect("pid") as u32
}

/// A round trip that may fail (the client's process is gone).
fn try_round_trip(ws: &mut Ws) -> bool {
    if ws.send(Message::text(REPORT)).is_err() {
        return false;
    }
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return t.as_str() == "got it!",
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return false,
        }
    }
}

/// `count` clients, each with a first round trip done.
fn clients(s: &Server, count: usize) -> Vec<Ws> {
    let mut all = Vec::with_capacity(count);
    for _ in 0..count {
        let mut ws = connect(&s.url());
        assert!(try_round_trip(&mut ws), "a new client is served");
        all.push(ws);
    }
    all
}

#[test]
fn connections_land_on_every_process_and_a_killed_one_is_replaced() {
    let g = Gearmand::start();
    let (s, log) = start_group(&g.addr(), 2);
    wait_all_ok(&s);
    let mut held = clients(&s, 40);

    // The kernel spread them: the group's figures show upgrades on both processes, 40 in all.
    let mut upgrades = BTreeMap::new();
    wait_for("both processes' upgrades on the board", Duration::from_secs(10), || {
        upgrades = per_process(&s, "gearsock_handshakes_total");
        upgrades.values().sum::<f64>() == 40.0
    });
    assert_eq!(upgrades.len(), 2, "{upgrades:?}");
    assert!(upgrades.values().all(|&n| n > 0.0), "connections landed on one process only: {upgrades:?}");
    let open = per_process(&s, "gearsock_connections_open");
    assert!(open.len() == 2 && open.values().all(|&n| n > 0.0), "{open:?}");

    // SIGKILL the first process: its clients are cut, the other's carry on.
    let victim = pid_of(&s, 0);
    let ok = std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().expect("kill");
    assert!(ok.success());
    held.retain_mut(try_round_trip);
    assert_eq!(held.len() as f64, upgrades[&1], "exactly the survivor's clients are still served");

    // The supervisor restarts it in the same slot, with a new pid.
    wait_for("p0 restarted", Duration::from_secs(20), || {
        let h = health(&s);
        let p0 = &h["processes"][0];
        p0["up"] == true && p0["pid"].as_u64() != Some(u64::from(victim)) && p0["restarts"] == 1
    });
    wait_all_ok(&s);
    assert_eq!(per_process(&s, "gearsock_process_up").values().sum::<f64>(), 2.0);
    assert_eq!(per_process(&s, "gearsock_process_restarts_total").get(&0), Some(&1.0));
    let killed = format!("process p0 (pid {victim}) was killed by signal 9 (SIGKILL)");
    assert_eq!(log.count(&killed), 1, "{:?}", log.lines());
    assert_eq!(log.count("process p0 restarted as pid"), 1, "{:?}", log.lines());

    // The survivors are still served, and new clients too.
    assert!(held.iter_mut().all(try_round_trip));
    clients(&s, 10);
}

#[test]
fn every_ping_hears_its_value_whichever_process_the_workers_report_lands_in() {
    let g = Gearmand::start();
    let (s, _log) = start_group(&g.addr(), 2);
    wait_all_ok(&s);
    // One worker, one report connection: it lands in one process, while the pings' clients
    // land in both, so about half of the reports must be forwarded to the other process.
    let (gearmand, url) = (g.addr(), s.url());
    let args = ["worker", "--gearmand", &gearmand, "--count", "1", "--interval-ms", "1", "--report", &url];
    let mut worker = Proc::spawn(&args);
    assert_eq!(worker.line(), "waiting");
    let mut pingers: Vec<Ws> = (0..20).map(|_| connect(&s.url())).collect();
    wait_for("every client on the board", Duration::from_secs(10), || {
        per_process(&s, "gearsock_handshakes_total").values().sum::<f64>() == 20.0
    });
    let upgrades = per_process(&s, "gearsock_handshakes_total");
    assert!(upgrades.values().all(|&n| n > 0.0), "the clients landed in one process: {upgrades:?}");
    // Each process is an instance of its own, named after its slot.
    let h = health(&s);
    let ids: Vec<&str> = (0..2).filter_map(|i| h["processes"][i]["instance"].as_str()).collect();
    assert!(ids.len() == 2 && ids[0].ends_with("-0") && ids[1].ends_with("-1"), "{h}");
    for ws in &mut pingers {
        send(ws, r#"{"type":"ping"}"#);
    }
    for ws in &mut pingers {
        assert_eq!(recv(ws), "before the 'received' message");
        assert!(recv(ws).starts_with("job: H:"));
        assert_eq!(recv(ws), "value: done");
    }
    let forwarded = r#"outcome="sent""#;
    wait_for("the forwards on the board", Duration::from_secs(5), || {
        s.metric_sum("gearsock_reports_forwarded_total", forwarded) > 0.0
            && s.metric_sum("gearsock_reports_received_total", r#"outcome="delivered""#)
                == s.metric_sum("gearsock_reports_forwarded_total", forwarded)
    });
}

#[test]
fn sigterm_closes_every_client_with_1001_and_stops_every_process() {
    let g = Gearmand::start();
    let (mut s, log) = start_group(&g.addr(), 2);
    wait_all_ok(&s);
    let pids = [pid_of(&s, 0), pid_of(&s, 1)];
    let mut held = clients(&s, 20);
    wait_for("every upgrade on the board", Duration::from_secs(10), || {
        per_process(&s, "gearsock_handshakes_total").values().sum::<f64>() == 20.0
    });

    s.proc.signal("TERM");
    for ws in &mut held {
        set_read_timeout(ws, Duration::from_secs(10));
        let code = loop {
            match ws.read() {
                Ok(Message::Close(frame)) => break frame.map(|f| f.code),
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        };
        assert_eq!(code, Some(CloseCode::Away));
    }
    assert_eq!(s.proc.wait_exit(Duration::from_secs(15)), Some(0), "the supervisor exits 0");
    for pid in pids {
        wait_for("the child to be gone", Duration::from_secs(5), || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
    }
    assert_eq!(log.count("group stopped"), 1, "{:?}", log.lines());
    assert_eq!(log.count("closing every client with 1001"), 2, "{:?}", log.lines());
}

#[test]
fn a_port_in_use_is_refused_before_any_process_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap().to_string();
    let args = ["serve", "--processes", "2", "--listen", &addr, "--echo"];
    let mut proc = Proc::spawn_env(&args, &[], Stdio::piped());
    let log = proc.collect_stderr();
    assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(1));
    wait_for("the reason", Duration::from_secs(2), || log.count(&format!("cannot listen on {addr}")) == 1);
    assert_eq!(log.count("p0"), 0, "no process was started: {:?}", log.lines());
}

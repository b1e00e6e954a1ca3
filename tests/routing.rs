//! Reports between instances: two `gearsock serve` processes on different ports share one real
//! gearmand, and the worker reports to the instance that does not hold the job. The report
//! must still reach the job, forwarded through gearmand to the owner's desk function.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// `gearsock worker` (the article's ping worker), reporting to `report`.
fn ping_worker(g: &Gearmand, report: &Server) -> Proc {
    let (gearmand, url) = (g.addr(), report.url());
    let args = ["worker", "--gearmand", &gearmand, "--count", "3", "--interval-ms", "20", "--report", &url];
    let mut w = Proc::spawn(&args);
    assert_eq!(w.line(), "waiting");
    w
}

/// Two instances with known ids on one gearmand, both up.
fn two_instances(g: &Gearmand) -> (Server, Server) {
    let alpha = Server::start(&g.addr(), &["--poll-interval-ms", "20", "--instance-id", "alpha"]);
    let beta = Server::start(&g.addr(), &["--poll-interval-ms", "20", "--instance-id", "beta"]);
    alpha.wait_healthy();
    beta.wait_healthy();
    for (server, id) in [(&alpha, "alpha"), (&beta, "beta")] {
        let health: serde_json::Value =
            serde_json::from_str(&server.http("GET", "/healthz").1).expect("JSON");
        assert_eq!(health["instance"], id, "{health}");
    }
    (alpha, beta)
}

const SENT: &str = "gearsock_reports_forwarded_total{outcome=\"sent\"}";
const DELIVERED: &str = "gearsock_reports_received_total{outcome=\"delivered\"}";

#[test]
fn the_articles_ping_hears_its_value_from_a_worker_reporting_to_the_other_instance() {
    let g = Gearmand::start();
    let (alpha, beta) = two_instances(&g);
    let mut w = ping_worker(&g, &beta);
    let mut ws = connect(&alpha.url());
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    let job = recv(&mut ws);
    let handle = job.strip_prefix("job: ").unwrap_or_else(|| panic!("{job}"));
    assert_eq!(recv(&mut ws), "value: done");
    assert_eq!(w.line(), format!("received: {handle}"));
    for i in 1..=3 {
        assert_eq!(w.line(), format!("ping {i}"));
    }
    assert_eq!(w.line(), "response: got it!", "beta took the report for alpha's job");
    assert_eq!(beta.metric(SENT), 1.0, "beta forwarded it");
    assert_eq!(alpha.metric(DELIVERED), 1.0, "alpha delivered it");
    assert_eq!(alpha.metric("gearsock_stored_values") + beta.metric("gearsock_stored_values"), 0.0);
}

#[test]
fn a_background_job_completes_with_the_value_reported_to_the_other_instance() {
    let g = Gearmand::start();
    let (alpha, beta) = two_instances(&g);
    let _w = ping_worker(&g, &alpha);
    // This time the job lives on beta and the report goes to alpha.
    let mut ws = connect(&beta.url());
    let submit =
        json!({"type": "submit", "function": "ping", "payload": "noop", "mode": "background", "ref": 7});
    send(&mut ws, &submit.to_string());
    let created = recv_json(&mut ws);
    assert_eq!((created["type"].as_str(), created["ref"].as_i64()), (Some("job.created"), Some(7)));
    let done = loop {
        let v = recv_json(&mut ws);
        if v["type"] != "job.status" {
            break v;
        }
    };
    assert_eq!(done["type"], "job.complete", "{done}");
    assert_eq!((done["result"].as_str(), done["ref"].as_i64()), (Some("done"), Some(7)), "{done}");
    assert_eq!(alpha.metric(SENT), 1.0);
    assert_eq!(beta.metric(DELIVERED), 1.0);
}

#[test]
fn a_report_for_an_unknown_job_of_this_instance_is_refused_not_forwarded() {
    let g = Gearmand::start();
    let (alpha, _beta) = two_instances(&g);
    let mut ws = connect(&alpha.url());
    send(&mut ws, r#"{"type":"worker.complete","unique":"alpha.nosuchjob","value":"x"}"#);
    assert_eq!(recv_json(&mut ws)["code"], "unknown_job");
    assert_eq!(alpha.metric(SENT), 0.0);
}

#[test]
fn routing_comes_back_with_a_restarted_gearmand() {
    let mut g = Gearmand::start();
    let (alpha, beta) = two_instances(&g);
    // gearmand dies with every desk registration; on reconnect each link registers again.
    g.kill();
    let g = Gearmand::start_on(g.port);
    for server in [&alpha, &beta] {
        wait_for("the link to reconnect", Duration::from_secs(10), || {
            server.metric("gearsock_gearmand_connects_total") == 2.0
        });
        server.wait_healthy();
    }
    let mut w = ping_worker(&g, &beta);
    let mut ws = connect(&alpha.url());
    send(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(recv(&mut ws), "before the 'received' message");
    assert!(recv(&mut ws).starts_with("job: H:"));
    assert_eq!(recv(&mut ws), "value: done");
    assert!(w.line().starts_with("received: "));
    assert_eq!(beta.metric(SENT), 1.0);
    assert_eq!(alpha.metric(DELIVERED), 1.0);
}

//! Plain HTTP on the WebSocket port, sans-IO: which page a request gets, and the bodies of
//! `/healthz` and `/metrics`. The shell hands over the parsed request and a snapshot of the
//! state these pages report on; it never decides a status code itself.

use serde_json::json;

use crate::metrics::{Gauges, Metrics};

/// The demo page, built into the binary.
const DEMO_PAGE: &str = include_str!("demo.html");
/// `GET /` in echo mode: the demo page speaks the job protocol, which echo mode does not.
const ECHO_PAGE: &str =
    "gearsock echo server: every WebSocket text or binary message is sent back as it came\n";

/// One gearmand as the pages show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkView {
    /// `HOST:PORT` as configured.
    pub addr: String,
    /// `connected`, `stalled`, `connecting`, `resolving` or `disconnected`.
    pub state: &'static str,
    /// Connections made so far.
    pub connects: u64,
    /// Connections retiring (finishing their jobs before they close).
    pub retiring: usize,
}

/// What the pages report on, gathered by the shell when a page that needs it is asked for.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// Each gearmand.
    pub links: Vec<LinkView>,
    /// Live values.
    pub gauges: Gauges,
    /// Counters.
    pub metrics: &'a Metrics,
}

/// An answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Its reason phrase.
    pub reason: &'static str,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    fn new(status: u16, reason: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, reason, content_type, body: body.into() }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Answers `method` `path` (query ignored); `echo`: the server runs in echo mode. `snapshot`
/// is called only for the pages that report state.
pub fn route<'a>(method: &str, path: &str, echo: bool, snapshot: impl FnOnce() -> Snapshot<'a>) -> Response {
    let path = path.split('?').next().unwrap_or("");
    if !matches!(path, "/" | "/healthz" | "/metrics") {
        return Response::new(404, "Not Found", TEXT, "not found\n");
    }
    if method != "GET" {
        return Response::new(405, "Method Not Allowed", TEXT, "only GET\n");
    }
    match path {
        "/healthz" => healthz(echo, &snapshot()),
        "/metrics" => {
            let s = snapshot();
            let text = s.metrics.render(&s.gauges);
            Response::new(200, "OK", "text/plain; version=0.0.4; charset=utf-8", text)
        }
        // The demo page speaks the job protocol, which echo mode does not.
        _ if echo => Response::new(200, "OK", TEXT, ECHO_PAGE),
        _ => Response::new(200, "OK", "text/html; charset=utf-8", DEMO_PAGE),
    }
}

/// 200 while some gearmand is connected and not stalled (always, in echo mode: nothing to
/// depend on), 503 otherwise; JSON either way.
fn healthz(echo: bool, s: &Snapshot) -> Response {
    let body = if echo {
        json!({"status": "ok", "mode": "echo", "gearmand": [], "connections": s.gauges.connections})
    } else {
        let any_up = s.links.iter().any(|l| l.state == "connected");
        let servers: Vec<_> = s
            .links
            .iter()
            .map(|l| json!({"server": l.addr, "state": l.state, "connects": l.connects, "retiring": l.retiring}))
            .collect();
        json!({
            "status": if any_up { "ok" } else { "unavailable" },
            "gearmand": servers,
            "connections": s.gauges.connections,
            "jobs_in_flight": s.gauges.jobs_in_flight,
            "jobs_queued": s.gauges.jobs_queued,
        })
    };
    let ok = body["status"] == "ok";
    let (status, reason) = if ok { (200, "OK") } else { (503, "Service Unavailable") };
    Response::new(status, reason, "application/json", format!("{body}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot<'a>(metrics: &'a Metrics, states: &[&'static str]) -> Snapshot<'a> {
        let links = states
            .iter()
            .map(|&state| LinkView { addr: "127.0.0.1:4730".into(), state, connects: 1, retiring: 0 })
            .collect();
        Snapshot { links, gauges: Gauges { connections: 3, ..Gauges::default() }, metrics }
    }

    #[test]
    fn paths_methods_and_pages() {
        let m = Metrics::default();
        let page = route("GET", "/?x=1", false, || unreachable!("no snapshot for a page"));
        assert_eq!((page.status, page.content_type), (200, "text/html; charset=utf-8"));
        assert_eq!(
            route("GET", "/", true, || unreachable!("no snapshot for a page")).body,
            ECHO_PAGE.as_bytes()
        );
        assert_eq!(route("POST", "/healthz", false, || unreachable!("no snapshot for a 405")).status, 405);
        assert_eq!(route("GET", "/nope", false, || unreachable!("no snapshot for a 404")).status, 404);
        let metrics = route("GET", "/metrics", false, || snapshot(&m, &["connected"]));
        assert!(String::from_utf8_lossy(&metrics.body).contains("gearsock_connections_open 3"));
    }

    #[test]
    fn health_follows_the_gearmand_links() {
        let m = Metrics::default();
        let up = route("GET", "/healthz", false, || snapshot(&m, &["stalled", "connected"]));
        assert_eq!(up.status, 200);
        let down = route("GET", "/healthz", false, || snapshot(&m, &["stalled", "resolving"]));
        assert_eq!(down.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&down.body).unwrap();
        assert_eq!(
            (body["status"].as_str(), body["gearmand"][1]["state"].as_str()),
            (Some("unavailable"), Some("resolving"))
        );
        let echo = route("GET", "/healthz", true, || snapshot(&m, &[]));
        assert_eq!(echo.status, 200, "echo mode depends on no gearmand");
    }
}

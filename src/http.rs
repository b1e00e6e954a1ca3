//! Plain HTTP on the WebSocket port and the admin port, sans-IO: which page a request gets on
//! which port, and the bodies of `/livez`, `/readyz`, `/healthz` and `/metrics`. The shell
//! hands over the parsed request and a snapshot of the state these pages report on; it never
//! decides a status code itself.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::metrics::{Gauges, LinkStatus, Metrics};

/// The demo page, built into the binary.
const DEMO_PAGE: &str = include_str!("demo.html");
/// The browser client as a classic script: it defines the global `Gearsock`.
const CLIENT_SCRIPT: &str = include_str!("gearsock.js");
/// The same client as an ES module: the script's text, then its exports.
const CLIENT_MODULE: &str =
    concat!(include_str!("gearsock.js"), "\nexport { Gearsock };\nexport default Gearsock;\n");
/// `Content-Type` of both (RFC 9239).
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
/// `GET /` in echo mode: the demo page speaks the job protocol, which echo mode does not.
const ECHO_PAGE: &str =
    "gearsock echo server: every WebSocket text or binary message is sent back as it came\n";

/// One gearmand as the pages show it (and as a process of a group publishes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct LinkView {
    /// `HOST:PORT` as configured.
    pub addr: String,
    /// How it is shown (`connected`, `stalled`, `connecting`, `resolving`, `disconnected`).
    pub state: LinkStatus,
    /// Connections made so far.
    pub connects: u64,
    /// Connections retiring (finishing their jobs before they close).
    pub retiring: usize,
}

/// What the pages report on, gathered by the shell when a page that needs it is asked for.
#[derive(Debug)]
pub(crate) struct Snapshot<'a> {
    /// This instance's id (`--instance-id`, or drawn at startup).
    pub instance: &'a str,
    /// Each gearmand.
    pub links: Vec<LinkView>,
    /// Live values.
    pub gauges: Gauges,
    /// Counters.
    pub metrics: &'a Metrics,
}

/// An answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Response {
    /// Status code.
    pub status: u16,
    /// Its reason phrase.
    pub reason: &'static str,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// A 405 names the methods the page has (RFC 9110 15.5.6).
    pub allow: Option<&'static str>,
    /// `Access-Control-Allow-Origin: *`: a page of another origin may load it as a module.
    pub any_origin: bool,
}

impl Response {
    fn new(status: u16, reason: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response { status, reason, content_type, body: body.into(), allow: None, any_origin: false }
    }

    /// The response on the wire; `head_only` (a `HEAD` request): the same head, its
    /// `Content-Length` included, without the body (RFC 9110 9.3.2).
    pub fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.body.len());
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(methods) = self.allow {
            headers.push(("Allow", methods));
        }
        if self.any_origin {
            headers.push(("Access-Control-Allow-Origin", "*"));
        }
        crate::ws::write_http_with(
            &mut out,
            self.status,
            self.reason,
            self.content_type,
            &headers,
            &self.body,
        );
        if head_only {
            out.truncate(out.len() - self.body.len());
        }
        out
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The pages of this port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Page {
    /// `GET /`: the demo page (a short text in echo mode).
    Demo,
    /// `GET /gearsock.js`: the browser client as a classic script.
    Script,
    /// `GET /gearsock.mjs`: the browser client as an ES module.
    Module,
    /// `GET /healthz`: `/readyz` with the details, as JSON (its meaning before `/readyz`).
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /livez`: 200 whenever the loop answers at all.
    Live,
    /// `GET /readyz`: 200 when jobs can be taken, 503 and the reason otherwise.
    Ready,
}

/// Which pages a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pages {
    /// `/` (off with `--no-demo-page`). The browser client (`/gearsock.js`, `/gearsock.mjs`)
    /// is not the demo: applications load it, so the client port always serves it.
    pub demo: bool,
    /// `/gearsock.js` and `/gearsock.mjs`: the client port's, never the admin port's.
    pub client: bool,
    /// `/metrics`, `/livez`, `/readyz`, `/healthz` (off on the client port when
    /// `--admin-listen` gives them a port of their own).
    pub admin: bool,
}

impl Pages {
    /// The client port's pages, and the admin port's (`None` without `--admin-listen`).
    pub fn of(demo: bool, admin_listener: bool) -> (Pages, Option<Pages>) {
        let admin_port = Pages { demo: false, client: false, admin: true };
        (Pages { demo, client: true, admin: !admin_listener }, admin_listener.then_some(admin_port))
    }
}

/// Which page `method` `path` asks for (query ignored) among `pages`, or the answer that says
/// there is none (404, or 405 for a method other than GET and HEAD on a page).
pub(crate) fn page(method: &str, path: &str, pages: Pages) -> Result<Page, Response> {
    let page = match path.split('?').next().unwrap_or("") {
        "/" if pages.demo => Page::Demo,
        "/gearsock.js" if pages.client => Page::Script,
        "/gearsock.mjs" if pages.client => Page::Module,
        "/healthz" if pages.admin => Page::Health,
        "/metrics" if pages.admin => Page::Metrics,
        "/livez" if pages.admin => Page::Live,
        "/readyz" if pages.admin => Page::Ready,
        _ => return Err(Response::new(404, "Not Found", TEXT, "not found\n")),
    };
    if method != "GET" && method != "HEAD" {
        let mut refusal = Response::new(405, "Method Not Allowed", TEXT, "only GET and HEAD\n");
        refusal.allow = Some("GET, HEAD");
        return Err(refusal);
    }
    Ok(page)
}

/// `GET /livez`: the loop turned to answer this, which is all liveness means here (gearmand
/// being down is readiness's business, so a liveness probe never restarts us for it).
pub(crate) fn livez() -> Response {
    Response::new(200, "OK", TEXT, "live\n")
}

/// `GET /readyz`: `Ok` 200, or 503 with `why` (for a load balancer and a human alike).
pub(crate) fn readyz(why_not: Option<String>) -> Response {
    match why_not {
        None => Response::new(200, "OK", TEXT, "ready\n"),
        Some(why) => Response::new(503, "Service Unavailable", TEXT, format!("not ready: {why}\n")),
    }
}

/// Why a process with these links cannot take jobs, if it cannot.
pub(crate) fn not_ready(echo: bool, links: &[LinkView]) -> Option<String> {
    if links_ok(echo, links) {
        return None;
    }
    let each: Vec<String> = links.iter().map(|l| format!("{} {}", l.addr, l.state.name())).collect();
    Some(format!("no gearmand connected ({})", each.join(", ")))
}

/// Answers `method` `path` (query ignored) among `pages`; `echo`: the server runs in echo
/// mode. `snapshot` is called only for the pages that report state.
pub(crate) fn route<'a>(
    method: &str,
    path: &str,
    pages: Pages,
    echo: bool,
    snapshot: impl FnOnce() -> Snapshot<'a>,
) -> Response {
    match page(method, path, pages) {
        Err(refusal) => refusal,
        Ok(Page::Live) => livez(),
        Ok(Page::Ready) => readyz(not_ready(echo, &snapshot().links)),
        Ok(Page::Health) => healthz(echo, &snapshot()),
        Ok(Page::Metrics) => {
            let s = snapshot();
            metrics_page(s.metrics.render(&s.gauges))
        }
        Ok(Page::Demo) => demo(echo),
        Ok(Page::Script) => client_script(false),
        Ok(Page::Module) => client_script(true),
    }
}

/// `GET /gearsock.js`, or `/gearsock.mjs` (`module`): a static file any page may load, so any
/// origin may (a module from another origin needs the CORS header; a classic script does not).
pub(crate) fn client_script(module: bool) -> Response {
    let text = if module { CLIENT_MODULE } else { CLIENT_SCRIPT };
    let mut page = Response::new(200, "OK", JAVASCRIPT, text);
    page.any_origin = true;
    page
}

/// `GET /`: the demo page speaks the job protocol, which echo mode does not.
pub(crate) fn demo(echo: bool) -> Response {
    if echo {
        Response::new(200, "OK", TEXT, ECHO_PAGE)
    } else {
        Response::new(200, "OK", "text/html; charset=utf-8", DEMO_PAGE)
    }
}

/// `GET /metrics` with this Prometheus text.
pub(crate) fn metrics_page(text: String) -> Response {
    Response::new(200, "OK", "text/plain; version=0.0.4; charset=utf-8", text)
}

/// `GET /healthz` with this JSON: 200 when its `status` is `ok` (or `degraded`: a group still
/// serving with a process down), 503 otherwise.
pub(crate) fn health_page(body: &Value) -> Response {
    let ok = matches!(body["status"].as_str(), Some("ok" | "degraded"));
    let (status, reason) = if ok { (200, "OK") } else { (503, "Service Unavailable") };
    Response::new(status, reason, "application/json", format!("{body}\n"))
}

/// Whether a process with these gearmand links can run jobs: some gearmand is connected and
/// not stalled (always, in echo mode: nothing to depend on).
pub(crate) fn links_ok(echo: bool, links: &[LinkView]) -> bool {
    echo || links.iter().any(|l| l.state == LinkStatus::Connected)
}

/// The `gearmand` list of `/healthz`.
pub(crate) fn links_json(links: &[LinkView]) -> Vec<Value> {
    let each = |l: &LinkView| json!({"server": l.addr, "state": l.state, "connects": l.connects, "retiring": l.retiring});
    links.iter().map(each).collect()
}

/// 200 while some gearmand is connected and not stalled (always, in echo mode: nothing to
/// depend on), 503 otherwise; JSON either way.
fn healthz(echo: bool, s: &Snapshot) -> Response {
    let body = if echo {
        json!({"status": "ok", "mode": "echo", "gearmand": [], "connections": s.gauges.connections})
    } else {
        json!({
            "status": if links_ok(echo, &s.links) { "ok" } else { "unavailable" },
            "instance": s.instance,
            "gearmand": links_json(&s.links),
            "connections": s.gauges.connections,
            "jobs_in_flight": s.gauges.jobs_in_flight,
            "jobs_queued": s.gauges.jobs_queued,
        })
    };
    health_page(&body)
}

/// A link read back from a group member's figures (`disconnected` for a state name this build
/// does not know).
impl<'de> Deserialize<'de> for LinkView {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            addr: String,
            state: String,
            connects: u64,
            retiring: usize,
        }
        let w = Wire::deserialize(d)?;
        let state = LinkStatus::from_name(&w.state).unwrap_or(LinkStatus::Disconnected);
        Ok(LinkView { addr: w.addr, state, connects: w.connects, retiring: w.retiring })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot<'a>(metrics: &'a Metrics, states: &[&'static str]) -> Snapshot<'a> {
        let links = states
            .iter()
            .map(|&state| LinkView {
                addr: "127.0.0.1:4730".into(),
                state: LinkStatus::from_name(state).expect("a link state"),
                connects: 1,
                retiring: 0,
            })
            .collect();
        Snapshot { instance: "t1", links, gauges: Gauges { connections: 3, ..Gauges::default() }, metrics }
    }

    const ALL: Pages = Pages { demo: true, client: true, admin: true };

    fn route<'a>(method: &str, path: &str, echo: bool, s: impl FnOnce() -> Snapshot<'a>) -> Response {
        super::route(method, path, ALL, echo, s)
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
        let refused = route("POST", "/healthz", false, || unreachable!("no snapshot for a 405"));
        assert_eq!((refused.status, refused.allow), (405, Some("GET, HEAD")));
        assert!(String::from_utf8_lossy(&refused.encode(false)).contains("\r\nAllow: GET, HEAD\r\n"));
        assert_eq!(route("GET", "/nope", false, || unreachable!("no snapshot for a 404")).status, 404);
        for path in ["/gearsock.js", "/gearsock.mjs?v=1"] {
            let script = route("GET", path, false, || unreachable!("no snapshot for a script"));
            assert_eq!((script.status, script.content_type), (200, JAVASCRIPT), "{path}");
            let wire = String::from_utf8_lossy(&script.encode(false)).into_owned();
            assert!(wire.contains("\r\nAccess-Control-Allow-Origin: *\r\n"), "{path}");
            assert!(wire.contains("var Gearsock = (function () {"), "{path}");
        }
        let module = route("GET", "/gearsock.mjs", false, || unreachable!("no snapshot for a script"));
        assert!(String::from_utf8_lossy(&module.body).ends_with("export default Gearsock;\n"));
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

    #[test]
    fn live_is_not_ready_and_head_has_no_body() {
        let m = Metrics::default();
        assert_eq!(route("GET", "/livez", false, || unreachable!("liveness reads no state")).status, 200);
        let down = route("HEAD", "/readyz", false, || snapshot(&m, &["disconnected"]));
        assert_eq!(down.status, 503);
        assert!(
            String::from_utf8_lossy(&down.body)
                .contains("no gearmand connected (127.0.0.1:4730 disconnected)")
        );
        let wire = String::from_utf8(down.encode(true)).unwrap();
        assert!(wire.ends_with("\r\n\r\n") && wire.contains(&format!("Content-Length: {}", down.body.len())));
        assert_eq!(route("GET", "/readyz", false, || snapshot(&m, &["connected"])).status, 200);
    }

    #[test]
    fn each_port_serves_its_own_pages() {
        let m = Metrics::default();
        let (client, admin) = Pages::of(false, true);
        let admin = admin.expect("an admin port");
        for path in ["/metrics", "/livez", "/readyz", "/healthz", "/"] {
            let on_client = super::route("GET", path, client, false, || snapshot(&m, &["connected"]));
            assert_eq!(on_client.status, 404, "{path} on the client port");
        }
        for path in ["/metrics", "/livez", "/readyz", "/healthz"] {
            assert_eq!(super::route("GET", path, admin, false, || snapshot(&m, &["connected"])).status, 200);
        }
        assert_eq!(super::route("GET", "/", admin, false, || unreachable!("no demo")).status, 404);
        assert_eq!(
            super::route("GET", "/gearsock.js", admin, false, || unreachable!("no script")).status,
            404
        );
        let script = super::route("GET", "/gearsock.js", client, false, || unreachable!("no snapshot"));
        assert_eq!(script.status, 200, "the client port serves the script without the demo page");
        assert_eq!(Pages::of(true, false), (ALL, None));
    }
}

//! What a process of a group publishes (a [`Report`]), and the group's `/metrics` and
//! `/healthz` built from every member's. Sans-IO: the shell reads the board and hands the
//! members over.
//!
//! `/metrics` renders each live member's figures with the one renderer a lone process uses
//! (`Metrics::render`), then [`merge`] keeps each family's `# HELP` and `# TYPE` once and gives
//! every sample a `process="<slot>"` label: a family lists its samples from every process in
//! slot order. The label is the slot, not the pid, so a restarted child continues its
//! predecessor's series (as a counter reset, which Prometheus expects). Three families
//! describe the group itself: `gearsock_processes`, `gearsock_process_up{process}` and
//! `gearsock_process_restarts_total{process}`.

use std::collections::HashMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::{self, LinkView, Page, Response, Snapshot};
use crate::metrics::{Gauges, Metrics};

/// One process's figures, as it publishes them on the board (JSON: structured, and every
/// field `Metrics` and `Gauges` gain travels without more code).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Report {
    /// The publishing process (a slot whose pid is not the supervisor's is stale).
    pub pid: u32,
    /// Its instance id (`ID-slot`).
    pub instance: String,
    /// Its counters.
    pub metrics: Metrics,
    /// Its live values (their `links` are rebuilt from `links`).
    pub gauges: Gauges,
    /// Its gearmand links.
    pub links: Vec<LinkView>,
}

impl Report {
    /// The report of a process with this snapshot.
    pub fn new(pid: u32, snapshot: Snapshot) -> Report {
        let Snapshot { instance, links, gauges, metrics } = snapshot;
        Report { pid, instance: instance.to_string(), metrics: metrics.clone(), gauges, links }
    }

    /// The bytes that go on the board.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        // Serialising plain numbers and strings into a Vec cannot fail.
        let _ = serde_json::to_writer(out, self);
    }

    /// A report read off the board; `None` if the bytes are not one.
    pub fn decode(bytes: &[u8]) -> Option<Report> {
        let mut r: Report = serde_json::from_slice(bytes).ok()?;
        r.gauges.links = r.links.iter().map(|l| (l.addr.clone(), l.state)).collect();
        Some(r)
    }
}

/// One slot of the group as the pages show it.
#[derive(Debug)]
pub(crate) struct Member {
    /// Its slot (the `process` label).
    pub slot: usize,
    /// The pid the supervisor runs there (0: none).
    pub pid: u32,
    /// Restarts in this slot.
    pub restarts: u64,
    /// Its figures, when it runs and has published them.
    pub report: Option<Report>,
}

impl Member {
    /// Whether the slot's process runs and its figures are its own (not a predecessor's).
    pub fn is_up(&self) -> bool {
        self.pid != 0 && self.report.as_ref().is_some_and(|r| r.pid == self.pid)
    }

    fn live_report(&self) -> Option<&Report> {
        self.report.as_ref().filter(|_| self.is_up())
    }
}

/// The group, from the answering process's point of view.
#[derive(Debug)]
pub(crate) struct Group {
    /// The slot of the process that answers.
    pub me: usize,
    /// Every slot, in order.
    pub members: Vec<Member>,
}

/// `route` for a process of a group: `/metrics`, `/readyz` and `/healthz` describe the whole
/// group (ready while any process can take jobs, as the port is shared).
pub(crate) fn route(
    method: &str,
    path: &str,
    pages: http::Pages,
    echo: bool,
    group: impl FnOnce() -> Group,
) -> Response {
    match http::page(method, path, pages) {
        Err(refusal) => refusal,
        Ok(Page::Demo) => http::demo(echo),
        Ok(Page::Script) => http::client_script(false),
        Ok(Page::Module) => http::client_script(true),
        Ok(Page::Live) => http::livez(),
        Ok(Page::Ready) => {
            let health = healthz(echo, &group());
            let ready = matches!(health["status"].as_str(), Some("ok" | "degraded"));
            http::readyz((!ready).then(|| "no process of the group has a gearmand connected".to_string()))
        }
        Ok(Page::Metrics) => http::metrics_page(metrics_text(&group())),
        Ok(Page::Health) => http::health_page(&healthz(echo, &group())),
    }
}

/// The group's Prometheus text: every family once, samples of each live process labelled
/// with its slot, then the group's own families.
pub(crate) fn metrics_text(group: &Group) -> String {
    let parts: Vec<(usize, String)> = group
        .members
        .iter()
        .filter_map(|m| Some((m.slot, m.live_report()?)))
        .map(|(slot, r)| (slot, r.metrics.render(&r.gauges)))
        .collect();
    let mut out = merge(&parts);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP gearsock_{name} {help}\n# TYPE gearsock_{name} {kind}");
    };
    family(&mut out, "processes", "gauge", "Event-loop processes in the group (--processes).");
    let _ = writeln!(out, "gearsock_processes {}", group.members.len());
    family(
        &mut out,
        "process_up",
        "gauge",
        "1 when the process in this slot runs and publishes its figures.",
    );
    for m in &group.members {
        let _ = writeln!(out, "gearsock_process_up{{process=\"{}\"}} {}", m.slot, u8::from(m.is_up()));
    }
    family(&mut out, "process_restarts_total", "counter", "Processes restarted in this slot.");
    for m in &group.members {
        let _ = writeln!(out, "gearsock_process_restarts_total{{process=\"{}\"}} {}", m.slot, m.restarts);
    }
    out
}

/// Merges the Prometheus texts of several processes (`(slot, text)`, each from the same
/// renderer): each family's comment lines once, at its first appearance, then its samples from
/// every text in the order given, each with `process="<slot>"` as its first label.
pub(crate) fn merge(parts: &[(usize, String)]) -> String {
    struct Family<'a> {
        comments: Vec<&'a str>,
        samples: Vec<(usize, &'a str)>,
    }
    let mut order: Vec<&str> = Vec::new();
    let mut families: HashMap<&str, Family> = HashMap::new();
    for (slot, text) in parts {
        let mut current: Option<&str> = None;
        let mut first_seen = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                let name = rest.split(' ').next().unwrap_or("");
                if current != Some(name) {
                    current = Some(name);
                    first_seen = !families.contains_key(name);
                    if first_seen {
                        order.push(name);
                        families.insert(name, Family { comments: Vec::new(), samples: Vec::new() });
                    }
                }
                if first_seen && let Some(f) = families.get_mut(name) {
                    f.comments.push(line);
                }
            } else if !line.is_empty() && !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                let family = current.unwrap_or(name);
                if !families.contains_key(family) {
                    order.push(family);
                    families.insert(family, Family { comments: Vec::new(), samples: Vec::new() });
                }
                if let Some(f) = families.get_mut(family) {
                    f.samples.push((*slot, line));
                }
            }
        }
    }
    let mut out = String::with_capacity(parts.iter().map(|(_, t)| t.len() + t.len() / 4).sum());
    for name in order {
        let Some(f) = families.get(name) else { continue };
        for line in &f.comments {
            out.push_str(line);
            out.push('\n');
        }
        for (slot, line) in &f.samples {
            out.push_str(&labelled(line, *slot));
            out.push('\n');
        }
    }
    out
}

/// `name{a="b"} 1` as `name{process="3",a="b"} 1`; `name 1` as `name{process="3"} 1`.
fn labelled(sample: &str, slot: usize) -> String {
    let cut = sample.find(['{', ' ']).unwrap_or(sample.len());
    let (name, rest) = sample.split_at(cut);
    match rest.strip_prefix('{') {
        Some(labels) if labels.starts_with('}') => format!("{name}{{process=\"{slot}\"{labels}"),
        Some(labels) => format!("{name}{{process=\"{slot}\",{labels}"),
        None => format!("{name}{{process=\"{slot}\"}}{rest}"),
    }
}

/// The group's `/healthz`: `ok` when every process runs and can run jobs, `degraded` when some
/// but not all can (still 200: the group serves), `unavailable` (503) when none can. Each
/// process has its entry; the totals add them up; `gearmand` is the answering process's view.
pub(crate) fn healthz(echo: bool, group: &Group) -> Value {
    let mut entries = Vec::new();
    let (mut good, mut connections, mut in_flight, mut queued) = (0, 0, 0, 0);
    let mut mine: &[LinkView] = &[];
    for m in &group.members {
        let mut entry = json!({"process": m.slot, "pid": m.pid, "up": m.is_up(), "restarts": m.restarts});
        if let Some(r) = m.live_report() {
            let ok = http::links_ok(echo, &r.links);
            good += usize::from(ok);
            connections += r.gauges.connections;
            in_flight += r.gauges.jobs_in_flight;
            queued += r.gauges.jobs_queued;
            if m.slot == group.me {
                mine = &r.links;
            }
            entry["status"] = json!(if ok { "ok" } else { "unavailable" });
            entry["instance"] = json!(r.instance);
            entry["connections"] = json!(r.gauges.connections);
            entry["jobs_in_flight"] = json!(r.gauges.jobs_in_flight);
            entry["jobs_queued"] = json!(r.gauges.jobs_queued);
            entry["gearmand"] = json!(http::links_json(&r.links));
        } else {
            entry["status"] = json!(if m.pid == 0 { "down" } else { "starting" });
        }
        entries.push(entry);
    }
    let status = match good {
        0 => "unavailable",
        n if n == group.members.len() => "ok",
        _ => "degraded",
    };
    let mut body = json!({
        "status": status,
        "process": group.me,
        "processes": entries,
        "connections": connections,
        "jobs_in_flight": in_flight,
        "jobs_queued": queued,
        "gearmand": http::links_json(mine),
    });
    if echo {
        body["mode"] = json!("echo");
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LinkStatus, LoopEvent, Message};

    fn report(pid: u32, connections: usize, state: &'static str) -> Report {
        let mut metrics = Metrics::default();
        metrics.count_message(Message::Ping);
        metrics.observe(LoopEvent::Accepted);
        let state = LinkStatus::from_name(state).expect("a link state");
        let links = vec![LinkView { addr: "127.0.0.1:4730".into(), state, connects: 1, retiring: 0 }];
        let gauges = Gauges { connections, jobs_in_flight: 2, ..Gauges::default() };
        let r = Report { pid, instance: format!("t-{pid}"), metrics, gauges, links };
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        Report::decode(&bytes).expect("decodes")
    }

    fn group(members: Vec<(u32, u64, Option<Report>)>) -> Group {
        let members = members
            .into_iter()
            .enumerate()
            .map(|(slot, (pid, restarts, report))| Member { slot, pid, restarts, report })
            .collect();
        Group { me: 0, members }
    }

    #[test]
    fn a_report_survives_the_board() {
        let r = report(7, 3, "stalled");
        assert_eq!((r.pid, r.gauges.connections, r.gauges.jobs_in_flight), (7, 3, 2));
        assert_eq!(r.metrics.messages(Message::Ping), 1);
        assert_eq!(r.links[0].state, LinkStatus::Stalled);
        assert_eq!(r.gauges.links, vec![("127.0.0.1:4730".to_string(), LinkStatus::Stalled)]);
        assert!(Report::decode(b"{\"pid\":1,\"metr").is_none(), "a torn copy is no report");
    }

    #[test]
    fn every_family_once_and_every_sample_labelled_with_its_process() {
        let g = group(vec![
            (10, 0, Some(report(10, 3, "connected"))),
            (0, 2, Some(report(11, 9, "connected"))), // slot 1 is down: its last figures are not shown
            (12, 1, Some(report(12, 5, "connecting"))),
        ]);
        let text = metrics_text(&g);
        assert!(text.contains("gearsock_connections_open{process=\"0\"} 3\n"), "{text}");
        assert!(text.contains("gearsock_connections_open{process=\"2\"} 5\n"));
        assert!(!text.contains("process=\"1\"} 9"), "a dead process's figures are gone");
        assert!(text.contains("gearsock_messages_in_total{process=\"2\",type=\"ping\"} 1\n"));
        assert!(text.contains("gearsock_processes 3\n"));
        assert!(text.contains("gearsock_process_up{process=\"1\"} 0\n"));
        assert!(text.contains("gearsock_process_up{process=\"2\"} 1\n"));
        assert!(text.contains("gearsock_process_restarts_total{process=\"1\"} 2\n"));
        // Valid exposition: each family's HELP and TYPE exactly once, before all its samples,
        // and no sample line twice.
        let mut seen = std::collections::HashSet::new();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(typed.insert(rest.split(' ').next().unwrap().to_string()), "TYPE twice: {line}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} sampled before its TYPE");
                assert!(line.contains("process=\"") || name.starts_with("gearsock_processes"), "{line}");
                assert!(seen.insert(line.split(' ').next().unwrap().to_string()), "twice: {line}");
            }
        }
        assert_eq!(text.matches("# HELP gearsock_connections_open ").count(), 1);
    }

    #[test]
    fn labels_go_first_and_bare_samples_get_braces() {
        assert_eq!(labelled("m 1", 0), "m{process=\"0\"} 1");
        assert_eq!(labelled("m{a=\"b\"} 1", 12), "m{process=\"12\",a=\"b\"} 1");
        assert_eq!(labelled("m{} 1", 3), "m{process=\"3\"} 1");
        let merged = merge(&[
            (0, "# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b counter\nb{x=\"y\"} 2\n".into()),
            (1, "# HELP a A.\n# TYPE a gauge\na 3\n# HELP b B.\n# TYPE b counter\nb{x=\"y\"} 4\n".into()),
        ]);
        assert_eq!(
            merged,
            "# HELP a A.\n# TYPE a gauge\na{process=\"0\"} 1\na{process=\"1\"} 3\n\
             # HELP b B.\n# TYPE b counter\nb{process=\"0\",x=\"y\"} 2\nb{process=\"1\",x=\"y\"} 4\n"
        );
    }

    #[test]
    fn health_is_the_groups() {
        let all =
            group(vec![(10, 0, Some(report(10, 3, "connected"))), (11, 0, Some(report(11, 4, "connected")))]);
        let body = healthz(false, &all);
        assert_eq!((body["status"].as_str(), body["connections"].as_u64()), (Some("ok"), Some(7)));
        assert_eq!(body["processes"][1]["pid"], 11);
        assert_eq!(body["gearmand"][0]["state"], "connected");
        assert_eq!(http::health_page(&body).status, 200);

        let one_down = group(vec![(10, 0, Some(report(10, 3, "connected"))), (0, 1, None)]);
        let body = healthz(false, &one_down);
        assert_eq!(body["status"], "degraded");
        assert_eq!(
            (body["processes"][1]["up"].as_bool(), body["processes"][1]["status"].as_str()),
            (Some(false), Some("down"))
        );
        assert_eq!(http::health_page(&body).status, 200, "the group still serves");

        let no_gearmand =
            group(vec![(10, 0, Some(report(10, 3, "connecting"))), (11, 0, Some(report(11, 0, "stalled")))]);
        let body = healthz(false, &no_gearmand);
        assert_eq!(body["status"], "unavailable");
        assert_eq!(http::health_page(&body).status, 503);
        assert_eq!(healthz(true, &no_gearmand)["status"], "ok", "echo mode depends on no gearmand");
    }

    const ALL: http::Pages = http::Pages { demo: true, client: true, admin: true };

    #[test]
    fn pages_and_refusals() {
        assert_eq!(
            route("GET", "/livez", ALL, false, || unreachable!("liveness reads no state")).status,
            200
        );
        let down = || group(vec![(10, 0, Some(report(10, 1, "disconnected")))]);
        assert_eq!(route("GET", "/readyz", ALL, false, down).status, 503);
        let g = || group(vec![(10, 0, Some(report(10, 1, "connected")))]);
        assert_eq!(route("GET", "/metrics", ALL, false, g).status, 200);
        assert_eq!(route("GET", "/healthz?x", ALL, false, g).status, 200);
        assert_eq!(route("POST", "/metrics", ALL, false, || unreachable!("no group for a 405")).status, 405);
        assert_eq!(route("GET", "/x", ALL, false, || unreachable!("no group for a 404")).status, 404);
        assert_eq!(route("GET", "/", ALL, false, || unreachable!("no group for the page")).status, 200);
    }
}

//! The relay tables' tests: two Apps, `a1` (the requester) and `b2` (the owner), with the
//! relay messages carried between their desks by hand.
use super::super::testkit::*;
use super::super::*;
use super::Kind;
use super::*;

/// An owner instance `b2` beside the testkit's `a1`, with its gearmand link up.
fn owner_app(max_job_bytes: usize) -> App {
    let mut app =
        App::new(AppConfig { instance_id: "b2".into(), max_job_bytes, ..cfg() }, 1, Entropy::counter());
    app.handle_link_up(0);
    app.handle_client_open(A, true);
    app
}

fn attach(job: &str) -> RemoteAttach {
    let reference = Some(Ref::Text("x".into()));
    RemoteAttach { job: job.into(), resume: "b2.1.s".into(), after: 0, reference, sub: None }
}

/// The relay messages among `e`, as (desk function, unique, payload).
fn relayed(e: &[Effect]) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Submit {
                tag: RELAY_TAG, function, unique, payload, mode: JobMode::Background, ..
            } => Some((String::from_utf8_lossy(function).into_owned(), unique.clone(), payload.clone())),
            _ => None,
        })
        .collect()
}

fn deliver(app: &mut App, message: &(String, Vec<u8>, Vec<u8>)) {
    let event = JobEvent::Forwarded { unique: message.1.clone(), value: message.2.clone() };
    app.handle_job_event(0, event, Instant::now());
}

/// A requester `a1` whose client A attached a job of `b2`, and the relay's id.
fn requested() -> (App, RelayId) {
    let mut app = up_app();
    app.relay_attach(A, "b2", attach("H:gm:7"));
    let e = effects(&mut app);
    let [(function, unique, payload)] = &relayed(&e)[..] else { panic!("{e:?}") };
    assert_eq!(function, "gearsock.report.b2");
    let address = relay_wire::parse_unique(unique).unwrap();
    assert_eq!((address.sender, address.n), ("a1", 0));
    let (kind, records) = relay_wire::parse(payload).unwrap();
    assert_eq!((kind, RemoteAttach::from_records(&records)), (Kind::Attach, Some(attach("H:gm:7"))));
    assert_eq!(app.relays_requested(), 1);
    (app, address.relay)
}

#[test]
fn an_attach_for_another_instances_job_goes_to_its_desk_and_its_answer_comes_back() {
    let (mut requester, _) = requested();
    let mut owner = owner_app(1 << 20);
    let e = effects(&mut requester);
    assert!(e.is_empty());
    requester.relay_attach(A, "b2", attach("H:gm:8"));
    let e = effects(&mut requester);
    deliver(&mut owner, &relayed(&e)[0]);
    let answer = relayed(&effects(&mut owner));
    let [(function, unique, _)] = &answer[..] else { panic!("{answer:?}") };
    assert_eq!(function, "gearsock.report.a1");
    assert!(unique.starts_with(b"@b2."));
    assert_eq!(owner.relays_served(), 0, "a refusal ends the relay");
    deliver(&mut requester, &answer[0]);
    let e = effects(&mut requester);
    assert_eq!(codes(&e), ["unknown_job"]);
    assert!(sent(&e)[0].1.contains(r#""ref":"x""#));
    assert_eq!(
        (requester.relays_requested(), requester.relays.held_by(A)),
        (1, 1),
        "the first relay is open"
    );
}

#[test]
fn a_relay_counts_as_a_job_of_its_client() {
    let (mut app, _) = requested();
    app.relay_attach(A, "b2", attach("H:gm:8"));
    app.relay_attach(A, "b2", attach("H:gm:9"));
    let e = effects(&mut app);
    assert_eq!(relayed(&e).len(), 1);
    assert_eq!(codes(&e), ["too_many_jobs"]);
    app.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, Instant::now());
    assert_eq!(codes(&effects(&mut app)), ["too_many_jobs"]);
    app.handle_link_down(0, Instant::now());
    effects(&mut app);
    app.handle_client_open(B, true);
    app.relay_attach(B, "b2", attach("H:gm:9"));
    assert_eq!(codes(&effects(&mut app)), ["unavailable"], "no gearmand to relay through");
}

/// The owner's side of the relay `relay` of `a1`, opened directly (the core's attach would).
fn serve(owner: &mut App, relay: RelayId) -> u64 {
    let key = RemoteKey { instance: "a1".into(), relay };
    let at = owner.links.current(0);
    owner.relays.open_served(key, at).unwrap()
}

#[test]
fn texts_of_one_pass_go_as_one_message_and_are_handed_on_in_order_once() {
    let (mut requester, relay) = requested();
    let mut owner = owner_app(1 << 20);
    let id = serve(&mut owner, relay);
    owner.relay_text(id, "one");
    owner.relay_text(id, "two");
    let first = relayed(&effects(&mut owner));
    assert_eq!(first.len(), 1, "one message for the pass");
    owner.relay_text(id, "three");
    let second = relayed(&effects(&mut owner));
    owner.relay_last(id, "four");
    let third = relayed(&effects(&mut owner));
    assert_eq!(owner.relays_served(), 0);
    owner.relay_text(id, "late");
    assert!(effects(&mut owner).is_empty(), "nothing goes to a relay that is over");
    // They arrive backwards, and one twice: the client hears each once, in order.
    for m in [&third[0], &second[0], &second[0], &first[0], &first[0]] {
        deliver(&mut requester, m);
    }
    let e = effects(&mut requester);
    assert_eq!(sent(&e), vec![(A, "one"), (A, "two"), (A, "three"), (A, "four")]);
    assert_eq!(requester.relays.held_by(A), 0, "the last message frees the client's slot");
    assert_eq!(requester.metrics.relay_events, [0, 4]);
    assert_eq!(owner.metrics.relay_events, [4, 0]);
}

#[test]
fn a_long_text_goes_in_pieces_within_the_desks_limit() {
    let (mut requester, relay) = requested();
    let mut owner = owner_app(2048);
    let id = serve(&mut owner, relay);
    let long = format!("{{\"data\":\"{}\"}}", "z".repeat(5000));
    owner.relay_text(id, "short");
    owner.relay_last(id, &long);
    let messages = relayed(&effects(&mut owner));
    assert!(messages.len() >= 3, "{}", messages.len());
    assert!(messages.iter().all(|m| m.2.len() <= relay_wire::max_payload(2048)));
    for m in messages.iter().rev() {
        deliver(&mut requester, m);
    }
    assert_eq!(sent(&effects(&mut requester)), vec![(A, "short"), (A, long.as_str())]);
}

#[test]
fn a_relay_nobody_asked_for_is_told_to_stop_once() {
    let mut owner = owner_app(1 << 20);
    let id = serve(&mut owner, *b"NotAnyones12");
    owner.relay_text(id, "one");
    let first = relayed(&effects(&mut owner));
    owner.relay_text(id, "two");
    let second = relayed(&effects(&mut owner));
    let mut requester = up_app();
    deliver(&mut requester, &first[0]);
    deliver(&mut requester, &second[0]);
    let e = effects(&mut requester);
    assert!(sent(&e).is_empty());
    let detach = relayed(&e);
    assert_eq!(detach.len(), 1, "answered once");
    assert_eq!(relay_wire::parse(&detach[0].2).map(|(k, _)| k), Ok(Kind::Detach));
    deliver(&mut owner, &detach[0]);
    assert_eq!(owner.relays_served(), 0);
    owner.relay_text(id, "three");
    assert!(effects(&mut owner).is_empty());
}

#[test]
fn a_client_that_leaves_detaches_its_relay_at_the_owner() {
    let (mut requester, relay) = requested();
    let mut owner = owner_app(1 << 20);
    let id = serve(&mut owner, relay);
    owner.relay_text(id, "queued but not sent");
    requester.handle_client_closed(A, Instant::now());
    let e = effects(&mut requester);
    let [detach] = &relayed(&e)[..] else { panic!("{e:?}") };
    assert_eq!(requester.relays_requested(), 0);
    deliver(&mut owner, detach);
    assert_eq!(owner.relays_served(), 0);
    assert!(relayed(&effects(&mut owner)).is_empty(), "what was queued for it is dropped");
}

#[test]
fn a_lost_link_breaks_the_relay_with_unavailable_for_the_job() {
    let (mut requester, _) = requested();
    requester.handle_link_down(0, Instant::now());
    let e = effects(&mut requester);
    let [(c, text)] = &sent(&e)[..] else { panic!("{e:?}") };
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(*c, A);
    assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("unavailable")));
    assert_eq!((v["job"].as_str(), v["ref"].as_str()), (Some("H:gm:7"), Some("x")));
    assert_eq!(requester.relays_requested(), 0);
    // The owner's side ends too: whatever it queued for the lost link is not sent.
    let mut owner = owner_app(1 << 20);
    let id = serve(&mut owner, *b"AAAAAAAAAAAA");
    owner.relay_text(id, "lost");
    owner.handle_link_down(0, Instant::now());
    assert!(relayed(&effects(&mut owner)).is_empty());
    assert_eq!(owner.relays_served(), 0);
}

/// Carries every relay message among `e` to `to`; returns how many.
fn carry(e: &[Effect], to: &mut App) -> usize {
    let messages = relayed(e);
    for m in &messages {
        deliver(to, m);
    }
    messages.len()
}

#[test]
fn a_job_attached_from_another_instance_hears_every_event_once_through_the_relay() {
    let t0 = Instant::now();
    let mut owner = owner_app(1 << 20);
    owner.handle_client_text(A, r#"{"type":"submit","function":"f","payload":"p","ref":"mine"}"#, t0);
    let tag = submitted(&effects(&mut owner))[0];
    owner.handle_job_event(0, JobEvent::Created { tag, handle: b"H:gm:7".to_vec() }, t0);
    let created: Value = serde_json::from_str(sent(&effects(&mut owner))[0].1).unwrap();
    let resume = created["resume"].as_str().unwrap().to_string();
    assert!(resume.starts_with("b2."), "{created}");
    owner.handle_job_event(0, JobEvent::Data { tag, data: b"d1".to_vec() }, t0);
    owner.handle_client_closed(A, t0);
    owner.handle_job_event(0, JobEvent::Data { tag, data: b"d2".to_vec() }, t0);
    effects(&mut owner);

    // A client of a1 attaches after seq 2: the attach travels to b2's desk.
    let mut requester = up_app();
    let attach = serde_json::json!({"type":"attach","job":"H:gm:7","resume":resume,"after":2,"ref":"again"});
    requester.handle_client_text(A, &attach.to_string(), t0);
    assert_eq!(carry(&effects(&mut requester), &mut owner), 1);
    assert_eq!(owner.relays_served(), 1);
    // job.attached and the missed d2 come back as one message; then each live event.
    assert_eq!(carry(&effects(&mut owner), &mut requester), 1);
    owner.handle_job_event(0, JobEvent::Data { tag, data: b"d3".to_vec() }, t0);
    owner.handle_job_event(0, JobEvent::Complete { tag, data: b"done".to_vec() }, t0);
    assert_eq!(carry(&effects(&mut owner), &mut requester), 1, "one pass, one message");
    let e = effects(&mut requester);
    let got: Vec<Value> =
        sent(&e).iter().map(|(c, t)| (assert_eq!(*c, A), serde_json::from_str(t).unwrap()).1).collect();
    let kinds: Vec<&str> = got.iter().filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(kinds, ["job.attached", "job.data", "job.data", "job.complete"], "{got:?}");
    let seqs: Vec<u64> = got[1..].iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(got[0]["ref"], "again");
    assert_eq!((owner.relays_served(), requester.relays_requested()), (0, 0), "the end ends the relay");

    // The same token again, now that the job is gone: unknown_job, as a local attach hears.
    requester.handle_client_text(A, &attach.to_string(), t0);
    carry(&effects(&mut requester), &mut owner);
    carry(&effects(&mut owner), &mut requester);
    assert_eq!(codes(&effects(&mut requester)), ["unknown_job"]);
}

#[test]
fn a_remote_owner_that_leaves_detaches_the_job_and_a_local_attach_takes_it_over() {
    let t0 = Instant::now();
    let mut owner = owner_app(1 << 20);
    owner.handle_client_text(A, r#"{"type":"submit","function":"f"}"#, t0);
    let tag = submitted(&effects(&mut owner))[0];
    owner.handle_job_event(0, JobEvent::Created { tag, handle: b"H:gm:7".to_vec() }, t0);
    let created: Value = serde_json::from_str(sent(&effects(&mut owner))[0].1).unwrap();
    let resume = created["resume"].as_str().unwrap().to_string();
    owner.handle_client_closed(A, t0);
    let attach = serde_json::json!({"type":"attach","job":"H:gm:7","resume":resume,"after":1});
    let mut requester = up_app();
    requester.handle_client_text(A, &attach.to_string(), t0);
    carry(&effects(&mut requester), &mut owner);
    carry(&effects(&mut owner), &mut requester);
    effects(&mut requester);
    assert_eq!(owner.jobs_detached(), 0, "attached from a1");
    // The requester's client leaves: the job waits detached on its owner again.
    requester.handle_client_closed(A, t0);
    carry(&effects(&mut requester), &mut owner);
    assert_eq!((owner.jobs_detached(), owner.relays_served()), (1, 0));

    // Attached from a1 again, then taken over by a local client of b2: a1's client hears
    // job.detached and its relay ends.
    requester.handle_client_open(B, true);
    requester.handle_client_text(B, &attach.to_string(), t0);
    carry(&effects(&mut requester), &mut owner);
    carry(&effects(&mut owner), &mut requester);
    effects(&mut requester);
    owner.handle_client_open(B, true);
    owner.handle_client_text(B, &attach.to_string(), t0);
    let e = effects(&mut owner);
    assert!(sent(&e).iter().any(|(c, t)| *c == B && t.contains("job.attached")));
    carry(&e, &mut requester);
    let e = effects(&mut requester);
    let [(c, text)] = &sent(&e)[..] else { panic!("{e:?}") };
    assert!(*c == B && text.contains("job.detached"), "{text}");
    assert_eq!(requester.relays.held_by(B), 0);
}

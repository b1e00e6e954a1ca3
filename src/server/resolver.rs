//! Host names are resolved off the loop.
//!
//! `getaddrinfo` reads /etc/hosts and may ask a DNS server over the network; with a slow or
//! unreachable server it blocks for seconds. The loop never calls it: a `--gearmand` given as a
//! host name is sent to one resolver thread, which answers through a channel and wakes the
//! loop with a `mio::Waker`. The loop asks again before every connect, so a gearmand whose
//! address changed is found on the next reconnect. Numeric addresses never come here.
//!
//! Test hook: `GEARSOCK_TEST_RESOLVE_DELAY_MS` makes every lookup take that much longer, so a
//! test can show that the loop keeps serving while a name is being resolved.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use mio::Waker;

/// A lookup's result, for gearmand link `link`.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The link that asked.
    pub link: usize,
    /// The addresses, in the resolver's order, or why there are none.
    pub result: Result<Vec<SocketAddr>, String>,
}

/// The loop's end of the resolver thread.
pub(crate) struct Resolver {
    requests: Sender<(usize, String)>,
    answers: Receiver<Answer>,
}

impl Resolver {
    /// Starts the thread; `waker` is registered with the loop's poll.
    pub fn spawn(waker: Arc<Waker>) -> std::io::Result<Resolver> {
        Self::spawn_with(waker, lookup)
    }

    /// Starts the thread with a given lookup function (tests pass their own).
    pub fn spawn_with(
        waker: Arc<Waker>,
        lookup: fn(&str) -> Result<Vec<SocketAddr>, String>,
    ) -> std::io::Result<Resolver> {
        let (requests, inbox) = mpsc::channel::<(usize, String)>();
        let (outbox, answers) = mpsc::channel();
        let delay = std::env::var("GEARSOCK_TEST_RESOLVE_DELAY_MS").ok().and_then(|v| v.parse().ok());
        std::thread::Builder::new().name("gearsock-resolve".into()).spawn(move || {
            // Ends when the loop drops its `Resolver` (the request channel closes).
            for (link, name) in inbox {
                if let Some(ms) = delay {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                let answer = Answer { link, result: lookup(&name) };
                if outbox.send(answer).is_err() {
                    return;
                }
                let _ = waker.wake();
            }
        })?;
        Ok(Resolver { requests, answers })
    }

    /// Asks for `name` (`HOST:PORT`) on behalf of link `link`; the answer comes later.
    pub fn ask(&self, link: usize, name: &str) {
        let _ = self.requests.send((link, name.to_string()));
    }

    /// The answers that arrived (call after the waker's event).
    pub fn answers(&self) -> impl Iterator<Item = Answer> + '_ {
        self.answers.try_iter()
    }
}

/// The system's resolver (`getaddrinfo`): blocking, so only ever called on the resolver thread.
fn lookup(name: &str) -> Result<Vec<SocketAddr>, String> {
    match name.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() { Err(format!("name not found: {name} has no address")) } else { Ok(addrs) }
        }
        Err(e) => Err(format!("name not found: {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token};
    use std::sync::Mutex;
    use std::thread::ThreadId;

    static SEEN_ON: Mutex<Option<ThreadId>> = Mutex::new(None);

    fn recording_lookup(name: &str) -> Result<Vec<SocketAddr>, String> {
        *SEEN_ON.lock().unwrap() = Some(std::thread::current().id());
        if name == "gone:1" {
            Err("name not found: gone".into())
        } else {
            Ok(vec!["127.0.0.1:4730".parse().unwrap()])
        }
    }

    #[test]
    fn names_are_resolved_on_another_thread_and_wake_the_poll() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).unwrap());
        let resolver = Resolver::spawn_with(waker, recording_lookup).unwrap();
        resolver.ask(3, "gearmand.example:4730");
        resolver.ask(4, "gone:1");
        let mut got = Vec::new();
        let mut events = Events::with_capacity(8);
        while got.len() < 2 {
            poll.poll(&mut events, Some(Duration::from_secs(10))).unwrap();
            assert!(events.iter().any(|e| e.token() == Token(7)), "the waker woke the poll");
            got.extend(resolver.answers());
        }
        assert_eq!(got[0].link, 3);
        assert_eq!(got[0].result, Ok(vec!["127.0.0.1:4730".parse().unwrap()]));
        assert_eq!((got[1].link, got[1].result.is_err()), (4, true));
        let seen = SEEN_ON.lock().unwrap().expect("the lookup ran");
        assert_ne!(seen, std::thread::current().id(), "the lookup ran off the calling thread");
    }
}

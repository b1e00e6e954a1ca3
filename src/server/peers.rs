//! Open WebSockets per peer address, for `--max-connections-per-ip`: an upgrade is counted when
//! it is let in and released when that connection ends; one over the cap is answered 429
//! instead of 101. Bounded: an address has an entry only while it holds a counted connection.
//! Behind a proxy every client shares the proxy's address (docs/OPERATIONS.md).

use std::collections::HashMap;
use std::net::IpAddr;

use crate::logging::Event;
use crate::metrics::Denial;

/// Counted upgrades by address.
#[derive(Debug, Default)]
pub(super) struct PerIp {
    /// 0: off.
    max: usize,
    open: HashMap<IpAddr, usize>,
}

impl PerIp {
    pub(super) fn new(max: usize) -> PerIp {
        PerIp { max, open: HashMap::new() }
    }

    /// True (and counted) when `ip` may hold one more WebSocket.
    pub(super) fn admit(&mut self, ip: IpAddr) -> bool {
        if self.max == 0 {
            return true;
        }
        let n = self.open.entry(ip).or_default();
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// A WebSocket `admit` let in has ended.
    pub(super) fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }
}

impl From<Denial> for Event {
    fn from(denial: Denial) -> Event {
        match denial {
            Denial::Unauthorized => Event::Unauthorized,
            Denial::Function => Event::Forbidden,
            Denial::RateLimited => Event::RateLimited,
            Denial::PerIp => Event::OverIpLimit,
            Denial::PerSubject => Event::OverSubjectLimit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PerIp;

    #[test]
    fn an_address_holds_at_most_its_cap_and_leaves_no_entry_behind() {
        let (a, b) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let mut per_ip = PerIp::new(2);
        assert!(per_ip.admit(a) && per_ip.admit(a) && !per_ip.admit(a));
        assert!(per_ip.admit(b), "another address has its own count");
        per_ip.release(a);
        assert!(per_ip.admit(a));
        for ip in [a, a, b] {
            per_ip.release(ip);
        }
        assert!(per_ip.open.is_empty());
        assert!(PerIp::new(0).admit(a), "0 is off");
    }
}

//! The loop's part in a group of processes (`serve --processes N`; see `group`): it publishes
//! this process's figures on the board every `PUBLISH_PERIOD` (and whenever it answers a
//! page), and answers `/metrics` and `/healthz` for the whole group from every slot.
//!
//! Everything here is memory: the board is a shared mapping, so publishing and reading are
//! loads and stores, never a system call or a disk access. A process that serves alone has no
//! `Membership` and runs none of this.

use std::time::{Duration, Instant};

use log::warn;

use super::Server;
use crate::config::GroupChild;
use crate::group::board::{Board, TooLarge};
use crate::group::page::{self, Group, Member, Report};
use crate::http::{Pages, Response};

/// How often a member publishes its figures (the other processes' pages are at most this old).
pub(crate) const PUBLISH_PERIOD: Duration = Duration::from_secs(1);

/// This process's seat in its group, and the board it shares.
#[derive(Debug)]
pub(crate) struct Membership {
    board: Board,
    slot: usize,
    pid: u32,
    /// The encoded report, kept between publications.
    out: Vec<u8>,
    /// A slot's bytes as read, kept between reads.
    read: Vec<u8>,
    warned: bool,
}

impl Membership {
    /// Maps the board the supervisor handed down and checks the seat is on it.
    pub fn join(child: GroupChild) -> std::io::Result<Membership> {
        let board = Board::open(child.board_fd)?;
        if child.slot >= board.slots() {
            let why = format!("slot {} on a board of {}", child.slot, board.slots());
            return Err(std::io::Error::other(why));
        }
        let pid = std::process::id();
        Ok(Membership { board, slot: child.slot, pid, out: Vec::new(), read: Vec::new(), warned: false })
    }

    /// Puts `report` in this process's slot.
    fn publish(&mut self, report: &Report) {
        report.encode(&mut self.out);
        if let Err(TooLarge(n)) = self.board.publish(self.slot, &self.out)
            && !std::mem::replace(&mut self.warned, true)
        {
            warn!(
                "figures of {n} bytes do not fit the group's slot of {}: not published",
                self.board.capacity()
            );
        }
    }

    /// Every slot as the pages show it; this process's own with `mine`, its live figures.
    fn group(&mut self, mine: Report) -> Group {
        let mut mine = Some(mine);
        let members = (0..self.board.slots())
            .map(|slot| {
                let seat = self.board.seat(slot);
                let report = if slot == self.slot {
                    mine.take()
                } else if self.board.read(slot, &mut self.read) {
                    Report::decode(&self.read)
                } else {
                    None
                };
                // The supervisor writes the pid after the child starts: ours is ours already.
                let pid = if slot == self.slot { self.pid } else { seat.pid };
                Member { slot, pid, restarts: seat.restarts, report }
            })
            .collect();
        Group { me: self.slot, members }
    }
}

impl Server {
    /// This process's figures now, on the board.
    pub(super) fn publish(&mut self, now: Instant) {
        let Some(pid) = self.group.as_ref().map(|m| m.pid) else { return };
        let report = Report::new(pid, self.snapshot(now));
        if let Some(m) = &mut self.group {
            m.publish(&report);
        }
    }

    /// `/metrics` and `/healthz` of the whole group (the other pages as a lone process has
    /// them). This process's own figures are published first, so they are current.
    pub(super) fn answer_group(&mut self, method: &str, path: &str, pages: Pages, now: Instant) -> Response {
        let echo = self.cfg.echo;
        page::route(method, path, pages, echo, || {
            let Some(pid) = self.group.as_ref().map(|m| m.pid) else {
                return Group { me: 0, members: Vec::new() };
            };
            let report = Report::new(pid, self.snapshot(now));
            let Some(m) = &mut self.group else { return Group { me: 0, members: Vec::new() } };
            m.publish(&report);
            m.group(report)
        })
    }
}

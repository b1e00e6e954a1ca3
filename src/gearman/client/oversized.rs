//! Packets over the session's body limit, skipped without buffering them: a WORK_* packet's
//! handle is read from the front of its body, its submission hears `TooLarge` (and is detached
//! from the job), and the rest of the body is dropped as it arrives; a desk job that large is
//! failed. Anything else that large is a protocol error.

use log::{debug, trace};

use super::{ClientSession, Desk, JobEvent, work_terminal};
use crate::buf::InBuf;
use crate::gearman::packet::{HEADER_BYTES, PacketType, ProtocolError, encode_request};

/// An oversized WORK_* packet's handle must end (NUL) within this many body bytes; gearmand's
/// handles are `H:<hostname>:<n>`, far shorter.
const HANDLE_SCAN_BYTES: usize = 256;

impl ClientSession {
    /// The header of a packet over the limit is at the front of `input`. For a WORK_* packet,
    /// once its handle has arrived: reports it to the submission whose copy it is, consumes the
    /// header and arms the skip of the body; returns false (consuming nothing) while the handle
    /// is still incomplete. Any other type, or a handle that does not end in time, is an error.
    pub(super) fn start_skip(
        &mut self,
        input: &mut InBuf,
        kind: PacketType,
        size_bytes: u32,
    ) -> Result<bool, ProtocolError> {
        let too_large =
            ProtocolError::BodyTooLarge { size_bytes: u64::from(size_bytes), max_bytes: self.max_body_bytes };
        let assigned = kind == PacketType::JobAssignUniq && self.desk == Desk::Grabbing;
        let terminal = match work_terminal(kind) {
            Some(terminal) => terminal,
            None if assigned => true,
            None => return Err(too_large),
        };
        // The shell's input holds at least `max_body_bytes` of body, so never wait for more.
        let window = HANDLE_SCAN_BYTES.min(self.max_body_bytes);
        let body = input.data().get(HEADER_BYTES..).unwrap_or_default();
        let handle = match body.iter().take(window).position(|&b| b == 0) {
            Some(end) => body[..end].to_vec(),
            None if body.len() >= window => return Err(too_large),
            None => return Ok(false),
        };
        input.consume(HEADER_BYTES);
        self.skip_bytes = u64::from(size_bytes);
        if assigned {
            // No report is that large: fail it (so gearmand forgets it) and grab the next.
            debug!("gearman failing an oversized desk job of {size_bytes} bytes");
            encode_request(&mut self.replies, PacketType::WorkFail, &[&handle]);
            encode_request(&mut self.replies, PacketType::GrabJobUniq, &[]);
            return Ok(true);
        }
        self.on_oversized(&handle, kind, terminal, u64::from(size_bytes));
        Ok(true)
    }

    /// One copy of an oversized WORK_* packet: its submission gets `TooLarge` and is detached.
    fn on_oversized(&mut self, handle: &[u8], kind: PacketType, terminal: bool, size_bytes: u64) {
        let Some(subscribers) = self.running.get_mut(handle) else {
            debug!(
                "gearman skipping oversized {kind} of {size_bytes} bytes for unknown handle {:?}",
                handle.escape_ascii()
            );
            return;
        };
        // A terminal copy ends the submission at gearmand too; otherwise more copies follow.
        let slot = if terminal { subscribers.take_next() } else { subscribers.detach_next() };
        if subscribers.slots.is_empty() {
            self.running.remove(handle);
        }
        match slot {
            Some(tag) => {
                debug!("gearman skipping oversized {kind} of {size_bytes} bytes for tag={}", tag.0);
                self.events.push_back(JobEvent::TooLarge { tag, kind, size_bytes });
            }
            None => trace!("gearman skipping oversized {kind} for a detached submission"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gearman::client::JobTag;
    use crate::gearman::client::tests::{events, feed, fg};
    use crate::gearman::packet::{Magic, PacketType::*, encode_raw, response};

    /// The limit in the oversized tests: small, so a 1,000-byte body is over it.
    const SMALL: usize = 64;

    fn small_setup() -> (ClientSession, Vec<u8>, InBuf) {
        // As the shell sizes it: one packet at the limit, header included.
        (ClientSession::new(SMALL), Vec::new(), InBuf::new(SMALL + HEADER_BYTES))
    }

    /// A packet of `kind` whose `body_bytes`-long body is `handle`, NUL, then filler.
    fn oversized(kind: PacketType, handle: &[u8], body_bytes: usize) -> Vec<u8> {
        let mut body = handle.to_vec();
        body.push(0);
        body.resize(body_bytes, b'x');
        let mut out = Vec::new();
        encode_raw(&mut out, Magic::Res, kind.as_u32(), &body);
        out
    }

    /// Feeds `wire` in `chunk`-byte reads, checking the input never holds more than the shell's
    /// bound: the skipped body is dropped, not buffered.
    fn feed_in_chunks(session: &mut ClientSession, input: &mut InBuf, wire: &[u8], chunk: usize) {
        for piece in wire.chunks(chunk) {
            input.extend(piece);
            session.handle_input(input).unwrap();
            assert!(input.len() <= SMALL + HEADER_BYTES, "input grew to {}", input.len());
        }
        assert!(input.is_empty());
    }

    #[test]
    fn oversized_work_data_ends_its_submission_only_byte_at_a_time() {
        let (mut session, mut out, mut input) = small_setup();
        fg(&mut session, 1, b"", &mut out);
        fg(&mut session, 2, b"", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(JobCreated, &[b"H:gm:2"]),
            oversized(WorkData, b"H:gm:1", 1000),
            response(WorkComplete, &[b"H:gm:2", b"ok"]),
            // gearmand's terminal copy for the detached submission goes nowhere.
            response(WorkComplete, &[b"H:gm:1", b"late"]),
        ]
        .concat();
        feed_in_chunks(&mut session, &mut input, &wire, 1);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() },
                JobEvent::Created { tag: JobTag(2), handle: b"H:gm:2".to_vec() },
                JobEvent::TooLarge { tag: JobTag(1), kind: WorkData, size_bytes: 1000 },
                JobEvent::Complete { tag: JobTag(2), data: b"ok".to_vec() },
            ]
        );
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn coalesced_oversized_copies_reach_each_submission_once_in_chunks() {
        let (mut session, mut out, mut input) = small_setup();
        fg(&mut session, 1, b"same", &mut out);
        fg(&mut session, 2, b"same", &mut out);
        fg(&mut session, 3, b"", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(JobCreated, &[b"H:gm:1"]),
            oversized(WorkComplete, b"H:gm:1", 1000),
            oversized(WorkComplete, b"H:gm:1", 1000),
            // The link is still in step: the next reply and a small result decode.
            response(JobCreated, &[b"H:gm:2"]),
            response(WorkComplete, &[b"H:gm:2", b"small"]),
        ]
        .concat();
        for chunk in [7, 64, 100] {
            let (mut session, mut input) = (ClientSession::new(SMALL), InBuf::new(SMALL + HEADER_BYTES));
            for tag in [1, 2] {
                fg(&mut session, tag, b"same", &mut Vec::new());
            }
            fg(&mut session, 3, b"", &mut Vec::new());
            feed_in_chunks(&mut session, &mut input, &wire, chunk);
            assert_eq!(events(&mut session).len(), 6, "chunk {chunk}");
        }
        feed_in_chunks(&mut session, &mut input, &wire, 7);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag: JobTag(1), handle: b"H:gm:1".to_vec() },
                JobEvent::Created { tag: JobTag(2), handle: b"H:gm:1".to_vec() },
                JobEvent::TooLarge { tag: JobTag(1), kind: WorkComplete, size_bytes: 1000 },
                JobEvent::TooLarge { tag: JobTag(2), kind: WorkComplete, size_bytes: 1000 },
                JobEvent::Created { tag: JobTag(3), handle: b"H:gm:2".to_vec() },
                JobEvent::Complete { tag: JobTag(3), data: b"small".to_vec() },
            ]
        );
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn detached_submissions_keep_absorbing_their_copies() {
        let (mut session, mut out, mut input) = small_setup();
        fg(&mut session, 1, b"same", &mut out);
        fg(&mut session, 2, b"same", &mut out);
        let wire = [
            response(JobCreated, &[b"H:gm:1"]),
            response(JobCreated, &[b"H:gm:1"]),
            oversized(WorkStatus, b"H:gm:1", 500),
            oversized(WorkStatus, b"H:gm:1", 500),
        ]
        .concat();
        feed_in_chunks(&mut session, &mut input, &wire, 30);
        assert_eq!(session.in_flight(), 0);
        // A third submission joins; gearmand now sends three copies of everything.
        fg(&mut session, 3, b"same", &mut out);
        let three = |kind, args: &[&[u8]]| [response(kind, args), response(kind, args), response(kind, args)];
        let wire = [
            vec![response(JobCreated, &[b"H:gm:1"])],
            three(WorkData, &[b"H:gm:1", b"d"]).to_vec(),
            three(WorkComplete, &[b"H:gm:1", b"r"]).to_vec(),
        ]
        .concat()
        .concat();
        feed_in_chunks(&mut session, &mut input, &wire, 5);
        let tag = JobTag(1);
        assert_eq!(
            events(&mut session),
            vec![
                JobEvent::Created { tag, handle: b"H:gm:1".to_vec() },
                JobEvent::Created { tag: JobTag(2), handle: b"H:gm:1".to_vec() },
                JobEvent::TooLarge { tag, kind: WorkStatus, size_bytes: 500 },
                JobEvent::TooLarge { tag: JobTag(2), kind: WorkStatus, size_bytes: 500 },
                JobEvent::Created { tag: JobTag(3), handle: b"H:gm:1".to_vec() },
                JobEvent::Data { tag: JobTag(3), data: b"d".to_vec() },
                JobEvent::Complete { tag: JobTag(3), data: b"r".to_vec() },
            ]
        );
        assert_eq!(session.in_flight(), 0);
    }

    #[test]
    fn oversized_work_for_an_unknown_handle_is_skipped_silently() {
        let (mut session, mut out, mut input) = small_setup();
        session.get_status(b"H:gm:9", 5, &mut out);
        let wire = [
            oversized(WorkWarning, b"H:gm:9", 1000),
            oversized(WorkException, b"H:gm:9", SMALL + 1),
            response(StatusRes, &[b"H:gm:9", b"0", b"0", b"0", b"0"]),
        ]
        .concat();
        feed_in_chunks(&mut session, &mut input, &wire, 1);
        assert!(matches!(events(&mut session)[..], [JobEvent::StatusRes { ask: 5, known: false, .. }]));
    }

    #[test]
    fn oversized_reply_other_than_work_is_refused_from_the_header() {
        for kind in [JobCreated, StatusRes, Error, EchoRes, OptionRes] {
            let (mut session, mut out, mut input) = small_setup();
            fg(&mut session, 1, b"", &mut out);
            let wire = oversized(kind, b"H:gm:1", SMALL + 1);
            assert_eq!(
                feed(&mut session, &mut input, &wire[..HEADER_BYTES]),
                Err(ProtocolError::BodyTooLarge { size_bytes: SMALL as u64 + 1, max_bytes: SMALL }),
                "{kind}"
            );
        }
    }

    #[test]
    fn oversized_work_whose_handle_does_not_end_in_time_is_an_error() {
        let big = 1 << 10;
        let (mut session, mut input) = (ClientSession::new(big), InBuf::new(big + HEADER_BYTES));
        let mut wire = Vec::new();
        encode_raw(&mut wire, Magic::Res, WorkData.as_u32(), &vec![b'h'; big + 1]);
        // Short of the 256-byte window: wait, consuming nothing.
        let waiting = HEADER_BYTES + HANDLE_SCAN_BYTES - 1;
        feed(&mut session, &mut input, &wire[..waiting]).unwrap();
        assert_eq!(input.len(), waiting);
        assert_eq!(
            feed(&mut session, &mut input, &wire[waiting..waiting + 1]),
            Err(ProtocolError::BodyTooLarge { size_bytes: big as u64 + 1, max_bytes: big })
        );
        // Under a limit below the window, the window shrinks to the limit: the shell's input is
        // only sure to hold that much of the body.
        let (mut session, _, mut input) = small_setup();
        let wire = oversized(WorkData, &[b'h'; SMALL], 1000);
        assert!(feed(&mut session, &mut input, &wire[..HEADER_BYTES + SMALL - 1]).is_ok());
        assert!(feed(&mut session, &mut input, &wire[HEADER_BYTES + SMALL - 1..][..1]).is_err());
    }
}

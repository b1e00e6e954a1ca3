//! Where the client's current WebSocket message stands, read off the frame headers as
//! `MemStream` hands them to tungstenite: whether one is open, its number, and the bytes
//! tungstenite holds of it. Sans-IO and clock-free: the connection times it.

/// The message a client has begun and not finished, followed from the frame headers as they
/// are handed to tungstenite: tungstenite keeps a fragmented message's frames inside its state
/// and says nothing of them until the last one arrives, yet they are memory the client makes us
/// hold, and time it may stretch. A message begins with the first byte of its first data frame
/// and ends with the last byte of its FIN frame; control frames in between (pings, pongs) are
/// no part of it.
#[derive(Debug, Default)]
pub(super) struct MessageTrack {
    /// Messages begun so far: the number of the one in progress, so the connection can tell a
    /// new message from the one it is already timing.
    pub started: u32,
    /// A message has begun and its last byte has not been handed over yet.
    pub open: bool,
    /// Bytes of that message (frame headers included) handed to tungstenite, which holds them
    /// until the message is whole.
    pub bytes: usize,
    /// The frame being handed over is a data or continuation frame (part of a message).
    in_data_frame: bool,
    /// ... and it is the message's last (FIN).
    in_final_frame: bool,
}

impl MessageTrack {
    /// A frame header starts with `first` (FIN bit, opcode): a data frame opens a message unless
    /// one is open (a continuation, or the same header seen again once its cut end arrived).
    pub fn frame_starts(&mut self, first: u8) {
        self.in_data_frame = first & 0x0f < 8; // opcodes 8 to 15 are control frames
        self.in_final_frame = first & 0x80 != 0;
        if self.in_data_frame && !self.open {
            self.open = true;
            self.started = self.started.wrapping_add(1);
        }
    }

    /// `n` bytes of the current frame were handed over; `frame_done`: its last one among them.
    pub fn handed(&mut self, n: usize, frame_done: bool) {
        if !self.in_data_frame {
            return;
        }
        self.bytes = self.bytes.saturating_add(n);
        if frame_done && self.in_final_frame {
            (self.open, self.bytes, self.in_data_frame) = (false, 0, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MessageTrack;

    #[test]
    fn fragments_open_a_message_control_frames_do_not_and_the_fin_frame_closes_it() {
        let mut t = MessageTrack::default();
        t.frame_starts(0x89); // a ping between messages
        t.handed(7, true);
        assert_eq!((t.open, t.bytes), (false, 0));
        t.frame_starts(0x01); // text, no FIN
        t.handed(10, true);
        assert_eq!((t.open, t.started, t.bytes), (true, 1, 10));
        t.frame_starts(0x8a); // a pong inside the message: no part of it
        t.handed(6, true);
        t.frame_starts(0x00); // continuation, its bytes arriving in two reads
        t.handed(3, false);
        t.frame_starts(0x00); // the same header seen again does not begin another message
        t.handed(3, true);
        assert_eq!((t.open, t.started, t.bytes), (true, 1, 16));
        t.frame_starts(0x80); // the last fragment
        t.handed(4, false);
        assert!(t.open, "open until its last byte");
        t.handed(1, true);
        assert_eq!((t.open, t.bytes), (false, 0));
        t.frame_starts(0x82); // a whole binary message is the second one
        assert_eq!((t.open, t.started), (true, 2));
        t.handed(5, true);
        assert!(!t.open);
    }
}

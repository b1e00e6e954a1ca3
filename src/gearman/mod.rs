//! The Gearman binary protocol, sans-IO.
//!
//! `packet` is the wire format (encode/decode, `ProtocolError`); `client` is `ClientSession`,
//! the submitting side of a gearmand connection (what the server uses); `worker` is
//! `WorkerSession`, the grabbing side (what `crate::worker` drives over a blocking socket).
//! Nothing here owns a socket or reads the clock: bytes go in through `handle_input`, bytes come
//! out appended to a caller's `Vec<u8>`, meaning comes out of `poll_event`.
pub mod client;
pub mod packet;
pub mod worker;

pub use client::{ClientSession, JobEvent, JobMode, JobTag, Priority};
pub use packet::{Magic, Packet, PacketType, ProtocolError};
pub use worker::{Assignment, WorkerEvent, WorkerSession, WorkerState};

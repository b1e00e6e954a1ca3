//! The Gearman binary packet: `PacketType`, `encode`, `decode`, `ProtocolError`.
//!
//! This module owns the wire format only: a 12-byte header (magic, type, body size) followed by
//! the arguments separated by single NULs. It knows how many arguments each type carries and
//! nothing about what they mean; the sessions in `client` and `worker` give them meaning. It owns
//! no socket and keeps no state. The line-based admin protocol that shares gearmand's port is
//! out of scope: a first byte other than `0x00` is a `ProtocolError`.

use std::fmt;

/// Length of the fixed packet header: magic, type, body size.
pub const HEADER_BYTES: usize = 12;

/// Which way a packet travels: `\0REQ` to the server, `\0RES` from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Magic {
    /// `\0REQ`: sent by a client or worker.
    Req,
    /// `\0RES`: sent by the server.
    Res,
}

impl Magic {
    /// The four magic bytes on the wire.
    pub fn bytes(self) -> &'static [u8; 4] {
        match self {
            Magic::Req => b"\0REQ",
            Magic::Res => b"\0RES",
        }
    }
}

/// Every packet type of the binary protocol, numbered as on the wire (1..=42).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// W→S: function.
    CanDo = 1,
    /// W→S: function.
    CantDo = 2,
    /// W→S: no arguments.
    ResetAbilities = 3,
    /// W→S: no arguments; the worker sleeps until NOOP.
    PreSleep = 4,
    /// Type 5 was never assigned; it decodes, with no arguments, so a peer's use of it is not
    /// mistaken for a framing error.
    Unused = 5,
    /// S→W: wake up and grab.
    Noop = 6,
    /// C→S: function, unique, payload.
    SubmitJob = 7,
    /// S→C: handle.
    JobCreated = 8,
    /// W→S: no arguments.
    GrabJob = 9,
    /// S→W: no arguments.
    NoJob = 10,
    /// S→W: handle, function, payload.
    JobAssign = 11,
    /// W→S, S→C: handle, numerator, denominator.
    WorkStatus = 12,
    /// W→S, S→C: handle, result.
    WorkComplete = 13,
    /// W→S, S→C: handle.
    WorkFail = 14,
    /// C→S: handle.
    GetStatus = 15,
    /// C/W→S: opaque.
    EchoReq = 16,
    /// S→C/W: the same opaque bytes.
    EchoRes = 17,
    /// C→S: function, unique, payload.
    SubmitJobBg = 18,
    /// S→C/W: code, text.
    Error = 19,
    /// S→C: handle, known, running, numerator, denominator.
    StatusRes = 20,
    /// C→S: function, unique, payload.
    SubmitJobHigh = 21,
    /// W→S: id string.
    SetClientId = 22,
    /// W→S: function, timeout.
    CanDoTimeout = 23,
    /// W→S: no arguments (never implemented by gearmand).
    AllYours = 24,
    /// W→S, S→C: handle, exception data.
    WorkException = 25,
    /// C/W→S: option name.
    OptionReq = 26,
    /// S→C/W: option name.
    OptionRes = 27,
    /// W→S, S→C: handle, data.
    WorkData = 28,
    /// W→S, S→C: handle, data.
    WorkWarning = 29,
    /// W→S: no arguments.
    GrabJobUniq = 30,
    /// S→W: handle, function, unique, payload.
    JobAssignUniq = 31,
    /// C→S: function, unique, payload.
    SubmitJobHighBg = 32,
    /// C→S: function, unique, payload.
    SubmitJobLow = 33,
    /// C→S: function, unique, payload.
    SubmitJobLowBg = 34,
    /// C→S: function, unique, minute, hour, day of month, month, day of week, payload.
    SubmitJobSched = 35,
    /// C→S: function, unique, unix time, payload.
    SubmitJobEpoch = 36,
    /// C→S: function, unique, reducer, payload.
    SubmitReduceJob = 37,
    /// C→S: function, unique, reducer, payload.
    SubmitReduceJobBackground = 38,
    /// W→S: no arguments.
    GrabJobAll = 39,
    /// S→W: handle, function, unique, reducer, payload.
    JobAssignAll = 40,
    /// C→S: unique.
    GetStatusUnique = 41,
    /// S→C: unique, known, running, numerator, denominator, waiting clients.
    StatusResUnique = 42,
}

impl PacketType {
    /// Every type, in wire order.
    pub const ALL: [PacketType; 42] = {
        use PacketType::*;
        [
            CanDo,
            CantDo,
            ResetAbilities,
            PreSleep,
            Unused,
            Noop,
            SubmitJob,
            JobCreated,
            GrabJob,
            NoJob,
            JobAssign,
            WorkStatus,
            WorkComplete,
            WorkFail,
            GetStatus,
            EchoReq,
            EchoRes,
            SubmitJobBg,
            Error,
            StatusRes,
            SubmitJobHigh,
            SetClientId,
            CanDoTimeout,
            AllYours,
            WorkException,
            OptionReq,
            OptionRes,
            WorkData,
            WorkWarning,
            GrabJobUniq,
            JobAssignUniq,
            SubmitJobHighBg,
            SubmitJobLow,
            SubmitJobLowBg,
            SubmitJobSched,
            SubmitJobEpoch,
            SubmitReduceJob,
            SubmitReduceJobBackground,
            GrabJobAll,
            JobAssignAll,
            GetStatusUnique,
            StatusResUnique,
        ]
    };

    /// The type with wire number `n`, or `None` for 0 and anything above 42.
    pub fn from_u32(n: u32) -> Option<PacketType> {
        let index = usize::try_from(n).ok()?.checked_sub(1)?;
        PacketType::ALL.get(index).copied()
    }

    /// The wire number.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// How many arguments a packet of this type carries. All but the last are NUL-terminated;
    /// the last runs to the end of the body.
    pub fn arg_count(self) -> usize {
        use PacketType::*;
        match self {
            ResetAbilities | PreSleep | Unused | Noop | GrabJob | NoJob | AllYours | GrabJobUniq
            | GrabJobAll => 0,
            CanDo | CantDo | JobCreated | WorkFail | GetStatus | EchoReq | EchoRes | SetClientId
            | OptionReq | OptionRes | GetStatusUnique => 1,
            WorkComplete | Error | CanDoTimeout | WorkException | WorkData | WorkWarning => 2,
            SubmitJob | JobAssign | WorkStatus | SubmitJobBg | SubmitJobHigh | SubmitJobHighBg
            | SubmitJobLow | SubmitJobLowBg => 3,
            JobAssignUniq | SubmitJobEpoch | SubmitReduceJob | SubmitReduceJobBackground => 4,
            StatusRes | JobAssignAll => 5,
            StatusResUnique => 6,
            SubmitJobSched => 8,
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One decoded packet. Arguments are owned copies, so the input buffer can be consumed at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Direction the packet claimed.
    pub magic: Magic,
    /// Its type.
    pub kind: PacketType,
    /// Exactly `kind.arg_count()` arguments.
    pub args: Vec<Vec<u8>>,
}

impl Packet {
    /// Argument `i`, or an empty slice if the packet has fewer (decode never produces fewer).
    pub fn arg(&self, i: usize) -> &[u8] {
        self.args.get(i).map_or(&[], Vec::as_slice)
    }
}

/// Why bytes from a peer cannot be a Gearman packet, or why a packet makes no sense where it
/// arrived. Every variant means the connection should be dropped: there is no resynchronising
/// inside a byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The magic (up to the bytes seen so far) is not the one expected. A first byte other than
    /// `0x00` would be the text admin protocol, which we do not speak.
    BadMagic {
        /// The magic we expected.
        expected: Magic,
        /// The (at most four) bytes found where it should be.
        found: Vec<u8>,
    },
    /// Type 0 or above 42.
    UnknownType(u32),
    /// The header declares a body larger than our limit; refused before the body arrives. (A
    /// client session skips an oversized WORK_* packet instead, and reports this only when the
    /// handle does not end within the body's first 256 bytes.)
    BodyTooLarge {
        /// Declared body size.
        size_bytes: u64,
        /// Our limit.
        max_bytes: usize,
    },
    /// The body has fewer NUL separators than the type's argument count needs.
    MissingArgs {
        /// The packet type.
        kind: PacketType,
        /// Arguments the type carries.
        expected: usize,
        /// Arguments found.
        found: usize,
    },
    /// A well-formed packet that the session did not expect at this point (for example a
    /// JOB_CREATED with no submit outstanding, or a server packet a client never gets).
    Unexpected {
        /// The packet type received.
        kind: PacketType,
        /// What the session was waiting for.
        expected: &'static str,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadMagic { expected, found } => {
                write!(f, "bad magic {:?}, expected {:?}", found.escape_ascii().to_string(), expected)
            }
            ProtocolError::UnknownType(n) => write!(f, "unknown packet type {n}"),
            ProtocolError::BodyTooLarge { size_bytes, max_bytes } => {
                write!(f, "packet body of {size_bytes} bytes exceeds the limit of {max_bytes}")
            }
            ProtocolError::MissingArgs { kind, expected, found } => {
                write!(f, "{kind} needs {expected} arguments, body holds {found}")
            }
            ProtocolError::Unexpected { kind, expected } => {
                write!(f, "unexpected {kind} while waiting for {expected}")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Appends one packet: header, then `args` joined by single NULs (the last unterminated).
///
/// Always pass the type's full argument list, empty ones included: gearmand 1.1.20 reads past a
/// body that lacks its separators and then drops the connection.
///
/// # Panics
/// If the body would exceed the u32 size field (4 GiB − 1); callers cap payloads far below.
pub fn encode(out: &mut Vec<u8>, magic: Magic, kind: PacketType, args: &[&[u8]]) {
    debug_assert_eq!(args.len(), kind.arg_count(), "{kind} takes {} arguments", kind.arg_count());
    let body_bytes = args.iter().map(|a| a.len()).sum::<usize>() + args.len().saturating_sub(1);
    let size = u32::try_from(body_bytes).expect("gearman body over 4 GiB; payload limits prevent this");
    out.reserve(HEADER_BYTES + body_bytes);
    out.extend_from_slice(magic.bytes());
    out.extend_from_slice(&kind.as_u32().to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(arg);
    }
}

/// `encode` with `\0REQ`: what clients and workers send.
pub(crate) fn encode_request(out: &mut Vec<u8>, kind: PacketType, args: &[&[u8]]) {
    encode(out, Magic::Req, kind, args);
}

/// `encode` with `\0RES`: what the server sends (tests and fake servers use it).
pub fn encode_response(out: &mut Vec<u8>, kind: PacketType, args: &[&[u8]]) {
    encode(out, Magic::Res, kind, args);
}

/// One whole response packet as its own bytes: what gearmand would send (fake peers, tests).
#[cfg(test)]
pub(crate) fn response(kind: PacketType, args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_response(&mut out, kind, args);
    out
}

/// Appends a header with any type number and a raw body, unchecked: for fake peers in tests
/// that must send what a well-behaved peer never would.
#[cfg(test)]
pub(crate) fn encode_raw(out: &mut Vec<u8>, magic: Magic, kind: u32, body: &[u8]) {
    let size = u32::try_from(body.len()).expect("raw test body over 4 GiB");
    out.extend_from_slice(magic.bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads the header at the start of `buf`: the packet's type and declared body size.
///
/// `Ok(None)` means the 12 header bytes are not all here yet; nothing is consumed either way.
/// Errors come as early as in `decode`: a wrong magic from its first byte, an unknown type once
/// the type field is complete. The size is not checked against any limit, so a caller can decide
/// what to do with an oversized packet before its body arrives.
pub fn peek_header(buf: &[u8], expect: Magic) -> Result<Option<(PacketType, u32)>, ProtocolError> {
    let magic = expect.bytes();
    let seen = buf.len().min(magic.len());
    if buf[..seen] != magic[..seen] {
        return Err(ProtocolError::BadMagic { expected: expect, found: buf[..seen].to_vec() });
    }
    if buf.len() < 8 {
        return Ok(None);
    }
    let number = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let kind = PacketType::from_u32(number).ok_or(ProtocolError::UnknownType(number))?;
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    Ok(Some((kind, u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]))))
}

/// Decodes the packet at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed; nothing is consumed. `Ok(Some((packet, used)))`
/// means the caller should consume `used` bytes. Errors are found as early as the bytes allow:
/// a wrong magic from its first byte, an unknown type from the header, and a body over
/// `max_body` from the header, before any of the body arrives.
pub fn decode(buf: &[u8], expect: Magic, max_body: usize) -> Result<Option<(Packet, usize)>, ProtocolError> {
    let Some((kind, declared)) = peek_header(buf, expect)? else {
        return Ok(None);
    };
    let size = match usize::try_from(declared) {
        Ok(size) if size <= max_body => size,
        _ => {
            return Err(ProtocolError::BodyTooLarge { size_bytes: u64::from(declared), max_bytes: max_body });
        }
    };
    let Some(body) = buf.get(HEADER_BYTES..HEADER_BYTES + size) else {
        return Ok(None);
    };
    let args = split_args(kind, body)?;
    Ok(Some((Packet { magic: expect, kind, args }, HEADER_BYTES + size)))
}

/// `decode` expecting `\0RES`: what clients and workers read.
pub(crate) fn decode_response(buf: &[u8], max_body: usize) -> Result<Option<(Packet, usize)>, ProtocolError> {
    decode(buf, Magic::Res, max_body)
}

/// `decode` expecting `\0REQ`: what a server (or a fake one in tests) reads.
pub fn decode_request(buf: &[u8], max_body: usize) -> Result<Option<(Packet, usize)>, ProtocolError> {
    decode(buf, Magic::Req, max_body)
}

/// Splits on the first `argc - 1` NULs only, so the last argument may hold NULs.
fn split_args(kind: PacketType, body: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let argc = kind.arg_count();
    if argc == 0 {
        // A body on a no-argument packet carries nothing we could use; tolerate it.
        return Ok(Vec::new());
    }
    if kind == PacketType::WorkFail {
        // gearmand 1.1.20 synthesises WORK_FAIL from WORK_EXCEPTION with a NUL after the handle.
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        return Ok(vec![body[..end].to_vec()]);
    }
    let mut args = Vec::with_capacity(argc);
    let mut rest = body;
    while args.len() + 1 < argc {
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(ProtocolError::MissingArgs { kind, expected: argc, found: args.len() + 1 });
        };
        args.push(rest[..nul].to_vec());
        rest = &rest[nul + 1..];
    }
    args.push(rest.to_vec());
    Ok(args)
}

/// Reads a decimal ASCII number the way gearmand's `atoi` does: optional leading spaces, then
/// digits up to the first non-digit. Garbage gives 0; overflow saturates.
pub fn parse_number(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, &d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn sample_args(kind: PacketType) -> Vec<Vec<u8>> {
        // Distinct, non-empty arguments; the last one holds NULs where that is legal.
        let argc = kind.arg_count();
        (0..argc)
            .map(|i| {
                if i + 1 == argc && kind != PacketType::WorkFail {
                    b"last\0with\0nul".to_vec()
                } else {
                    format!("a{i}").into_bytes()
                }
            })
            .collect()
    }

    fn wire(magic: Magic, kind: PacketType, args: &[Vec<u8>]) -> Vec<u8> {
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        encode(&mut out, magic, kind, &refs);
        out
    }

    #[test]
    fn every_type_round_trips_both_ways() {
        for kind in PacketType::ALL {
            assert_eq!(PacketType::from_u32(kind.as_u32()), Some(kind));
            for magic in [Magic::Req, Magic::Res] {
                let args = sample_args(kind);
                let bytes = wire(magic, kind, &args);
                let (packet, used) = decode(&bytes, magic, MAX).unwrap().unwrap();
                assert_eq!(used, bytes.len(), "{kind}");
                assert_eq!(packet, Packet { magic, kind, args }, "{kind}");
            }
        }
    }

    #[test]
    fn numbers_match_the_protocol_table() {
        assert_eq!(PacketType::CanDo.as_u32(), 1);
        assert_eq!(PacketType::Noop.as_u32(), 6);
        assert_eq!(PacketType::WorkFail.as_u32(), 14);
        assert_eq!(PacketType::StatusRes.as_u32(), 20);
        assert_eq!(PacketType::WorkException.as_u32(), 25);
        assert_eq!(PacketType::JobAssignUniq.as_u32(), 31);
        assert_eq!(PacketType::SubmitJobLowBg.as_u32(), 34);
        assert_eq!(PacketType::StatusResUnique.as_u32(), 42);
        assert_eq!(PacketType::from_u32(0), None);
        assert_eq!(PacketType::from_u32(43), None);
    }

    #[test]
    fn encode_writes_header_and_nul_separators() {
        let mut out = Vec::new();
        encode_request(&mut out, PacketType::SubmitJob, &[b"reverse", b"", b"abc"]);
        assert_eq!(out, b"\0REQ\0\0\0\x07\0\0\0\x0creverse\0\0abc");
        out.clear();
        encode_response(&mut out, PacketType::Noop, &[]);
        assert_eq!(out, b"\0RES\0\0\0\x06\0\0\0\0");
    }

    #[test]
    fn byte_at_a_time_needs_more_until_the_last_byte() {
        let args = vec![b"H:gm:1".to_vec(), b"payload\0x".to_vec()];
        let bytes = wire(Magic::Res, PacketType::WorkData, &args);
        for end in 0..bytes.len() {
            assert_eq!(decode_response(&bytes[..end], MAX), Ok(None), "prefix of {end}");
        }
        let (packet, used) = decode_response(&bytes, MAX).unwrap().unwrap();
        assert_eq!((packet.kind, packet.args, used), (PacketType::WorkData, args, bytes.len()));
    }

    #[test]
    fn only_the_first_packet_is_taken() {
        let mut bytes = wire(Magic::Res, PacketType::NoJob, &[]);
        bytes.extend(wire(Magic::Res, PacketType::Noop, &[]));
        let (packet, used) = decode_response(&bytes, MAX).unwrap().unwrap();
        assert_eq!((packet.kind, used), (PacketType::NoJob, HEADER_BYTES));
    }

    #[test]
    fn oversize_body_is_refused_from_the_header_alone() {
        let mut header = Vec::new();
        encode_raw(&mut header, Magic::Res, PacketType::WorkData.as_u32(), &[]);
        header[8..12].copy_from_slice(&1001u32.to_be_bytes());
        assert_eq!(
            decode_response(&header, 1000),
            Err(ProtocolError::BodyTooLarge { size_bytes: 1001, max_bytes: 1000 })
        );
        header[8..12].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(decode_response(&header, 1000), Ok(None));
    }

    #[test]
    fn peek_header_reads_type_and_size_without_a_limit() {
        let mut header = Vec::new();
        encode_raw(&mut header, Magic::Res, PacketType::WorkData.as_u32(), &[]);
        header[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        for end in 0..HEADER_BYTES {
            assert_eq!(peek_header(&header[..end], Magic::Res), Ok(None), "prefix of {end}");
        }
        assert_eq!(peek_header(&header, Magic::Res), Ok(Some((PacketType::WorkData, u32::MAX))));
        assert!(matches!(peek_header(b"\0RX", Magic::Res), Err(ProtocolError::BadMagic { .. })));
        assert!(matches!(peek_header(&header[..4], Magic::Req), Err(ProtocolError::BadMagic { .. })));
        header[4..8].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(peek_header(&header[..8], Magic::Res), Err(ProtocolError::UnknownType(99)));
    }

    #[test]
    fn garbage_magic_is_refused_at_the_first_wrong_byte() {
        assert!(matches!(decode_response(b"G", MAX), Err(ProtocolError::BadMagic { .. })));
        assert!(matches!(decode_response(b"\0RX", MAX), Err(ProtocolError::BadMagic { .. })));
        assert_eq!(decode_response(b"\0RE", MAX), Ok(None));
        let request = wire(Magic::Req, PacketType::Noop, &[]);
        assert!(matches!(decode_response(&request, MAX), Err(ProtocolError::BadMagic { .. })));
        assert!(decode_request(&request, MAX).unwrap().is_some());
    }

    #[test]
    fn type_zero_and_ninety_nine_are_unknown() {
        for number in [0, 43, 99] {
            let mut bytes = Vec::new();
            encode_raw(&mut bytes, Magic::Res, number, b"");
            assert_eq!(decode_response(&bytes[..8], MAX), Err(ProtocolError::UnknownType(number)));
        }
    }

    #[test]
    fn missing_nul_separators_are_an_error() {
        let mut bytes = Vec::new();
        encode_raw(&mut bytes, Magic::Res, PacketType::StatusRes.as_u32(), b"H:gm:1\x001\x001");
        assert_eq!(
            decode_response(&bytes, MAX),
            Err(ProtocolError::MissingArgs { kind: PacketType::StatusRes, expected: 5, found: 3 })
        );
        bytes.clear();
        encode_raw(&mut bytes, Magic::Req, PacketType::SubmitJob.as_u32(), b"abc");
        assert!(matches!(decode_request(&bytes, MAX), Err(ProtocolError::MissingArgs { found: 1, .. })));
    }

    #[test]
    fn payload_may_hold_nuls_and_empty_args_survive() {
        let mut bytes = Vec::new();
        encode_request(&mut bytes, PacketType::SubmitJob, &[b"f", b"", b"\0\0x\0"]);
        let (packet, _) = decode_request(&bytes, MAX).unwrap().unwrap();
        assert_eq!(packet.args, vec![b"f".to_vec(), Vec::new(), b"\0\0x\0".to_vec()]);
    }

    #[test]
    fn work_fail_with_trailing_nul_yields_the_bare_handle() {
        let mut bytes = Vec::new();
        encode_raw(&mut bytes, Magic::Res, PacketType::WorkFail.as_u32(), b"H:vm:1\0");
        let (packet, used) = decode_response(&bytes, MAX).unwrap().unwrap();
        assert_eq!((packet.kind, packet.args, used), (PacketType::WorkFail, vec![b"H:vm:1".to_vec()], 19));
    }

    #[test]
    fn numbers_parse_like_atoi() {
        assert_eq!(parse_number(b"42"), 42);
        assert_eq!(parse_number(b" 7x"), 7);
        assert_eq!(parse_number(b"abc"), 0);
        assert_eq!(parse_number(b""), 0);
        assert_eq!(parse_number(b"99999999999999999999999"), u64::MAX);
    }
}

//! Arbitrary bytes into the Gearman packet decoder (`gearman::packet::decode`).
//!
//! Input: one control byte (which magic to expect, which body limit), two bytes that pick a
//! split point, then the wire bytes. The wire is decoded packet after packet the way a session
//! does it: once from one buffer holding everything, and once streamed through an `InBuf` the
//! size the shell gives it (limit + header), in two chunks cut at the split point and each
//! pushed in no more than the buffer's room, as `server::io::fill` reads.
//!
//! Checked: no panic; each packet has its type's argument count and re-encodes to the bytes it
//! came from; the header peek agrees with the decode; a full buffer always decodes (a decoder
//! that waits on a full buffer would stall its connection); and the two feedings give the same
//! packets, then the same leftover or the same kind of error.
#![no_main]

use std::mem::discriminant;

use gearsock::buf::InBuf;
use gearsock::gearman::packet::{
    HEADER_BYTES, Magic, Packet, PacketType, ProtocolError, decode, encode, parse_number, peek_header,
};
use libfuzzer_sys::fuzz_target;

/// Body limits: none at all, below the 256-byte handle window, above it, and roomy.
const LIMITS: [usize; 4] = [0, 16, 300, 1 << 16];

/// What one feeding produced: the packets, then the error that stopped it (if any) and the
/// bytes left undecoded.
#[derive(Debug)]
struct Outcome {
    packets: Vec<Packet>,
    error: Option<ProtocolError>,
    leftover: Vec<u8>,
}

fuzz_target!(|data: &[u8]| {
    let [control, hi, lo, wire @ ..] = data else { return };
    let max_body = LIMITS[usize::from(control & 3)];
    let magic = if control & 4 == 0 { Magic::Res } else { Magic::Req };
    let split = usize::from(u16::from_be_bytes([*hi, *lo])) % (wire.len() + 1);

    let whole = decode_all(wire, magic, max_body);
    let (first, second) = wire.split_at(split);
    let streamed = stream(&[first, second], magic, max_body);

    assert_eq!(whole.packets, streamed.packets, "chunking changed the packets");
    match (&whole.error, &streamed.error) {
        // After an error the connection is dropped, and what was read past it does not matter.
        (None, None) => assert_eq!(whole.leftover, streamed.leftover, "chunking changed what was left"),
        (Some(a), Some(b)) => assert_eq!(discriminant(a), discriminant(b), "{a:?} vs {b:?}"),
        (a, b) => panic!("chunking changed the outcome: {a:?} vs {b:?}"),
    }
});

/// Decodes packet after packet from one slice.
fn decode_all(wire: &[u8], magic: Magic, max_body: usize) -> Outcome {
    let mut packets = Vec::new();
    let mut at = 0;
    loop {
        match decode(&wire[at..], magic, max_body) {
            Ok(Some((packet, used))) => {
                check_packet(&packet, &wire[at..], used, magic, max_body);
                packets.push(packet);
                at += used;
            }
            Ok(None) => return Outcome { packets, error: None, leftover: wire[at..].to_vec() },
            Err(e) => return Outcome { packets, error: Some(e), leftover: wire[at..].to_vec() },
        }
    }
}

/// Feeds `chunks` through an `InBuf` sized as the shell sizes it, decoding after every push.
fn stream(chunks: &[&[u8]], magic: Magic, max_body: usize) -> Outcome {
    let mut input = InBuf::new(max_body + HEADER_BYTES);
    let mut packets = Vec::new();
    for chunk in chunks {
        let mut rest = *chunk;
        loop {
            let n = rest.len().min(input.room());
            input.extend(&rest[..n]);
            rest = &rest[n..];
            loop {
                match decode(input.data(), magic, max_body) {
                    Ok(Some((packet, used))) => {
                        check_packet(&packet, input.data(), used, magic, max_body);
                        input.consume(used);
                        packets.push(packet);
                    }
                    Ok(None) => break,
                    Err(e) => return Outcome { packets, error: Some(e), leftover: input.data().to_vec() },
                }
            }
            assert!(
                !input.is_full(),
                "decoder waits for more bytes on a full buffer ({} bytes)",
                input.len()
            );
            if rest.is_empty() {
                break;
            }
        }
    }
    Outcome { packets, error: None, leftover: input.data().to_vec() }
}

/// What must hold for a packet decoded from the start of `buf`, `used` bytes long.
fn check_packet(packet: &Packet, buf: &[u8], used: usize, magic: Magic, max_body: usize) {
    assert!(used >= HEADER_BYTES && used <= buf.len() && used - HEADER_BYTES <= max_body);
    assert_eq!(packet.magic, magic);
    assert_eq!(packet.args.len(), packet.kind.arg_count(), "{:?}", packet.kind);
    let body_bytes = u32::try_from(used - HEADER_BYTES).expect("body fits the size field");
    assert_eq!(peek_header(buf, magic), Ok(Some((packet.kind, body_bytes))));
    for i in 0..=packet.args.len() {
        parse_number(packet.arg(i));
    }
    let body = &buf[HEADER_BYTES..used];
    match packet.kind.arg_count() {
        // A body on a no-argument packet is tolerated and dropped.
        0 => {}
        // WORK_FAIL keeps the handle up to the first NUL.
        _ if packet.kind == PacketType::WorkFail => {
            let handle = &packet.args[0];
            assert!(body.starts_with(handle) && !handle.contains(&0));
        }
        _ => {
            let args: Vec<&[u8]> = packet.args.iter().map(Vec::as_slice).collect();
            let mut again = Vec::new();
            encode(&mut again, magic, packet.kind, &args);
            assert_eq!(again, &buf[..used], "{:?} does not re-encode to its bytes", packet.kind);
            // Every argument but the last ends at a NUL, so none of them holds one.
            assert!(args[..args.len() - 1].iter().all(|a| !a.contains(&0)));
        }
    }
}

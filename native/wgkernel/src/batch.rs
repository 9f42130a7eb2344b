//! Whole-batch transport work in one call: a TUN TSO super-packet into one buffer of sealed
//! datagrams ready for a UDP_SEGMENT send, and a run of one session's transport messages into
//! their IP packets, replay-checked, with the runs of one flow marked. Python does the same in
//! `wiremesh.core.wireguard.kernel` (seal_tso_python, open_run_python), byte for byte.

use ring::aead::{Aad, LessSafeKey};

use crate::offload;
use crate::{nonce, HEADER, MESSAGE_TRANSPORT, TAG};

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

pub fn sealed_len(packet: usize) -> usize {
    HEADER + ((packet + 15) & !15) + TAG
}

/// Segment a TSO super-packet and seal each segment straight into one buffer, counters from
/// `counter` on: (the buffer, the size of the first message, how many).
pub fn seal_segments(
    aead: &LessSafeKey,
    receiver: u32,
    counter: u64,
    packet: &[u8],
    mss: usize,
) -> Result<(Vec<u8>, usize, usize), &'static str> {
    let mut out: Vec<u8> = Vec::with_capacity(packet.len() + (packet.len() / mss.max(1) + 1) * 160);
    let mut first = 0;
    let mut c = counter;
    let count = offload::segment_each(packet, mss, |head, payload| {
        let at = out.len();
        let plain = head.len() + payload.len();
        let n = sealed_len(plain);
        out.extend_from_slice(&MESSAGE_TRANSPORT.to_le_bytes());
        out.extend_from_slice(&receiver.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
        out.extend_from_slice(head);
        out.extend_from_slice(payload);
        out.resize(at + n, 0); // padding to 16, then room for the tag
        let (body, tag) = out[at + HEADER..].split_at_mut(n - HEADER - TAG);
        let t = aead
            .seal_in_place_separate_tag(nonce(c), Aad::empty(), body)
            .expect("a transport payload is far below the cipher's limit");
        tag.copy_from_slice(t.as_ref());
        if c == counter {
            first = n;
        }
        c += 1;
    })?;
    Ok((out, first, count))
}

/// What opening one run found, besides the packets.
#[derive(Default)]
pub struct RunStats {
    pub authenticated: usize,
    pub nbytes: usize,
    pub data: usize,
    pub replay: usize,
    pub decrypt_failed: usize,
    pub not_ip: usize,
}

/// The end (exclusive) of the run starting at `start`: transport messages of one receiver index.
pub fn run_end(datagrams: &[&[u8]], start: usize) -> usize {
    let prefix = &datagrams[start][..8];
    let mut j = start + 1;
    while j < datagrams.len() && datagrams[j].len() >= HEADER + TAG && &datagrams[j][..8] == prefix {
        j += 1;
    }
    j
}

pub fn counter_of(datagram: &[u8]) -> u64 {
    u64::from_le_bytes(datagram[8..16].try_into().expect("8 bytes"))
}

/// Decrypt each (datagram index) into `plain`, returning (offset, length) or None per message.
pub fn open_all(aead: &LessSafeKey, datagrams: &[&[u8]], todo: &[usize], plain: &mut Vec<u8>) -> Vec<Option<(usize, usize)>> {
    let mut out = Vec::with_capacity(todo.len());
    for &i in todo {
        let d = datagrams[i];
        let at = plain.len();
        plain.extend_from_slice(&d[HEADER..]);
        let counter = counter_of(d);
        match aead.open_in_place(nonce(counter), Aad::empty(), &mut plain[at..]) {
            Ok(p) => {
                let n = p.len();
                plain.truncate(at + n);
                out.push(Some((at, n)));
            }
            Err(_) => {
                plain.truncate(at);
                out.push(None);
            }
        }
    }
    out
}

/// The IP packet inside a non-empty payload (padding cut off) and its source address, or None
/// (not_ip): an IP header whose length covers no more than was decrypted.
pub fn inner(plain: &[u8]) -> Option<(&[u8], &[u8])> {
    let size = plain.len();
    let version = plain[0] >> 4;
    let (length, src) = if version == 4 && size >= 20 {
        let length = usize::from(u16::from_be_bytes([plain[2], plain[3]]));
        if length < 20 {
            return None;
        }
        (length, &plain[12..16])
    } else if version == 6 && size >= 40 {
        (usize::from(u16::from_be_bytes([plain[4], plain[5]])) + 40, &plain[8..24])
    } else {
        return None;
    };
    if length > size {
        return None;
    }
    Some((&plain[..length], src))
}

/// The part of a plain-header TCP/UDP packet that names its flow (protocol, addresses, ports),
/// as the packet filter's fast path reads it; None for anything else.
pub fn flow_key(p: &[u8]) -> Option<(u8, &[u8])> {
    let n = p.len();
    if n >= 24 && p[0] == 0x45 && p[6] & 0x1F == 0 && p[7] == 0 {
        let proto = p[9];
        if proto == PROTO_TCP || proto == PROTO_UDP {
            return Some((proto, &p[12..24]));
        }
    } else if n >= 44 && p[0] >> 4 == 6 {
        let proto = p[6];
        if proto == PROTO_TCP || proto == PROTO_UDP {
            return Some((proto, &p[8..44]));
        }
    }
    None
}

//! TCP segmentation (TUN TSO super-packets into segments) and coalescing (received segments into
//! one GSO write), byte for byte what wiremesh.agent.gso.segment_tcp and gro.coalesce do.

const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
const VNET_HDR_LEN: usize = 10;
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const MAX_IP_PACKET: usize = 65535;

fn fold(mut total: u64) -> u64 {
    while total >> 16 != 0 {
        total = (total & 0xFFFF) + (total >> 16);
    }
    total
}

/// Folded ones'-complement sum of `data` as big-endian 16-bit words (odd length zero-padded).
fn ones_sum(data: &[u8]) -> u64 {
    let mut s: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        s += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        s += u64::from(*last) << 8;
    }
    fold(s)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Segments of one TCP super-packet with `mss` payload bytes each, checksums complete; Err with
/// the reason when the packet is not what TSO hands over.
pub fn segment_tcp(packet: &[u8], mss: usize) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut out = Vec::new();
    segment_each(packet, mss, |head, payload| {
        let mut segment = Vec::with_capacity(head.len() + payload.len());
        segment.extend_from_slice(head);
        segment.extend_from_slice(payload);
        out.push(segment);
    })?;
    Ok(out)
}

/// segment_tcp handing each segment, as (headers, payload), to `emit` in order, so that a
/// caller can lay segments out where it wants them without a copy per segment.
pub fn segment_each<F: FnMut(&[u8], &[u8])>(packet: &[u8], mss: usize, mut emit: F) -> Result<usize, &'static str> {
    let n = packet.len();
    if n < 40 || mss == 0 {
        return Err("super-packet too short");
    }
    let version = packet[0] >> 4;
    let (t, pseudo, ip_base, ip_id) = match version {
        4 => {
            let t = usize::from(packet[0] & 0x0F) * 4;
            if t < 20 || packet[9] != PROTO_TCP {
                return Err("TSO packet is not IPv4/TCP");
            }
            if t > n {
                return Err("super-packet shorter than its headers");
            }
            let pseudo = ones_sum(&packet[12..20]) + u64::from(PROTO_TCP);
            let mut base = packet[..t].to_vec();
            base[2..6].fill(0); // total length and identification vary per segment
            base[10..12].fill(0); // the checksum
            (t, pseudo, ones_sum(&base), u64::from(be16(packet, 4)))
        }
        6 => {
            if packet[6] != PROTO_TCP {
                return Err("TSO packet is not IPv6/TCP (extension headers unsupported)");
            }
            (40, ones_sum(&packet[8..40]) + u64::from(PROTO_TCP), 0, 0)
        }
        _ => return Err("not an IP packet"),
    };
    if t + 20 > n {
        return Err("super-packet shorter than its headers");
    }
    let doff = usize::from(packet[t + 12] >> 4) * 4;
    let hl = t + doff;
    if doff < 20 || hl > n {
        return Err("bad TCP header length");
    }
    let payload = &packet[hl..];
    let total = payload.len();
    if total <= mss {
        // Nothing to split; still finish the checksum the kernel left partial.
        let mut fixed = packet.to_vec();
        fixed[t + 16..t + 18].fill(0);
        let csum = !fold(pseudo + (n - t) as u64 + ones_sum(&fixed[t..])) & 0xFFFF;
        put16(&mut fixed, t + 16, csum as u16);
        if version == 4 {
            fixed[10..12].fill(0);
            let ipsum = !ones_sum(&fixed[..t]) & 0xFFFF;
            put16(&mut fixed, 10, ipsum as u16);
        }
        emit(&fixed, &[]);
        return Ok(1);
    }
    let seq0 = u32::from_be_bytes([packet[t + 4], packet[t + 5], packet[t + 6], packet[t + 7]]);
    let flags0 = packet[t + 13];
    // TCP header sum without sequence number, flags and checksum: those vary per segment.
    let mut fixed_words = Vec::with_capacity(doff);
    fixed_words.extend_from_slice(&packet[t..t + 4]);
    fixed_words.extend_from_slice(&[0, 0, 0, 0]);
    fixed_words.extend_from_slice(&packet[t + 8..t + 12]);
    let mut tcp_base = ones_sum(&fixed_words) + (u64::from(packet[t + 12]) << 8);
    let mut rest_words = Vec::with_capacity(doff);
    rest_words.extend_from_slice(&packet[t + 14..t + 16]);
    rest_words.extend_from_slice(&packet[t + 18..hl]);
    tcp_base += ones_sum(&rest_words);
    let full = total / mss;
    let rest = total % mss;
    let count = full + usize::from(rest > 0);
    let mut head = packet[..hl].to_vec();
    for k in 0..count {
        let seglen = if k < full { mss } else { rest };
        let start = k * mss;
        let seg = &payload[start..start + seglen];
        let last = k == count - 1;
        let mut flags = if last { flags0 } else { flags0 & !(TCP_FIN | TCP_PSH) };
        if k > 0 {
            flags &= !TCP_CWR;
        }
        let seq = seq0.wrapping_add((k * mss) as u32);
        if version == 4 {
            let length = (hl + seglen) as u64;
            let ident = (ip_id + k as u64) & 0xFFFF;
            put16(&mut head, 2, length as u16);
            put16(&mut head, 4, ident as u16);
            put16(&mut head, 10, (!fold(ip_base + length + ident) & 0xFFFF) as u16);
        } else {
            put16(&mut head, 4, (doff + seglen) as u16);
        }
        head[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        head[t + 13] = flags;
        let seq64 = u64::from(seq);
        let csum = fold(
            pseudo
                + (doff + seglen) as u64
                + tcp_base
                + u64::from(flags)
                + (seq64 >> 16)
                + (seq64 & 0xFFFF)
                + ones_sum(seg),
        );
        put16(&mut head, t + 16, (!csum & 0xFFFF) as u16);
        emit(&head, seg);
    }
    Ok(count)
}

fn plain(p: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(VNET_HDR_LEN + p.len());
    w.extend_from_slice(&[0u8; VNET_HDR_LEN]);
    w.extend_from_slice(p);
    w
}

fn seq_of(p: &[u8], t: usize) -> u32 {
    u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]])
}

fn same_ip(p: &[u8], q: &[u8], t: usize, tos: u8) -> bool {
    if t == 20 {
        q[0] == 0x45
            && q[1] == tos
            && q[6] & 0x3F == 0
            && q[7] == 0
            && q[8..10] == p[8..10]
            && q[12..20] == p[12..20]
    } else {
        q[0..4] == p[0..4] && q[6..8] == p[6..8] && q[8..40] == p[8..40]
    }
}

/// TUN writes (each behind a virtio_net_hdr) for decrypted packets: runs of consecutive TCP
/// segments of one flow merged into one GSO packet, everything else written as it is.
pub fn coalesce(packets: &[&[u8]]) -> Vec<Vec<u8>> {
    let n = packets.len();
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let p = packets[i];
        if i + 1 == n {
            out.push(plain(p));
            break;
        }
        let size = p.len();
        let (t, tos) = if size >= 40 && p[0] == 0x45 && p[9] == PROTO_TCP && p[6] & 0x3F == 0 && p[7] == 0 {
            (20usize, p[1])
        } else if size >= 60 && p[0] >> 4 == 6 && p[6] == PROTO_TCP {
            (40usize, 0u8)
        } else {
            out.push(plain(p));
            i += 1;
            continue;
        };
        let doff = usize::from(p[t + 12] >> 4) * 4;
        let hl = t + doff;
        if doff < 20 || hl >= size || p[t + 13] != TCP_ACK {
            out.push(plain(p));
            i += 1;
            continue;
        }
        let mss = size - hl;
        let mut next_seq = seq_of(p, t).wrapping_add(mss as u32);
        let mut total = size;
        let mut last_flags = TCP_ACK;
        let mut j = i + 1;
        while j < n {
            let q = packets[j];
            if q.len() <= hl {
                break;
            }
            let length = q.len() - hl;
            if length > mss || total + length > MAX_IP_PACKET {
                break;
            }
            let flags = q[t + 13];
            if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
                break;
            }
            if !same_ip(p, q, t, tos)
                || q[t..t + 4] != p[t..t + 4]
                || q[t + 8..t + 13] != p[t + 8..t + 13]
                || q[t + 14..t + 16] != p[t + 14..t + 16]
                || q[t + 20..hl] != p[t + 20..hl]
                || seq_of(q, t) != next_seq
            {
                break;
            }
            total += length;
            next_seq = next_seq.wrapping_add(length as u32);
            last_flags = flags;
            j += 1;
            if length < mss || flags & TCP_PSH != 0 {
                break; // a short or pushed segment ends a run, as in the kernel's GRO
            }
        }
        if j - i == 1 {
            out.push(plain(p));
            i += 1;
            continue;
        }
        out.push(merge(&packets[i..j], t, hl, mss, total, last_flags));
        i = j;
    }
    out
}

fn merge(run: &[&[u8]], t: usize, hl: usize, mss: usize, total: usize, last_flags: u8) -> Vec<u8> {
    let first = run[0];
    let mut head = first[..hl].to_vec();
    let (gso_type, pseudo) = if t == 20 {
        put16(&mut head, 2, total as u16);
        head[10..12].fill(0);
        let ipsum = !fold(ones_sum(&head[..20])) & 0xFFFF;
        put16(&mut head, 10, ipsum as u16);
        let s = ones_sum(&first[12..20]);
        (GSO_TCPV4, fold(s + u64::from(PROTO_TCP) + (total - 20) as u64))
    } else {
        let tcp_length = (total - 40) as u64;
        put16(&mut head, 4, tcp_length as u16);
        let s = ones_sum(&first[8..40]);
        (GSO_TCPV6, fold(s + (tcp_length >> 16) + (tcp_length & 0xFFFF) + u64::from(PROTO_TCP)))
    };
    head[t + 13] = last_flags;
    put16(&mut head, t + 16, pseudo as u16);
    let mut w = Vec::with_capacity(VNET_HDR_LEN + total);
    w.push(NEEDS_CSUM);
    w.push(gso_type);
    w.extend_from_slice(&(hl as u16).to_ne_bytes());
    w.extend_from_slice(&(mss as u16).to_ne_bytes());
    w.extend_from_slice(&(t as u16).to_ne_bytes());
    w.extend_from_slice(&16u16.to_ne_bytes());
    w.extend_from_slice(&head);
    for q in run {
        w.extend_from_slice(&q[hl..]);
    }
    w
}

const GSO_NONE: u8 = 0;
const GSO_ECN: u8 = 0x80;
const PROTO_UDP: u8 = 17;

/// Finish a CHECKSUM_PARTIAL packet: the field at csum_start + csum_offset holds the
/// pseudo-header sum; the sum from csum_start on completes it.
fn complete_checksum(packet: &[u8], csum_start: usize, csum_offset: usize) -> Result<Vec<u8>, &'static str> {
    let at = csum_start + csum_offset;
    if csum_start >= packet.len() || at + 2 > packet.len() {
        return Err("checksum offsets outside the packet");
    }
    let mut value = (!ones_sum(&packet[csum_start..]) & 0xFFFF) as u16;
    if value == 0 && packet.len() > 9 && packet[0] >> 4 == 4 && packet[9] == PROTO_UDP {
        value = 0xFFFF; // UDP sends a computed zero as all ones
    }
    let mut out = packet.to_vec();
    put16(&mut out, at, value);
    Ok(out)
}

/// A TUN read (virtio_net_hdr + packet) -> the IP packets to encrypt, checksums complete.
pub fn from_tun(raw: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    if raw.len() < VNET_HDR_LEN {
        return Err("read shorter than a virtio_net_hdr");
    }
    let flags = raw[0];
    let gso_type = raw[1] & !GSO_ECN;
    let gso_size = usize::from(u16::from_ne_bytes([raw[4], raw[5]]));
    let csum_start = usize::from(u16::from_ne_bytes([raw[6], raw[7]]));
    let csum_offset = usize::from(u16::from_ne_bytes([raw[8], raw[9]]));
    let packet = &raw[VNET_HDR_LEN..];
    if gso_type == GSO_NONE {
        if flags & NEEDS_CSUM != 0 {
            return Ok(vec![complete_checksum(packet, csum_start, csum_offset)?]);
        }
        return Ok(vec![packet.to_vec()]);
    }
    if (gso_type != GSO_TCPV4 && gso_type != GSO_TCPV6) || gso_size == 0 {
        return Err("unsupported gso_type");
    }
    segment_tcp(packet, gso_size)
}

//! wiremesh's WireGuard transport kernel: seal and open whole batches of transport messages
//! (type 4) in one call, with the interpreter lock released while the cipher runs.
//!
//! It does exactly what `wiremesh.core.wireguard.kernel`'s Python fallback does, byte for byte:
//! no state, no I/O. Counters, replay windows, timers and routing stay in the Python core.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

mod batch;
mod offload;
mod replay;

use replay::Replay;

pub(crate) const HEADER: usize = 16; // type (4), receiver index (4), counter (8)
pub(crate) const TAG: usize = 16;
pub(crate) const MESSAGE_TRANSPORT: u32 = 4;

fn cipher(key: &[u8]) -> PyResult<LessSafeKey> {
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
        .map_err(|_| PyValueError::new_err("key must be 32 bytes"))?;
    Ok(LessSafeKey::new(unbound))
}

pub(crate) fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn seal_one(aead: &LessSafeKey, receiver: u32, counter: u64, packet: &[u8]) -> Vec<u8> {
    let padded = (packet.len() + 15) & !15;
    let mut out = vec![0u8; HEADER + padded + TAG];
    out[0..4].copy_from_slice(&MESSAGE_TRANSPORT.to_le_bytes());
    out[4..8].copy_from_slice(&receiver.to_le_bytes());
    out[8..16].copy_from_slice(&counter.to_le_bytes());
    out[HEADER..HEADER + packet.len()].copy_from_slice(packet);
    let (body, tag) = out[HEADER..].split_at_mut(padded);
    let t: Tag = aead
        .seal_in_place_separate_tag(nonce(counter), Aad::empty(), body)
        .expect("a transport payload is far below the cipher's limit");
    tag.copy_from_slice(t.as_ref());
    out
}

fn open_one(aead: &LessSafeKey, datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.len() < HEADER + TAG {
        return None;
    }
    let counter = u64::from_le_bytes(datagram[8..16].try_into().ok()?);
    let mut body = datagram[HEADER..].to_vec();
    let plain_len = aead.open_in_place(nonce(counter), Aad::empty(), &mut body).ok()?.len();
    body.truncate(plain_len);
    Some(body)
}

/// Transport messages for `packets` to the peer's `receiver` index, counters from `counter` on,
/// each payload padded to a multiple of 16.
#[pyfunction]
fn seal<'py>(
    py: Python<'py>,
    key: &[u8],
    receiver: u32,
    counter: u64,
    packets: Vec<Bound<'py, PyBytes>>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let aead = cipher(key)?;
    let inputs: Vec<&[u8]> = packets.iter().map(|p| p.as_bytes()).collect();
    let sealed: Vec<Vec<u8>> = py.allow_threads(|| {
        inputs
            .iter()
            .enumerate()
            .map(|(i, p)| seal_one(&aead, receiver, counter + i as u64, p))
            .collect()
    });
    Ok(sealed.iter().map(|d| PyBytes::new(py, d)).collect())
}

/// The payloads of transport messages (None where one does not authenticate); the counter is
/// read from each header. Replay checks are the caller's.
#[pyfunction]
fn open<'py>(
    py: Python<'py>,
    key: &[u8],
    datagrams: Vec<Bound<'py, PyBytes>>,
) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
    let aead = cipher(key)?;
    let inputs: Vec<&[u8]> = datagrams.iter().map(|d| d.as_bytes()).collect();
    let opened: Vec<Option<Vec<u8>>> =
        py.allow_threads(|| inputs.iter().map(|d| open_one(&aead, d)).collect());
    Ok(opened
        .iter()
        .map(|o| o.as_ref().map(|p| PyBytes::new(py, p)))
        .collect())
}

/// The segments of a TUN TSO super-packet, checksums complete (ValueError with the reason if it
/// is not an IPv4/IPv6 TCP packet TSO would hand over).
#[pyfunction]
fn segment_tcp<'py>(py: Python<'py>, packet: Bound<'py, PyBytes>, mss: usize) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let input = packet.as_bytes();
    let segments = py.allow_threads(|| offload::segment_tcp(input, mss)).map_err(PyValueError::new_err)?;
    Ok(segments.iter().map(|s| PyBytes::new(py, s)).collect())
}

/// The IP packets of a batch of TUN reads (virtio_net_hdr + packet each: TSO super-packets
/// segmented, partial checksums completed) and how many reads were malformed (skipped).
#[pyfunction]
fn tun_packets<'py>(py: Python<'py>, reads: Vec<Bound<'py, PyBytes>>) -> (Vec<Bound<'py, PyBytes>>, usize) {
    let inputs: Vec<&[u8]> = reads.iter().map(|r| r.as_bytes()).collect();
    let (packets, malformed) = py.allow_threads(|| {
        let mut packets = Vec::with_capacity(inputs.len());
        let mut malformed = 0;
        for raw in &inputs {
            match offload::from_tun(raw) {
                Ok(mut p) => packets.append(&mut p),
                Err(_) => malformed += 1,
            }
        }
        (packets, malformed)
    });
    (packets.iter().map(|p| PyBytes::new(py, p)).collect(), malformed)
}

/// TUN writes for decrypted packets, runs of one TCP flow merged into GSO packets.
#[pyfunction]
fn coalesce<'py>(py: Python<'py>, packets: Vec<Bound<'py, PyBytes>>) -> Vec<Bound<'py, PyBytes>> {
    let inputs: Vec<&[u8]> = packets.iter().map(|p| p.as_bytes()).collect();
    let writes = py.allow_threads(|| offload::coalesce(&inputs));
    writes.iter().map(|w| PyBytes::new(py, w)).collect()
}

/// A TUN TSO super-packet (`raw` from `offset` on, TCP payload in `mss`-byte segments) as one
/// buffer of sealed transport messages, counters from `counter` on: (buffer, the size of each
/// message but the last, which may be shorter, the number of messages). One UDP_SEGMENT send
/// carries such a buffer. ValueError with the reason if it is not a TSO packet.
#[pyfunction]
fn seal_tso<'py>(
    py: Python<'py>,
    key: &[u8],
    receiver: u32,
    counter: u64,
    raw: Bound<'py, PyBytes>,
    offset: usize,
    mss: usize,
) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
    let aead = cipher(key)?;
    let input = raw.as_bytes();
    if offset > input.len() {
        return Err(PyValueError::new_err("offset past the end of the read"));
    }
    let (buffer, size, count) = py
        .allow_threads(|| batch::seal_segments(&aead, receiver, counter, &input[offset..], mss))
        .map_err(PyValueError::new_err)?;
    Ok((PyBytes::new(py, &buffer), size, count))
}

type Flow<'py> = (Bound<'py, PyBytes>, Bound<'py, PyBytes>, usize, Vec<Bound<'py, PyBytes>>);
type Opened<'py> = (usize, Vec<Flow<'py>>, (usize, usize, usize, usize, usize, usize));

/// Open the run of transport messages of one receiver index that starts at `datagrams[start]`:
/// (end of the run, flows, (authenticated, bytes authenticated, non-empty payloads, replay drops,
/// decrypt_failed drops, not_ip drops)). Counters are checked against `replay` before decryption
/// and committed after; `reject_after` and up are refused as replays. A flow is a run of packets
/// of one TCP/UDP flow (every other packet is one alone): (source address, its first packet,
/// how many, the TUN writes that carry them), so that a caller checks a source and a filter once
/// per flow. With `vnet` the writes start with a virtio_net_hdr and runs of TCP segments are
/// merged into one (coalesce); without, they are the packets.
#[pyfunction]
fn open_run<'py>(
    py: Python<'py>,
    key: &[u8],
    mut replay: PyRefMut<'py, Replay>,
    datagrams: Vec<Bound<'py, PyBytes>>,
    start: usize,
    reject_after: u64,
    vnet: bool,
) -> PyResult<Opened<'py>> {
    let views: Vec<&[u8]> = datagrams.iter().map(|d| d.as_bytes()).collect();
    if start >= views.len()
        || views[start].len() < HEADER + TAG
        || views[start][..4] != MESSAGE_TRANSPORT.to_le_bytes()
    {
        return Err(PyValueError::new_err("a run starts with a transport message"));
    }
    let aead = cipher(key)?;
    let end = batch::run_end(&views, start);
    let mut stats = batch::RunStats::default();
    let mut todo = Vec::with_capacity(end - start);
    for (i, d) in views.iter().enumerate().take(end).skip(start) {
        let c = batch::counter_of(d);
        if c >= reject_after || !replay.precheck(c) {
            stats.replay += 1;
        } else {
            todo.push(i);
        }
    }
    let mut plain = Vec::with_capacity(todo.iter().map(|&i| views[i].len()).sum());
    let opened = py.allow_threads(|| batch::open_all(&aead, &views, &todo, &mut plain));
    // (start, end) over `packets` per flow, with the flow's source.
    let mut packets: Vec<&[u8]> = Vec::with_capacity(todo.len());
    let mut runs: Vec<(&[u8], usize, usize)> = Vec::new();
    let mut current: Option<(u8, &[u8])> = None;
    for (k, &i) in todo.iter().enumerate() {
        let Some((at, n)) = opened[k] else {
            stats.decrypt_failed += 1;
            continue;
        };
        if !replay.commit(batch::counter_of(views[i])) {
            stats.replay += 1; // a duplicate within this run
            continue;
        }
        stats.authenticated += 1;
        stats.nbytes += views[i].len();
        if n == 0 {
            continue; // a keepalive
        }
        stats.data += 1;
        let Some((packet, src)) = batch::inner(&plain[at..at + n]) else {
            stats.not_ip += 1;
            current = None;
            continue;
        };
        let key = batch::flow_key(packet);
        let index = packets.len();
        packets.push(packet);
        match runs.last_mut() {
            Some(last) if key.is_some() && key == current && last.2 == index => last.2 = index + 1,
            _ => runs.push((src, index, index + 1)),
        }
        current = key;
    }
    let writes: Vec<Vec<Vec<u8>>> = if vnet {
        py.allow_threads(|| runs.iter().map(|&(_, a, b)| offload::coalesce(&packets[a..b])).collect())
    } else {
        Vec::new()
    };
    let mut flows: Vec<Flow<'py>> = Vec::with_capacity(runs.len());
    for (r, &(src, a, b)) in runs.iter().enumerate() {
        let out: Vec<Bound<'py, PyBytes>> = if vnet {
            writes[r].iter().map(|w| PyBytes::new(py, w)).collect()
        } else {
            packets[a..b].iter().map(|p| PyBytes::new(py, p)).collect()
        };
        let first = if vnet { PyBytes::new(py, packets[a]) } else { out[0].clone() };
        flows.push((PyBytes::new(py, src), first, b - a, out));
    }
    let s = stats;
    Ok((end, flows, (s.authenticated, s.nbytes, s.data, s.replay, s.decrypt_failed, s.not_ip)))
}

#[pymodule]
fn wiremesh_wgkernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(seal, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(segment_tcp, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce, m)?)?;
    m.add_function(wrap_pyfunction!(seal_tso, m)?)?;
    m.add_function(wrap_pyfunction!(tun_packets, m)?)?;
    m.add_function(wrap_pyfunction!(open_run, m)?)?;
    m.add_class::<Replay>()?;
    Ok(())
}

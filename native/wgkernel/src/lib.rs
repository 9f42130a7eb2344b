//! wiremesh's WireGuard transport kernel: seal and open whole batches of transport messages
//! (type 4) in one call, with the interpreter lock released while the cipher runs.
//!
//! It does exactly what `wiremesh.core.wireguard.kernel`'s Python fallback does, byte for byte:
//! no state, no I/O. Counters, replay windows, timers and routing stay in the Python core.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

mod offload;

const HEADER: usize = 16; // type (4), receiver index (4), counter (8)
const TAG: usize = 16;
const MESSAGE_TRANSPORT: u32 = 4;

fn cipher(key: &[u8]) -> PyResult<LessSafeKey> {
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
        .map_err(|_| PyValueError::new_err("key must be 32 bytes"))?;
    Ok(LessSafeKey::new(unbound))
}

fn nonce(counter: u64) -> Nonce {
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

/// TUN writes for decrypted packets, runs of one TCP flow merged into GSO packets.
#[pyfunction]
fn coalesce<'py>(py: Python<'py>, packets: Vec<Bound<'py, PyBytes>>) -> Vec<Bound<'py, PyBytes>> {
    let inputs: Vec<&[u8]> = packets.iter().map(|p| p.as_bytes()).collect();
    let writes = py.allow_threads(|| offload::coalesce(&inputs));
    writes.iter().map(|w| PyBytes::new(py, w)).collect()
}

#[pymodule]
fn wiremesh_wgkernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(seal, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(segment_tcp, m)?)?;
    m.add_function(wrap_pyfunction!(coalesce, m)?)?;
    Ok(())
}

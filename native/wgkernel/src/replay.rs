//! The transport replay window (RFC 6479's ring of 64-bit blocks), with exactly the behaviour of
//! `wiremesh.core.wireguard.replay.ReplayWindow`: the same window size, the same answers.

use pyo3::prelude::*;

const BLOCK_BITS: u64 = 64;
const BLOCKS: usize = 64;
const RING_MASK: u64 = BLOCKS as u64 - 1;
const WINDOW_SIZE: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;

/// Accepts each counter at most once, and nothing WINDOW_SIZE or more behind the newest.
#[pyclass(module = "wiremesh_wgkernel")]
pub struct Replay {
    /// The newest counter accepted plus one (0: none yet), so that it fits a u64.
    next: u64,
    blocks: [u64; BLOCKS],
}

impl Replay {
    pub fn precheck(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        let greatest = self.next - 1;
        if greatest - counter >= WINDOW_SIZE {
            return false;
        }
        (self.blocks[((counter >> 6) & RING_MASK) as usize] >> (counter & 63)) & 1 == 0
    }

    pub fn commit(&mut self, counter: u64) -> bool {
        if counter == u64::MAX {
            return false; // far past REJECT_AFTER_MESSAGES: never a valid counter
        }
        if counter >= self.next {
            let index = counter >> 6;
            if self.next == 0 || index - ((self.next - 1) >> 6) >= BLOCKS as u64 {
                if self.next != 0 || self.blocks.iter().any(|b| *b != 0) {
                    self.blocks = [0; BLOCKS];
                }
            } else {
                let top = (self.next - 1) >> 6;
                for i in top + 1..=index {
                    self.blocks[(i & RING_MASK) as usize] = 0;
                }
            }
            self.next = counter + 1;
        } else if self.next - 1 - counter >= WINDOW_SIZE {
            return false;
        }
        let slot = ((counter >> 6) & RING_MASK) as usize;
        let bit = 1u64 << (counter & 63);
        if self.blocks[slot] & bit != 0 {
            return false;
        }
        self.blocks[slot] |= bit;
        true
    }
}

#[pymethods]
impl Replay {
    #[new]
    fn new() -> Self {
        Replay { next: 0, blocks: [0; BLOCKS] }
    }

    /// The newest counter accepted, -1 before any.
    #[getter]
    fn greatest(&self) -> i128 {
        i128::from(self.next) - 1
    }

    /// May `counter` still be accepted (the cheap test before decryption)?
    fn check(&self, counter: u64) -> bool {
        self.precheck(counter)
    }

    /// Accept `counter` (after its message authenticated): False if it was seen or is too old.
    fn update(&mut self, counter: u64) -> bool {
        self.commit(counter)
    }
}

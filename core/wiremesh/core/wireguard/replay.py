"""Sliding-window replay protection for transport counters, after RFC 6479.

The window is a ring of 64-bit blocks: an in-order packet touches one small integer, and moving
the window forward clears whole blocks instead of shifting a long bitmap.
"""

from __future__ import annotations

_BLOCK_BITS = 64
_BLOCKS = 64  # a power of two, so the ring index is a mask
_RING_MASK = _BLOCKS - 1
# One block is always being filled, so the guaranteed window is one block less than the ring.
WINDOW_SIZE = (_BLOCKS - 1) * _BLOCK_BITS  # 4032 counters


class ReplayWindow:
    """Accepts each counter at most once, and nothing WINDOW_SIZE or more behind the newest.

    `check` is the cheap pre-test before decryption; `update` commits a counter only after its
    packet authenticated, so forged packets cannot move the window.
    """

    __slots__ = ("_blocks", "greatest")

    def __init__(self) -> None:
        self.greatest = -1
        self._blocks = [0] * _BLOCKS

    def check(self, counter: int) -> bool:
        greatest = self.greatest
        if counter > greatest:
            return True
        if greatest - counter >= WINDOW_SIZE:
            return False
        return not (self._blocks[(counter >> 6) & _RING_MASK] >> (counter & 63)) & 1

    def update(self, counter: int) -> bool:
        greatest = self.greatest
        blocks = self._blocks
        if counter > greatest:
            index = counter >> 6
            top = greatest >> 6 if greatest >= 0 else -1
            if index != top:
                # Entering new blocks: they may still hold bits from a full turn ago.
                if index - top >= _BLOCKS:
                    blocks[:] = [0] * _BLOCKS
                else:
                    for i in range(top + 1, index + 1):
                        blocks[i & _RING_MASK] = 0
            self.greatest = counter
        elif greatest - counter >= WINDOW_SIZE:
            return False
        slot = (counter >> 6) & _RING_MASK
        bit = 1 << (counter & 63)
        block = blocks[slot]
        if block & bit:
            return False
        blocks[slot] = block | bit
        return True

"""Sliding-window replay protection for transport counters (the idea of RFC 6479, as a bitmap)."""

from __future__ import annotations

WINDOW_SIZE = 2048
_MASK = (1 << WINDOW_SIZE) - 1


class ReplayWindow:
    """Accepts each counter at most once, and nothing older than WINDOW_SIZE behind the newest.

    `check` is the cheap pre-test before decryption; `update` commits a counter only after its
    packet authenticated, so forged packets cannot move the window.
    """

    __slots__ = ("_bitmap", "greatest")

    def __init__(self) -> None:
        self.greatest = -1
        self._bitmap = 0  # bit i set: counter (greatest - i) was seen

    def check(self, counter: int) -> bool:
        if counter > self.greatest:
            return True
        diff = self.greatest - counter
        return diff < WINDOW_SIZE and not (self._bitmap >> diff) & 1

    def update(self, counter: int) -> bool:
        greatest = self.greatest
        if counter > greatest:
            shift = counter - greatest
            self._bitmap = ((self._bitmap << shift) | 1) & _MASK if shift < WINDOW_SIZE else 1
            self.greatest = counter
            return True
        diff = greatest - counter
        if diff >= WINDOW_SIZE:
            return False
        bit = 1 << diff
        if self._bitmap & bit:
            return False
        self._bitmap |= bit
        return True

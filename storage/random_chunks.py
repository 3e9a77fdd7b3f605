"""Fresh random public values of one size, drawn from the OS a block at a time.

Owns: handing out random values (record ids, request ids) that must never repeat, at one
getrandom(2) per block instead of one per value.
Must never: hold key material (keys are drawn straight from the OS, so no unused key waits in
memory); hand one value out twice, in this process or in a forked child.
"""

from __future__ import annotations

import os
from collections import deque


class RandomChunks:
    """One getrandom(2) per value was a visible share of a write's CPU on the leader; a block of
    `chunks_per_draw` values costs one. Each value is handed out once (deque.popleft is atomic,
    so two threads never get the same one), and a forked child (the snapshot writer) starts
    with none of its parent's, so it never hands out one its parent will too."""

    def __init__(self, chunk_size_bytes: int, chunks_per_draw: int = 256) -> None:
        self._chunk_size_bytes = chunk_size_bytes
        self._chunks_per_draw = chunks_per_draw
        self._chunks: deque[bytes] = deque()
        os.register_at_fork(after_in_child=self.forget)

    def take(self) -> bytes:
        while True:
            try:
                return self._chunks.popleft()
            except IndexError:
                size = self._chunk_size_bytes
                block = os.urandom(size * self._chunks_per_draw)
                self._chunks.extend(block[i : i + size] for i in range(0, len(block), size))

    def forget(self) -> None:
        self._chunks.clear()

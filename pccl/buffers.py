"""A small pool of reusable byte buffers.

Fresh large numpy buffers cost a page fault per 4 KiB on first touch (about as much as a copy);
reusing them keeps per-op allocations off the hot path. Thread-safe; bounded.
"""
from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    def __init__(self, max_free: int = 4) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._max_free = max_free

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly ``nbytes`` (a view of a pooled one when possible)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.size >= nbytes]
            if fits:
                best = min(fits, key=lambda i: self._free[i].size)
                return self._free.pop(best)[:nbytes]
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        base = buf.base if isinstance(buf.base, np.ndarray) and buf.base.dtype == np.uint8 else buf
        with self._lock:
            if any(b is base for b in self._free):
                return
            self._free.append(base)
            if len(self._free) > self._max_free:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].size))

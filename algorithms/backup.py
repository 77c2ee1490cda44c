"""Copies an in-place op's input aside, piece by piece, in the order the ring overwrites it.

The caller's thread runs :meth:`Backup.run` right after announcing the op, so the copy overlaps
the master round trip and the first ring steps instead of sitting on the receive path. A receive
program calls :meth:`wait` before it first overwrites a piece; since the copy runs in overwrite
order and memory copies are faster than the network, it rarely waits.

An unquantized ring's reduce-scatter receives copy their pieces aside themselves, block by block
just before reducing each block (``RingJob._receive_reduce``): the block is then still in the CPU
cache when the add reads it, where a copy made earlier by the caller would be read back from
memory. Their pieces are left out of the caller's order (``overwrite_order(skip_reduced=True)``);
a piece the caller's backup does cover (:meth:`Backup.covers`) is waited for instead.
"""
from __future__ import annotations

import threading

import numpy as np

from pccl.errors import PeerFailure
from pccl.algorithms.ring import RingPlan


def overwrite_order(plan: RingPlan, skip_reduced: bool = False) -> list[tuple[int, int]]:
    """Piece ranges of ``plan`` in the order its receives first overwrite them; with
    ``skip_reduced``, only those the all-gather overwrites (the reduce-scatter's receives back
    up their own pieces)."""
    order: list[tuple[int, int]] = []
    for step in plan.steps:
        if (step.reduce and not skip_reduced) or (not step.reduce and step.recv_chunk == plan.rank):
            order.extend(plan.piece(step.recv_chunk, j) for j in range(plan.pieces))
    return [r for r in order if r[1] > r[0]]


class Backup:
    def __init__(self, src: np.ndarray, store: np.ndarray, order: list[tuple[int, int]]) -> None:
        """``order``: the piece ranges in the order they are first overwritten (for a ring plan,
        :func:`overwrite_order`)."""
        self.src = src
        self.store = store  # same dtype and size as src
        self.order = order
        self._index = {r: i for i, r in enumerate(self.order)}
        self._done = 0
        self._cond = threading.Condition()
        self._cancelled = False

    def run(self) -> None:
        for i, (lo, hi) in enumerate(self.order):
            if self._cancelled:
                return
            np.copyto(self.store[lo:hi], self.src[lo:hi])
            with self._cond:
                self._done = i + 1
                self._cond.notify_all()

    def cancel(self) -> None:
        """Stop copying (the op failed before anything was overwritten) and wake waiters."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def covers(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi) is one of the pieces :meth:`run` copies."""
        return (lo, hi) in self._index

    def wait(self, lo: int, hi: int) -> None:
        """Block until [lo, hi) is safely copied."""
        i = self._index[(lo, hi)]
        with self._cond:
            while self._done <= i:
                if self._cancelled:
                    raise PeerFailure("the op was abandoned before its input was backed up")
                self._cond.wait(1.0)

    def restore(self, ranges: list[tuple[int, int]]) -> None:
        for lo, hi in ranges:
            self.src[lo:hi] = self.store[lo:hi]

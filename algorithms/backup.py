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

Both copy through :meth:`Backup.save`. For an op of at least ``NONTEMPORAL_MIN_BYTES`` it uses
non-temporal stores (``codec_jit.copy_nt``, once the compiled kernels are loaded): the backup is
written once and read only after a failure, and ordinary stores would first read every line of
it into the cache, evicting what the lanes and the kernel's socket copies of every peer on the
machine are working on. Smaller ops, machines other than x86-64, or no numba: ``np.copyto``.
"""
from __future__ import annotations

import threading

import numpy as np

from pccl.errors import PeerFailure
from pccl.algorithms import codecs
from pccl.algorithms.ring import RingPlan

#: in-place ops whose buffer has at least this many bytes back it up with non-temporal stores
#: (docs/benchmarks.md: 64 MiB ops 2-12 % faster at N = 2, 3 and 4; at 4 MiB no difference)
NONTEMPORAL_MIN_BYTES = 8 << 20


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
        self._copy_nt = None  # codec_jit.copy_nt when it applies (see the module doc)
        if (store.nbytes >= NONTEMPORAL_MIN_BYTES and src.ndim == 1 and src.flags.c_contiguous
                and store.flags.c_contiguous):
            codecs.KERNELS.start()  # loads in the background; this op copies with numpy until then
            if codecs.KERNELS.module is not None:
                self._copy_nt = codecs.KERNELS.module.copy_nt

    def save(self, lo: int, hi: int) -> None:
        """Copy the input's elements [lo, hi) aside."""
        if self._copy_nt is not None:
            self._copy_nt(self.store[lo:hi].view(np.uint8), self.src[lo:hi].view(np.uint8))
        else:
            np.copyto(self.store[lo:hi], self.src[lo:hi])

    def run(self) -> None:
        for i, (lo, hi) in enumerate(self.order):
            if self._cancelled:
                return
            self.save(lo, hi)
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

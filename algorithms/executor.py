"""Runs a :class:`~pccl.algorithms.ring.RingPlan` over the connections of a :class:`LinkSet`.

How it works
1. For every lane k the job submits a *send program* to send-connection k and a *receive program*
   to receive-connection k. Each program walks the plan's steps for the pieces of its lane.
2. The receive program reads each frame header, checks it is exactly the expected (op, step,
   piece, size), then receives the payload: into a reused scratch buffer and reduces it into the
   output (reduce-scatter), or straight into the output (all-gather). The owned chunk is
   finalized right after its last reduction. Then it bumps the lane's counter.
3. The send program sends step 0 from the input and every later piece from the output as soon as
   the lane counter says the piece has arrived (and been reduced): sending overlaps receiving and
   reducing, piece by piece.
4. In place (output is the input), a :class:`~pccl.algorithms.backup.Backup` copies the input
   aside in overwrite order; a receive waits for its piece's copy before the first overwrite and
   ``restore()`` puts the caller's bytes back after an abort. Unquantized reduce-scatter receives
   copy their own pieces aside instead, block by block, when the caller's backup leaves them out.
5. ``abort()`` records the reason and shuts the link's sockets, which ends every blocked program.
6. Quantized (``codec`` not NONE, float32 SUM/AVG): reduce-scatter hops send ``encode(piece)``
   of the partial sum and the receiver adds ``decode(bytes)`` in float32; the owner of a chunk,
   after finalizing it, adopts ``decode(encode(x))`` and keeps the encoded bytes; the all-gather
   forwards those bytes verbatim (receivers keep what they received to forward it), so every peer
   decodes the very same bytes and ends bit-identical (ALGORITHMS.md §5.2, §5.4).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import numpy as np

from pccl.buffers import BufferPool
from pccl.enums import Quantization, ReduceOp
from pccl.errors import PcclError, PcclTimeout, PeerFailure, ProtocolError
from pccl.algorithms import codecs, kernels
from pccl.algorithms.backup import Backup
from pccl.algorithms.ring import RingPlan
from pccl.transports import framing
from pccl.transports.links import Connection, LinkSet, recv_exact


#: Reduce-scatter pieces are received and reduced in blocks of this size (see ``_receive_reduce``):
#: small enough to stay in a core's L2 cache between the kernel's copy and the add.
RECV_BLOCK_BYTES = 256 << 10


#: Payloads are handed to the kernel this many bytes per send call: a 4 MiB piece in one call
#: measured 4-10 % slower at N = 4 on loopback, and no faster at N = 2 (docs/benchmarks.md).
SEND_SLICE_BYTES = 256 << 10


def send_frame(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Send one frame: the header with the payload's first slice in one call, then the rest of
    the payload ``SEND_SLICE_BYTES`` at a time."""
    first = payload[:SEND_SLICE_BYTES]
    total = len(header) + len(first)
    sent = sock.sendmsg([header, first])
    if sent < total:
        if sent < len(header):
            sock.sendall(header[sent:])
            sock.sendall(first)
        else:
            sock.sendall(first[sent - len(header):])
    for a in range(SEND_SLICE_BYTES, len(payload), SEND_SLICE_BYTES):
        sock.sendall(payload[a:a + SEND_SLICE_BYTES])


def recv_header(sock: socket.socket, buf: bytearray, max_frame: int, seq: int, step: int, piece: int,
                nbytes: int) -> None:
    """Receive one data frame header into ``buf`` (FRAME_SIZE bytes) and check that it announces
    exactly the frame expected; anything else is a ProtocolError."""
    recv_exact(sock, memoryview(buf))
    h = framing.decode_frame(buf, max_frame)
    if (h.seq, h.step, h.piece, h.nbytes) != (seq, step, piece, nbytes):
        raise ProtocolError(f"unexpected data frame (op {h.seq} step {h.step:#x} piece {h.piece} {h.nbytes} B; "
                            f"expected op {seq} step {step:#x} piece {piece} {nbytes} B)")


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a).cast("B") if a.size else memoryview(b"")


def take_buffer(pool: BufferPool | None, nbytes: int, pooled: list[np.ndarray]) -> np.ndarray:
    """A uint8 buffer for one op: from ``pool`` (and listed in ``pooled``, for the caller to give
    back once the lanes stopped) when there is one, else a new array. Fresh buffers cost a page
    fault per 4 KiB on every op, which on some VMs is slower than the transfer itself."""
    if pool is None:
        return np.empty(nbytes, np.uint8)
    buf = pool.take(nbytes)
    pooled.append(buf)
    return buf


class EncodedSlots:
    """Every encoded piece a quantized job keeps (its own final pieces, which it sends, and the
    pieces it receives), each at a fixed slot of one buffer: the layout is made first (``nbytes``),
    then a buffer is bound (:meth:`bind`, or :meth:`take` from a pool)."""

    def __init__(self, codec: Quantization, counts: dict) -> None:
        """``counts``: key -> element count of each piece to hold."""
        self._at: dict = {}
        self.nbytes = 0
        for key, n in counts.items():
            size = codecs.encoded_size(codec, n)
            self._at[key] = (self.nbytes, self.nbytes + size)
            self.nbytes += size
        self.buf: np.ndarray | None = None

    def bind(self, buf: np.ndarray) -> EncodedSlots:
        """Use ``buf`` (uint8, at least ``nbytes``) for the slots."""
        if buf.size < self.nbytes:
            raise ValueError(f"encoded slots need {self.nbytes} bytes, the buffer given has {buf.size}")
        self.buf = buf[:self.nbytes]
        return self

    def take(self, pool: BufferPool | None, pooled: list[np.ndarray]) -> EncodedSlots:
        """Bind a buffer from :func:`take_buffer`."""
        return self.bind(take_buffer(pool, self.nbytes, pooled))

    def __getitem__(self, key) -> np.ndarray:
        lo, hi = self._at[key]
        return self.buf[lo:hi]


class LaneJob:
    """Book-keeping shared by the jobs: lane programs still running, the first failure, and the
    waits on them (each bounded). Subclasses set ``seq`` and ``_running`` before submitting."""

    def __init__(self) -> None:
        self.seq = 0
        #: lane progress (pieces received or reduced): lane programs wait on it for each other
        self._cond = threading.Condition()
        #: the end of the job (no program running) or its failure: the caller waits on it, so
        #: progress inside the job does not wake the caller (a context switch costs ~0.2 ms here)
        self._done = threading.Condition(self._cond._lock)  # type: ignore[attr-defined]
        self._running = 0
        self.failed: BaseException | None = None
        #: uint8 buffers taken from a pool: the caller gives them back once the lanes stopped
        self.pooled: list[np.ndarray] = []

    def _lane_done(self, err: BaseException | None) -> None:
        with self._cond:
            self._running -= 1
            if err is not None:
                if self.failed is None:
                    self.failed = err
                self._cond.notify_all()  # lanes waiting for progress give up
            if err is not None or self._running == 0:
                self._done.notify_all()

    def _wait_lanes(self, deadline: float) -> None:
        """Block until every lane program finished; raise the first error or PcclTimeout."""
        with self._cond:
            while self._running > 0 and self.failed is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PcclTimeout(f"op {self.seq}: the data transfer did not finish before the deadline")
                self._done.wait(min(left, 1.0))
            if self.failed is not None:
                raise self.failed

    def _mark_failed(self, reason: BaseException) -> None:
        with self._cond:
            if self.failed is None:
                self.failed = reason
            self._cond.notify_all()
            self._done.notify_all()

    def _join_lanes(self, timeout: float) -> bool:
        """Wait until no lane program of this job runs any more (after an abort)."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._running > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(min(left, 0.5))
        return True

    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed if isinstance(self.failed, PcclError) else PeerFailure(str(self.failed))


def ring_slots(codec: Quantization, plan: RingPlan) -> EncodedSlots:
    """The slots (no buffer bound yet) of the encoded pieces a quantized ring job keeps: every
    non-empty (chunk, piece)."""
    return EncodedSlots(codec, {(c, j): hi - lo for c in range(plan.world) for j in range(plan.pieces)
                                for lo, hi in [plan.piece(c, j)] if hi > lo})


class RingJob(LaneJob):
    """One ring all-reduce of ``inp`` into ``out`` on the links of one revision."""

    def __init__(self, plan: RingPlan, seq: int, op: ReduceOp, inp: np.ndarray, out: np.ndarray,
                 links: LinkSet, max_frame: int, backup: Backup | None = None,
                 codec: Quantization = Quantization.NONE, gate: Callable[[], None] | None = None,
                 restored_by_caller: bool = False, pool: BufferPool | None = None, step_base: int = 0,
                 slots: EncodedSlots | None = None) -> None:
        """``backup`` (of ``inp``, for this plan) is required when ``out is inp``, unless
        ``restored_by_caller`` (a hierarchical job that backs up the whole buffer itself). A
        ``codec`` other than NONE needs float32 buffers and op SUM or AVG. ``gate()`` runs first in
        every lane program (it blocks until the ring's input is ready, or raises). ``pool``: where
        the quantized op's encoded pieces live (see :class:`EncodedSlots`). ``step_base`` is added to
        every frame's step (several rings of one op on the same links stay distinguishable).
        ``slots``: the encoded pieces' slots with a buffer already bound (:func:`ring_slots`), so
        that several rings can share one pooled buffer; else they are taken from ``pool``."""
        super().__init__()
        self.plan, self.seq, self.op = plan, seq, op
        self.codec = None if codec is Quantization.NONE else codec
        if self.codec is not None and (inp.dtype != np.float32 or op not in (ReduceOp.SUM, ReduceOp.AVG)):
            raise ValueError("quantized ring jobs reduce float32 with SUM or AVG")
        # encoded all-gather pieces by (chunk, piece): the owner's, then each one received
        self._slots = None if self.codec is None or plan.world == 1 else (
            slots if slots is not None else ring_slots(self.codec, plan).take(pool, self.pooled))
        self.inp, self.out = inp, out
        self.links = links
        self.max_frame = max_frame
        if out is inp and plan.world > 1 and backup is None and not restored_by_caller:
            raise ValueError("an in-place ring job needs a backup buffer")
        self.gate = gate
        self.step_base = step_base
        self.backup = backup if out is inp and plan.world > 1 else None
        self.touched: list[tuple[int, int]] = []
        self._recv_done = [0] * plan.lanes
        self.tx = [0] * plan.lanes
        self.rx = [0] * plan.lanes

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        if self.plan.world == 1:
            return
        if len(self.links.send) < self.plan.lanes or len(self.links.recv) < self.plan.lanes:
            raise PeerFailure("the data links of this revision are missing")
        with self._cond:
            self._running = 2 * self.plan.lanes
        for k in range(self.plan.lanes):
            self.links.send[k].submit(self._sender(k), self._lane_done)
            self.links.recv[k].submit(self._receiver(k), self._lane_done)

    def wait(self, deadline: float) -> None:
        """Block until every lane finished; raise the first lane error or PcclTimeout."""
        self._wait_lanes(deadline)

    def abort(self, reason: BaseException) -> None:
        self._mark_failed(reason)
        self.links.abort()

    def join(self, timeout: float) -> bool:
        """Wait until no lane program of this job runs any more (after ``abort``)."""
        return self._join_lanes(timeout)

    def restore(self) -> None:
        if self.backup is not None:
            self.backup.restore(self.touched)

    @property
    def tx_bytes(self) -> int:
        return sum(self.tx)

    @property
    def rx_bytes(self) -> int:
        return sum(self.rx)

    # ------------------------------------------------------------------ lane programs
    def _sender(self, lane: int):
        plan = self.plan
        pieces = plan.lane_pieces(lane)
        per_step = len(pieces)

        def run(conn: Connection) -> None:
            if self.gate is not None:
                self.gate()
            sock = conn.sock
            i = 0
            for step in plan.steps:
                src = self.inp if step.index == 0 else self.out
                for j in pieces:
                    if i >= per_step:
                        need = i - per_step + 1
                        with self._cond:
                            while self._recv_done[lane] < need and self.failed is None:
                                self._cond.wait(1.0)
                    self._check()
                    lo, hi = plan.piece(step.send_chunk, j)
                    if hi > lo:
                        if self.codec is None:
                            payload = _bytes(src[lo:hi])
                        elif step.reduce:
                            size = codecs.encoded_size(self.codec, hi - lo)
                            payload = _bytes(codecs.encode(self.codec, src[lo:hi], out=conn.scratch(size)))
                        else:
                            payload = _bytes(self._slots[(step.send_chunk, j)])
                        hdr = framing.encode_frame(framing.FrameHeader(self.seq, self.step_base + step.index, j, len(payload)))
                        send_frame(sock, hdr, payload)
                        self.tx[lane] += len(payload)
                    i += 1

        return run

    def _receiver(self, lane: int):
        plan = self.plan
        pieces = plan.lane_pieces(lane)
        itemsize = self.out.dtype.itemsize
        hdr_buf = bytearray(framing.FRAME_SIZE)

        def run(conn: Connection) -> None:
            if self.gate is not None:
                self.gate()
            sock = conn.sock
            for step in plan.steps:
                for j in pieces:
                    self._check()
                    lo, hi = plan.piece(step.recv_chunk, j)
                    if hi > lo:
                        nbytes = (hi - lo) * itemsize if self.codec is None else codecs.encoded_size(
                            self.codec, hi - lo)
                        recv_header(sock, hdr_buf, self.max_frame, self.seq, self.step_base + step.index, j, nbytes)
                        target = self.out[lo:hi]
                        # The caller's backup holds this piece before its first overwrite, except an
                        # unquantized reduce piece it leaves out: _receive_reduce copies that aside.
                        backed_up = self.backup is not None and (
                            (self.codec is not None or self.backup.covers(lo, hi)) if step.reduce
                            else step.recv_chunk == plan.rank)
                        if backed_up:
                            self.backup.wait(lo, hi)
                            self.touched.append((lo, hi))
                        if self.codec is not None:
                            self._receive_quantized(sock, conn, step, j, lo, hi, nbytes)
                        elif step.reduce:
                            self._receive_reduce(sock, conn, lo, hi, self.backup is not None and not backed_up)
                            if step.final:
                                kernels.finalize(self.op, target, plan.world)
                        else:
                            recv_exact(sock, _bytes(target))
                        self.rx[lane] += nbytes
                    with self._cond:
                        self._recv_done[lane] += 1
                        self._cond.notify_all()

        return run

    def _receive_reduce(self, sock: socket.socket, conn: Connection, lo: int, hi: int, save: bool) -> None:
        """Receive elements [lo, hi) and reduce them into the output, one cache-sized block at a
        time: each block is added while it is still in the CPU cache from the kernel's copy, instead
        of the whole piece being read back from memory. With ``save`` (in place, a piece the
        caller's backup leaves out), each block of the input is first copied aside
        (:meth:`Backup.save`, listed for ``restore``), and the add's read of it then hits the cache."""
        per = max(1, RECV_BLOCK_BYTES // self.out.dtype.itemsize)
        buf = conn.scratch(min(hi - lo, per) * self.out.dtype.itemsize).view(self.out.dtype)
        for a in range(lo, hi, per):
            b = min(a + per, hi)
            block = buf[:b - a]
            recv_exact(sock, _bytes(block))
            if save:
                self.backup.save(a, b)
                self.touched.append((a, b))
            kernels.reduce_into(self.op, self.inp[a:b], block, self.out[a:b])

    def _receive_quantized(self, sock: socket.socket, conn: Connection, step, j: int, lo: int, hi: int,
                           nbytes: int) -> None:
        target = self.out[lo:hi]
        if step.reduce:
            buf = conn.scratch(nbytes)
            recv_exact(sock, _bytes(buf))
            if self.out is not self.inp:
                np.copyto(target, self.inp[lo:hi])
            codecs.decode_add(self.codec, buf, target)
            if step.final:
                kernels.finalize(self.op, target, self.plan.world)
                # The owner adopts decode(encode(x)) and keeps the bytes the all-gather forwards.
                codecs.adopt(self.codec, target, out=self._slots[(step.recv_chunk, j)])
        else:
            enc = self._slots[(step.recv_chunk, j)]
            recv_exact(sock, _bytes(enc))
            codecs.decode(self.codec, enc, out=target)

"""Runs a :class:`~pccl.algorithms.groups.GroupPlan` (star or hierarchical all-reduce) over the
direct connections of a :class:`~pccl.transports.links.Mesh`.

How it works
1. ``start()`` queues every program of every phase at once, on every connection this rank uses,
   in the master's commence order (so all peers queue them in the same order and concurrent ops
   never cross). A program of a later phase first blocks in a *gate* until the phase it depends on
   finished on this rank, or the job failed.
2. Phase A: a send program per (owner, lane) sends this rank's pieces of that owner's shard; an
   owner runs a receive program per (member, lane) into one buffer per member. When piece p has
   arrived from every member, the thread that completed it reduces piece p in member order into
   the output (quantized: decode-accumulate in float32), then marks it done.
3. Phase B (owners, several groups): one :class:`RingJob` per segment of the shard over the
   column's ring, each gated on phase A having reduced the pieces of its segment (its frames'
   steps are offset by the segment, so the rings queued on one link stay distinguishable).
4. Phase C: the owner finalizes each segment once, when its ring is done (AVG: divide by the
   world size; quantized: adopt decode(encode(x)) and keep the bytes); a send program per
   (member, lane) sends each piece as soon as its segment is final; every member runs a receive
   program per (owner, lane) that copies (or decodes) it into the output. So the slow links of
   phase B start after the first segment of phase A, and phase C trails phase B by one segment.
5. An owner's per-member receive buffers (quantized: one :class:`EncodedSlots` for the received
   and the owner's encoded pieces, and one buffer that the phase-B rings share for theirs) come
   from ``pool`` (the communicator's :class:`~pccl.buffers.BufferPool`) when one is given, and
   ``pooled`` lists them so the caller
   hands them back once every lane has stopped: on VMs whose first touch of a fresh page is slow
   (0.05 GB/s measured here), allocating them anew per op cost more than the transfer itself.
6. In place, a :class:`Backup` holds the whole input; receives wait for its copy before the first
   overwrite and ``restore()`` puts the touched ranges back after an abort (the same contract as
   the ring job). ``abort()`` shuts the mesh's sockets, which ends every blocked program.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from pccl.buffers import BufferPool
from pccl.enums import Quantization, ReduceOp
from pccl.errors import PcclTimeout
from pccl.algorithms import codecs, kernels, ring
from pccl.algorithms.backup import Backup
from pccl.algorithms.executor import (EncodedSlots, LaneJob, RingJob, _bytes, recv_header, ring_slots,
                                      send_frame, take_buffer)
from pccl.algorithms.groups import STEP_BROADCAST, STEP_REDUCE, GroupPlan
from pccl.transports import framing
from pccl.transports.links import Connection, LinkSet, Mesh, recv_exact


class GroupJob(LaneJob):
    """One star or hierarchical all-reduce of ``inp`` into ``out`` on the mesh of one revision."""

    def __init__(self, plan: GroupPlan, seq: int, op: ReduceOp, inp: np.ndarray, out: np.ndarray,
                 mesh: Mesh, peers: tuple[int, ...], max_frame: int, deadline: float,
                 backup: Backup | None = None, codec: Quantization = Quantization.NONE,
                 pipeline_bytes: int = 4 << 20, pool: BufferPool | None = None) -> None:
        """``peers[r]`` is the peer id of rank r. ``backup`` (whole input) is required in place.
        ``pool``: where raw receive buffers come from (see ``pooled``)."""
        super().__init__()
        self.plan, self.seq, self.op = plan, seq, op
        self.codec = None if codec is Quantization.NONE else codec
        if self.codec is not None and (inp.dtype != np.float32 or op not in (ReduceOp.SUM, ReduceOp.AVG)):
            raise ValueError("quantized group jobs reduce float32 with SUM or AVG")
        if out is inp and backup is None:
            raise ValueError("an in-place group job needs a backup buffer")
        self.inp, self.out, self.mesh, self.peers = inp, out, mesh, peers
        self.max_frame, self.deadline, self.backup = max_frame, deadline, backup if out is inp else None
        self.pipeline_bytes = pipeline_bytes
        self.touched: list[tuple[int, int]] = []
        self.tx = self.rx = 0
        self._arrived = [0] * plan.pieces
        self._piece_reduced = [False] * plan.pieces
        self._final_lock = threading.Lock()
        self._finalized = [False] * len(plan.segments)
        self.rings: list[RingJob] = []  # phase B, one per segment
        j = plan.owned
        self._bufs: dict[int, np.ndarray] = {}
        self._slots: EncodedSlots | None = None
        self.pool = pool
        if j is not None and self.codec is not None:  # received pieces by (member, p), own by (-1, p)
            pieces = [(p, hi - lo) for p in range(plan.pieces) for lo, hi in [plan.piece(j, p)] if hi > lo]
            self._slots = EncodedSlots(self.codec, {(x, p): n for x in plan.members if x != plan.rank
                                                    for p, n in pieces} | {(-1, p): n for p, n in pieces}
                                       ).take(pool, self.pooled)
        elif j is not None:  # raw values, one buffer per member
            lo, hi = plan.shards[j]
            for x in plan.members:
                if x == plan.rank:
                    continue
                self._bufs[x] = take_buffer(pool, (hi - lo) * out.dtype.itemsize, self.pooled).view(out.dtype)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        plan = self.plan
        programs: list[tuple[Connection, object]] = []
        j = plan.owned
        lanes = range(plan.lanes)
        for shard in range(plan.columns):  # phase A sends
            if shard != j:
                conns = self.mesh.send(self.peers[plan.owner(shard)])
                programs += [(conns[k], self._sender(shard, k, STEP_REDUCE)) for k in lanes]
        if j is not None:  # phase A receives
            for x in plan.members:
                if x != plan.rank:
                    conns = self.mesh.recv(self.peers[x])
                    programs += [(conns[k], self._reduce_receiver(x, k)) for k in lanes]
        phase_a = len(programs)
        if j is not None:
            column = plan.column()
            if len(column) > 1:  # phase B
                g = column.index(plan.rank)
                nxt, prv = self.peers[column[(g + 1) % len(column)]], self.peers[column[g - 1]]
                links = LinkSet(self.mesh.revision, nxt, prv, self.mesh.send(nxt), self.mesh.recv(prv))
                steps = 2 * (len(column) - 1)
                spans = [plan.segment_range(j, s) for s in range(len(plan.segments))]
                rplans = [ring.plan(hi - lo, len(column), g, self.out.dtype.itemsize, self.pipeline_bytes,
                                    self.mesh.k) for lo, hi in spans]
                slots: list[EncodedSlots | None] = [None] * len(rplans)
                if self.codec is not None:  # one pooled buffer for the encoded pieces of every ring
                    slots = [ring_slots(self.codec, rp) for rp in rplans]
                    whole = take_buffer(self.pool, sum(sl.nbytes for sl in slots), self.pooled)
                    at = 0
                    for sl in slots:
                        sl.bind(whole[at:at + sl.nbytes])
                        at += sl.nbytes
                for s, ((lo, hi), rplan) in enumerate(zip(spans, rplans)):
                    view = self.out[lo:hi]
                    self.rings.append(RingJob(
                        rplan, self.seq, ReduceOp.SUM if self.op is ReduceOp.AVG else self.op, view, view, links,
                        self.max_frame, codec=self.codec or Quantization.NONE, restored_by_caller=True,
                        gate=lambda s=s: self._segment_reduced(s), step_base=s * steps, slots=slots[s]))
            for x in plan.members:  # phase C sends
                if x != plan.rank:
                    conns = self.mesh.send(self.peers[x])
                    programs += [(conns[k], self._sender(j, k, STEP_BROADCAST)) for k in lanes]
        for shard in range(plan.columns):  # phase C receives
            if shard != j:
                conns = self.mesh.recv(self.peers[plan.owner(shard)])
                programs += [(conns[k], self._copy_receiver(shard, k)) for k in lanes]
        with self._cond:
            self._running = len(programs)
        # Ring programs are queued after this rank's phase A programs on their connections (the
        # rings use other connections than phase A/C: their peers are in other groups), in
        # segment order on every owner of the column.
        for conn, prog in programs[:phase_a]:
            conn.submit(prog, self._lane_done)
        for rj in self.rings:
            rj.start()
        for conn, prog in programs[phase_a:]:
            conn.submit(prog, self._lane_done)

    def wait(self, deadline: float) -> None:
        """Block until every program (and the column ring) finished; raise the first error or PcclTimeout."""
        self._wait_lanes(deadline)
        if self.plan.owned is not None:
            self._finalize()  # an owner with no other members sends nothing, so finalize here

    def abort(self, reason: BaseException) -> None:
        self._mark_failed(reason)
        for rj in self.rings:
            rj.abort(reason)
        self.mesh.abort()

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        return self._join_lanes(timeout) and all(rj.join(max(end - time.monotonic(), 0.0)) for rj in self.rings)

    def restore(self) -> None:
        if self.backup is not None:
            self.backup.restore(self.touched)

    @property
    def tx_bytes(self) -> int:
        return self.tx + sum(rj.tx_bytes for rj in self.rings)

    @property
    def rx_bytes(self) -> int:
        return self.rx + sum(rj.rx_bytes for rj in self.rings)

    # ------------------------------------------------------------------ phases
    def _gate(self, ready) -> None:
        with self._cond:
            while not ready() and self.failed is None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise PcclTimeout(f"op {self.seq}: a phase did not finish before the deadline")
                self._cond.wait(min(left, 1.0))
        self._check()

    def _segment_reduced(self, s: int) -> None:
        """Gate: every piece of segment ``s`` of this rank's shard is reduced inside the group."""
        a, b = self.plan.segments[s]
        if len(self.plan.members) == 1:
            self._reduce_alone(a, b)
        self._gate(lambda: all(self._piece_reduced[a:b]))

    def _reduce_alone(self, a: int, b: int) -> None:
        with self._final_lock:
            for p in range(a, b):
                if not self._piece_reduced[p]:
                    self._reduce_piece(p)

    def _finalize(self) -> None:
        """Finalize every segment (see :meth:`_finalize_segment`)."""
        for s in range(len(self.plan.segments)):
            self._finalize_segment(s)

    def _finalize_segment(self, s: int) -> None:
        """Once per segment, on an owner, when the segment is fully reduced (phase A, then its
        ring): AVG division, and for a quantized op the adoption of decode(encode(x)) with the
        bytes phase C sends."""
        self._segment_reduced(s)
        if self.rings:
            self.rings[s].wait(self.deadline)
        with self._final_lock:
            if self._finalized[s]:
                return
            j = self.plan.owned
            assert j is not None
            for p in range(*self.plan.segments[s]):
                lo, hi = self.plan.piece(j, p)
                if hi <= lo:
                    continue
                target = self.out[lo:hi]
                kernels.finalize(self.op, target, self.plan.world)
                if self.codec is not None:
                    codecs.adopt(self.codec, target, out=self._slots[(-1, p)])
            self._finalized[s] = True

    def _own(self, lo: int, hi: int) -> np.ndarray:
        """This rank's original input for [lo, hi)."""
        if self.backup is not None:
            self.backup.wait(lo, hi)
            return self.backup.store[lo:hi]
        return self.inp[lo:hi]

    def _reduce_piece(self, p: int) -> None:
        """Reduce piece p of the owned shard in member order into the output."""
        plan = self.plan
        j = plan.owned
        assert j is not None
        lo, hi = plan.piece(j, p)
        base = plan.shards[j][0]
        if hi > lo:
            target = self.out[lo:hi]
            own = self._own(lo, hi)  # in place: waits for the backup before the first write below
            if self.backup is not None:
                with self._cond:
                    self.touched.append((lo, hi))
            for i, x in enumerate(plan.members):
                if x == plan.rank:
                    src = own
                    if i == 0:
                        if src is not target:
                            np.copyto(target, src)
                    else:
                        kernels.reduce_into(self.op, target, src, target)
                elif self.codec is not None:
                    enc = self._slots[(x, p)]
                    if i == 0:
                        codecs.decode(self.codec, enc, out=target)
                    else:
                        codecs.decode_add(self.codec, enc, target)
                else:
                    got = self._bufs[x][lo - base:hi - base]
                    if i == 0:
                        np.copyto(target, got)
                    else:
                        kernels.reduce_into(self.op, target, got, target)
        with self._cond:
            self._piece_reduced[p] = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ lane programs
    def _nbytes(self, lo: int, hi: int, encoded: bool) -> int:
        return codecs.encoded_size(self.codec, hi - lo) if encoded else (hi - lo) * self.out.dtype.itemsize

    def _pieces(self, lane: int) -> range:
        return range(lane, self.plan.pieces, self.plan.lanes)

    def _sender(self, shard: int, lane: int, step: int):
        broadcast = step == STEP_BROADCAST

        def run(conn: Connection) -> None:
            for p in self._pieces(lane):
                self._check()
                lo, hi = self.plan.piece(shard, p)
                if hi <= lo:
                    continue
                if broadcast:
                    self._finalize_segment(self.plan.segment_of(p))
                if self.codec is None:
                    payload = _bytes((self.out if broadcast else self.inp)[lo:hi])
                elif broadcast:
                    payload = _bytes(self._slots[(-1, p)])
                else:
                    size = codecs.encoded_size(self.codec, hi - lo)
                    payload = _bytes(codecs.encode(self.codec, self.inp[lo:hi], out=conn.scratch(size)))
                send_frame(conn.sock, framing.encode_frame(framing.FrameHeader(self.seq, step, p, len(payload))),
                           payload)
                with self._cond:
                    self.tx += len(payload)

        return run

    def _header(self, conn: Connection, step: int, p: int, nbytes: int) -> None:
        recv_header(conn.sock, bytearray(framing.FRAME_SIZE), self.max_frame, self.seq, step, p, nbytes)

    def _reduce_receiver(self, member: int, lane: int):
        plan = self.plan
        j = plan.owned
        assert j is not None
        base = plan.shards[j][0]
        last = len(plan.members) - 1

        def run(conn: Connection) -> None:
            for p in self._pieces(lane):
                self._check()
                lo, hi = plan.piece(j, p)
                if hi > lo:
                    nbytes = self._nbytes(lo, hi, self.codec is not None)
                    self._header(conn, STEP_REDUCE, p, nbytes)
                    if self.codec is not None:
                        recv_exact(conn.sock, _bytes(self._slots[(member, p)]))
                    else:
                        recv_exact(conn.sock, _bytes(self._bufs[member][lo - base:hi - base]))
                with self._cond:
                    self.rx += 0 if hi <= lo else nbytes
                    self._arrived[p] += 1
                    complete = self._arrived[p] == last
                if complete:  # this thread brought the last member's piece: reduce it now
                    self._reduce_piece(p)

        return run

    def _copy_receiver(self, shard: int, lane: int):
        def run(conn: Connection) -> None:
            for p in self._pieces(lane):
                self._check()
                lo, hi = self.plan.piece(shard, p)
                if hi <= lo:
                    continue
                nbytes = self._nbytes(lo, hi, self.codec is not None)
                self._header(conn, STEP_BROADCAST, p, nbytes)
                target = self.out[lo:hi]
                if self.backup is not None:
                    self.backup.wait(lo, hi)
                    with self._cond:
                        self.touched.append((lo, hi))
                if self.codec is not None:
                    enc = conn.scratch(nbytes)
                    recv_exact(conn.sock, _bytes(enc))
                    codecs.decode(self.codec, enc, out=target)
                else:
                    recv_exact(conn.sock, _bytes(target))
                with self._cond:
                    self.rx += nbytes

        return run

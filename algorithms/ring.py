"""Ring all-reduce schedule (pure): who sends which piece of which chunk at which step.

How it works
1. The buffer of ``count`` elements is cut into N chunks; chunk c covers
   ``[c*q + min(c, r), ...)`` with q, r = divmod(count, N), so the first r chunks are one longer.
2. Reduce-scatter, steps t = 0..N-2: rank k sends chunk (k - t) mod N to its right neighbour and
   receives chunk (k - t - 1) mod N from its left, reducing it with its own values. After the last
   step rank k holds the fully reduced chunk (k + 1) mod N (its *owned* chunk) and finalizes it
   (AVG division) exactly once.
3. All-gather, steps t = N-1..2N-3: rank k sends chunk (k + 1 - t') mod N (t' = t - N + 1) and
   receives chunk (k - t') mod N, copying it. Each element is reduced along exactly one path and
   then copied, so every peer ends with identical bytes.
4. Pipelining: every chunk is cut into the same number P of pieces (piece bounds use the same
   rule as chunks). Piece j travels on lane j mod K. The piece a rank sends at step t >= 1 is the
   piece it received at step t - 1, so within one lane "send item i" depends only on "receive item
   i - L" of the same lane (L = pieces per lane): lanes are independent pipelines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Cut [start, stop) into ``parts`` contiguous ranges, the first ones one element longer."""
    q, r = divmod(stop - start, parts)
    out, lo = [], start
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass(frozen=True)
class Step:
    index: int
    send_chunk: int
    recv_chunk: int
    reduce: bool  # True: reduce-scatter step (reduce into own values); False: all-gather (copy)
    final: bool  # the last reduce-scatter step: the received chunk is the owned one, finalize it


@dataclass(frozen=True)
class RingPlan:
    count: int
    world: int
    rank: int
    pieces: int  # pieces per chunk
    lanes: int
    chunks: tuple[tuple[int, int], ...]
    steps: tuple[Step, ...]

    def piece(self, chunk: int, j: int) -> tuple[int, int]:
        lo, hi = self.chunks[chunk]
        return split(lo, hi, self.pieces)[j]

    def lane_pieces(self, lane: int) -> list[int]:
        return list(range(lane, self.pieces, self.lanes))

    @property
    def owned_chunk(self) -> int:
        return (self.rank + 1) % self.world


def plan(count: int, world: int, rank: int, itemsize: int, pipeline_bytes: int, lanes: int,
         min_piece_bytes: int = 64 << 10) -> RingPlan:
    """The schedule of rank ``rank`` in a ring of ``world`` peers over ``count`` elements."""
    if world < 1 or not 0 <= rank < world or lanes < 1 or count < 0:
        raise ValueError("bad ring parameters")
    chunks = tuple(split(0, count, world))
    biggest = (chunks[0][1] - chunks[0][0]) * itemsize
    pieces = max(1, math.ceil(biggest / max(pipeline_bytes, 1)))
    if biggest >= lanes * min_piece_bytes:
        pieces = max(pieces, lanes)  # let one op use every connection of the link
    pieces = min(pieces, max(1, chunks[0][1] - chunks[0][0]))
    n = world
    steps = []
    for t in range(n - 1):
        steps.append(Step(t, (rank - t) % n, (rank - t - 1) % n, True, t == n - 2))
    for t2 in range(n - 1):
        steps.append(Step(n - 1 + t2, (rank + 1 - t2) % n, (rank - t2) % n, False, False))
    return RingPlan(count, world, rank, pieces, min(lanes, pieces), chunks, tuple(steps))

"""The ring all-reduce schedule, executed in memory (no sockets) under random interleavings.

The simulator follows the executor's rules exactly: per lane one send program and one receive
program per rank, FIFO channels from rank r to r+1 per lane, step 0 sends from the input and later
steps from the output, a send item i waits only for receive item i - L of its own lane, empty
pieces are skipped on both sides (the receive counter still moves). Two payload kinds run through
it: float32 data (checked bit for bit against the reference reduction along the ring path) and
symbolic contribution records (each output element must hold every rank's contribution exactly
once, gathered along one path, finalized exactly once).
"""
from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl.algorithms import kernels
from pccl.algorithms.ring import RingPlan, plan, split
from pccl.enums import ReduceOp

ITEMSIZE = 4  # float32


# --------------------------------------------------------------------------- payload backends
class Numeric:
    def __init__(self, world: int, count: int, op: ReduceOp, inplace: bool, rng: np.random.Generator) -> None:
        self.op, self.world = op, world
        self.inp = [(rng.standard_normal(count) * 4).astype(np.float32) for _ in range(world)]
        self.orig = [x.copy() for x in self.inp]
        self.out = self.inp if inplace else [np.full(count, np.nan, dtype=np.float32) for _ in range(world)]

    def send(self, r: int, step_index: int, lo: int, hi: int):
        src = self.inp[r] if step_index == 0 else self.out[r]
        return src[lo:hi].copy()  # the bytes leave at send time

    def recv(self, r: int, step, lo: int, hi: int, payload) -> None:
        target = self.out[r][lo:hi]
        if step.reduce:
            kernels.reduce_into(self.op, self.inp[r][lo:hi], payload, target)
            if step.final:
                kernels.finalize(self.op, target, self.world)
        else:
            target[...] = payload

    def reference(self, chunks) -> np.ndarray:
        """Reduce each chunk in ring-path order: x_c, then x_{c+1} op acc, ..., finalize at rank c-1."""
        n = self.world
        count = len(self.orig[0])
        ref = np.empty(count, dtype=np.float32)
        with np.errstate(all="ignore"):
            for c, (lo, hi) in enumerate(chunks):
                acc = self.orig[c][lo:hi].copy()
                for i in range(1, n):
                    kernels.reduce_into(self.op, self.orig[(c + i) % n][lo:hi], acc.copy(), acc)
                kernels.finalize(self.op, acc, n)
                ref[lo:hi] = acc
        return ref


class Symbolic:
    """Elements are (contributions along the path, times finalized)."""

    def __init__(self, world: int, count: int) -> None:
        self.world = world
        self.inp = [[(((r, i),), 0) for i in range(count)] for r in range(world)]
        self.out = [[None] * count for _ in range(world)]

    def send(self, r: int, step_index: int, lo: int, hi: int):
        src = self.inp[r] if step_index == 0 else self.out[r]
        payload = src[lo:hi]
        assert None not in payload, f"rank {r} sends unwritten output [{lo}, {hi}) at step {step_index}"
        return payload

    def recv(self, r: int, step, lo: int, hi: int, payload) -> None:
        if step.reduce:
            new = [(mine[0] + got[0], mine[1] + got[1]) for mine, got in zip(self.inp[r][lo:hi], payload)]
            if step.final:
                new = [(c, f + 1) for c, f in new]
            self.out[r][lo:hi] = new
        else:
            self.out[r][lo:hi] = payload


class Both:
    """Drive several backends through one execution (same interleaving)."""

    def __init__(self, *backends) -> None:
        self.backends = backends

    def send(self, r, step_index, lo, hi):
        return [b.send(r, step_index, lo, hi) for b in self.backends]

    def recv(self, r, step, lo, hi, payload) -> None:
        for b, p in zip(self.backends, payload):
            b.recv(r, step, lo, hi, p)


# --------------------------------------------------------------------------- the in-memory executor
def lane_items(p: RingPlan, lane: int) -> list[tuple[int, int]]:
    pieces = p.lane_pieces(lane)
    return [(s.index, j) for s in p.steps for j in pieces]


def piece_tables(p: RingPlan) -> list[list[tuple[int, int]]]:
    """``p.piece(c, j)`` for every chunk and piece (ranks share chunks; check_structure checks that)."""
    return [[p.piece(c, j) for j in range(p.pieces)] for c in range(len(p.chunks))]


def execute(plans: list[RingPlan], backend, rng: random.Random | None, tables=None) -> None:
    """Run every rank's plan; rng=None runs programs in a fixed order, else in a random one."""
    n = len(plans)
    p0 = plans[0]
    lanes = p0.lanes
    items = [lane_items(p0, k) for k in range(lanes)]
    per = [len(p0.lane_pieces(k)) for k in range(lanes)]
    tables = tables or piece_tables(p0)
    send_i = [[0] * lanes for _ in range(n)]
    recv_i = [[0] * lanes for _ in range(n)]
    chan = {(r, k): deque() for r in range(n) for k in range(lanes)}

    def piece(chunk: int, j: int) -> tuple[int, int]:
        return tables[chunk][j]

    def try_send(r: int, k: int) -> bool:
        i = send_i[r][k]
        if i >= len(items[k]) or (i >= per[k] and recv_i[r][k] < i - per[k] + 1):
            return False
        s, j = items[k][i]
        step = plans[r].steps[s]
        lo, hi = piece(step.send_chunk, j)
        if hi > lo:
            chan[(r, k)].append((s, j, lo, hi, backend.send(r, s, lo, hi)))
        send_i[r][k] += 1
        return True

    def try_recv(r: int, k: int) -> bool:
        i = recv_i[r][k]
        if i >= len(items[k]):
            return False
        s, j = items[k][i]
        step = plans[r].steps[s]
        lo, hi = piece(step.recv_chunk, j)
        if hi > lo:
            q = chan[((r - 1) % n, k)]
            if not q:
                return False
            hs, hj, hlo, hhi, payload = q.popleft()
            # the executor checks the frame header is exactly the expected (step, piece, size)
            assert (hs, hj) == (s, j), f"rank {r} lane {k}: got step {hs} piece {hj}, expected {s} {j}"
            assert (hlo, hhi) == (lo, hi), "sender and receiver disagree on the piece's range"
            backend.recv(r, step, lo, hi, payload)
        recv_i[r][k] += 1
        return True

    # Event-driven scheduler: a program that cannot move waits until the one it depends on moves
    # (a send waits on its own lane's receives, a receive on its left neighbour's sends).
    programs = [(kind, r, k) for kind in (0, 1) for r in range(n) for k in range(lanes)]
    ready = list(programs)
    queued = set(programs)
    while ready:
        if rng is None:
            prog = ready.pop()
        else:
            i = int(rng.random() * len(ready))
            ready[i], ready[-1] = ready[-1], ready[i]
            prog = ready.pop()
        queued.discard(prog)
        kind, r, k = prog
        if not (try_send if kind == 0 else try_recv)(r, k):
            continue
        woken = [prog, (1, (r + 1) % n, k)] if kind == 0 else [prog, (0, r, k)]
        for w in woken:
            if w not in queued:
                queued.add(w)
                ready.append(w)
    for r in range(n):
        for k in range(lanes):
            assert send_i[r][k] == recv_i[r][k] == len(items[k]), f"deadlock at rank {r} lane {k}"
    assert all(not q for q in chan.values()), "bytes left in a channel"


# --------------------------------------------------------------------------- checks
def plans_for(count, world, pipeline_bytes, lanes, min_piece_bytes=64 << 10) -> list[RingPlan]:
    return [plan(count, world, r, ITEMSIZE, pipeline_bytes, lanes, min_piece_bytes) for r in range(world)]


def check_structure(plans: list[RingPlan], count: int, world: int, lanes: int) -> list[list[tuple[int, int]]]:
    p0 = plans[0]
    tables = piece_tables(p0)
    for r, p in enumerate(plans):
        assert (p.count, p.world, p.rank) == (count, world, r)
        assert (p.pieces, p.lanes, p.chunks) == (p0.pieces, p0.lanes, p0.chunks)  # all ranks agree
        assert p.chunks == tuple(split(0, count, world))
        assert p.owned_chunk == (r + 1) % world
        assert p.pieces >= 1 and 1 <= p.lanes <= min(lanes, p.pieces)
        assert len(p.steps) == 2 * (world - 1)
        assert [s.index for s in p.steps] == list(range(2 * (world - 1)))
        assert [s.reduce for s in p.steps] == [True] * (world - 1) + [False] * (world - 1)
        finals = [s for s in p.steps if s.final]
        if world > 1:
            assert len(finals) == 1 and finals[0].index == world - 2
            assert finals[0].recv_chunk == p.owned_chunk
            # the owned chunk is the first one sent in the all-gather, and it is never received again
            assert p.steps[world - 1].send_chunk == p.owned_chunk
            assert p.owned_chunk not in [s.recv_chunk for s in p.steps[world - 1:]]
        else:
            assert finals == []
        assert sorted(j for k in range(p.lanes) for j in p.lane_pieces(k)) == list(range(p.pieces))
        for k in range(p.lanes):
            assert all(j % p.lanes == k for j in p.lane_pieces(k))
    # pieces of every chunk partition it (the first ones one element longer)
    for c, (lo, hi) in enumerate(p0.chunks):
        ranges = tables[c]
        assert ranges[0][0] == lo and ranges[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    return tables


def check_lane_dependency(plans: list[RingPlan], tables) -> None:
    """Send item i of a lane depends only on receive item i - L of the same lane (L = its pieces),
    and receive item i of rank r is send item i of rank r-1 (so per-lane FIFOs line up)."""
    n = len(plans)
    for r, p in enumerate(plans):
        left = plans[(r - 1) % n]
        for k in range(p.lanes):
            items = lane_items(p, k)
            per = len(p.lane_pieces(k))
            for i, (s, j) in enumerate(items):
                send = tables[p.steps[s].send_chunk][j]
                recv = tables[p.steps[s].recv_chunk][j]
                assert tables[left.steps[s].send_chunk][j] == recv
                if i < per:
                    assert s == 0  # sent from the input: depends on nothing
                else:
                    ps, pj = items[i - per]
                    assert (ps, pj) == (s - 1, j)
                    assert tables[p.steps[ps].recv_chunk][pj] == send


def check_symbolic(sym: Symbolic, plans: list[RingPlan]) -> None:
    n = len(plans)
    for c, (lo, hi) in enumerate(plans[0].chunks):
        path = [(c - 1 - i) % n for i in range(n)]  # reduced at c+1, c+2, ..., finished at c-1
        for r in range(n):
            for i in range(lo, hi):
                contribs, finalized = sym.out[r][i]
                assert finalized == 1, f"rank {r} element {i}: finalized {finalized} times"
                assert sorted(contribs) == [(q, i) for q in range(n)], f"rank {r} element {i}: {contribs}"
                assert [q for q, _ in contribs] == path, f"element {i} took path {contribs}, not {path}"


def check_numeric(num: Numeric, plans: list[RingPlan]) -> None:
    n = len(plans)
    first = num.out[0].tobytes()
    for r in range(1, n):
        assert num.out[r].tobytes() == first, f"rank {r} differs from rank 0"
    ref = num.reference(plans[0].chunks)
    assert num.out[0].tobytes() == ref.tobytes()
    if num.op in (ReduceOp.SUM, ReduceOp.AVG) and len(ref):
        exact = np.sum(np.stack(num.orig).astype(np.float64), axis=0)
        if num.op is ReduceOp.AVG:
            exact /= n
        np.testing.assert_allclose(num.out[0], exact, rtol=1e-4, atol=1e-4)
    if num.op is ReduceOp.MAX and len(ref):
        assert np.array_equal(num.out[0], np.max(np.stack(num.orig), axis=0))


def run_case(count: int, world: int, lanes: int, pipeline_bytes: int, min_piece_bytes: int,
             op: ReduceOp, inplace: bool, seed: int | None) -> None:
    plans = plans_for(count, world, pipeline_bytes, lanes, min_piece_bytes)
    tables = check_structure(plans, count, world, lanes)
    check_lane_dependency(plans, tables)
    if world == 1:
        assert plans[0].steps == () and plans[0].chunks == ((0, count),)
        return
    sym = Symbolic(world, count)
    num = Numeric(world, count, op, inplace, np.random.default_rng(seed or 0))
    execute(plans, Both(sym, num), None if seed is None else random.Random(seed), tables)
    check_symbolic(sym, plans)
    check_numeric(num, plans)


# --------------------------------------------------------------------------- the grid
OPS = list(ReduceOp)


@pytest.mark.parametrize("world", range(1, 17))
def test_ring_every_small_count(world):
    """Counts 0..N+1 (chunks of 0, 1 or 2 elements) with one item per piece, so there are as many
    pieces and lanes as the chunk allows; lanes 1, 2, 3 requested in turn."""
    for count in range(0, world + 2):
        run_case(count, world, 1 + count % 3, ITEMSIZE, 64 << 10, OPS[count % len(OPS)], inplace=count % 2 == 0,
                 seed=None if count % 4 == 0 else count)
    count = 3 * world + 2  # chunks of 3-4 elements: 4 pieces, 1, 2 or 3 lanes
    for lanes in (1, 2, 3):
        run_case(count, world, lanes, ITEMSIZE, 64 << 10, OPS[(world + lanes) % len(OPS)], inplace=lanes == 2,
                 seed=lanes)
    # one piece per chunk unless the lanes force more (min_piece_bytes reached)
    run_case(count, world, 2, 1 << 20, ITEMSIZE, ReduceOp.SUM, inplace=False, seed=1)


@pytest.mark.parametrize("world,count,lanes,pipeline_bytes", [
    (2, 1000, 3, 64), (3, 1000, 2, 64), (3, 1001, 3, 40), (4, 257, 3, 12), (5, 999, 1, 100),
    (7, 500, 3, 20), (8, 64, 2, 4), (16, 300, 3, 8), (11, 1234, 2, 48),
])
def test_ring_larger_counts_with_many_pieces(world, count, lanes, pipeline_bytes):
    plans = plans_for(count, world, pipeline_bytes, lanes)
    assert plans[0].pieces > 1
    for i, op in enumerate([OPS[world % len(OPS)], OPS[(world + 2) % len(OPS)]]):
        run_case(count, world, lanes, pipeline_bytes, 64 << 10, op, inplace=i % 2 == 0, seed=i + world)


@settings(max_examples=20, deadline=None)
@given(world=st.integers(2, 6), count=st.integers(0, 60), lanes=st.integers(1, 3),
       pipeline_bytes=st.integers(1, 64), min_piece_bytes=st.sampled_from([1, 4, 64 << 10]),
       op=st.sampled_from(OPS), inplace=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_ring_random_interleavings(world, count, lanes, pipeline_bytes, min_piece_bytes, op, inplace, seed):
    run_case(count, world, lanes, pipeline_bytes, min_piece_bytes, op, inplace, seed)


def test_a_schedule_bug_would_be_caught():
    """The simulator notices a wrong schedule (here: all-gather sends shifted by one chunk)."""
    import dataclasses

    plans = plans_for(7, 3, ITEMSIZE, 1)
    bad = []
    for p in plans:
        steps = tuple(dataclasses.replace(s, send_chunk=(s.send_chunk + 1) % 3) if not s.reduce else s
                      for s in p.steps)
        bad.append(dataclasses.replace(p, steps=steps))
    with pytest.raises(AssertionError):
        sym = Symbolic(3, 7)
        execute(bad, sym, None)
        check_symbolic(sym, bad)


# --------------------------------------------------------------------------- plan parameters and split
def test_plan_rejects_bad_parameters():
    for args in [(10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)]:
        with pytest.raises(ValueError):
            plan(*args, itemsize=4, pipeline_bytes=1024, lanes=1)
    with pytest.raises(ValueError):
        plan(10, 2, 0, itemsize=4, pipeline_bytes=1024, lanes=0)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 1 << 16), world=st.integers(1, 64), lanes=st.integers(1, 8),
       itemsize=st.sampled_from([1, 2, 4, 8]), pipeline_bytes=st.integers(1, 1 << 22),
       min_piece_bytes=st.integers(1, 1 << 17))
def test_plan_piece_sizes(count, world, lanes, itemsize, pipeline_bytes, min_piece_bytes):
    p = plan(count, world, 0, itemsize, pipeline_bytes, lanes, min_piece_bytes)
    biggest = p.chunks[0][1] - p.chunks[0][0]
    assert 1 <= p.pieces <= max(1, biggest)
    assert p.lanes == min(lanes, p.pieces)
    lo, hi = p.piece(0, 0)
    largest_piece = hi - lo
    # pipelining keeps pieces near pipeline_bytes (rounded up to whole items)
    assert largest_piece * itemsize < max(pipeline_bytes, itemsize) + itemsize or p.pieces == biggest
    if biggest * itemsize >= lanes * min_piece_bytes:
        assert p.pieces >= min(lanes, biggest)


@settings(max_examples=100, deadline=None)
@given(start=st.integers(-1000, 1000), length=st.integers(0, 5000), parts=st.integers(1, 200))
def test_split_invariants(start, length, parts):
    stop = start + length
    out = split(start, stop, parts)
    assert len(out) == parts
    assert out[0][0] == start and out[-1][1] == stop
    assert all(a[1] == b[0] for a, b in zip(out, out[1:]))
    sizes = [hi - lo for lo, hi in out]
    assert all(s >= 0 for s in sizes) and sum(sizes) == length
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ones are the longer ones
    assert sizes.count(length // parts + 1) == (length % parts if length % parts else 0)

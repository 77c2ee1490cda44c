"""The ring executor over real socket pairs in one process: results, bit parity, and restore of
the caller's input after a failure injected at every stage of reduce-scatter and all-gather."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from pccl.enums import Quantization, ReduceOp
from pccl.errors import PeerFailure
from pccl.algorithms import executor as ex
from pccl.algorithms import ring
from pccl.algorithms.backup import Backup, overwrite_order
from pccl.transports.links import Connection, LinkSet

from lane_faults import failing_recv, settle


def make_links(n: int, k: int) -> list[LinkSet]:
    send = [[] for _ in range(n)]
    recv = [[] for _ in range(n)]
    for r in range(n):
        for i in range(k):
            a, b = socket.socketpair()
            send[r].append(Connection(a, f"{r}->{(r + 1) % n}/{i}"))
            recv[(r + 1) % n].append(Connection(b, f"{(r + 1) % n}<-{r}/{i}"))
    return [LinkSet(1, (r + 1) % n, (r - 1) % n, send[r], recv[r]) for r in range(n)]


def run_ring(inputs, op, k=2, pipeline_bytes=1 << 12, in_place=True, fail=None, skip_reduced=True,
             codec=Quantization.NONE):
    """Run one ring all-reduce; ``fail=(rank, call)`` makes that rank's call-th receive raise.
    In place, the caller's backup leaves out the reduce-scatter's pieces (the receives copy those
    aside themselves, as in the communicator) unless ``skip_reduced`` is False (as the
    communicator does for a quantized ring, ``codec``)."""
    n = len(inputs)
    links = make_links(n, k)
    outs = [x if in_place else np.empty_like(x) for x in inputs]
    jobs, backups = [], []
    for r in range(n):
        plan = ring.plan(inputs[r].size, n, r, inputs[r].itemsize, pipeline_bytes, k)
        b = (Backup(inputs[r], np.empty_like(inputs[r]), overwrite_order(plan, skip_reduced))
             if in_place and n > 1 else None)
        if b is not None:
            b.run()
        backups.append(b)
        jobs.append(ex.RingJob(plan, 7, op, inputs[r], outs[r], links[r], 1 << 30, b, codec))
    real = ex.recv_exact
    ex.recv_exact, calls = failing_recv({id(c.sock): r for r in range(n) for c in links[r].recv}, fail, real)
    try:
        for j in jobs:
            j.start()
        return outs, settle(jobs, 2 if fail else 30), calls
    finally:
        ex.recv_exact = real
        for ls in links:
            ls.close()


def reference(inputs, op):
    acc = np.stack(inputs).astype(np.float64)
    return {ReduceOp.SUM: acc.sum(0), ReduceOp.AVG: acc.mean(0), ReduceOp.MAX: acc.max(0),
            ReduceOp.MIN: acc.min(0), ReduceOp.PROD: acc.prod(0)}[op]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("count", [0, 1, 4, 1001, 20000])
@pytest.mark.parametrize("in_place", [True, False])
def test_ring_results_are_correct_and_identical(n, count, in_place):
    rng = np.random.default_rng(n * 100000 + count)
    inputs = [rng.standard_normal(count).astype(np.float32) for _ in range(n)]
    originals = [x.copy() for x in inputs]
    if n == 1:
        return  # a world of one never builds a ring job (the communicator returns the input)
    outs, errors, _ = run_ring(inputs, ReduceOp.AVG, in_place=in_place)
    assert errors == []
    ref = reference(originals, ReduceOp.AVG)
    tol = n * 2.0**-23 * np.abs(np.stack(originals)).sum(0) + 1e-30 if count else 0
    for o in outs:
        assert o.tobytes() == outs[0].tobytes()
        assert np.all(np.abs(o.astype(np.float64) - ref) <= tol)
    if not in_place:
        assert all(np.array_equal(a, b) for a, b in zip(inputs, originals))


@pytest.mark.parametrize("op", list(ReduceOp))
def test_blockwise_receive_gives_the_bits_of_whole_pieces(op, monkeypatch):
    """Reduce-scatter pieces are received and reduced block by block (RECV_BLOCK_BYTES); blocks
    that do not divide the pieces give exactly the bits of one block per piece."""
    rng = np.random.default_rng(5)
    originals = [(1 + rng.standard_normal(5003) / 8).astype(np.float32) for _ in range(3)]
    whole, errors, _ = run_ring([x.copy() for x in originals], op, pipeline_bytes=1 << 14)
    assert errors == []
    monkeypatch.setattr(ex, "RECV_BLOCK_BYTES", 12)  # 3 elements
    blocked, errors, calls = run_ring([x.copy() for x in originals], op, pipeline_bytes=1 << 14)
    assert errors == [] and calls[0] > 1000  # the blocks were really used
    for a, b in zip(whole, blocked):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("n, block, skip_reduced, codec, nontemporal", [
    (2, None, True, Quantization.NONE, False), (3, None, True, Quantization.NONE, False),
    (4, None, True, Quantization.NONE, False), (3, 400, True, Quantization.NONE, False),
    (3, 400, False, Quantization.NONE, False), (3, 400, True, Quantization.NONE, True),
    (3, None, False, Quantization.UINT8, False), (4, None, False, Quantization.FP4, True)])
def test_failure_at_every_stage_restores_input_and_retry_succeeds(n, block, skip_reduced, codec, nontemporal,
                                                                  monkeypatch):
    """skip_reduced: the reduce-scatter's receives back up their own pieces (else the caller's
    backup covers every piece, as for a quantized ring). nontemporal: the backups copy with the
    compiled non-temporal kernel."""
    if nontemporal:
        use_nontemporal_backups(monkeypatch)
    if block is not None:  # pieces of 512 elements received in blocks of 100: fail mid-piece too
        monkeypatch.setattr(ex, "RECV_BLOCK_BYTES", block)
    count = 3000
    rng = np.random.default_rng(n)
    originals = [rng.standard_normal(count).astype(np.float32) for _ in range(n)]
    # Count the receive calls of a clean run, then fail at each of them in turn.
    _, errors, calls = run_ring([x.copy() for x in originals], ReduceOp.SUM, k=2, pipeline_bytes=1 << 11,
                                skip_reduced=skip_reduced, codec=codec)
    assert errors == []
    victim = n - 1
    total = calls[victim]
    assert total >= 4 * (n - 1)  # several pieces in each of the 2(N-1) steps
    for call in range(1, total + 1):
        inputs = [x.copy() for x in originals]
        _, errors, _ = run_ring(inputs, ReduceOp.SUM, k=2, pipeline_bytes=1 << 11, fail=(victim, call),
                                skip_reduced=skip_reduced, codec=codec)
        assert errors, f"failure at receive call {call} went unnoticed"
        for x, o in zip(inputs, originals):
            assert x.tobytes() == o.tobytes(), f"input not restored after a failure at receive call {call}"
    outs, errors, _ = run_ring([x.copy() for x in originals], ReduceOp.SUM, skip_reduced=skip_reduced, codec=codec)
    assert errors == [] and all(o.tobytes() == outs[0].tobytes() for o in outs)


QUANTIZED = [q for q in Quantization if q is not Quantization.NONE]


def use_nontemporal_backups(monkeypatch) -> None:
    """Make every backup, however small, copy with codec_jit.copy_nt (skips where there is none)."""
    from pccl.algorithms import backup as backup_mod, codecs

    assert codecs.load_kernels(), f"the compiled kernels did not load: {codecs.KERNELS.error!r}"
    if codecs.KERNELS.module.copy_nt is None:
        pytest.skip("non-temporal stores are compiled on x86-64 only")
    monkeypatch.setattr(backup_mod, "NONTEMPORAL_MIN_BYTES", 0)
    x = np.arange(10, dtype=np.float32)
    assert Backup(x, np.empty_like(x), [])._copy_nt is codecs.KERNELS.module.copy_nt


def test_backups_copy_non_temporally_from_the_threshold_on(monkeypatch):
    """Below NONTEMPORAL_MIN_BYTES, or for a buffer that is not one contiguous vector, numpy
    copies; from it on, the compiled kernel does, and what it saves restores byte for byte."""
    from pccl.algorithms import backup as backup_mod

    use_nontemporal_backups(monkeypatch)
    monkeypatch.setattr(backup_mod, "NONTEMPORAL_MIN_BYTES", 4001)
    small = np.arange(1000, dtype=np.float32)  # 4000 bytes
    assert Backup(small, np.empty_like(small), [])._copy_nt is None
    strided = np.arange(4000, dtype=np.float32)[::2]
    assert Backup(strided, np.empty(strided.size, np.float32), [])._copy_nt is None
    x = np.random.default_rng(3).standard_normal(1001).astype(np.float32)
    original = x.copy()
    b = Backup(x, np.empty_like(x), [(0, 333), (333, 1001)])
    assert b._copy_nt is not None
    b.run()
    x[:] = -1
    b.restore([(0, 333), (333, 1001)])
    assert x.tobytes() == original.tobytes()


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("codec", QUANTIZED)
def test_quantized_ring_is_bit_identical_on_every_peer_for_every_world_size(n, codec):
    """Every codec at every N from 2 to 8 over real socket pairs, in place: odd sizes (fewer
    elements than peers, one more than a multiple of N, chunks split into odd pieces), a constant
    input, and all-negative chunks. Every peer ends with the same bits, and the in-place result
    equals the out-of-place one."""
    rng = np.random.default_rng(1000 * n + list(Quantization).index(codec))
    cases = [[rng.standard_normal(count).astype(np.float32) for _ in range(n)] for count in (1, n - 1, 8 * n + 1, 2003)]
    cases.append([np.full(1001, 0.75, np.float32) for _ in range(n)])  # constant: every chunk one value
    cases.append([-np.abs(rng.standard_normal(1001)).astype(np.float32) - 1 for _ in range(n)])  # all negative
    for xs in cases:
        ins, oops = [x.copy() for x in xs], [x.copy() for x in xs]
        outs, errors, _ = run_ring(ins, ReduceOp.AVG, pipeline_bytes=1 << 10, skip_reduced=False, codec=codec)
        assert errors == []
        assert len({o.tobytes() for o in outs}) == 1, f"{codec.name} N={n} size {xs[0].size}: peers differ"
        out_of_place, errors, _ = run_ring(oops, ReduceOp.AVG, pipeline_bytes=1 << 10, in_place=False, codec=codec)
        assert errors == [] and out_of_place[0].tobytes() == outs[0].tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(oops, xs))  # out of place keeps the input
        ref = np.mean(np.stack(xs).astype(np.float64), 0)
        if np.all(ref < 0):
            assert np.all(outs[0] <= 0), f"{codec.name}: an all-negative mean came out positive"
        if xs[0].size == 1001 and np.ptp(ref) == 0:  # a constant stays constant, and close to its value
            assert np.all(outs[0] == outs[0][0]) and abs(outs[0][0] - ref[0]) <= 1e-2 * abs(ref[0])


def test_overwrite_order_covers_every_piece_once():
    for n in range(2, 7):
        for rank in range(n):
            plan = ring.plan(1000, n, rank, 4, 256, 3)
            order = overwrite_order(plan)
            cells = np.zeros(1000, dtype=int)
            for lo, hi in order:
                cells[lo:hi] += 1
            assert np.all(cells == 1)
            # skip_reduced: exactly this rank's own chunk, which no reduce-scatter step receives
            own = np.zeros(1000, dtype=int)
            for lo, hi in overwrite_order(plan, skip_reduced=True):
                own[lo:hi] += 1
            lo, hi = plan.chunks[rank]
            assert np.all(own[lo:hi] == 1) and own.sum() == hi - lo


def test_backup_wait_raises_when_cancelled():
    plan = ring.plan(100, 2, 0, 4, 64, 1)
    b = Backup(np.ones(100, np.float32), np.empty(100, np.float32), overwrite_order(plan))
    lo, hi = b.order[-1]
    b.cancel()
    with pytest.raises(PeerFailure):
        b.wait(lo, hi)


@pytest.mark.parametrize("nbytes", [0, 1, ex.SEND_SLICE_BYTES - 1, ex.SEND_SLICE_BYTES,
                                    3 * ex.SEND_SLICE_BYTES + 17])
def test_send_frame_delivers_header_and_payload_in_order_whatever_the_slicing(nbytes):
    """A frame goes out as the header with the first slice, then whole slices: the receiver sees
    exactly header + payload, also when the kernel takes less than offered (a 4 KiB send buffer
    and a reader that drains slowly force partial sends)."""
    import threading
    import time

    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10.0)  # each send call then takes what fits and returns: partial sends happen
    payload = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    header = bytes(range(32))
    got = bytearray()

    def drain():
        while len(got) < len(header) + nbytes:
            chunk = b.recv(65536)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.0005)

    t = threading.Thread(target=drain)
    t.start()
    try:
        ex.send_frame(a, header, memoryview(payload).cast("B") if nbytes else memoryview(b""))
        t.join(30)
        assert not t.is_alive()
        assert bytes(got) == header + payload.tobytes()
    finally:
        a.close()
        b.close()

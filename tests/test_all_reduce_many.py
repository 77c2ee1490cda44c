"""comm.all_reduce_many: many tensors with a bounded window, retries after a peer dies, admit=False."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pccl
from test_shared_state import close_all, group, together


@pytest.fixture
def master():
    with pccl.Master("127.0.0.1", 0) as m:
        yield m


def tensors(i, n=24):
    return [np.full(1 + 1000 * (k % 5), i + 1 + k, dtype=np.float32) for k in range(n)]


def test_many_tensors_are_reduced_in_place_identically(master):
    comms = group(master, 3)
    try:
        ts = [tensors(i) for i in range(3)]
        out, errs = together([lambda c=c, t=t: c.all_reduce_many(t, max_in_flight=4) for c, t in zip(comms, ts)])
        assert errs == [None] * 3
        for k in range(24):
            assert (ts[0][k] == sum(i + 1 + k for i in range(3))).all()
            assert ts[0][k].tobytes() == ts[1][k].tobytes() == ts[2][k].tobytes()
        assert all(len(o) == 24 and all(r.world_size == 3 for r in o) for o in out)
        with pytest.raises(pccl.InvalidUsage):
            comms[0].all_reduce_many(ts[0], max_in_flight=0)
    finally:
        close_all(comms)


def test_failed_tensors_are_retried_among_the_survivors_and_newcomers_wait(master):
    comms = group(master, 3)
    late = None
    try:
        big = [[np.full(1 << 20, float(i + 1), dtype=np.float32) for _ in range(12)] for i in range(3)]
        # a newcomer registers now: the retry's update_topology(admit=False) must not admit it
        late = pccl.Communicator(master.address)
        t = threading.Thread(target=lambda: late.connect(timeout=60), daemon=True)
        t.start()
        while comms[0].are_peers_pending() is False:
            time.sleep(0.01)

        def victim():
            time.sleep(0.05)
            comms[2].close()  # leaves in the middle of the list
        out, errs = together([lambda: comms[0].all_reduce_many(big[0], max_in_flight=2),
                              lambda: comms[1].all_reduce_many(big[1], max_in_flight=2), victim])
        assert errs[:2] == [None, None]
        worlds = [r.world_size for r in out[0]]
        assert worlds == [r.world_size for r in out[1]]
        for k, w in enumerate(worlds):
            expect = 6.0 if w == 3 else 3.0
            assert (big[0][k] == expect).all() and big[0][k].tobytes() == big[1][k].tobytes()
        assert comms[0].world_size == 2 and comms[0].are_peers_pending()  # still waiting
        assert 2 in worlds, "the death happened after the whole list: nothing was retried"
        _, errs = together([comms[0].update_topology, comms[1].update_topology])
        t.join(30)
        assert errs == [None, None] and late.world_size == 3
    finally:
        close_all(comms[:2] + ([late] if late else []))


def mixed(i):
    """Tensors of several dtypes and sizes, filled with values exact in every dtype."""
    out = []
    for k in range(30):
        dtype = (np.float32, np.float64, np.int32, np.float16)[k % 4]
        out.append(np.full((k % 7) * 300 + (k % 3), i + 1 + k % 5, dtype=dtype))
    out.append(np.full(40000, i + 1.0, np.float32))  # 160 KB: over the cap, a bucket of its own
    out.append(np.zeros((0,), np.float32))
    return out


def test_small_tensors_are_coalesced_per_dtype_and_stay_bit_identical(master):
    torch = pytest.importorskip("torch")
    comms = group(master, 3)
    cap = 64 << 10
    try:
        ts = [mixed(i) + [torch.full((500,), float(i + 1)), torch.full((300,), float(i + 2), dtype=torch.bfloat16)]
              for i in range(3)]
        expect = [sum(np.asarray(t[k], dtype=np.float64) if not hasattr(t[k], "float") else t[k].float().numpy()
                      for t in ts) for k in range(len(ts[0]))]
        out, errs = together([lambda c=c, t=t: c.all_reduce_many(t, max_in_flight=3, bucket_bytes=cap)
                              for c, t in zip(comms, ts)])
        assert errs == [None] * 3
        sizes_kinds = [pccl.coalesce.describe(x)[:2] for x in ts[0]]
        buckets = pccl.coalesce.plan([s for s, _ in sizes_kinds], [k for _, k in sizes_kinds], cap)
        assert 4 < len(buckets) < len(ts[0]) // 2
        for o in out:  # one collective per bucket: its tensors share the bucket's ReduceInfo
            assert len(o) == len(ts[0]) and all(r.world_size == 3 for r in o)
            assert len({id(r) for r in o}) == len(buckets)
            assert all(o[b[0]] is o[i] for b in buckets for i in b)
        for k in range(len(ts[0])):
            got = [t[k].float().numpy() if hasattr(t[k], "float") else t[k] for t in ts]
            assert (got[0] == expect[k]).all(), k
            assert got[0].tobytes() == got[1].tobytes() == got[2].tobytes()
        assert ts[0][-1].dtype == torch.bfloat16 and [ts[0][k].dtype for k in (8, 9, 10, 11)] == [
            np.float32, np.float64, np.int32, np.float16]  # dtypes kept

        # bucket_bytes=0 and quantized ops: one collective per tensor
        small = [[np.full(100, float(i + k), np.float32) for k in range(5)] for i in range(3)]
        for kw in ({"bucket_bytes": 0}, {"quantization": pccl.Quantization.UINT8}):
            out, errs = together([lambda c=c, t=t: c.all_reduce_many(t, **kw) for c, t in zip(comms, small)])
            assert errs == [None] * 3 and len({id(r) for r in out[0]}) == 5, kw
        with pytest.raises(pccl.InvalidUsage, match="bucket_bytes"):
            comms[0].all_reduce_many(small[0], bucket_bytes=-1)
    finally:
        close_all(comms)


def test_a_failed_bucket_leaves_all_its_tensors_unchanged(master):
    comms = group(master, 3)
    try:
        n, cap = 400, 4096  # 1 KiB tensors, 4 per bucket: 100 collectives
        ts = [[np.full(256, float(i + 1) * (k + 1), np.float32) for k in range(n)] for i in range(3)]
        before = [[x.copy() for x in t] for t in ts]

        def closer():  # once the victim's first bucket committed, with 99 collectives to go
            deadline = time.monotonic() + 30
            while ts[2][0][0] != 6.0 and time.monotonic() < deadline:
                time.sleep(0.001)
            comms[2].close()

        def victim():
            threading.Thread(target=closer, daemon=True).start()
            comms[2].all_reduce_many(ts[2], max_in_flight=2, bucket_bytes=cap, retries=0)
        _, errs = together([lambda: comms[0].all_reduce_many(ts[0], max_in_flight=2, bucket_bytes=cap, retries=0),
                            lambda: comms[1].all_reduce_many(ts[1], max_in_flight=2, bucket_bytes=cap, retries=0),
                            victim])
        assert isinstance(errs[0], (pccl.PeerFailure, pccl.Aborted)), errs
        assert isinstance(errs[1], (pccl.PeerFailure, pccl.Aborted)), errs
        done = []
        for k in range(n):
            reduced = ts[0][k][0] == 6.0 * (k + 1)
            if reduced:
                assert (ts[0][k] == 6.0 * (k + 1)).all()
            else:
                assert ts[0][k].tobytes() == before[0][k].tobytes() and ts[1][k].tobytes() == before[1][k].tobytes()
            assert ts[0][k].tobytes() == ts[1][k].tobytes() or not reduced
            done.append(reduced)
        assert done[0] and not done[-1], "the peer died before the first or after the last bucket"
        for b in range(0, n, 4):  # a bucket is reduced or left alone as a whole
            assert len(set(done[b:b + 4])) == 1, b
    finally:
        close_all(comms[:2])


def test_lists_that_differ_across_peers_fail_at_once_on_every_peer(master):
    """Bucketed, peers with different lists could plan different numbers of collectives; the
    first collective names the whole list's layout, so the master refuses it on every peer."""
    comms = group(master, 2)
    try:
        cases = [  # (peer 0's list, peer 1's list)
            ([np.ones(2, np.float32), np.ones(2, np.float32)], [np.ones(3, np.float32), np.ones(1, np.float32)]),
            ([np.ones(4, np.float32), np.ones(4, np.float32)], [np.ones(4, np.float32), np.ones(4, np.float64)]),
            ([np.ones(4, np.float16), np.ones(2, np.float32)], [np.ones(4, np.float32), np.ones(2, np.float32)]),
        ]
        for a, b in cases:
            before = [x.copy() for x in a + b]
            t0 = time.monotonic()
            _, errs = together([lambda: comms[0].all_reduce_many(a, timeout=60),
                                lambda: comms[1].all_reduce_many(b, timeout=60)])
            assert all(isinstance(e, pccl.InvalidUsage) for e in errs), errs
            assert time.monotonic() - t0 < 20  # not the 60 s deadline of a collective left waiting
            assert all(x.tobytes() == y.tobytes() for x, y in zip(a + b, before))
        # nothing was left waiting on either peer: the next collective on tag 1 pairs correctly
        xs = [np.full(4, 1.0, np.float32), np.full(4, 2.0, np.float32)]
        _, errs = together([lambda c=c, x=x: c.all_reduce(x, tag=1, timeout=30) for c, x in zip(comms, xs)])
        assert errs == [None, None] and (xs[0] == 3.0).all()
    finally:
        close_all(comms)


def test_bad_lists_are_refused_before_anything_starts(master):
    comms = group(master, 2)
    try:
        x = np.ones(4, np.float32)
        with pytest.raises(pccl.InvalidUsage, match="twice"):
            comms[0].all_reduce_many([x, np.ones(4, np.float32), x])

        def lists(i):
            ro = np.full(4, float(i + 1), np.float32)
            ro.flags.writeable = False
            return [np.full(4, float(i + 1), np.float32), ro, np.full(4, float(i + 1), np.float32)]
        ts = [lists(0), lists(1)]
        _, errs = together([lambda c=c, t=t: c.all_reduce_many(t, timeout=30) for c, t in zip(comms, ts)])
        assert all(isinstance(e, pccl.InvalidUsage) and "read-only" in str(e) for e in errs), errs
        assert all((t[k] == i + 1).all() for i, t in enumerate(ts) for k in range(3))  # one bucket, not started
        swapped = np.ones(4, np.dtype(np.float32).newbyteorder("S"))
        with pytest.raises(pccl.InvalidUsage, match="byte order"):
            comms[0].all_reduce(swapped)
        with pytest.raises(pccl.InvalidUsage, match="read-only"):
            comms[0].all_reduce(ts[0][1])
    finally:
        close_all(comms)

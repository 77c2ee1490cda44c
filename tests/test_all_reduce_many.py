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

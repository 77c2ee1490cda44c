"""Communicator behaviour that needs no second process: argument checks, world size 1, async
handles, tag rules (two communicators in threads of this process where a pair is needed)."""
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


@pytest.fixture
def solo(master):
    with pccl.Communicator(master.address) as c:
        yield c


def pair(master, timeouts=None):
    a = pccl.Communicator(master.address, timeouts=timeouts).connect()
    b = pccl.Communicator(master.address, timeouts=timeouts)
    t = threading.Thread(target=b.connect)
    t.start()
    end = time.monotonic() + 30
    while not a.are_peers_pending():
        assert time.monotonic() < end, "the second peer never registered"
        time.sleep(0.01)
    a.update_topology()
    t.join(30)
    assert a.world_size == b.world_size == 2
    return a, b


def both(fn_a, fn_b):
    out = [None, None]
    err = [None, None]

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:
            err[i] = exc

    ts = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate((fn_a, fn_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out, err


def test_world_of_one_returns_the_input(solo):
    assert solo.world_size == 1 and solo.rank == 0 and solo.topology == (solo.peer_id,)
    x = np.arange(10, dtype=np.int32)
    info = solo.all_reduce(x, op=pccl.ReduceOp.AVG)
    assert np.array_equal(x, np.arange(10)) and info.world_size == 1
    y = np.empty_like(x)
    solo.all_reduce(x, dst=y)
    assert np.array_equal(y, x)


@pytest.mark.parametrize("bad", [
    lambda: np.ones(4, dtype=np.complex64),
    lambda: np.ones((4, 4), dtype=np.float32)[:, 1],
    lambda: [1.0, 2.0],
])
def test_bad_buffers_raise_invalid_usage(solo, bad):
    with pytest.raises(pccl.InvalidUsage):
        solo.all_reduce(bad())


def test_mismatched_src_dst_and_bad_arguments(solo):
    x = np.ones(4, dtype=np.float32)
    with pytest.raises(pccl.InvalidUsage):
        solo.all_reduce(x, dst=np.ones(5, dtype=np.float32))
    with pytest.raises(pccl.InvalidUsage):
        solo.all_reduce(x, dst=np.ones(4, dtype=np.float64))
    with pytest.raises(pccl.InvalidUsage):
        solo.all_reduce(x, op="median")
    with pytest.raises(pccl.InvalidUsage):
        solo.all_reduce(x, tag=-1)
    big = np.ones(8, dtype=np.float32)
    with pytest.raises(pccl.InvalidUsage):
        solo.all_reduce(big[:6], dst=big[2:])  # partial overlap


def test_every_algorithm_in_a_world_of_one_returns_the_input(solo):
    for algo in pccl.Algorithm:
        x = np.arange(4, dtype=np.float32)
        info = solo.all_reduce(x, algorithm=algo)
        assert x.tolist() == [0, 1, 2, 3] and info.world_size == 1


def test_auto_resolution_is_reported_and_checked_for_agreement(master):
    a, b = pair(master)
    try:
        for algo in (pccl.Algorithm.STAR, pccl.Algorithm.HIERARCHICAL, pccl.Algorithm.RING):
            xs = [np.full(1000, 1, np.int64), np.full(1000, 2, np.int64)]
            out, err = both(lambda: a.all_reduce(xs[0], algorithm=algo), lambda: b.all_reduce(xs[1], algorithm=algo))
            assert err == [None, None] and out[0].algorithm == out[1].algorithm == algo.value
            assert xs[0].tolist() == xs[1].tolist() == [3] * 1000
        # AUTO at N=2: the ring has as few hops as the star and moves less, so the model picks it.
        xs = [np.ones(4, np.float32), np.ones(4, np.float32)]
        out, err = both(lambda: a.all_reduce(xs[0]), lambda: b.all_reduce(xs[1]))
        assert err == [None, None] and out[0].algorithm == out[1].algorithm == "ring"
        # The resolved algorithm travels in the announcement: peers that resolve differently (here
        # AUTO -> ring against an explicit STAR) are refused on both sides, inputs untouched.
        out, err = both(lambda: a.all_reduce(xs[0], tag=1),
                        lambda: b.all_reduce(xs[1], tag=1, algorithm=pccl.Algorithm.STAR))
        assert all(isinstance(e, pccl.InvalidUsage) for e in err), err
        assert xs[0].tolist() == xs[1].tolist() == [2] * 4
    finally:
        a.close()
        b.close()


def test_auto_on_one_host_picks_the_star_at_1_mib_and_the_ring_once_a_peer_is_elsewhere(master):
    """Three peers: on one data address AUTO takes the star for 1 MiB at N = 3 (the one-host
    model of algorithms/select.py); when one peer advertises another address (127.0.0.2, still
    loopback here) the peers no longer share one host and the separate-links model picks the ring."""
    for hosts, expect in ((["127.0.0.1"] * 3, "star"), (["127.0.0.1", "127.0.0.1", "127.0.0.2"], "ring")):
        comms = group(master, 3, hosts=hosts)
        try:
            assert [c.world_size for c in comms] == [3, 3, 3]
            xs = [np.full(1 << 18, i + 1, np.float32) for i in range(3)]  # 1 MiB each
            out, err = together([lambda c=c, x=x: c.all_reduce(x) for c, x in zip(comms, xs)])
            assert err == [None] * 3, err
            assert [o.algorithm for o in out] == [expect] * 3, (hosts, out)
            assert all(np.array_equal(x, np.full(1 << 18, 6, np.float32)) for x in xs)
        finally:
            close_all(comms)


def test_quantization_in_a_world_of_one_returns_the_input_and_checks_it(solo):
    x = np.arange(4, dtype=np.float32)
    solo.all_reduce(x, quantization=pccl.Quantization.UINT8)
    assert x.tolist() == [0, 1, 2, 3]
    x[2] = np.inf
    with pytest.raises(pccl.InvalidUsage, match="NaN/inf"):
        solo.all_reduce(x, quantization=pccl.Quantization.UINT8)


def test_calls_after_close_raise(master):
    c = pccl.Communicator(master.address).connect()
    c.close()
    c.close()  # idempotent
    with pytest.raises(pccl.InvalidUsage):
        c.all_reduce(np.ones(3, dtype=np.float32))


def test_missing_master_address(monkeypatch):
    monkeypatch.delenv("PCCL_MASTER", raising=False)
    with pytest.raises(pccl.InvalidUsage):
        pccl.Communicator()
    with pytest.raises(pccl.InvalidUsage):
        pccl.Communicator("nohostport")


def test_unreachable_master_raises_instead_of_hanging():
    cfg = pccl.Config(master_timeout=1.0, heartbeat_interval=0.2, peer_timeout=0.5)
    c = pccl.Communicator("127.0.0.1:9", timeouts=cfg)  # nothing listens on the discard port
    with pytest.raises(pccl.MasterUnreachable):
        c.connect(timeout=20)
    c.close()


def test_async_ops_in_flight_with_distinct_tags(master):
    a, b = pair(master)
    try:
        xs = {c: [np.full(1000 + i, float(c.peer_id * 10 + i), dtype=np.float32) for i in range(5)] for c in (a, b)}

        def run(c):
            hs = [c.all_reduce_async(x, tag=i) for i, x in enumerate(xs[c])]
            with pytest.raises(pccl.InvalidUsage):
                c.all_reduce_async(np.ones(3, dtype=np.float32), tag=0)  # tag 0 still in flight
            with pytest.raises(pccl.InvalidUsage):
                c.update_topology()  # collectives in flight
            infos = [h.wait() for h in hs]
            assert [h.wait() for h in hs] == infos  # wait() again returns the same result
            return infos

        (ia, ib), err = both(lambda: run(a), lambda: run(b))
        assert err == [None, None], err
        for i in range(5):
            expect = float(a.peer_id * 10 + i + b.peer_id * 10 + i)
            assert np.all(xs[a][i] == expect) and np.array_equal(xs[a][i], xs[b][i])
            assert ia[i].world_size == 2 and ia[i].tx_bytes > 0
    finally:
        a.close()
        b.close()


def test_peer_groups_reduce_separately(master):
    a = pccl.Communicator(master.address, peer_group=0).connect()
    others = [pccl.Communicator(master.address, peer_group=g) for g in (0, 1, 1)]
    ts = [threading.Thread(target=o.connect) for o in others]
    for t in ts:
        t.start()
    deadline = time.monotonic() + 30
    while master.status().count("pending") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # let all three register
    a.update_topology()
    for t in ts:
        t.join(30)
    comms = [a] + others
    try:
        assert [c.world_size for c in comms] == [2, 2, 2, 2]
        xs = [np.full(100, float(c.peer_group * 100 + i), dtype=np.float64) for i, c in enumerate(comms)]
        errs = []

        def run(c, x):
            try:
                c.all_reduce(x)
            except BaseException as exc:
                errs.append(exc)

        ts = [threading.Thread(target=run, args=(c, x)) for c, x in zip(comms, xs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert errs == []
        assert xs[0][0] == xs[1][0] == 0 + 1
        assert xs[2][0] == xs[3][0] == 102 + 103
    finally:
        for c in comms:
            c.close()


def test_a_crash_of_the_master_loop_is_raised_not_only_logged():
    master = pccl.Master().start()

    def broken(*args, **kwargs):
        raise ValueError("bug")

    master.core.handle = broken
    c = pccl.Communicator(master.address, timeouts=pccl.Config(master_timeout=1.0, heartbeat_interval=0.2,
                                                              peer_timeout=0.5))
    with pytest.raises(pccl.MasterUnreachable):
        c.connect(timeout=10)  # the master stops answering
    c.close()
    with pytest.raises(RuntimeError, match="crashed"):
        master.status()
    master.close()  # the error was raised once; closing still works


# ----------------------------------------------------------------------------- master restart
RIDE = pccl.Config(master_timeout=3.0, master_reconnect_timeout=30.0, master_reconnect_backoff=0.05,
                   master_reconnect_backoff_max=0.5, master_regroup_timeout=10.0)


def test_a_pair_rides_through_a_master_restart_on_the_same_port():
    m1 = pccl.Master("127.0.0.1", 0, config=RIDE).start()
    host, port = m1.address.rsplit(":", 1)
    a, b = pair(m1, RIDE)
    m2 = None
    try:
        x = np.full(1000, 1.0, np.float32)
        out, err = both(lambda: a.all_reduce(x.copy()), lambda: b.all_reduce(x.copy()))
        assert err == [None, None]
        m1.close()
        with pytest.raises(pccl.MasterLost):  # a collective while reconnecting fails at once, retryable
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                a.all_reduce(x.copy())
                time.sleep(0.02)
        assert isinstance(pccl.MasterLost("x"), pccl.RETRYABLE)
        m2 = pccl.Master(host, int(port), config=RIDE).start()  # no state, same port

        def step(c):
            buf = np.full(1000, 1.0 + (c is b), np.float32)
            seen = []  # what a user's retry loop sees; bounded in time, not in attempts
            end = time.monotonic() + 40
            while time.monotonic() < end and len(seen) < 200:
                try:
                    return c.all_reduce(buf), buf
                except pccl.RETRYABLE as exc:
                    seen.append(f"{time.monotonic():.2f} {exc!r}")
                    c.update_topology()
            raise AssertionError(f"no success after {len(seen)} attempts: " + "; ".join(seen[-10:]))

        out, err = both(lambda: step(a), lambda: step(b))
        assert err == [None, None], err
        for info, buf in out:
            assert info.world_size == 2 and np.all(buf == 3.0)
        assert a.world_size == b.world_size == 2 and set(a.topology) == set(b.topology)
        assert len(m2.core.live_members()) == 2
    finally:
        a.close()
        b.close()
        if m2 is not None:
            m2.close()


def test_a_peer_the_master_removed_cannot_ride_back_in_as_if_the_master_had_restarted():
    """b takes the master for silent (as a peer does after a freeze longer than master_timeout),
    drops its connection and re-registers as a re-joining member. The master did not restart: it
    removed b when the connection dropped, so b ends with Kicked and a goes on alone."""
    m1 = pccl.Master("127.0.0.1", 0, config=RIDE).start()
    a, b = pair(m1, RIDE)
    try:
        b._control._core.last_heard = -1e9  # the control thread sees "no message for ages" at its next tick
        err = None
        end = time.monotonic() + 20
        while err is None and time.monotonic() < end:
            try:
                b.update_topology(timeout=0.5)
            except pccl.MasterLost:
                time.sleep(0.05)
            except pccl.PcclError as exc:
                err = exc
        assert isinstance(err, pccl.Kicked) and "did not restart" in str(err), err
        a.update_topology()
        assert a.world_size == 1 and len(m1.core.live_members()) == 1
    finally:
        a.close()
        b.close()
        m1.close()


def test_kicked_is_final_and_a_refusing_master_says_so():
    import zmq

    from pccl.transports import messages as msgs

    m1 = pccl.Master("127.0.0.1", 0, config=RIDE).start()
    host, port = m1.address.rsplit(":", 1)
    c = pccl.Communicator(m1.address, timeouts=RIDE).connect()
    c._send(msgs.Registered(peer_id=1, accepted=True))  # peers may not send this: the master kicks
    with pytest.raises(pccl.Kicked, match="removed this peer"):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            c.are_peers_pending()
            time.sleep(0.05)
    time.sleep(0.5)
    with pytest.raises(pccl.Kicked):
        c.update_topology()
    assert m1.core.live_members() == [] and not any(p.alive for p in m1.core.peers.values())  # no silent return
    c.close()

    # A master that is reachable but refuses every registration (here: kicks everything).
    d = pccl.Communicator(m1.address, timeouts=RIDE).connect()
    m1.close()
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind(f"tcp://{host}:{port}")
    try:
        end = time.monotonic() + 30
        err = None
        while err is None and time.monotonic() < end:
            if fake.poll(100):
                ident, _ = fake.recv_multipart()
                fake.send_multipart([ident, msgs.encode(msgs.Kicked(reason="not today"))])
            try:
                d.are_peers_pending(timeout=0.1)
            except pccl.MasterLost:
                pass
            except pccl.PcclError as exc:
                err = exc
        assert isinstance(err, pccl.Kicked) and "refused" in str(err) and "not today" in str(err), err
    finally:
        d.close()
        fake.close(0)
        ctx.term()

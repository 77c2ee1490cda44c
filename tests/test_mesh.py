"""Mesh connections (star/hierarchical links) over real listeners: lazy dial and claim, data in
both directions, and a claim that ends promptly when its op is aborted or its peer is dead."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pccl.config import Config
from pccl.errors import PeerFailure
from pccl.transports import links
from pccl.transports.links import Listener, Mesh, recv_exact


@pytest.fixture
def pair():
    cfg = Config(op_timeout=60.0)
    ls = [Listener("127.0.0.1", 0, cfg) for _ in range(2)]
    for i, lst in enumerate(ls):
        lst.assign(10 + i)
    addresses = {10 + i: ("127.0.0.1", lst.port) for i, lst in enumerate(ls)}
    dead: set[int] = set()
    meshes = [Mesh(ls[i], 3, 10 + i, addresses, 2, cfg, abandoned=lambda pid: pid in dead) for i in range(2)]
    yield meshes, dead
    for m in meshes:
        m.close()
    for lst in ls:
        lst.close()


def run_program(conn, program):
    done = threading.Event()
    result: list = []
    conn.submit(program, lambda err: (result.append(err), done.set()))
    return done, result


def test_lazy_connections_carry_data_both_ways(pair):
    (a, b), _ = pair
    payload = np.arange(1000, dtype=np.float32)
    got = np.empty_like(payload)
    for src, dst, sid, did in ((a, b, 10, 11), (b, a, 11, 10)):
        for lane in range(2):
            got[:] = 0
            s_done, s_err = run_program(src.send(did)[lane], lambda c: c.sock.sendall(memoryview(payload).cast("B")))
            r_done, r_err = run_program(dst.recv(sid)[lane], lambda c: recv_exact(c.sock, memoryview(got).cast("B")))
            assert s_done.wait(10) and r_done.wait(10)
            assert s_err == [None] and r_err == [None]
            assert np.array_equal(got, payload)
    assert a.send(11) is a.send(11)  # cached for the revision


@pytest.mark.parametrize("how", ["abort", "dead"])
def test_a_claim_ends_promptly_when_aborted_or_the_peer_dies(pair, how):
    (a, _b), dead = pair
    conn = a.recv(11)[0]  # peer 11 never dials
    done, err = run_program(conn, lambda c: None)
    time.sleep(0.3)
    assert not done.is_set()
    t0 = time.monotonic()
    if how == "abort":
        a.abort()
    else:
        dead.add(11)
    assert done.wait(5), "the claim did not end"
    assert time.monotonic() - t0 < 5
    assert isinstance(err[0], PeerFailure)


def test_closed_mesh_refuses_new_connections(pair):
    (a, _), _ = pair
    a.close()
    with pytest.raises(PeerFailure):
        a.send(11)
    assert links.framing.MESH_INDEX >= links.framing.MAX_CONNECTIONS

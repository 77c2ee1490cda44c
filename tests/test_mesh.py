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


class _Ends:
    """The two addresses of a connection, as a connected socket reports them."""

    def __init__(self, local: str, peer: str) -> None:
        self._ends = (local, 5000), (peer, 6000)

    def getsockname(self):
        return self._ends[0]

    def getpeername(self):
        return self._ends[1]


def test_same_host_means_a_loopback_peer_or_the_same_address_at_both_ends():
    assert links.same_host(_Ends("127.0.0.1", "127.0.0.1"))
    assert links.same_host(_Ends("127.0.0.1", "127.0.0.2"))
    assert links.same_host(_Ends("::1", "::1"))
    assert links.same_host(_Ends("10.1.2.3", "10.1.2.3"))  # one host's own LAN address: routed via loopback
    assert not links.same_host(_Ends("10.1.2.3", "10.1.2.4"))
    assert not links.same_host(_Ends("198.18.0.1", "198.18.0.2"))  # the emulated hosts of pccl netem
    assert not links.same_host(_Ends("", "garbage"))


@pytest.mark.parametrize("size", [256 << 10, 0])
def test_loopback_data_connections_get_the_configured_send_buffer(size):
    """Both ends of a real loopback data connection get SO_SNDBUF = local_send_buffer (Linux
    reports twice the value set); 0 leaves what the kernel gives any loopback connection."""
    import socket

    cfg = Config(local_send_buffer=size)
    lst = Listener("127.0.0.1", 0, cfg)
    lst.assign(11)
    try:
        dialed = links.connect("127.0.0.1", lst.port, 10, 11, 3, 0, cfg)
        claimed = lst.claim(3, 10, 0, time.monotonic() + 5)
        with socket.create_server(("127.0.0.1", 0)) as srv, \
                socket.create_connection(srv.getsockname()) as plain:
            default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # what the kernel picks
        for s in (dialed, claimed):
            got = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            assert got == (2 * size if size else default), (size, got, default)
        dialed.close()
        claimed.close()
    finally:
        lst.close()

"""Loopback integration: real peer processes, real TCP, real signals."""
from __future__ import annotations

import collections
import re
import signal
import socket
import time

import pytest
import zmq


pytestmark = pytest.mark.timeout(240)


# world 6 (35 s here) runs with `make test-all`; the ring schedule is simulated for worlds 1-64 in test_ring_schedule.py
@pytest.mark.parametrize("world", [2, 3, pytest.param(6, marks=pytest.mark.slow)])
def test_every_dtype_and_op_matches_reference_and_is_identical(cluster_factory, world):
    cluster = cluster_factory()
    peers = [cluster.spawn("matrix", i, "--world", str(world), *(["--torch"] if world == 3 else []))
             for i in range(world)]
    done = [p.expect("done", timeout=200) for p in peers]
    for d in done:
        assert d["failures"] == []
    digests = [[(e["dtype"], e["op"], e["count"], e["digest"]) for e in p.log if e["event"] == "result"]
               for p in peers]
    assert len(digests[0]) > 200
    for d in digests[1:]:
        assert d == digests[0]  # bit-identical on every peer


def _survivors_fail_and_recover(peers, victim, sig, cluster, bound):
    for p in peers:
        p.expect("op_ok", timeout=60, n=2)
    victim.expect("op_start", timeout=30)
    time.sleep(0.05)
    t_kill = victim.signal(sig)
    survivors = [p for p in peers if p is not victim]
    for p in survivors:
        fail = p.expect("op_fail", timeout=bound + 10)
        assert fail["error"] in ("PeerFailure", "Aborted"), fail
        assert fail["restored"], "src was not restored byte for byte"
        assert fail["t"] - t_kill < bound, f"failure noticed after {fail['t'] - t_kill:.2f}s"
    for p in survivors:
        ev = p.expect("op_ok", timeout=60, world=len(survivors))
        assert ev["value"] == sum(q.index + 1 for q in survivors)
    return t_kill


# star (29 s here) runs with `make test-all`; its abort/restore path is also covered in-process by
# test_group_exec.py::test_failure_at_every_receive_restores_every_input
@pytest.mark.parametrize("algorithm", ["ring", pytest.param("star", marks=pytest.mark.slow), "hierarchical"])
def test_sigkill_mid_all_reduce(cluster_factory, algorithm):
    # peer_timeout is long, so failing fast proves detection through the sockets, not heartbeats.
    cluster = cluster_factory(peer_timeout=20.0)
    peers = [cluster.spawn("loop", i, "--world", "4", "--count", str(8 << 20), "--ops", "8",
                           "--algorithm", algorithm, "--locality", "ab"[i % 2]) for i in range(4)]
    _survivors_fail_and_recover(peers, peers[2], signal.SIGKILL, cluster, bound=3.0)
    for p in peers:
        if p is not peers[2]:
            p.expect("done", timeout=120)


def test_sigstop_mid_all_reduce_detected_by_heartbeats(cluster_factory):
    cluster = cluster_factory(peer_timeout=2.0, heartbeat_interval=0.25, master_timeout=3.0)
    peers = [cluster.spawn("loop", i, "--world", "3", "--count", str(8 << 20), "--ops", "8") for i in range(3)]
    victim = peers[1]
    t_stop = _survivors_fail_and_recover(peers, victim, signal.SIGSTOP, cluster, bound=2.0 + 3.0)
    time.sleep(max(0.0, t_stop + 3.0 + 1.0 - time.time()))  # frozen for longer than master_timeout
    # Revived, the frozen peer reads that it was removed (Kicked, final): its freeze is not taken
    # for a lost master (a re-registration would slip it back into the group as if the master had
    # restarted), and the others are not disturbed.
    victim.signal(signal.SIGCONT)
    ev = victim.expect("fatal", timeout=30)
    assert ev["error"] == "Kicked", ev
    for p in peers:
        if p is not victim:
            p.expect("done", timeout=120)


def test_join_mid_run(cluster_factory):
    cluster = cluster_factory()
    peers = [cluster.spawn("loop", i, "--world", "2", "--count", "100000", "--ops", "40", "--pause", "0.05")
             for i in range(2)]
    for p in peers:
        p.expect("op_ok", timeout=60, n=3)
    newcomer = cluster.spawn("loop", 2, "--world", "3", "--count", "100000", "--ops", "10")
    for p in peers + [newcomer]:
        ev = p.expect("op_ok", timeout=60, world=3)
        assert ev["value"] == 1 + 2 + 3
    for p in peers + [newcomer]:
        p.expect("done", timeout=120)
    # Every op that completed with the same ring produced identical bytes everywhere.
    by_key = collections.defaultdict(set)
    for p in peers + [newcomer]:
        for e in p.log:
            if e["event"] == "op_ok":
                by_key[(e["world"], e["value"])].add(e["digest"])
    assert all(len(v) == 1 for v in by_key.values())


def test_mismatched_arguments_fail_everywhere(cluster_factory):
    cluster = cluster_factory()
    peers = [cluster.spawn("mismatch", i, "--world", "3") for i in range(3)]
    for p in peers:
        ev = p.expect("result", timeout=60)
        assert ev["error"] == "InvalidUsage" and "count" in ev["message"] and ev["restored"]
    for p in peers:
        assert p.expect("done", timeout=60)["value"] == 3.0


def test_deadline_when_a_peer_never_joins_the_op(cluster_factory):
    cluster = cluster_factory()
    peers = [cluster.spawn("lonely", i, "--world", "2") for i in range(2)]
    ev = peers[0].expect("result", timeout=60)
    assert ev["error"] == "PcclTimeout" and ev["restored"]
    for p in peers:
        p.expect("done", timeout=30)


def test_master_death_raises_master_unreachable(cluster_factory):
    # No master comes back within the (short) reconnect window.
    cluster = cluster_factory(master_timeout=1.5, heartbeat_interval=0.25, master_reconnect_timeout=2.0)
    peers = [cluster.spawn("idle", i, "--world", "2", "--duration", "30") for i in range(2)]
    for p in peers:
        p.expect("ready", timeout=60)
    cluster.master.close()
    for p in peers:
        ev = p.expect("result", timeout=20)
        assert ev["error"] == "MasterUnreachable"


def test_garbage_to_master_and_data_ports(cluster_factory):
    cluster = cluster_factory()
    peers = [cluster.spawn("loop", i, "--world", "2", "--count", "1000", "--ops", "60", "--pause", "0.05")
             for i in range(2)]
    for p in peers:
        p.expect("op_ok", timeout=60, n=2)
    host, port = cluster.master.address.rsplit(":", 1)
    # Raw TCP garbage at the master port (not even ZMTP).
    for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 40):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(payload)
    # A well-formed zmq client sending garbage frames and forged messages.
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://{cluster.master.address}")
    for frame in (b"", b"\xff" * 100, b"\x93\x01\xa8announce\x80", b"\x93\x63\xa4junk\x80"):
        d.send(frame)
    assert d.poll(3000), "the master did not answer garbage with a kick"
    d.close(0)
    ctx.term()
    # Garbage and silence at a peer's data port.
    status = cluster.master.status()
    data_ports = [int(tok.rsplit(":", 1)[1]) for line in status.splitlines() if " accepted" in line
                  for tok in line.split() if re.fullmatch(r"[\d.]+:\d+", tok)]
    assert data_ports
    idle = []
    for dp in data_ports:
        with socket.create_connection(("127.0.0.1", dp), timeout=2) as s:
            s.sendall(b"\x13" * 100)
        idle.append(socket.create_connection(("127.0.0.1", dp), timeout=2))  # never handshakes
    before = [sum(1 for e in p.log if e["event"] == "op_ok") for p in peers]
    for p, b in zip(peers, before):
        p.expect("op_ok", timeout=30, n=b + 5)
    for s in idle:
        s.close()
    for p in peers:
        p.expect("done", timeout=60)
    fails = [e for p in peers for e in p.log if e["event"] == "op_fail"]
    assert fails == []


def test_master_sigkill_and_restart_on_the_same_port_mid_all_reduce_loop(process_cluster):
    """kill -9 the master while 3 peers all-reduce in a loop; a new master (no state) starts on
    the same port; the peers fail what was in flight with MasterLost (input restored), re-register,
    re-form the group of 3 and go on with exact, bit-identical results."""
    cluster = process_cluster(master_reconnect_timeout=60.0, master_regroup_timeout=20.0)
    peers = [cluster.spawn("loop", i, "--world", "3", "--count", str(1 << 20), "--ops", "20", "--duration", "150")
             for i in range(3)]
    for p in peers:
        p.expect("op_ok", timeout=90, n=5)
    cluster.masters[0].kill()
    time.sleep(1.0)  # peers back off against a closed port meanwhile
    cluster.restart_master()
    for p in peers:
        p.expect("done", timeout=150)
    # What was in flight failed with a retryable error (a peer between two calls rides through
    # in are_peers_pending instead), and every failed op restored its input.
    failures = [e for p in peers for e in p.log if e["event"] in ("op_fail", "topology_fail")]
    assert all(e["error"] in ("MasterLost", "Aborted", "PeerFailure") for e in failures), failures
    assert all(e["restored"] for e in failures if e["event"] == "op_fail")
    assert not [e for p in peers for e in p.log if e["event"] in ("fatal", "crash")]
    by_n: dict = collections.defaultdict(set)
    for p in peers:
        oks = [e for p2 in [p] for e in p2.log if e["event"] == "op_ok"]
        assert len(oks) == 20
        for e in oks:
            assert e["world"] == 3 and e["value"] == 1 + 2 + 3 and e["uniform"], e
            by_n[e["n"]].add(e["digest"])
    assert all(len(d) == 1 for d in by_n.values())  # bit-identical on every peer, op by op
    print(f"master restart: {len(failures)} failed calls: {[e['error'] for e in failures]}")

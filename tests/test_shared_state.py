"""Shared-state sync with communicators in threads of this process (real master, real TCP):
election outcomes, revision rules, key mismatches, strategies, torch tensors, transfers."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import pccl
from pccl.shared_state import digest


@pytest.fixture
def master():
    with pccl.Master("127.0.0.1", 0) as m:
        yield m


def group(master, n, connections=2, hosts=None):
    """n connected communicators in one group (the first admits the others); ``hosts``: each
    peer's data address (advertised and listened on), default the communicator's own choice."""
    hosts = hosts or [None] * n
    comms = [pccl.Communicator(master.address, connections=connections, advertise_host=h, listen_host=h)
             for h in hosts]
    first, rest = comms[0].connect(), comms[1:]
    ts = [threading.Thread(target=c.connect) for c in rest]
    for t in ts:
        t.start()
    deadline = time.monotonic() + 30
    while master.core.peers and sum(not p.accepted for p in master.core.peers.values()) < n - 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.update_topology()
    for t in ts:
        t.join(30)
    assert all(c.world_size == n for c in comms)
    return comms


def together(fns, timeout=60):
    """Run one callable per peer at once; returns (results, errors)."""
    out, err = [None] * len(fns), [None] * len(fns)

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            err[i] = exc

    ts = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "a sync hung"
    return out, err


def sync_all(comms, states, strategies=None):
    strategies = strategies or [pccl.SyncStrategy.ENFORCE_POPULAR] * len(comms)
    return together([lambda c=c, s=s, st=st: c.sync_shared_state(s, st) for c, s, st in zip(comms, states, strategies)])


def make_state(seed, revision=1, n=1000, extra=None):
    rng = np.random.default_rng(seed)
    tensors = {"w": rng.standard_normal(n).astype(np.float32), "step": np.array([seed], dtype=np.int64)}
    tensors.update(extra or {})
    return pccl.SharedState(tensors, revision=revision)


def close_all(comms):
    for c in comms:
        c.close()


# ----------------------------------------------------------------------------------- API checks
def test_shared_state_rejects_bad_input():
    with pytest.raises(pccl.InvalidUsage):
        pccl.SharedState({})
    with pytest.raises(pccl.InvalidUsage):
        pccl.SharedState({"a": np.zeros(3)}, revision=-1)
    with pytest.raises(pccl.InvalidUsage, match="unknown keys"):
        pccl.SharedState({"a": np.zeros(3)}, allow_content_inequality=["b"])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(pccl.InvalidUsage, match="read-only"):
        pccl.SharedState({"a": ro}).views()
    with pytest.raises(pccl.InvalidUsage, match="contiguous"):
        pccl.SharedState({"a": np.zeros((4, 4))[:, 0]}).views()
    with pytest.raises(pccl.InvalidUsage, match="expected"):
        pccl.SharedState({"a": [1, 2]}).views()


def test_world_of_one_and_local_revision_rule(master):
    with pccl.Communicator(master.address) as c:
        s = make_state(1, revision=7)
        assert c.sync_shared_state(s) == pccl.SyncInfo(0, 0, 7)
        s.revision = 9
        with pytest.raises(pccl.InvalidUsage, match="exactly one"):
            c.sync_shared_state(s)
        s.revision = 8
        assert c.sync_shared_state(s).revision == 8
        with pytest.raises(pccl.InvalidUsage):
            c.sync_shared_state({"w": np.zeros(3)})


# ----------------------------------------------------------------------------------- elections
def test_identical_states_move_no_bytes_and_a_drifted_key_is_repaired(master):
    comms = group(master, 3)
    try:
        states = [make_state(0) for _ in comms]
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3 and all(i.rx_bytes == 0 and i.tx_bytes == 0 for i in infos)
        states[2]["w"][17] += 1.0  # drift on one peer: the two others outvote it
        for s in states:
            s.revision += 1
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3
        assert infos[2].rx_bytes == states[2]["w"].nbytes and infos[0].rx_bytes == infos[1].rx_bytes == 0
        assert infos[0].tx_bytes + infos[1].tx_bytes == states[2]["w"].nbytes
        assert len({digest(s["w"].view(np.uint8)) for s in states}) == 1
        assert [i.revision for i in infos] == [2, 2, 2]
    finally:
        close_all(comms)


def test_joiner_at_any_revision_adopts_the_group_and_then_receives_nothing(master):
    comms = group(master, 3)
    try:
        states = [make_state(0, revision=41), make_state(0, revision=41), make_state(5, revision=0)]
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3
        assert infos[2].rx_bytes == sum(a.nbytes for a in states[0].tensors.values())
        assert states[2].revision == 41
        for k in ("w", "step"):
            assert states[2][k].tobytes() == states[0][k].tobytes()
        for s in states:
            s.revision += 1
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3 and [i.rx_bytes for i in infos] == [0, 0, 0]
    finally:
        close_all(comms)


def test_revision_violation_fails_only_that_peer(master):
    comms = group(master, 3)
    try:
        states = [make_state(0) for _ in comms]
        assert sync_all(comms, states)[1] == [None] * 3
        states[0].revision += 1
        states[1].revision += 1
        states[2].revision += 2  # skipped one
        states[0]["w"][0] = 99.0  # the others still elect among themselves (a tie: smallest digest)
        infos, errs = sync_all(comms, states)
        assert isinstance(errs[2], pccl.InvalidUsage) and "exactly one" in str(errs[2])
        assert errs[0] is None and errs[1] is None
        assert infos[0].revision == infos[1].revision == 2
        # the violator fixes its revision (last synced + 1), is behind and catches up
        states[0].revision = states[1].revision = 3
        states[2].revision = 2
        states[2]["w"][1] = -7.0
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3 and states[2].revision == 3 and infos[2].rx_bytes == states[2]["w"].nbytes
        assert states[2]["w"].tobytes() == states[0]["w"].tobytes()
    finally:
        close_all(comms)


def test_mismatched_keys_or_shapes_fail_only_that_peer_naming_the_key(master):
    comms = group(master, 3)
    try:
        states = [make_state(0), make_state(0), make_state(0, n=999)]
        infos, errs = sync_all(comms, states)
        assert isinstance(errs[2], pccl.InvalidUsage) and "'w'" in str(errs[2])
        assert errs[0] is None and errs[1] is None
        for s in states[:2]:
            s.revision += 1
        states[2] = make_state(0, revision=2, extra={"extra": np.zeros(2)})
        infos, errs = sync_all(comms, states)
        assert isinstance(errs[2], pccl.InvalidUsage) and "'extra'" in str(errs[2])
        assert errs[0] is None and errs[1] is None
    finally:
        close_all(comms)


def test_send_only_and_receive_only(master):
    S = pccl.SyncStrategy
    comms = group(master, 3)
    try:
        states = [make_state(1), make_state(2), make_state(2)]  # the SEND_ONLY peer is outvoted 2:1 ...
        infos, errs = sync_all(comms, states, [S.SEND_ONLY, S.ENFORCE_POPULAR, S.RECEIVE_ONLY])
        assert errs == [None] * 3  # ... but it is the only candidate, so its content wins
        assert all(s["w"].tobytes() == states[0]["w"].tobytes() for s in states)
        assert infos[0].rx_bytes == 0 and infos[0].tx_bytes > 0
        for s in states:
            s.revision += 1
        states[0]["w"][3] = 5.0  # a SEND_ONLY peer that holds losing content must not receive
        infos, errs = sync_all(comms, states, [S.SEND_ONLY, S.SEND_ONLY, S.SEND_ONLY])
        assert isinstance(errs[0], pccl.InvalidUsage) and "SEND_ONLY" in str(errs[0])
        assert errs[1] is None and errs[2] is None
        states[0].revision = 2  # its last successful sync was at 1
        states[1].revision = states[2].revision = 3
        infos, errs = sync_all(comms, states, [S.RECEIVE_ONLY] * 3)
        assert all(isinstance(e, pccl.InvalidUsage) and "RECEIVE_ONLY" in str(e) for e in errs)
    finally:
        close_all(comms)


def test_allow_content_inequality_keys_stay_local_except_for_joiners(master):
    comms = group(master, 3)
    try:
        def st(seed, rev, local):
            s = make_state(0, revision=rev, extra={"local": np.full(4, local, dtype=np.float64)})
            s.allow_content_inequality = frozenset({"local"})
            return s
        states = [st(0, 4, 1.0), st(0, 4, 2.0), st(0, 0, 3.0)]
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3
        assert states[0]["local"][0] == 1.0 and states[1]["local"][0] == 2.0  # in step: kept
        assert states[2]["local"][0] in (1.0, 2.0)  # the joiner got one holder's copy (ties: smallest digest)
        assert infos[2].rx_bytes == 32
    finally:
        close_all(comms)


def test_torch_tensors_including_bfloat16(master):
    torch = pytest.importorskip("torch")
    comms = group(master, 2)
    try:
        def st(seed, rev):
            g = torch.Generator().manual_seed(seed)
            return pccl.SharedState({"a": torch.randn(33, generator=g).to(torch.bfloat16),
                                     "b": torch.randn(4, 5, generator=g)}, revision=rev)
        states = [st(0, 3), st(1, 0)]
        infos, errs = sync_all(comms, states)
        assert errs == [None, None]
        assert torch.equal(states[0]["a"], states[1]["a"]) and torch.equal(states[0]["b"], states[1]["b"])
        assert infos[1].rx_bytes == 33 * 2 + 20 * 4
    finally:
        close_all(comms)


def test_large_state_is_striped_across_all_holders():
    # small pieces (48 of them for 6 connections), so one fast holder cannot take them all
    master = pccl.Master("127.0.0.1", 0).start()
    comms = group(master, 4)
    for c in comms:
        c.config = c.config.replace(pipeline_bytes=256 << 10)
    try:
        big = np.random.default_rng(3).standard_normal(3 << 20).astype(np.float32)  # 12 MiB: 3 pieces each
        states = [pccl.SharedState({"big": big.copy()}, revision=1) for _ in range(3)]
        states.append(pccl.SharedState({"big": np.zeros_like(big)}, revision=0))
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 4
        assert states[3]["big"].tobytes() == big.tobytes()
        assert infos[3].rx_bytes == big.nbytes
        assert sum(1 for i in infos[:3] if i.tx_bytes > 0) >= 2, "more than one holder served"
    finally:
        close_all(comms)
        master.close()


def test_sync_refused_while_a_peer_waits_in_update_topology(master):
    comms = group(master, 2)
    try:
        states = [make_state(0), make_state(0)]

        def sync_then_update():
            try:
                comms[0].sync_shared_state(states[0])
            except pccl.Aborted as exc:  # the canonical loop: update the topology, then retry
                comms[0].update_topology()
                return exc
        out, errs = together([sync_then_update, comms[1].update_topology])
        assert errs == [None, None] and isinstance(out[0], pccl.Aborted)
        assert comms[0].revision == comms[1].revision
        assert sync_all(comms, states)[1] == [None, None]
    finally:
        close_all(comms)

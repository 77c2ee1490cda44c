"""optimize_topology over real TCP (communicators in threads): probes, re-wiring, status output."""
from __future__ import annotations

import numpy as np
import pytest

import pccl
from pccl.status import query_status
from test_shared_state import close_all, group, make_state, sync_all, together

FAST = pccl.Config(probe_seconds=0.2)


@pytest.fixture
def master():
    with pccl.Master("127.0.0.1", 0, config=FAST) as m:
        yield m


def test_optimize_measures_rewires_and_keeps_the_shared_state(master, monkeypatch):
    monkeypatch.setenv("PCCL_PROBE_SECONDS", "0.2")
    comms = group(master, 3, connections=1)
    try:
        states = [make_state(0) for _ in comms]
        assert sync_all(comms, states)[1] == [None] * 3
        before = comms[0].revision
        _, errs = together([c.optimize_topology for c in comms], timeout=120)
        assert errs == [None] * 3
        assert all(c.revision == before + 1 for c in comms)
        assert len({c.topology for c in comms}) == 1
        bw = master.core.bandwidth
        assert len(bw) == 6 and all(v > 0 for v in bw.values())
        # AUTO's model now uses the slowest measured link inside the (one) locality
        assert all(c._link_rates == (min(bw.values()), c.config.wan_bytes_per_second) for c in comms)
        assert {c.locality for c in comms} == {comms[0].locality}  # one locality: nothing measured between
        text = query_status(master.address)
        assert "bandwidth of group 0" in text and "state-rev" in text
        # the re-wired ring reduces correctly and the state survived: nothing moves at the next sync
        xs = [np.full(1000, i + 1, dtype=np.float32) for i in range(3)]
        _, errs = together([lambda c=c, x=x: c.all_reduce(x) for c, x in zip(comms, xs)])
        assert errs == [None] * 3 and all((x == 6).all() for x in xs)
        for s in states:
            s.revision += 1
        infos, errs = sync_all(comms, states)
        assert errs == [None] * 3 and all(i.rx_bytes == 0 for i in infos)
        # a second optimize measures nothing new and still commits a topology
        _, errs = together([c.optimize_topology for c in comms], timeout=60)
        assert errs == [None] * 3 and len(master.core.bandwidth) == 6
    finally:
        close_all(comms)


def test_optimize_and_update_votes_mix(master, monkeypatch):
    monkeypatch.setenv("PCCL_PROBE_SECONDS", "0.2")
    comms = group(master, 2, connections=1)
    try:
        _, errs = together([comms[0].optimize_topology, comms[1].update_topology], timeout=60)
        assert errs == [None, None] and len(master.core.bandwidth) == 2
    finally:
        close_all(comms)

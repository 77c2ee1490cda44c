"""Shared-state sync with real peer processes: a joiner catching up on 64 MiB, a distributor
killed mid-transfer, every holder lost (clear error, no hang)."""
from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.timeout(240)

MIB64 = 64 << 20


def test_joiner_receives_64_mib_then_nothing(cluster_factory):
    cluster = cluster_factory()
    holders = [cluster.spawn("state", i, "--holders", "3", "--world", "4", "--state-mib", "64", "--ops", "3",
                             "--pause", "0.2") for i in range(3)]
    for h in holders:
        h.expect("joined", timeout=90)
    joiner = cluster.spawn("state", 3, "--joiner", "--world", "4", "--state-mib", "64", "--ops", "3",
                           "--pause", "0.2")
    first = joiner.expect("synced", timeout=120, n=1)
    assert first["rx"] == MIB64 + 8 and first["revision"] == 100
    for n in (2, 3):
        assert joiner.expect("synced", timeout=60, n=n)["rx"] == 0  # nothing drifted: nothing moves
    digests = {p.expect("done", timeout=60) and
               next(e["digest"] for e in p.log if e["event"] == "synced" and e["n"] == 3) for p in holders + [joiner]}
    assert len(digests) == 1, "states differ after the syncs"
    served = [sum(e["tx"] for e in p.log if e["event"] == "synced") for p in holders]
    assert sum(served) == MIB64 + 8 and sum(1 for s in served if s > 0) >= 2, f"not multi-source: {served}"


def test_distributor_killed_mid_transfer_joiner_refetches_from_the_others(cluster_factory):
    cluster = cluster_factory(pipeline_bytes=1 << 20)
    # Every holder serves slowly (holder 0 the slowest), so the 16 pieces take long enough that
    # holder 0's fetch workers get some: on a quiet machine the fast holders alone once finished
    # the download before holder 0 served anything, and it exited unkilled.
    holders = [cluster.spawn("state", i, "--holders", "3", "--world", "4", "--state-mib", "16", "--ops", "2",
                             "--pause", "0.2", "--slow-serve", "0.3" if i == 0 else "0.2")
               for i in range(3)]
    for h in holders:
        h.expect("joined", timeout=90)
    joiner = cluster.spawn("state", 3, "--joiner", "--world", "4", "--state-mib", "16", "--ops", "2",
                           "--duration", "120")
    holders[0].expect("serving", timeout=120)
    holders[0].signal(signal.SIGKILL)
    first = joiner.expect("synced", timeout=120, n=1)
    assert first["rx"] == (16 << 20) + 8 and first["revision"] == 100
    survivors = holders[1:] + [joiner]
    digests = set()
    for p in survivors:
        p.expect("done", timeout=120)
        digests.add(next(e["digest"] for e in p.log if e["event"] == "synced" and e["n"] == 1))
    assert len(digests) == 1


def test_every_holder_dies_mid_transfer_state_lost_no_hang(cluster_factory):
    cluster = cluster_factory(pipeline_bytes=1 << 20)
    holder = cluster.spawn("state", 0, "--holders", "1", "--world", "2", "--state-mib", "8", "--ops", "1",
                           "--slow-serve", "0.5")
    holder.expect("joined", timeout=90)
    joiner = cluster.spawn("state", 1, "--joiner", "--world", "2", "--state-mib", "8", "--ops", "1",
                           "--duration", "30")
    holder.expect("serving", timeout=120)
    holder.signal(signal.SIGKILL)
    fail = joiner.expect("sync_fail", timeout=60)
    assert fail["error"] == "PeerFailure" and ("lost" in fail["message"] or "gone" in fail["message"]), fail
    joiner.expect("topology", timeout=60, world=1)

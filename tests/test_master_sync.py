"""The master core's shared-state sync and optimize_topology flows (pure: fake clock, no sockets)."""
from __future__ import annotations

from pccl.master_core import SYNC_TAG
from pccl.transports import messages as m
from test_master_core import CFG, H, of, to


def key(name="w", d=b"a", nbytes=16, unequal=False):
    return m.KeyRec(name=name, dtype="float32", shape=(4,), nbytes=nbytes, digest=d, allow_inequality=unequal)


def vote(revision=1, digests=(b"a",), strategy="enforce_popular", error=""):
    return m.SyncVote(revision=revision, strategy=strategy,
                      keys=tuple(key(f"k{i}", d) for i, d in enumerate(digests)), error=error)


def plans(out):
    return {s.conn: s.msg for s in of(out, m.SyncPlan)}


def test_sync_waits_for_every_member_then_plans_and_finishes_after_the_receivers():
    h = H()
    h.world("a", "b", "c")
    assert h.send("a", vote()) == [] and h.send("b", vote()) == []
    out = h.send("c", vote(revision=0, digests=(b"z",)))
    p = plans(out)
    assert set(p) == {"a", "b", "c"} and len({x.seq for x in p.values()}) == 1
    assert p["a"].fetch == () and not p["a"].final
    (f,) = p["c"].fetch
    assert f.key == 0 and f.digest == b"a" and set(f.holders) == {h.pid["a"], h.pid["b"]}
    assert p["c"].revision == 1
    out = h.send("c", m.SyncReport(seq=p["c"].seq, ok=True, message=""))
    assert sorted(s.conn for s in of(out, m.SyncDone)) == ["a", "b", "c"]
    assert h.core.syncs == {} and all(r.state_revision == 1 for r in h.core.peers.values())
    assert "state-rev" in h.core.status_text()


def test_sync_without_transfers_is_final_at_once():
    h = H()
    h.world("a", "b")
    h.send("a", vote())
    p = plans(h.send("b", vote()))
    assert all(x.final and x.fetch == () for x in p.values()) and h.core.syncs == {}


def test_peer_errors_go_to_that_peer_only():
    h = H()
    h.world("a", "b", "c")
    h.send("a", vote())
    h.send("b", vote(error="revision went backwards"))
    out = h.send("c", m.SyncVote(revision=1, strategy="enforce_popular", keys=(key("other"),), error=""))
    failed = {s.conn: s.msg for s in of(out, m.OpFailed)}
    assert failed["b"].message == "revision went backwards" and failed["b"].tag == SYNC_TAG
    assert "'k0'" in failed["c"].message or "'other'" in failed["c"].message
    assert set(plans(out)) == {"a"}


def test_unknown_strategy_is_an_error_for_that_peer():
    h = H()
    h.world("a", "b")
    h.send("a", vote())
    out = h.send("b", vote(strategy="whatever"))
    assert "unknown sync strategy" in to(out, "b")[0].message and set(plans(out)) == {"a"}


def test_a_dead_holder_does_not_fail_the_sync_and_a_dead_receiver_ends_it():
    h = H()
    h.world("a", "b", "c", "d")
    for c in "ab":
        h.send(c, vote())
    h.send("c", vote(digests=(b"y",)))
    p = plans(h.send("d", vote(digests=(b"x",))))
    seq = p["c"].seq
    out = h.core.disconnected("a", h.now)
    assert of(out, m.SyncDone) == [] and of(out, m.PeerDown)
    assert h.send("c", m.SyncReport(seq=seq, ok=True, message="")) == []
    out = h.core.disconnected("d", h.now)  # the last receiver dies: holders are released
    assert sorted(s.conn for s in of(out, m.SyncDone)) == ["b", "c"]


def test_sync_refused_in_a_dirty_group_and_while_someone_votes():
    h = H()
    h.world("a", "b", "c")
    h.send("b", m.VoteTopology(optimize=False, admit=True))
    out = h.send("a", vote())
    assert to(out, "a")[0].kind == "aborted"
    h.send("a", m.VoteTopology(optimize=False, admit=True))
    h.send("c", m.VoteTopology(optimize=False, admit=True))
    h.core.disconnected("c", h.now)
    out = h.send("a", vote())
    assert to(out, "a", m.PeerDown)[0].kind == "peer_failure"


def test_a_pending_sync_vote_is_failed_when_a_member_votes_on_the_topology():
    h = H()
    h.world("a", "b")
    h.send("a", vote())
    out = h.send("b", m.VoteTopology(optimize=False, admit=True))
    (f,) = of(out, m.OpFailed)
    assert f.conn == "a" and f.msg.tag == SYNC_TAG and f.msg.kind == "aborted"


def test_withdrawn_sync_vote_is_forgotten():
    h = H()
    h.world("a", "b")
    h.send("a", vote())
    h.send("a", m.Withdraw(tag=SYNC_TAG))
    assert h.core.announced == {}


# ----------------------------------------------------------------------------------- optimize_topology
def probes(out):
    return [(s.conn, s.msg) for s in of(out, m.Probe)]


def run_measurement(h, out, bw):
    """Answer every probe with bw[(src_conn, dst_id)] until the topology commits; returns it."""
    names = {v: k for k, v in h.pid.items()}
    for _ in range(100):
        topo = of(out, m.Topology)
        if topo:
            return topo[0].msg
        ps = probes(out)
        assert ps, "no probes and no topology"
        busy = [c for c, _ in ps] + [names[p.target] for _, p in ps]
        assert len(busy) == len(set(busy)), "a round shares a peer"
        out = []
        for c, p in ps:
            out += h.send(c, m.ProbeResult(round=p.round, target=p.target,
                                           bytes_per_second=bw.get((c, names[p.target]), 1e9)))
    raise AssertionError("measurement did not end")


def test_optimize_measures_every_pair_once_and_orders_the_ring_around_the_slow_link():
    h = H()
    h.world("a", "b", "c", "d")
    out = []
    for c in "abc":
        out += h.send(c, m.VoteTopology(optimize=c == "b", admit=True))
    assert of(out, m.Probe) == []
    out = h.send("d", m.VoteTopology(optimize=False, admit=True))
    slow = {("a", "b"): 1e6, ("b", "a"): 1e6}  # a and b must not be ring neighbours in either direction
    topo = run_measurement(h, out, slow)
    assert h.core.revision == 5  # four joins, one commit after the measurement    assert len(h.core.bandwidth) == 12
    ring = [mb.peer_id for mb in topo.members]
    a, b = h.pid["a"], h.pid["b"]
    i, j = ring.index(a), ring.index(b)
    assert (i - j) % 4 == 2, f"a and b are neighbours in {ring}"
    assert "bandwidth of group 0" in h.core.status_text()
    # the committed topology carries the slowest measured pair (one locality here), for AUTO
    assert [(r.group, r.inside, r.between) for r in topo.rates] == [(0, min(h.core.bandwidth.values()), 0.0)]
    # measured pairs are not measured again
    out = []
    for c in "abcd":
        out += h.send(c, m.VoteTopology(optimize=True, admit=True))
    assert of(out, m.Probe) == [] and sorted(s.conn for s in of(out, m.Topology)) == list("abcd")


def test_probe_round_times_out_and_a_dead_prober_is_skipped():
    h = H()
    h.world("a", "b", "c")
    out = []
    for c in "abc":
        out += h.send(c, m.VoteTopology(optimize=True, admit=True))
    assert probes(out)
    assert h.core.next_deadline() < h.now + CFG.probe_seconds + 30
    # nobody answers: rounds time out one after the other, then the topology commits anyway
    for _ in range(2000):
        h.now = h.core.next_deadline()
        for c in "abc":
            h.send(c, m.Heartbeat())
        out = h.core.tick(h.now)
        if of(out, m.Topology):
            break
    else:
        raise AssertionError("the measurement never ended")
    assert h.core.bandwidth == {}
    # a prober that dies mid-round is skipped
    out = []
    for c in "abc":
        out += h.send(c, m.VoteTopology(optimize=True, admit=True))
    first = probes(out)
    out = h.core.disconnected(first[0][0], h.now)
    names = {v: k for k, v in h.pid.items()}
    dead = first[0][0]
    for _ in range(2000):
        if of(out, m.Topology):
            break
        ps = [(c, p) for c, p in probes(out) + first[1:] if c != dead and names[p.target] != dead]
        first = []
        out = []
        for c, p in ps:
            out += h.send(c, m.ProbeResult(round=p.round, target=p.target, bytes_per_second=5e8))
        if not ps and not of(out, m.Topology):
            h.now = h.core.next_deadline()
            for c in "abc":
                if c != dead:
                    h.send(c, m.Heartbeat())
            out = h.core.tick(h.now)
    topo = of(out, m.Topology)[0].msg
    assert h.pid[dead] not in [mb.peer_id for mb in topo.members]


def test_stale_or_bogus_probe_results_are_ignored():
    h = H()
    h.world("a", "b")
    out = h.send("a", m.VoteTopology(optimize=True, admit=True))
    out += h.send("b", m.VoteTopology(optimize=False, admit=True))
    (c, p), = probes(out)[:1]
    assert h.send(c, m.ProbeResult(round=p.round + 5, target=p.target, bytes_per_second=1.0)) == []
    assert h.core.bandwidth == {}
    h.send(c, m.ProbeResult(round=p.round, target=p.target, bytes_per_second=float("inf")))
    assert h.core.bandwidth == {}


# ----------------------------------------------------------------------------------- random interleavings
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EVENTS = st.lists(st.tuples(st.sampled_from(["vote"] * 6 + ["report"] * 3 + ["fail_report", "die", "topology", "tick"]),
                            st.integers(0, 2), st.sampled_from([b"a", b"b", b"c"]), st.integers(0, 3)),
                  max_size=40)


@settings(max_examples=150, deadline=None)
@given(EVENTS)
def test_sync_flows_under_random_interleavings(events):
    """Whatever order votes, reports, deaths and topology votes come in: one plan per voter and
    sync, SyncDone only after a plan, at most once, only to live participants; no sync is left
    open once its receivers are gone; nothing raises."""
    h = H()
    names = list("abc")
    h.world(*names)
    live = set(names)
    plans_seen: dict[int, set[str]] = {}
    done_seen: dict[int, set[str]] = {}
    receivers: dict[str, int] = {}
    for kind, i, d, rev in events:
        c = names[i % len(names)]
        out = []
        if kind == "vote" and c in live:
            out = h.send(c, vote(revision=rev, digests=(d,)))
        elif kind in ("report", "fail_report") and c in receivers:
            out = h.send(c, m.SyncReport(seq=receivers.pop(c), ok=kind == "report", message="x"))
        elif kind == "die" and c in live and len(live) > 1:
            live.discard(c)
            receivers.pop(c, None)
            out = h.core.disconnected(c, h.now)
        elif kind == "topology" and c in live:
            out = h.send(c, m.VoteTopology(optimize=False, admit=True))
        elif kind == "tick":
            h.now += 0.5
            for x in live:
                h.send(x, m.Heartbeat())
            out = h.core.tick(h.now)
        for s in out:
            assert s.conn in live or isinstance(s.msg, m.Kicked)
            if isinstance(s.msg, m.SyncPlan):
                assert s.conn not in plans_seen.setdefault(s.msg.seq, set())
                plans_seen[s.msg.seq].add(s.conn)
                if s.msg.fetch:
                    receivers[s.conn] = s.msg.seq
            elif isinstance(s.msg, m.SyncDone):
                assert s.conn in plans_seen.get(s.msg.seq, set()), "SyncDone without a plan"
                assert s.conn not in done_seen.setdefault(s.msg.seq, set()), "two SyncDone"
                done_seen[s.msg.seq].add(s.conn)
        for seq, rec in h.core.syncs.items():
            assert rec.receivers, "a sync with no receiver left is closed"
            assert rec.receivers <= {h.pid[x] for x in live}


def test_topology_carries_one_rate_entry_per_group_however_many_pairs_were_measured():
    """AUTO's measured figures travel as one (inside, between) entry per group: with every pair
    of 40 peers measured, the topology message stays as small as the member list."""
    h = H()
    names = [f"p{i}" for i in range(40)]
    h.world(*names)
    ids = [h.pid[c] for c in names]
    h.core.bandwidth = {(a, b): 1e8 + 1e6 * ((a * 7 + b) % 50) for a in ids for b in ids if a != b}
    out = h.vote_all(*names)
    topos = [s.msg for s in of(out, m.Topology)]
    assert len(topos) == len(names)
    rates = topos[0].rates
    assert [(r.group, r.inside, r.between) for r in rates] == [(0, min(h.core.bandwidth.values()), 0.0)]
    bare = m.encode(m.Topology(revision=topos[0].revision, members=topos[0].members))
    assert len(m.encode(topos[0])) < len(bare) + 64  # 1560 measured pairs add one small entry

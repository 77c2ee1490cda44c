"""The master's pure state machine: focused scenarios, then a hypothesis stateful test.

No sockets, threads or clocks: ``now`` is a plain number and every output is a ``Send`` list.
"""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from pccl.config import Config
from pccl.errors import ERROR_KINDS
from pccl.master_core import MasterCore, Send
from pccl.transports import messages as m

CFG = Config(heartbeat_interval=0.5, peer_timeout=4.0, max_in_flight=3)


# --------------------------------------------------------------------------- helpers
class H:
    """A core plus a fake clock and a few conveniences."""

    def __init__(self, config: Config = CFG) -> None:
        self.core = MasterCore(config)
        self.now = 0.0
        self.pid: dict[str, int] = {}

    def send(self, conn, msg, now: float | None = None) -> list[Send]:
        return self.core.handle(conn, msg, self.now if now is None else now)

    def register(self, conn: str, group: int = 0) -> list[Send]:
        out = self.send(conn, m.Register(group=group, data_host="10.0.0.1", data_port=len(self.pid) + 1000,
                                         locality="here", name=conn))
        reg = [s.msg for s in out if s.conn == conn and isinstance(s.msg, m.Registered)]
        assert len(reg) == 1
        self.pid[conn] = reg[0].peer_id
        return out

    def vote_all(self, *conns: str) -> list[Send]:
        out: list[Send] = []
        for c in conns:
            out += self.send(c, m.VoteTopology(optimize=False, admit=True))
        return out

    def world(self, *conns: str, group: int = 0) -> None:
        """Register ``conns`` and have the accepted ones vote until all are accepted."""
        accepted: list[str] = []
        for c in conns:
            self.register(c, group)
            if accepted:
                out = self.vote_all(*accepted)
                assert any(isinstance(s.msg, m.Topology) for s in out)
            accepted.append(c)

    def announce(self, conn: str, tag: int = 1, count: int = 10, dtype: str = "float32", op: str = "sum",
                 kind: str = "all_reduce") -> list[Send]:
        return self.send(conn, m.Announce(tag=tag, kind=kind, count=count, dtype=dtype, op=op,
                                          algorithm="ring", quantization="none", error=""))

    def commence(self, *conns: str, tag: int = 1) -> m.Commence:
        out: list[Send] = []
        for c in conns:
            out += self.announce(c, tag)
        cms = of(out, m.Commence)
        assert sorted(s.conn for s in cms) == sorted(conns)
        return cms[0].msg

    def report(self, conn: str, seq: int, ok: bool = True, kind: str = "", message: str = "") -> list[Send]:
        return self.send(conn, m.OpReport(seq=seq, ok=ok, kind=kind, message=message))


def of(out: list[Send], cls: type) -> list[Send]:
    return [s for s in out if isinstance(s.msg, cls)]


def to(out: list[Send], conn, *skip: type) -> list:
    """Messages for ``conn``, without the types in ``skip``."""
    return [s.msg for s in out if s.conn == conn and not isinstance(s.msg, skip)]


# --------------------------------------------------------------------------- membership
def test_first_peer_is_accepted_at_once():
    h = H()
    out = h.register("a")
    assert [type(s.msg) for s in out] == [m.Registered, m.Topology]
    assert all(s.conn == "a" for s in out)
    reg, topo = out[0].msg, out[1].msg
    assert reg.accepted is False and reg.peer_id >= 1
    assert topo.revision == 1 == h.core.revision
    assert topo.members == (m.Member(peer_id=reg.peer_id, group=0, host="10.0.0.1", port=1000, locality="here"),)


def test_second_peer_waits_for_the_vote():
    h = H()
    h.register("a")
    out = h.register("b")
    assert [(s.conn, type(s.msg)) for s in out] == [("b", m.Registered)]
    assert to(h.send("a", m.PendingQuery(req=5)), "a") == [m.PendingReply(req=5, pending=True)]
    assert to(h.send("b", m.PendingQuery(req=6)), "b") == [m.PendingReply(req=6, pending=True)]
    out = h.send("a", m.VoteTopology(optimize=False, admit=True))
    topos = of(out, m.Topology)
    assert sorted(s.conn for s in topos) == ["a", "b"]
    assert {s.msg for s in topos} == {topos[0].msg}
    assert topos[0].msg.revision == 2
    assert [x.peer_id for x in topos[0].msg.members] == [h.pid["a"], h.pid["b"]]
    assert to(h.send("a", m.PendingQuery(req=7)), "a") == [m.PendingReply(req=7, pending=False)]


def test_commit_needs_every_accepted_vote_and_keeps_ring_order():
    h = H()
    h.world("a", "b", "c")
    h.register("d")
    h.register("e")
    assert of(h.vote_all("c", "a"), m.Topology) == []
    out = h.send("b", m.VoteTopology(optimize=False, admit=True))
    topo = of(out, m.Topology)[0].msg
    assert [x.peer_id for x in topo.members] == [h.pid[c] for c in "abcde"]
    assert sorted(s.conn for s in of(out, m.Topology)) == list("abcde")
    # a voter that dies no longer counts; survivors keep order, newcomers are appended by join order
    h.register("f")
    h.vote_all("a", "c", "d", "e")
    out = h.core.disconnected("b", h.now)
    topo = of(out, m.Topology)[0].msg
    assert [x.peer_id for x in topo.members] == [h.pid[c] for c in "acdef"]
    assert topo.revision == h.core.revision == 5


def test_revoting_is_idempotent_and_lone_vote_commits():
    h = H()
    h.register("a")
    out = h.send("a", m.VoteTopology(optimize=False, admit=True))
    assert [(s.conn, s.msg.revision) for s in of(out, m.Topology)] == [("a", 2)]  # nothing changed: still a commit
    h.register("b")
    h.register("c")
    assert of(h.send("a", m.VoteTopology(optimize=False, admit=True)), m.Topology)[0].msg.revision == 3
    assert of(h.vote_all("b", "b", "c", "c"), m.Topology) == []
    out = h.send("a", m.VoteTopology(optimize=False, admit=True))
    assert sorted(s.conn for s in of(out, m.Topology)) == ["a", "b", "c"]
    assert h.core.revision == 4
    assert not any(p.voted for p in h.core.peers.values())


def test_pending_peer_voting_is_kicked():
    h = H()
    h.register("a")
    h.register("b")
    out = h.send("b", m.VoteTopology(optimize=False, admit=True))
    assert [type(x) for x in to(out, "b")] == [m.Kicked]
    assert h.pid["b"] not in h.core.peers
    assert to(h.send("b", m.Heartbeat()), "b") == [m.Kicked(reason="unknown peer: you were removed; register again")]


def test_all_accepted_dead_admits_pending_without_a_vote():
    h = H()
    h.world("a", "b")
    h.register("c")
    h.core.disconnected("a", h.now)
    out = h.send("b", m.Leave())
    topo = of(out, m.Topology)
    assert [s.conn for s in topo] == ["c"]
    assert [x.peer_id for x in topo[0].msg.members] == [h.pid["c"]]


def test_pending_query_answers_every_registered_peer():
    h = H()
    h.register("a")
    for i in range(3):
        assert to(h.send("a", m.PendingQuery(req=i)), "a") == [m.PendingReply(req=i, pending=False)]
    h.register("b", group=1)
    assert to(h.send("a", m.PendingQuery(req=9)), "a") == [m.PendingReply(req=9, pending=True)]


def test_a_restarted_master_admits_rejoining_peers_even_on_admit_false_votes_but_not_newcomers():
    """After a master restart the old group's peers register again with ``rejoin``: the first is
    accepted alone; its admit=False votes (a retry inside a training step) let the other
    re-joining peers in and keep a genuine newcomer pending until an ordinary update."""
    h = H()

    def register(conn: str, rejoin: bool) -> None:
        out = h.send(conn, m.Register(group=0, data_host="10.0.0.1", data_port=2000 + len(h.pid), locality="here",
                                      name=conn, rejoin=rejoin))
        h.pid[conn] = to(out, conn, m.Topology)[0].peer_id

    register("a", True)
    assert h.core.ring == [h.pid["a"]]  # accepted alone at once, like any first peer
    register("new", False)
    assert to(h.send("a", m.PendingQuery(req=1)), "a") == [m.PendingReply(req=1, pending=True, rejoin=False)]
    register("b", True)
    assert to(h.send("a", m.PendingQuery(req=2)), "a") == [m.PendingReply(req=2, pending=True, rejoin=True)]
    out = h.send("a", m.VoteTopology(optimize=False, admit=False))
    topo = of(out, m.Topology)[0].msg
    assert [x.peer_id for x in topo.members] == [h.pid["a"], h.pid["b"]]
    assert sorted(s.conn for s in of(out, m.Topology)) == ["a", "b"]
    assert to(h.send("b", m.PendingQuery(req=3)), "b") == [m.PendingReply(req=3, pending=True, rejoin=False)]
    out = h.vote_all("a", "b")  # an ordinary update admits the newcomer
    assert [x.peer_id for x in of(out, m.Topology)[0].msg.members] == [h.pid["a"], h.pid["b"], h.pid["new"]]


def test_a_rejoin_naming_this_very_master_is_refused_one_naming_another_is_not():
    """A peer that took its own freeze (or a dropped connection) for a master restart re-registers
    with ``rejoin`` and the id of the master it lost. If that is this master, there was no restart:
    this master removed the peer, so it is refused (Kicked), not slipped back into its group."""
    h = H()
    h.world("a", "b")
    me = h.core.incarnation
    assert me > 0 and MasterCore(CFG).incarnation != me  # random per master process
    reg = [s.msg for s in h.register("c") if isinstance(s.msg, m.Registered)][0]
    assert reg.master == me  # told to every registering peer
    h.core.disconnected("b", 1.0)  # b's connection dropped: the master removed it
    out = h.send("b2", m.Register(group=0, data_host="10.0.0.1", data_port=1001, locality="here", name="b",
                                  rejoin=True, former_master=me))
    assert [type(x) for x in to(out, "b2")] == [m.Kicked] and "did not restart" in to(out, "b2")[0].reason
    assert "b2" not in h.core.by_conn
    out = h.send("b3", m.Register(group=0, data_host="10.0.0.1", data_port=1001, locality="here", name="b",
                                  rejoin=True, former_master=me ^ 1))  # lost another master: a real restart
    assert [type(x) for x in to(out, "b3")] == [m.Registered]
    assert h.core.peers[h.core.by_conn["b3"]].rejoin


def test_status_query_is_answered_even_for_unknown_connections():
    h = H()
    h.world("a", "b")
    out = h.send("stranger", m.StatusQuery(req=3))
    assert len(out) == 1 and out[0].conn == "stranger"
    reply = out[0].msg
    assert isinstance(reply, m.StatusReply) and reply.req == 3
    assert "revision 2" in reply.text and "accepted" in reply.text
    assert "stranger" not in h.core.by_conn


def test_status_text_shows_every_state():
    h = H()
    h.world("a", "b", "c")
    h.register("p", group=1)
    h.send("a", m.VoteTopology(optimize=False, admit=True))
    h.core.disconnected("b", h.now)
    text = h.core.status_text()
    assert "revision 3" in text
    assert "dead" in text and "pending" in text and "accepted*" in text
    assert "needs update_topology" in text
    assert "group 1" in text


# --------------------------------------------------------------------------- liveness
def test_heartbeat_timeout_kills_and_aborts():
    h = H()
    h.world("a", "b", "c")
    cm = h.commence("a", "b", "c")
    h.send("a", m.Heartbeat(), now=3.0)
    h.send("b", m.Heartbeat(), now=3.0)
    assert of(h.core.tick(3.9), m.Kicked) == []  # c last seen at 0: not yet
    out = h.core.tick(4.5)
    assert [type(x) for x in to(out, "c")] == [m.Kicked] and "missed heartbeats" in to(out, "c")[0].reason
    verdicts = of(out, m.Verdict)
    assert sorted(s.conn for s in verdicts) == ["a", "b"]
    assert all(v.msg.seq == cm.seq and not v.msg.ok and v.msg.kind == "peer_failure" for v in verdicts)
    assert h.core.ops == {}
    assert not h.core.peers[h.pid["c"]].alive
    # the group needs a topology update before the next collective
    assert to(h.announce("a", tag=2), "a")[0].kind == "peer_failure"
    # any message from the dead peer's connection is answered with Kicked
    assert [type(x) for x in to(h.send("c", m.Heartbeat(), now=4.6), "c")] == [m.Kicked]


def test_any_message_counts_as_heartbeat():
    h = H()
    h.world("a")
    h.send("a", m.PendingQuery(req=1), now=3.0)
    assert of(h.core.tick(6.9), m.Kicked) == []
    assert [type(x) for x in to(h.core.tick(7.1), "a")] == [m.Kicked]


def test_disconnect_kills_without_notification():
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b")
    out = h.core.disconnected("b", 1.0)
    assert to(out, "b") == []
    verdicts = to(out, "a", m.PeerDown)
    assert verdicts == [m.Verdict(seq=cm.seq, ok=False, kind="peer_failure", message=verdicts[0].message)]
    assert h.core.disconnected("b", 1.0) == []  # twice is harmless
    assert h.core.disconnected("nobody", 1.0) == []


def test_leave_aborts_ops_and_is_not_answered():
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b")
    out = h.send("b", m.Leave())
    assert to(out, "b") == []
    assert [(v.seq, v.ok) for v in to(out, "a", m.PeerDown)] == [(cm.seq, False)]
    assert h.core.ops == {}


def test_peer_down_goes_to_every_live_accepted_peer():
    h = H()
    h.world("a", "b", "c")
    h.register("x", group=1)
    h.vote_all("a", "b", "c")
    h.register("p")
    out = h.core.disconnected("b", 1.0)
    downs = of(out, m.PeerDown)
    assert sorted(s.conn for s in downs) == ["a", "c", "x"]  # all groups, not the pending one, not b
    assert {s.msg.peer_id for s in downs} == {h.pid["b"]}
    # a pending peer's death is nobody's business
    assert of(h.core.disconnected("p", 1.0), m.PeerDown) == []
    # nor is a second notice sent for the same peer
    assert of(h.core.tick(1.0), m.PeerDown) == []


def test_pending_peer_timeout_forgets_it():
    h = H()
    h.world("a")
    h.register("b")
    h.send("a", m.Heartbeat(), now=4.0)
    out = h.core.tick(4.5)
    assert [type(x) for x in to(out, "b")] == [m.Kicked]
    assert h.pid["b"] not in h.core.peers
    assert of(out, m.Topology) == []
    assert to(h.send("a", m.PendingQuery(req=1), now=4.5), "a") == [m.PendingReply(req=1, pending=False)]


def test_next_deadline():
    h = H()
    assert h.core.next_deadline() == math.inf
    h.register("a")
    d = h.core.next_deadline()
    assert math.isfinite(d) and d == 0.5
    assert h.core.tick(0.4) == []
    out = h.core.tick(d)
    assert to(out, "a") == [m.Heartbeat()]
    assert h.core.next_deadline() == 1.0
    h.send("a", m.Heartbeat(), now=0.9)
    assert h.core.next_deadline() == 1.0
    h.core.disconnected("a", 1.0)
    assert h.core.next_deadline() == math.inf


def test_heartbeats_go_only_to_quiet_live_peers():
    h = H()
    h.world("a", "b")
    h.register("c")
    h.send("a", m.PendingQuery(req=1), now=0.9)  # the reply counts as traffic to a
    out = h.core.tick(1.0)
    assert sorted(s.conn for s in of(out, m.Heartbeat)) == ["b", "c"]
    h.core.disconnected("b", 1.0)
    out = h.core.tick(1.5)
    assert sorted(s.conn for s in of(out, m.Heartbeat)) == ["a", "c"]


def test_tick_at_next_deadline_always_makes_progress():
    """Regression: tick() killed only when now - last_seen > peer_timeout, so tick(next_deadline())
    changed nothing and a fake-clock driver stalled at the same deadline forever."""
    h = H()
    h.register("a")  # at t=0; the master heartbeats it, it never answers
    seen = []
    for _ in range(50):
        d = h.core.next_deadline()
        if d == math.inf:
            break
        assert not seen or d > seen[-1], f"next_deadline stuck at {d}"
        seen.append(d)
        h.core.tick(d)
    assert not any(p.alive for p in h.core.peers.values())  # the silent peer was declared dead at its deadline


# --------------------------------------------------------------------------- collectives
def test_announce_agreement_commences_in_ring_order():
    h = H()
    h.world("a", "b", "c", "d")
    h.register("e")
    # make the ring order differ from registration order: b dies, e joins at the end
    h.core.disconnected("b", h.now)
    h.vote_all("a", "c", "d")
    ring = [h.pid[c] for c in "acde"]
    out: list[Send] = []
    for c in "edca":
        assert of(out, m.Commence) == []
        out = h.announce(c, tag=7)
    cms = of(out, m.Commence)
    assert sorted(s.conn for s in cms) == sorted("acde")
    cm = cms[0].msg
    assert all(s.msg == cm for s in cms)
    assert cm.participants == tuple(ring)
    assert cm.tag == 7 and cm.revision == h.core.revision
    assert cm.seq in h.core.ops


@pytest.mark.parametrize("field,value", [("count", 11), ("dtype", "float64"), ("op", "max"), ("kind", "broadcast")])
def test_mismatched_arguments_fail_everywhere(field, value):
    h = H()
    h.world("a", "b", "c")
    h.announce("a")
    h.announce("b", **{field: value})
    out = h.announce("c")
    fails = of(out, m.OpFailed)
    assert sorted(s.conn for s in fails) == ["a", "b", "c"]
    for s in fails:
        assert s.msg.kind == "invalid_usage" and s.msg.tag == 1
        assert field in s.msg.message and str(value) in s.msg.message
    assert of(out, m.Commence) == [] and h.core.ops == {}
    # nothing is left over: the same tag works next time
    assert h.commence("a", "b", "c").tag == 1


def test_all_ok_reports_give_one_verdict():
    h = H()
    h.world("a", "b", "c")
    cm = h.commence("a", "b", "c")
    assert h.report("a", cm.seq) == []
    assert h.report("b", cm.seq) == []
    out = h.report("c", cm.seq)
    assert sorted(s.conn for s in out) == ["a", "b", "c"]
    assert {s.msg for s in out} == {m.Verdict(seq=cm.seq, ok=True, kind="", message="")}
    assert h.core.ops == {} and h.core.dirty == {}
    assert h.report("a", cm.seq) == []  # late / duplicate reports are ignored
    # the group stays clean: the next collective commences
    assert h.commence("a", "b", "c", tag=1).seq == cm.seq + 1


@pytest.mark.parametrize("kind,want", [("peer_failure", "peer_failure"), ("timeout", "aborted"), ("", "aborted")])
def test_one_failure_aborts_all_and_dirties_the_group(kind, want):
    h = H()
    h.world("a", "b", "c")
    cm = h.commence("a", "b", "c")
    h.report("a", cm.seq)
    out = h.report("b", cm.seq, ok=False, kind=kind, message="link broke")
    verdicts = of(out, m.Verdict)
    assert sorted(s.conn for s in verdicts) == ["a", "b", "c"]
    assert all(s.msg.seq == cm.seq and s.msg.ok is False and s.msg.kind == want for s in verdicts)
    assert "link broke" in verdicts[0].msg.message
    assert h.report("c", cm.seq) == []  # decided already: no second verdict
    fail = to(h.announce("a", tag=2), "a")
    assert [(x.kind, x.tag) for x in fail] == [("peer_failure", 2)]
    # a commit (everyone votes) cleans the group
    out = h.vote_all("a", "b", "c")
    assert of(out, m.Topology) and h.core.dirty == {}
    assert h.commence("a", "b", "c", tag=2).participants == tuple(h.pid[c] for c in "abc")


def test_abort_fails_waiting_announcements_of_the_group():
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b", tag=1)
    h.announce("a", tag=2)
    out = h.report("b", cm.seq, ok=False, kind="peer_failure", message="x")
    assert [(x.tag, x.kind) for x in to(out, "a") if isinstance(x, m.OpFailed)] == [(2, "aborted")]
    assert h.core.announced == {}


def test_announce_while_a_member_votes_is_aborted():
    h = H()
    h.world("a", "b", "c")
    h.announce("a", tag=3)
    out = h.send("b", m.VoteTopology(optimize=False, admit=True))
    assert to(out, "a") == [m.OpFailed(tag=3, kind="aborted", message=to(out, "a")[0].message)]
    out = h.announce("c", tag=4)
    assert [(x.tag, x.kind) for x in to(out, "c")] == [(4, "aborted")]
    assert "update_topology" in to(out, "c")[0].message
    out = h.vote_all("a", "c")
    assert of(out, m.Topology)
    assert h.commence("a", "b", "c", tag=4).tag == 4


def test_vote_during_an_op_aborts_it():
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b")
    out = h.send("a", m.VoteTopology(optimize=False, admit=True))
    assert sorted(s.conn for s in of(out, m.Verdict)) == ["a", "b"]
    assert all(s.msg.kind == "aborted" and not s.msg.ok for s in of(out, m.Verdict))
    assert h.core.ops == {} and cm.seq not in h.core.ops


def test_withdraw_before_commence():
    h = H()
    h.world("a", "b")
    h.announce("a", tag=5)
    assert h.send("a", m.Withdraw(tag=5)) == []
    assert of(h.announce("b", tag=5), m.Commence) == []  # a's announcement is gone
    out = h.announce("a", tag=5)
    assert sorted(s.conn for s in of(out, m.Commence)) == ["a", "b"]
    assert h.send("a", m.Withdraw(tag=99)) == []  # unknown tag: nothing


def test_withdraw_after_commence_aborts():
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b", tag=5)
    h.report("b", cm.seq)
    out = h.send("a", m.Withdraw(tag=5))
    verdicts = of(out, m.Verdict)
    assert sorted(s.conn for s in verdicts) == ["a", "b"]
    assert all(s.msg == m.Verdict(seq=cm.seq, ok=False, kind="aborted", message=s.msg.message) for s in verdicts)
    assert h.report("a", cm.seq) == []
    assert [x.kind for x in to(h.announce("a", tag=6), "a")] == ["peer_failure"]


def test_duplicate_tag_is_invalid_usage():
    h = H()
    h.world("a", "b")
    h.announce("a", tag=1)
    out = h.announce("a", tag=1, count=99)
    assert [(x.tag, x.kind) for x in to(out, "a")] == [(1, "invalid_usage")]
    # the first announcement still stands
    out = h.announce("b", tag=1)
    assert sorted(s.conn for s in of(out, m.Commence)) == ["a", "b"]
    # and the tag is busy while its op is in flight
    out = h.announce("a", tag=1)
    assert [(x.tag, x.kind) for x in to(out, "a")] == [(1, "invalid_usage")]
    assert len(h.core.ops) == 1


def test_in_flight_limit():
    h = H()
    h.world("a", "b")
    for tag in range(CFG.max_in_flight):
        assert h.announce("a", tag=tag) == []
    out = h.announce("a", tag=100)
    assert [(x.tag, x.kind) for x in to(out, "a")] == [(100, "invalid_usage")]
    assert "in flight" in to(out, "a")[0].message


def test_refused_announcements_leave_no_state():
    """Regression: refusals used to leave an empty ``announced[(group, tag)]`` entry behind."""
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b", tag=7)
    for tag in range(CFG.max_in_flight - 1):
        h.announce("a", tag=tag)
    before = {k: dict(v) for k, v in h.core.announced.items()}
    refused = h.announce("a", tag=7)  # busy: its op is in flight
    for tag in range(100, 110):  # over the in-flight limit
        refused += h.announce("a", tag=tag)
    assert [s.msg.kind for s in refused] == ["invalid_usage"] * 11
    assert cm.seq in h.core.ops
    assert h.core.announced == before


def test_pending_peer_cannot_announce():
    h = H()
    h.world("a")
    h.register("b")
    out = h.announce("b")
    assert [(x.kind, x.tag) for x in to(out, "b")] == [("invalid_usage", 1)]
    assert h.core.peers[h.pid["b"]].alive


def test_groups_are_independent():
    h = H()
    h.world("a", "b")
    h.register("x", group=1)
    h.register("y", group=1)
    h.vote_all("a", "b")
    assert h.core.live_members(1) and [p.peer_id for p in h.core.live_members(1)] == [h.pid["x"], h.pid["y"]]
    cm0 = h.commence("a", "b", tag=1)
    cm1 = h.commence("x", "y", tag=1)
    assert cm0.participants == (h.pid["a"], h.pid["b"]) and cm1.participants == (h.pid["x"], h.pid["y"])
    assert cm0.seq != cm1.seq
    out = h.core.disconnected("y", h.now)
    assert [s.conn for s in of(out, m.Verdict)] == ["x"]
    assert cm0.seq in h.core.ops and 0 not in h.core.dirty and 1 in h.core.dirty
    h.report("a", cm0.seq)
    out = h.report("b", cm0.seq)
    assert {s.msg.ok for s in of(out, m.Verdict)} == {True}


def test_single_peer_group_commences_at_once():
    h = H()
    h.world("a")
    out = h.announce("a", tag=3)
    assert [type(x) for x in to(out, "a")] == [m.Commence]
    assert to(out, "a")[0].participants == (h.pid["a"],)


# --------------------------------------------------------------------------- misbehaviour
def test_protocol_error_kicks_known_and_unknown():
    h = H()
    h.world("a", "b")
    cm = h.commence("a", "b")
    out = h.core.protocol_error("a", "garbage", 1.0)
    assert [type(x) for x in to(out, "a")] == [m.Kicked]
    assert "garbage" in to(out, "a")[0].reason
    assert [v.ok for v in to(out, "b", m.PeerDown)] == [False]
    assert cm.seq not in h.core.ops
    out = h.core.protocol_error("zz", "noise", 1.0)
    assert [(s.conn, type(s.msg)) for s in out] == [("zz", m.Kicked)]
    assert "zz" not in h.core.by_conn


@pytest.mark.parametrize("msg", [m.VoteTopology(optimize=False, admit=True), m.PendingQuery(req=1), m.Withdraw(tag=1),
                                 m.OpReport(seq=1, ok=True, kind="", message=""), m.Heartbeat(),
                                 m.Announce(tag=1, kind="k", count=1, dtype="d", op="o", algorithm="a",
                                            quantization="q", error="")])
def test_unknown_connection_is_kicked(msg):
    h = H()
    h.world("a")
    out = h.send("ghost", msg)
    assert [(s.conn, type(s.msg)) for s in out] == [("ghost", m.Kicked)]
    assert "ghost" not in h.core.by_conn and len(h.core.peers) == 1


def test_unknown_connection_leaving_is_ignored():
    h = H()
    assert h.send("ghost", m.Leave()) == []


@pytest.mark.parametrize("msg", [m.Registered(peer_id=1, accepted=True), m.Verdict(seq=1, ok=True, kind="", message=""),
                                 m.Topology(revision=9, members=()), m.Kicked(reason="x"),
                                 m.Register(group=0, data_host="h", data_port=1, locality="", name="again")])
def test_peer_sending_forbidden_messages_is_kicked(msg):
    h = H()
    h.world("a", "b")
    out = h.send("b", msg)
    assert [type(x) for x in to(out, "b")] == [m.Kicked]
    assert not h.core.peers[h.pid["b"]].alive
    assert h.core.revision == 2


def test_reports_for_unknown_or_foreign_ops_are_ignored():
    h = H()
    h.world("a", "b")
    h.register("x", group=1)
    h.vote_all("a", "b")
    cm = h.commence("a", "b")
    assert h.report("x", cm.seq) == []
    assert h.report("x", cm.seq, ok=False) == []
    assert h.report("a", 12345) == []
    assert cm.seq in h.core.ops


def test_reregistering_after_death_gets_a_new_id():
    h = H()
    h.world("a", "b")
    old = h.pid["b"]
    h.core.disconnected("b", 1.0)
    h.register("b")
    assert h.pid["b"] != old
    out = h.send("a", m.VoteTopology(optimize=False, admit=True))
    topo = of(out, m.Topology)[0].msg
    assert [x.peer_id for x in topo.members] == [h.pid["a"], h.pid["b"]]
    assert old not in h.core.peers


# =========================================================================== stateful test
SCFG = CFG
BASE_ARGS = dict(kind="all_reduce", count=8, dtype="float32", op="sum", algorithm="ring", quantization="none",
                 error="")
VARIANTS = [{}] * 7 + [{"count": 9}, {"dtype": "int32"}, {"op": "max"}]
FORBIDDEN = [m.Registered(peer_id=1, accepted=True), m.Verdict(seq=1, ok=True, kind="", message=""),
             m.Topology(revision=1, members=()), m.Kicked(reason="x"), m.PeerDown(peer_id=1, reason="x"),
             m.Commence(tag=1, seq=1, revision=1, participants=(1,)), m.StatusReply(req=1, text="")]
STRANGER_MSGS = [m.Heartbeat(), m.Leave(), m.VoteTopology(optimize=False, admit=True), m.PendingQuery(req=1), m.Withdraw(tag=1),
                 m.OpReport(seq=1, ok=True, kind="", message=""), m.StatusQuery(req=2),
                 m.Announce(tag=1, **BASE_ARGS)] + FORBIDDEN
IDX = st.integers(0, 1 << 16)


class SimPeer:
    """A client as the master should see it: it only does what a real Communicator would."""

    def __init__(self, conn: str, group: int, host: str, port: int, locality: str) -> None:
        self.conn, self.group, self.host, self.port, self.locality = conn, group, host, port, locality
        self.pid: int | None = None
        self.state = "new"  # new -> pending -> accepted -> dead
        self.voting = False
        self.revision = 0
        self.announced: dict[int, m.Announce] = {}  # waiting for Commence or OpFailed
        self.ops: dict[int, dict] = {}  # commenced, waiting for the verdict
        self.downs: set[int] = set()
        self.last_rx = -math.inf

    @property
    def alive(self) -> bool:
        return self.state in ("pending", "accepted")

    def busy_tags(self) -> set[int]:
        return set(self.announced) | {o["tag"] for o in self.ops.values()}


class MasterMachine(RuleBasedStateMachine):
    """Random interleavings of joins, votes, leaves, crashes, timeouts, collectives and misbehaviour.

    Simulated peers behave like real clients (they vote only when accepted, announce only when
    accepted and not voting, report only ops they got Commence for); the ``misbehave`` rule sends
    what no client should. Every core call goes through ``step``, which delivers the output to the
    simulated peers (checking each message makes sense to its receiver) and then checks:
    membership and the revision change only with a Topology (revision +1, survivors in ring order
    then newcomers by id); no Commence before every live member of the group announced the tag with
    equal arguments, none in a dirty group or while a member votes; every op gets one verdict value,
    ok only when every participant reported ok, and every live participant hears it; when every
    live accepted peer has voted a commit happened; the core's announcements, dirty groups and live
    peers equal the model's; every accepted peer hears PeerDown for each accepted peer that dies.
    """

    def __init__(self) -> None:
        super().__init__()
        self.core = MasterCore(SCFG)
        self.now = 0.0
        self.peers: dict[str, SimPeer] = {}
        self.by_pid: dict[int, SimPeer] = {}
        self.n = 0
        self.revision = 0
        self.members: tuple[int, ...] = ()  # the last topology, ring order
        self.commenced: dict[int, dict] = {}
        self.reports: dict[int, dict[int, bool]] = {}
        self.verdict: dict[int, bool] = {}
        self.decided: set[int] = set()
        self.dirty: set[int] = set()
        # (dead peer, peers that must hear PeerDown): filled by mark_dead, checked after the step
        self.expected_downs: list[tuple[int, set[int]]] = []

    # ------------------------------------------------------------------ model helpers
    def pick(self, cands: list[SimPeer], i: int) -> SimPeer | None:
        cands = sorted(cands, key=lambda p: p.conn)
        return cands[i % len(cands)] if cands else None

    def with_state(self, *states: str) -> list[SimPeer]:
        return [p for p in self.peers.values() if p.state in states]

    def accepted_in(self, group: int) -> list[SimPeer]:
        return [self.by_pid[pid] for pid in self.members
                if self.by_pid[pid].state == "accepted" and self.by_pid[pid].group == group]

    def mark_dead(self, p: SimPeer) -> None:
        if p.state == "accepted":
            self.dirty.add(p.group)
            others = {q.pid for q in self.with_state("accepted") if q is not p}
            self.expected_downs.append((p.pid, others))
        p.state = "dead"
        p.voting = False
        p.announced.clear()
        p.ops.clear()

    # ------------------------------------------------------------------ one core call, checked
    def step(self, call, refusal: tuple[str, int] | None = None) -> list[Send]:
        core = self.core
        pre_ring = list(core.ring)
        pre_acc = {pid for pid, p in core.peers.items() if p.accepted}
        pre_rev = core.revision
        pre_ops = set(core.ops)
        pre_decided = core.decided
        self.topologies: list[m.Topology] = []
        self.topo_recipients: list[int] = []
        self.new_seqs: list[int] = []
        self.refusal = refusal
        self.refused: list[m.OpFailed] = []
        self.failed = True  # until this step checks out (teardown must not mask the real failure)
        out = call()  # the core must never raise
        assert isinstance(out, list) and all(isinstance(s, Send) for s in out)
        for s in out:
            self.deliver(s, pre_ops)
        self.check(pre_ring, pre_acc, pre_rev, pre_ops, pre_decided)
        self.failed = False
        return out

    def deliver(self, s: Send, pre_ops: set[int]) -> None:
        msg = s.msg
        peer = self.peers.get(s.conn)
        if peer is None or peer.state == "dead":
            assert isinstance(msg, (m.Kicked, m.StatusReply)), f"{msg!r} sent to {s.conn}, which is not a live peer"
            return
        peer.last_rx = self.now
        if isinstance(msg, m.Registered):
            assert peer.state == "new" and msg.accepted is False
            assert msg.peer_id not in self.by_pid, "peer id reused"
            peer.pid, peer.state = msg.peer_id, "pending"
            self.by_pid[msg.peer_id] = peer
        elif isinstance(msg, m.Topology):
            self.on_topology(peer, msg)
        elif isinstance(msg, m.Commence):
            self.on_commence(peer, msg)
        elif isinstance(msg, m.OpFailed):
            assert msg.kind in ERROR_KINDS
            if self.refusal == (s.conn, msg.tag) and not self.refused:
                self.refused.append(msg)
                return
            assert msg.tag in peer.announced, f"OpFailed for tag {msg.tag} that {peer.conn} has not announced"
            del peer.announced[msg.tag]
        elif isinstance(msg, m.Verdict):
            assert msg.seq in self.commenced, f"verdict for unknown op {msg.seq}"
            assert msg.seq in pre_ops and msg.seq not in self.decided, f"second verdict for op {msg.seq}"
            assert msg.seq in peer.ops, f"verdict for op {msg.seq} that {peer.conn} is not in"
            assert self.verdict.setdefault(msg.seq, msg.ok) == msg.ok, f"op {msg.seq} got both verdicts"
            if msg.ok:
                parts = self.commenced[msg.seq]["participants"]
                assert all(self.reports[msg.seq].get(pid) is True for pid in parts), "commit without all ok"
            else:
                assert msg.kind in ERROR_KINDS
                self.dirty.add(self.commenced[msg.seq]["group"])
            del peer.ops[msg.seq]
        elif isinstance(msg, m.PeerDown):
            assert peer.state == "accepted"
            dead = self.by_pid.get(msg.peer_id)
            assert dead is not None and dead.state == "dead", f"PeerDown for live peer {msg.peer_id}"
            assert msg.peer_id not in peer.downs, "PeerDown sent twice"
            peer.downs.add(msg.peer_id)
        elif isinstance(msg, m.Kicked):
            self.mark_dead(peer)
        else:
            assert isinstance(msg, (m.Heartbeat, m.PendingReply, m.StatusReply)), f"unexpected {msg!r}"

    def on_topology(self, peer: SimPeer, msg: m.Topology) -> None:
        if not self.topologies or msg.revision != self.topologies[-1].revision:
            assert msg.revision == self.revision + 1, "revisions go up by one per commit"
            survivors = [pid for pid in self.members if self.by_pid[pid].state == "accepted"]
            newcomers = sorted(p.pid for p in self.with_state("pending"))
            assert [x.peer_id for x in msg.members] == survivors + newcomers
            for x in msg.members:
                p = self.by_pid[x.peer_id]
                assert (x.group, x.host, x.port, x.locality) == (p.group, p.host, p.port, p.locality)
            if self.topologies:
                assert sorted(self.topo_recipients) == sorted(self.members)
            self.revision, self.members = msg.revision, tuple(survivors + newcomers)
            self.topologies.append(msg)
            self.topo_recipients = []
            self.dirty.clear()
        assert msg == self.topologies[-1]
        assert peer.pid in self.members and peer.pid not in self.topo_recipients
        self.topo_recipients.append(peer.pid)
        assert peer.state in ("pending", "accepted")
        peer.state, peer.voting, peer.revision = "accepted", False, msg.revision

    def on_commence(self, peer: SimPeer, cm: m.Commence) -> None:
        info = self.commenced.get(cm.seq)
        if info is None:
            g = peer.group
            assert g not in self.dirty, f"op {cm.seq} commenced in group {g}, which needs a topology update"
            group = self.accepted_in(g)
            assert list(cm.participants) == [p.pid for p in group], "participants are the live group in ring order"
            assert cm.revision == self.revision
            anns = [p.announced.get(cm.tag) for p in group]
            assert None not in anns, f"op {cm.seq} commenced before every live member announced tag {cm.tag}"
            assert len(set(anns)) == 1, "commenced with disagreeing arguments"
            assert not any(p.voting for p in group), "commenced while a member waits in update_topology"
            info = self.commenced[cm.seq] = {"group": g, "tag": cm.tag, "participants": cm.participants,
                                             "msg": cm, "got": set()}
            self.reports[cm.seq] = {}
            self.new_seqs.append(cm.seq)
        assert cm == info["msg"]
        assert peer.pid in cm.participants and peer.pid not in info["got"]
        info["got"].add(peer.pid)
        assert cm.tag in peer.announced
        del peer.announced[cm.tag]
        peer.ops[cm.seq] = {"tag": cm.tag, "reported": None}

    def check(self, pre_ring, pre_acc, pre_rev, pre_ops, pre_decided) -> None:
        core = self.core
        # revisions only go up; membership changes only with a Topology
        assert core.revision >= pre_rev and core.revision == self.revision
        acc = {pid for pid, p in core.peers.items() if p.accepted}
        if list(core.ring) != pre_ring or acc != pre_acc or core.revision != pre_rev:
            assert self.topologies, "the accepted set changed without a Topology"
        if self.topologies:
            assert sorted(self.topo_recipients) == sorted(self.members)
            assert list(core.ring) == list(self.members)
        # live sets agree
        live = {p.pid for p in self.with_state("pending", "accepted")}
        assert {pid for pid, p in core.peers.items() if p.alive} == live
        # a dead peer's missing vote never blocks; the first peer is never kept waiting
        live_acc = self.with_state("accepted")
        assert not (live_acc and all(p.voting for p in live_acc)), "every live peer voted but nothing committed"
        assert live_acc or not self.with_state("pending"), "pending peers wait although nobody can vote"
        # ops: every decided op decided once, and every live participant was told
        assert set(core.ops) <= set(self.commenced)
        newly = pre_ops - set(core.ops)
        assert not (newly & self.decided)
        assert core.decided == pre_decided + len(newly)
        self.decided |= newly
        for seq in self.new_seqs:
            assert self.commenced[seq]["got"] == set(self.commenced[seq]["participants"])
        for p in self.with_state("accepted"):
            assert set(p.ops) <= set(core.ops), f"{p.conn} never got the verdict of {set(p.ops) - set(core.ops)}"
        for seq in newly:
            if any(self.by_pid[pid].alive for pid in self.commenced[seq]["participants"]):
                assert seq in self.verdict
        # announcements the master holds are exactly those the clients wait on
        held = {(g, tag, pid) for (g, tag), d in core.announced.items() for pid in d}
        waiting = {(p.group, tag, p.pid) for p in self.with_state("accepted") for tag in p.announced}
        assert held == waiting
        for p in self.with_state("accepted"):
            for tag in p.announced:
                assert not all(tag in q.announced for q in self.accepted_in(p.group)), "announced by all, not started"
        # while a member waits in update_topology, its group holds no announcements (they failed)
        for p in self.with_state("accepted"):
            if p.voting:
                assert not any(q.announced for q in self.accepted_in(p.group)), "announcement survived a vote"
        # dirty groups as the model predicts
        assert set(core.dirty) == self.dirty
        # everyone accepted when a peer died heard about it
        for dead, recipients in self.expected_downs:
            for pid in recipients:
                assert dead in self.by_pid[pid].downs, f"peer {pid} never heard that {dead} is down"
        self.expected_downs = []

    # ------------------------------------------------------------------ well-behaved clients
    @initialize(groups=st.lists(st.sampled_from([0, 0, 1]), min_size=1, max_size=5), vote=st.booleans())
    def first(self, groups, vote):
        """Start from a world of a few peers (usually admitted already, as after a first update_topology)."""
        for g in groups:
            self.register(g)
        if vote:
            self.everyone_votes(random.Random(0))

    @rule(group=st.sampled_from([0, 0, 0, 1]))
    def register(self, group):
        if len(self.with_state("pending", "accepted")) >= 7:
            return
        self.n += 1
        conn = f"c{self.n}"
        p = self.peers[conn] = SimPeer(conn, group, f"10.0.{group}.{self.n}", 1000 + self.n, f"site{group}")
        self.step(lambda: self.core.handle(conn, m.Register(group=group, data_host=p.host, data_port=p.port,
                                                            locality=p.locality, name=conn), self.now))
        assert p.state in ("pending", "accepted")

    @rule(kind=st.sampled_from(["heartbeat", "pending_query", "status"]), i=IDX, req=st.integers(0, 10))
    def chatter(self, kind, i, req):
        {"heartbeat": lambda: self.heartbeat(i), "pending_query": lambda: self.pending_query(i, req),
         "status": lambda: self.status(i)}[kind]()

    def heartbeat(self, i):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p:
            assert self.step(lambda: self.core.handle(p.conn, m.Heartbeat(), self.now)) == []

    def pending_query(self, i, req):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p:
            out = self.step(lambda: self.core.handle(p.conn, m.PendingQuery(req=req), self.now))
            assert [s.msg for s in out] == [m.PendingReply(req=req, pending=bool(self.with_state("pending")))]

    def status(self, i):
        conn = self.pick(list(self.peers.values()), i).conn if self.peers and i % 2 else "status-cli"
        out = self.step(lambda: self.core.handle(conn, m.StatusQuery(req=i), self.now))
        assert len(out) == 1 and out[0].msg.req == i and f"revision {self.revision}" in out[0].msg.text

    @rule(i=IDX)
    def vote(self, i):
        p = self.pick([q for q in self.with_state("accepted") if not q.voting], i)
        if p:
            p.voting = True
            self.step(lambda: self.core.handle(p.conn, m.VoteTopology(optimize=False, admit=True), self.now))
            assert not p.announced and not p.ops  # its own announcements and ops were failed

    @rule(i=IDX, tag=st.integers(0, 3), variant=st.integers(0, len(VARIANTS) - 1))
    def announce(self, i, tag, variant):
        p = self.pick([q for q in self.with_state("accepted") if not q.voting and tag not in q.busy_tags()
                       and len(q.busy_tags()) < SCFG.max_in_flight], i)
        if not p:
            return
        msg = m.Announce(tag=tag, **{**BASE_ARGS, **VARIANTS[variant]})
        expect = ("peer_failure" if p.group in self.dirty else
                  "aborted" if any(q.voting for q in self.accepted_in(p.group)) else None)
        p.announced[tag] = msg
        out = self.step(lambda: self.core.handle(p.conn, msg, self.now))
        if expect:
            got = [s.msg for s in out if s.conn == p.conn]
            assert [(x.tag, x.kind) for x in got if isinstance(x, m.OpFailed)] == [(tag, expect)], got

    @rule(i=IDX, j=IDX)
    def withdraw(self, i, j):
        p = self.pick([q for q in self.with_state("accepted") if q.busy_tags()], i)
        if not p:
            return
        tag = sorted(p.busy_tags())[j % len(p.busy_tags())]
        if tag in p.announced:
            del p.announced[tag]
            assert self.step(lambda: self.core.handle(p.conn, m.Withdraw(tag=tag), self.now)) == []
        else:
            (seq,) = [s for s, o in p.ops.items() if o["tag"] == tag]
            self.step(lambda: self.core.handle(p.conn, m.Withdraw(tag=tag), self.now))
            assert seq not in p.ops and self.verdict[seq] is False

    @rule(i=IDX, j=IDX, ok=st.booleans(), kind=st.sampled_from(["peer_failure", "timeout", "protocol"]))
    def report(self, i, j, ok, kind):
        p = self.pick([q for q in self.with_state("accepted") if any(o["reported"] is None for o in q.ops.values())], i)
        if not p:
            return
        seqs = sorted(s for s, o in p.ops.items() if o["reported"] is None)
        seq = seqs[j % len(seqs)]
        p.ops[seq]["reported"] = ok
        self.reports[seq][p.pid] = ok
        self.step(lambda: self.core.handle(p.conn, m.OpReport(seq=seq, ok=ok, kind="" if ok else kind,
                                                              message="" if ok else "it broke"), self.now))
        parts = self.commenced[seq]["participants"]
        if not ok:
            assert self.verdict.get(seq) is False and seq not in self.core.ops
        elif all(self.reports[seq].get(pid) is True for pid in parts):
            assert self.verdict.get(seq) is True and seq not in self.core.ops
        else:
            assert seq in self.core.ops

    @rule(how=st.sampled_from(["leave", "crash", "timeout"]), i=IDX)
    def die(self, how, i):
        {"leave": self.leave, "crash": self.crash, "timeout": self.heartbeat_timeout}[how](i)

    def leave(self, i):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p:
            self.mark_dead(p)
            out = self.step(lambda: self.core.handle(p.conn, m.Leave(), self.now))
            assert [s for s in out if s.conn == p.conn] == []

    def crash(self, i):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p:
            self.mark_dead(p)
            out = self.step(lambda: self.core.disconnected(p.conn, self.now))
            assert [s for s in out if s.conn == p.conn] == []

    def heartbeat_timeout(self, i):
        victim = self.pick(self.with_state("pending", "accepted"), i)
        if not victim:
            return
        self.now += SCFG.peer_timeout + 0.25
        for p in self.with_state("pending", "accepted"):
            if p is not victim:
                self.step(lambda: self.core.handle(p.conn, m.Heartbeat(), self.now))
        out = self.step(lambda: self.core.tick(self.now))
        assert victim.state == "dead"
        assert [type(s.msg) for s in out if s.conn == victim.conn] == [m.Kicked]
        self.check_heard()

    def check_heard(self) -> None:
        """After tick(now) every live peer has heard from the master within one heartbeat interval."""
        for p in self.with_state("pending", "accepted"):
            assert self.now - p.last_rx < SCFG.heartbeat_interval, f"{p.conn} last heard {p.last_rx}"

    # ------------------------------------------------------------------ what whole groups do together
    @rule(order=st.randoms(use_true_random=False))
    def everyone_votes(self, order):
        """The usual update_topology round: every accepted peer votes, in some order."""
        peers = sorted(self.with_state("accepted"), key=lambda p: p.conn)
        order.shuffle(peers)
        for p in peers:
            if p.state == "accepted" and not p.voting:
                p.voting = True
                self.step(lambda: self.core.handle(p.conn, m.VoteTopology(optimize=False, admit=True), self.now))

    @rule(group=st.integers(0, 1), tag=st.integers(0, 3), odd=st.integers(-1, 12),
          variant=st.integers(1, len(VARIANTS) - 1), order=st.randoms(use_true_random=False))
    def group_collective(self, group, tag, odd, variant, order):
        """Every member of a group announces the same collective (member ``odd`` may disagree)."""
        peers = sorted(self.accepted_in(group), key=lambda p: p.conn)
        order.shuffle(peers)
        for k, p in enumerate(peers):
            if p.state != "accepted" or p.voting or tag in p.busy_tags() or len(p.busy_tags()) >= SCFG.max_in_flight:
                continue
            msg = m.Announce(tag=tag, **{**BASE_ARGS, **(VARIANTS[variant] if k == odd else {})})
            p.announced[tag] = msg
            self.step(lambda: self.core.handle(p.conn, msg, self.now))

    @rule(fail=st.integers(-1, 20), order=st.randoms(use_true_random=False))
    def everyone_reports(self, fail, order):
        """Every participant of every open op reports; report number ``fail`` (if any) is a failure."""
        todo = [(p, seq) for p in self.with_state("accepted") for seq, o in p.ops.items() if o["reported"] is None]
        todo.sort(key=lambda x: (x[0].conn, x[1]))
        order.shuffle(todo)
        for k, (p, seq) in enumerate(todo):
            if p.state == "accepted" and seq in p.ops:
                ok = k != fail
                p.ops[seq]["reported"] = ok
                self.reports[seq][p.pid] = ok
                self.step(lambda: self.core.handle(p.conn, m.OpReport(seq=seq, ok=ok, kind="" if ok else "peer_failure",
                                                                      message="" if ok else "link broke"), self.now))

    @rule(group=st.sampled_from([0, 0, 1]), tag=st.integers(0, 3), fail=st.sampled_from([-1, -1, -1, 0, 1, 2]),
          order=st.randoms(use_true_random=False))
    def training_step(self, group, tag, fail, order):
        """What a training loop does: update the topology if needed, run one collective, report."""
        if self.dirty or self.with_state("pending") or any(p.voting for p in self.with_state("accepted")):
            self.everyone_votes(order)
        self.group_collective(group, tag, -1, 1, order)
        self.everyone_reports(fail, order)

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5]), quiet=st.integers(0, 4))
    def advance(self, dt, quiet):
        """Time passes; the peers heartbeat as real clients do, unless they all went quiet."""
        self.now += dt
        if quiet:
            for p in self.with_state("pending", "accepted"):
                self.step(lambda: self.core.handle(p.conn, m.Heartbeat(), self.now))
        self.step(lambda: self.core.tick(self.now))
        self.check_heard()
        d = self.core.next_deadline()
        assert (d == math.inf) == (not self.with_state("pending", "accepted"))

    # ------------------------------------------------------------------ misbehaviour: the core must cope
    @rule(data=st.data())
    def misbehave(self, data):
        kind = data.draw(st.sampled_from(["stranger", "dead_peer_speaks", "pending_votes", "forbidden_message",
                                          "protocol_violation", "foreign_report", "withdraw_unknown",
                                          "duplicate_announce", "duplicate_announce", "pending_announces"]))
        i = data.draw(IDX)
        if kind == "stranger":
            self.stranger(data.draw(st.sampled_from(STRANGER_MSGS)))
        elif kind == "forbidden_message":
            self.forbidden_message(i, data.draw(st.sampled_from(FORBIDDEN + [
                m.Register(group=0, data_host="h", data_port=1, locality="", name="twice")])))
        elif kind == "protocol_violation":
            self.protocol_violation(i, data.draw(st.booleans()))
        elif kind == "foreign_report":
            self.foreign_report(i, data.draw(st.integers(0, 40)), data.draw(st.booleans()))
        elif kind == "withdraw_unknown":
            self.withdraw_unknown(i, data.draw(st.integers(0, 6)))
        elif kind == "duplicate_announce":
            self.duplicate_announce(i, data.draw(IDX))
        else:
            getattr(self, kind)(i)

    def stranger(self, which):
        self.n += 1
        conn = f"s{self.n}"
        before = dict(self.core.peers)
        out = self.step(lambda: self.core.handle(conn, which, self.now))
        assert all(s.conn == conn for s in out)
        assert self.core.peers == before and conn not in self.core.by_conn

    def dead_peer_speaks(self, i):
        p = self.pick(self.with_state("dead"), i)
        if p:
            out = self.step(lambda: self.core.handle(p.conn, m.Heartbeat(), self.now))
            assert [(s.conn, type(s.msg)) for s in out] == [(p.conn, m.Kicked)]

    def pending_votes(self, i):
        p = self.pick(self.with_state("pending"), i)
        if p:
            self.step(lambda: self.core.handle(p.conn, m.VoteTopology(optimize=False, admit=True), self.now))
            assert p.state == "dead"

    def forbidden_message(self, i, which):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p:
            self.step(lambda: self.core.handle(p.conn, which, self.now))
            assert p.state == "dead"

    def protocol_violation(self, i, stranger):
        p = self.pick(self.with_state("pending", "accepted"), i)
        conn = "garbage-sender" if stranger or not p else p.conn
        out = self.step(lambda: self.core.protocol_error(conn, "bad frame", self.now))
        assert [type(s.msg) for s in out if s.conn == conn] == [m.Kicked]
        if p and not stranger:
            assert p.state == "dead"

    def foreign_report(self, i, seq, ok):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p and seq not in p.ops:
            out = self.step(lambda: self.core.handle(p.conn, m.OpReport(seq=seq, ok=ok, kind="", message=""), self.now))
            assert out == []

    def withdraw_unknown(self, i, tag):
        p = self.pick(self.with_state("pending", "accepted"), i)
        if p and tag not in p.busy_tags():
            assert self.step(lambda: self.core.handle(p.conn, m.Withdraw(tag=tag), self.now)) == []

    def duplicate_announce(self, i, j):
        p = self.pick([q for q in self.with_state("accepted") if q.busy_tags()], i)
        if not p:
            return
        tag = sorted(p.busy_tags())[j % len(p.busy_tags())]
        outstanding = tag in p.announced
        self.step(lambda: self.core.handle(p.conn, m.Announce(tag=tag, **BASE_ARGS), self.now),
                  refusal=(p.conn, tag))
        assert len(self.refused) == 1, "a duplicate announcement must be refused"
        if outstanding:
            assert self.refused[0].kind == "invalid_usage"

    def pending_announces(self, i):
        p = self.pick(self.with_state("pending"), i)
        if p:
            out = self.step(lambda: self.core.handle(p.conn, m.Announce(tag=0, **BASE_ARGS), self.now),
                            refusal=(p.conn, 0))
            assert len(out) == 1 and [x.kind for x in self.refused] == ["invalid_usage"]

    # ------------------------------------------------------------------ the end: everyone dies
    def teardown(self) -> None:
        if getattr(self, "failed", False):
            return  # a step failed: its error is the one to report
        for p in self.with_state("pending", "accepted"):
            self.mark_dead(p)
            self.step(lambda: self.core.disconnected(p.conn, self.now))
        assert self.core.ops == {}, "an op outlived all its participants"
        assert self.core.announced == {}, "announcement state outlived every peer"
        assert set(self.commenced) == self.decided, "some op was never decided"
        assert self.core.next_deadline() == math.inf
        assert not any(p.alive for p in self.core.peers.values())


MasterMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=50, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
test_master_stateful = MasterMachine.TestCase

"""The master's protocol logic as a pure state machine (no sockets, threads or clocks).

How it works
1. The shell feeds every decoded message as ``handle(conn, msg, now)``, every transport disconnect
   as ``disconnected(conn, now)``, every undecodable message as ``protocol_error(conn, why, now)``,
   and calls ``tick(now)`` no later than ``next_deadline()``. Each returns a list of ``Send``
   actions for the shell to execute. ``conn`` is the transport's opaque routing key.
2. Membership: a registering peer is *pending*. It becomes *accepted* when every live accepted peer
   has voted ``update_topology`` (vacuously true when there is none, so the first peer is admitted
   at once). A commit builds the new world: live accepted peers in ring order, then the pending
   ones in join order; dead peers are dropped; the world revision goes up by one. The accepted
   set changes only at a commit. A vote with ``admit=False`` (a retry inside a step) keeps pending
   peers pending, except those registered with ``rejoin`` (members of a group re-forming after a
   master restart: this master has no memory of them, but they are no newcomers).
3. A peer that dies (heartbeat timeout, transport disconnect, protocol violation) or leaves is
   marked dead at once: every open op it takes part in is aborted, its group is marked *dirty*
   (the ring has a hole and links may hold stale bytes) and it stops counting as a voter. A dirty
   group runs no collective until the next commit. An aborted op also dirties its group.
4. Collectives: peers announce (tag, kind, count, dtype, op, ...). When every live member of the
   group announced the tag, the master checks that the arguments agree, assigns a sequence number
   and the participants (ring order) and sends ``Commence``. Disagreement fails the op everywhere
   with ``invalid_usage``. Each participant reports ``OpReport``; the master sends one ``Verdict``
   per op: commit once all reported ok, abort as soon as one failed or died.
5. While any member of a group waits in ``update_topology``, that group's announcements fail with
   ``aborted`` (their callers retry after updating the topology too), so the two never deadlock.
6. Shared-state sync is announced like a collective (reserved tag ``SYNC_TAG``) with a
   ``SyncVote``. Once every live member voted, the pure election (``pccl.sync_plan``) decides the
   revision and every peer's downloads; peers with an error get ``OpFailed`` alone, the others a
   ``SyncPlan``. Receivers report when done; a holder that dies does not fail the sync (receivers
   refetch from the other holders). When every receiver reported or died, ``SyncDone`` releases
   the holders.
7. ``optimize_topology`` is a topology vote that first measures every unmeasured directed pair of
   each group (rounds of disjoint pairs, ``Probe``/``ProbeResult``, each round bounded in time),
   keeps the bandwidth matrix, and orders each group's ring to maximise its slowest link.
8. Authentication (only when the config has a secret): a connection must first prove the secret
   (``AuthHello`` -> ``AuthChallenge`` with the master's proof -> ``AuthProof``) before anything
   else, status queries included; anything else from an unproven connection is answered with
   ``AuthFailed``. At most ``max_half_open`` connections may be in the middle of it; a challenge
   unanswered, or a proven connection that does not register, within ``connect_timeout`` is
   forgotten. Nonces come from ``nonce_source`` (an input, like time).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Hashable

from pccl import sync_plan
from pccl.algorithms import select, topology
from pccl.config import Config
from pccl.enums import SyncStrategy
from pccl.errors import AuthenticationFailed
from pccl.transports import auth
from pccl.transports import messages as m

log = logging.getLogger(__name__)

Conn = Hashable

#: reserved tag of shared-state syncs (collective tags are below it)
SYNC_TAG = (1 << 63) - 1


@dataclass(frozen=True)
class Send:
    conn: Conn
    msg: object


@dataclass
class PeerRec:
    peer_id: int
    conn: Conn
    group: int
    host: str
    port: int
    locality: str
    name: str
    accepted: bool = False
    alive: bool = True
    voted: bool = False
    optimize: bool = False
    hold_pending: bool = False  # voted with admit=False
    last_seen: float = 0.0
    state_revision: int | None = None  # shared-state revision of its last sync
    rejoin: bool = False  # re-registered after a master restart: admitted even by admit=False votes


@dataclass
class OpRec:
    seq: int
    group: int
    tag: int
    participants: tuple[int, ...]
    reported_ok: set[int] = field(default_factory=set)


@dataclass
class SyncRec:
    seq: int
    participants: set[int]
    receivers: set[int]
    revision: int


@dataclass
class Measurement:
    """An optimize_topology in progress: rounds of (src, dst) pairs, one round at a time."""

    rounds: list[list[tuple[int, int]]]
    index: int = -1
    outstanding: set[tuple[int, int]] = field(default_factory=set)
    deadline: float = float("inf")


_AGREE = ("kind", "count", "dtype", "op", "algorithm", "quantization")


class MasterCore:
    def __init__(self, config: Config | None = None,
                 nonce_source: Callable[[], bytes] = auth.new_nonce) -> None:
        self.config = config or Config()
        self._nonce_source = nonce_source
        # this process's incarnation, told to peers in Registered: a peer re-joining "after a
        # master restart" that names it was in fact removed by this very master (see _register)
        self.incarnation = int.from_bytes(nonce_source()[:8], "little") & ((1 << 63) - 1) or 1
        # authentication (config.secret set): challenges in flight, and connections that proved
        # the secret (deadline to register; inf once registered), both by conn
        self.challenges: dict[Conn, tuple[auth.Responder, float]] = {}
        self.proven: dict[Conn, float] = {}
        self.revision = 0
        self.peers: dict[int, PeerRec] = {}  # by peer id
        self.by_conn: dict[Conn, int] = {}
        self.ring: list[int] = []  # accepted peer ids in ring order (all groups interleaved)
        self.dirty: dict[int, str] = {}  # group -> reason it needs a topology update
        self.announced: dict[tuple[int, int], dict[int, m.Announce]] = {}
        self.ops: dict[int, OpRec] = {}
        self.next_seq = 1
        self.next_id = 1
        self.last_sent: dict[Conn, float] = {}
        self.decided = 0  # verdicts issued (for stats)
        self.syncs: dict[int, SyncRec] = {}
        self.bandwidth: dict[tuple[int, int], float] = {}  # (src, dst) -> bytes/s, measured
        self.measuring: Measurement | None = None

    # ------------------------------------------------------------------ entry points
    def handle(self, conn: Conn, msg: object, now: float) -> list[Send]:
        out: list[Send] = []
        pid = self.by_conn.get(conn)
        if isinstance(msg, (m.AuthHello, m.AuthProof)):
            self._authenticate(conn, msg, now, out)
            return out
        if self.config.secret is not None and conn not in self.proven:
            self._send(out, conn, m.AuthFailed(
                reason="this master requires the shared secret and the connection did not prove it "
                       "(set secret= or PCCL_SECRET on the peer)"), now)
            return out
        if isinstance(msg, m.StatusQuery):
            if pid is not None:
                self.peers[pid].last_seen = now  # any message counts as a heartbeat
            self._send(out, conn, m.StatusReply(req=msg.req, text=self.status_text()), now)
            return out
        if pid is None:
            if isinstance(msg, m.Register):
                self._register(conn, msg, now, out)
            elif not isinstance(msg, (m.Leave, m.Heartbeat)):
                self._send(out, conn, m.Kicked(reason="unknown peer: register first (or you were removed)"), now)
            elif isinstance(msg, m.Heartbeat):
                self._send(out, conn, m.Kicked(reason="unknown peer: you were removed; register again"), now)
            return out
        peer = self.peers[pid]  # by_conn holds live peers only: a dead one is unknown above
        peer.last_seen = now
        if isinstance(msg, m.Heartbeat):
            pass
        elif isinstance(msg, m.Leave):
            self._kill(peer, f"peer {pid} left", now, out, notify=False)
        elif isinstance(msg, m.PendingQuery):
            waiting = [p for p in self.peers.values() if p.alive and not p.accepted]
            self._send(out, conn, m.PendingReply(req=msg.req, pending=bool(waiting),
                                                 rejoin=any(p.rejoin for p in waiting)), now)
        elif isinstance(msg, m.VoteTopology):
            self._vote(peer, msg.optimize, msg.admit, now, out)
        elif isinstance(msg, m.Announce):
            self._announce(peer, msg, now, out)
        elif isinstance(msg, m.SyncVote):
            self._sync_vote(peer, msg, now, out)
        elif isinstance(msg, m.SyncReport):
            self._sync_report(peer, msg, now, out)
        elif isinstance(msg, m.ProbeResult):
            self._probe_result(peer, msg, now, out)
        elif isinstance(msg, m.Withdraw):
            self._withdraw(peer, msg, now, out)
        elif isinstance(msg, m.OpReport):
            self._report(peer, msg, now, out)
        elif isinstance(msg, m.Register):
            self._kill(peer, f"peer {pid} registered twice", now, out, notify=True)
        else:
            self._kill(peer, f"peer {pid} sent {type(msg).__name__}, which peers may not send", now, out, notify=True)
        return out

    def disconnected(self, conn: Conn, now: float) -> list[Send]:
        out: list[Send] = []
        self.challenges.pop(conn, None)
        self.proven.pop(conn, None)
        pid = self.by_conn.get(conn)
        if pid is not None and self.peers[pid].alive:
            self._kill(self.peers[pid], f"peer {pid} disconnected", now, out, notify=False)
        self.last_sent.pop(conn, None)
        return out

    def protocol_error(self, conn: Conn, why: str, now: float) -> list[Send]:
        out: list[Send] = []
        pid = self.by_conn.get(conn)
        if pid is not None and self.peers[pid].alive:
            self._kill(self.peers[pid], f"peer {pid} broke the protocol: {why}", now, out, notify=True)
        else:
            self._send(out, conn, m.Kicked(reason=f"protocol error: {why}"), now)
        return out

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        for conn in [c for c, (_, t) in self.challenges.items() if t <= now]:
            del self.challenges[conn]
            log.info("a connection did not answer its authentication challenge in time; forgotten")
        for conn in [c for c, t in self.proven.items() if t <= now and c not in self.by_conn]:
            del self.proven[conn]
        for peer in list(self.peers.values()):
            if peer.alive and now - peer.last_seen >= self.config.peer_timeout:
                self._kill(peer, f"peer {peer.peer_id} missed heartbeats for {now - peer.last_seen:.1f}s",
                           now, out, notify=True)
        for peer in self.peers.values():
            if peer.alive and now - self.last_sent.get(peer.conn, -1e18) >= self.config.heartbeat_interval:
                self._send(out, peer.conn, m.Heartbeat(), now)
        if self.measuring is not None and now >= self.measuring.deadline:
            log.info("bandwidth probes %s did not report in time", sorted(self.measuring.outstanding))
            self.measuring.outstanding.clear()
            self._next_round(now, out)
        return out

    def next_deadline(self) -> float:
        t = self.measuring.deadline if self.measuring is not None else float("inf")
        t = min([t] + [d for _, d in self.challenges.values()] + [d for d in self.proven.values()])
        for peer in self.peers.values():
            if peer.alive:
                t = min(t, peer.last_seen + self.config.peer_timeout,
                        self.last_sent.get(peer.conn, -1e18) + self.config.heartbeat_interval)
        return t

    # ------------------------------------------------------------------ helpers
    def _send(self, out: list[Send], conn: Conn, msg: object, now: float) -> None:
        out.append(Send(conn, msg))
        if conn in self.by_conn:
            self.last_sent[conn] = now

    def live_members(self, group: int | None = None) -> list[PeerRec]:
        """Accepted live peers in ring order, optionally of one group."""
        res = [self.peers[p] for p in self.ring if self.peers[p].alive]
        return res if group is None else [p for p in res if p.group == group]

    def _authenticate(self, conn: Conn, msg: m.AuthHello | m.AuthProof, now: float, out: list[Send]) -> None:
        """One step of the challenge-response (see 8. above)."""
        def refuse(reason: str) -> None:
            log.info("refused authentication: %s", reason)
            self._send(out, conn, m.AuthFailed(reason=reason), now)

        secret = self.config.secret
        if secret is None:
            return refuse("this master has no secret configured but the peer offered one "
                          "(use the same secret on both, or none)")
        if conn in self.proven or conn in self.by_conn:
            return refuse("this connection is already authenticated")
        if isinstance(msg, m.AuthHello):
            if conn not in self.challenges and len(self.challenges) >= self.config.max_half_open:
                return refuse(f"too many connections are authenticating (max_half_open "
                              f"{self.config.max_half_open}); try again later")
            try:
                resp = auth.Responder(secret, auth.CONTROL, msg.nonce, nonce_source=self._nonce_source)
            except AuthenticationFailed as exc:
                return refuse(str(exc))
            self.challenges[conn] = (resp, now + self.config.connect_timeout)
            self._send(out, conn, m.AuthChallenge(nonce=resp.nonce, proof=resp.proof), now)
            return
        pending = self.challenges.pop(conn, None)
        if pending is None:
            return refuse("no authentication challenge is pending on this connection (send auth_hello first)")
        if not pending[0].verify(msg.proof):
            return refuse("wrong secret: the peer's proof does not match this master's secret")
        self.proven[conn] = now + self.config.connect_timeout

    def _register(self, conn: Conn, msg: m.Register, now: float, out: list[Send]) -> None:
        if msg.rejoin and msg.former_master == self.incarnation:
            # Not a restart: this master removed the peer (missed heartbeats, e.g. while it was
            # frozen, or a lost connection) and its group went on. Letting it in as a re-joining
            # member would put it mid-step into a group at another step; its session is over.
            log.info("refused a re-registration from %s:%d: this master removed that peer; it did not restart",
                     msg.data_host, msg.data_port)
            self._send(out, conn, m.Kicked(reason="this master did not restart: it removed this peer earlier "
                                                  "(missed heartbeats or a lost connection)"), now)
            return
        if conn in self.proven:
            self.proven[conn] = float("inf")  # registered: no deadline; forgotten at disconnect
        pid = self.next_id
        self.next_id += 1
        peer = PeerRec(pid, conn, msg.group, msg.data_host, msg.data_port, msg.locality, msg.name,
                       last_seen=now, rejoin=msg.rejoin)
        self.peers[pid] = peer
        self.by_conn[conn] = pid
        self._send(out, conn, m.Registered(peer_id=pid, accepted=False, master=self.incarnation), now)
        log.info("peer %d registered (group %d, %s:%d, pending%s)", pid, msg.group, msg.data_host, msg.data_port,
                 ", re-joining after a master restart" if msg.rejoin else "")
        self._maybe_commit(now, out)

    def _kill(self, peer: PeerRec, reason: str, now: float, out: list[Send], notify: bool) -> None:
        """Mark a peer dead at once; its ops abort and its group needs a topology update."""
        log.info("%s", reason)
        if notify:
            self._send(out, peer.conn, m.Kicked(reason=reason), now)
        peer.alive = False
        self.by_conn.pop(peer.conn, None)
        self.last_sent.pop(peer.conn, None)
        if not peer.accepted:
            del self.peers[peer.peer_id]
        else:
            down = m.PeerDown(peer_id=peer.peer_id, reason=reason)
            for other in self.live_members():
                self._send(out, other.conn, down, now)
            self._dirty(peer.group, f"{reason}; call update_topology and retry", "peer_failure", now, out)
            for op in list(self.ops.values()):
                if peer.peer_id in op.participants:
                    self._decide(op, False, "peer_failure", f"op {op.seq} aborted: {reason}", now, out)
            for sync in list(self.syncs.values()):
                sync.participants.discard(peer.peer_id)
                if peer.peer_id in sync.receivers:
                    sync.receivers.discard(peer.peer_id)
                    self._maybe_finish_sync(sync, now, out)
            if self.measuring is not None:
                self.measuring.outstanding = {pr for pr in self.measuring.outstanding if peer.peer_id not in pr}
                if not self.measuring.outstanding:
                    self._next_round(now, out)
        self._maybe_commit(now, out)

    def _dirty(self, group: int, reason: str, kind: str, now: float, out: list[Send]) -> None:
        self.dirty.setdefault(group, reason)
        self._fail_announcements(group, kind, self.dirty[group], now, out)

    def _fail_announcements(self, group: int, kind: str, reason: str, now: float, out: list[Send]) -> None:
        for key in [k for k in self.announced if k[0] == group]:
            for pid in self.announced.pop(key):
                p = self.peers.get(pid)
                if p is not None and p.alive:
                    self._send(out, p.conn, m.OpFailed(tag=key[1], kind=kind, message=reason), now)

    def _vote(self, peer: PeerRec, optimize: bool, admit: bool, now: float, out: list[Send]) -> None:
        if not peer.accepted:
            self._kill(peer, f"peer {peer.peer_id} voted on the topology before it was accepted", now, out, notify=True)
            return
        peer.voted = True
        peer.optimize = peer.optimize or optimize
        peer.hold_pending = peer.hold_pending or not admit
        for op in list(self.ops.values()):
            if peer.peer_id in op.participants:
                self._decide(op, False, "aborted",
                             f"op {op.seq} aborted: peer {peer.peer_id} called update_topology during it", now, out)
        self._fail_announcements(peer.group, "aborted",
                                 f"peer {peer.peer_id} is waiting in update_topology; call update_topology and retry",
                                 now, out)
        self._maybe_commit(now, out)

    def _maybe_commit(self, now: float, out: list[Send]) -> None:
        voters = self.live_members()
        pending = [p for p in self.peers.values() if p.alive and not p.accepted]
        if self.measuring is not None:
            return
        if voters:
            if not all(p.voted for p in voters):
                return
            if any(p.optimize for p in voters):
                for p in voters:
                    p.optimize = False
                self._start_measuring(voters, now, out)
                if self.measuring is not None:
                    return
                voters = self.live_members()
        elif not pending:
            return
        if any(p.hold_pending for p in voters):
            # A retry inside a step: drop the dead, admit newcomers at the next update; peers that
            # were members before a master restart are no newcomers (their group is re-forming).
            pending = [p for p in pending if p.rejoin]
        # Commit: survivors keep their ring order (re-ordered by the last measurement when there
        # was one), newcomers join in registration order.
        for pid in [p for p in self.ring if not self.peers[p].alive]:
            del self.peers[pid]
        self.bandwidth = {k: v for k, v in self.bandwidth.items() if k[0] in self.peers and k[1] in self.peers}
        self.ring = [p.peer_id for p in voters] + [p.peer_id for p in sorted(pending, key=lambda p: p.peer_id)]
        self.revision += 1
        self.dirty.clear()
        for pid in self.ring:
            p = self.peers[pid]
            p.accepted = True
            p.voted = False
            p.hold_pending = False
        members = [self.peers[i] for i in self.ring]
        rates = []
        for g in sorted({p.group for p in members}):
            ids = [p.peer_id for p in members if p.group == g]
            inside, between = select.measured_rates(ids, [self.peers[i].locality for i in ids], self.bandwidth)
            if inside or between:
                rates.append(m.GroupRates(group=g, inside=inside, between=between))
        topo = m.Topology(revision=self.revision, members=tuple(
            m.Member(peer_id=p.peer_id, group=p.group, host=p.host, port=p.port, locality=p.locality)
            for p in members), rates=tuple(rates))
        log.info("topology revision %d: ring %s", self.revision, self.ring)
        for pid in self.ring:
            self._send(out, self.peers[pid].conn, topo, now)

    def _cannot_start(self, peer: PeerRec) -> tuple[str, str] | None:
        """Why ``peer`` may not start a collective or a sync now, as (error kind, message)."""
        if not peer.accepted:
            return "invalid_usage", "this peer is not accepted yet"
        if peer.group in self.dirty:
            return "peer_failure", self.dirty[peer.group]
        voter = next((p for p in self.live_members(peer.group) if p.voted), None)
        if voter is not None:
            return "aborted", f"peer {voter.peer_id} is waiting in update_topology; call update_topology and retry"
        return None

    # ------------------------------------------------------------------ optimize_topology
    def _start_measuring(self, voters: list[PeerRec], now: float, out: list[Send]) -> None:
        rounds: list[list[tuple[int, int]]] = []
        for g in sorted({p.group for p in voters}):
            ids = [p.peer_id for p in voters if p.group == g]
            done = {(i, j) for i, a in enumerate(ids) for j, b in enumerate(ids) if (a, b) in self.bandwidth}
            for r, pairs in enumerate(topology.measurement_rounds(len(ids), done)):
                if r == len(rounds):
                    rounds.append([])
                rounds[r].extend((ids[i], ids[j]) for i, j in pairs)
        self.measuring = Measurement(rounds)
        log.info("optimize_topology: measuring %d pairs in %d rounds", sum(map(len, rounds)), len(rounds))
        self._next_round(now, out, commit=False)  # the caller commits if nothing is left to measure

    def _next_round(self, now: float, out: list[Send], commit: bool = True) -> None:
        ms = self.measuring
        assert ms is not None
        while not ms.outstanding:
            ms.index += 1
            if ms.index >= len(ms.rounds):
                self.measuring = None
                self._reorder()
                if commit:
                    self._maybe_commit(now, out)
                return
            for src, dst in ms.rounds[ms.index]:
                a, b = self.peers.get(src), self.peers.get(dst)
                if a is None or b is None or not (a.alive and b.alive):
                    continue
                ms.outstanding.add((src, dst))
                self._send(out, a.conn, m.Probe(round=ms.index, target=dst, host=b.host, port=b.port,
                                                seconds=self.config.probe_seconds), now)
            ms.deadline = now + self.config.probe_seconds + 2 * self.config.connect_timeout + \
                self.config.request_timeout

    def _probe_result(self, peer: PeerRec, msg: m.ProbeResult, now: float, out: list[Send]) -> None:
        ms = self.measuring
        pair = (peer.peer_id, msg.target)
        if ms is None or msg.round != ms.index or pair not in ms.outstanding:
            return  # stale (its round timed out)
        ms.outstanding.discard(pair)
        bps = msg.bytes_per_second
        if bps > 0 and bps != float("inf"):
            self.bandwidth[pair] = bps
        if not ms.outstanding:
            self._next_round(now, out)

    def _reorder(self) -> None:
        """Re-order each group's live members in the ring to maximise the slowest link."""
        live = self.live_members()
        new_ring = list(self.ring)
        for g in sorted({p.group for p in live}):
            ids = [p.peer_id for p in live if p.group == g]
            if len(ids) < 3:
                continue  # every order of 1 or 2 peers is the same ring
            bw = [[self.bandwidth.get((a, b), 0.0) for b in ids] for a in ids]
            order = [ids[i] for i in topology.solve_ring(bw)]
            slots = [i for i, pid in enumerate(new_ring) if pid in set(ids)]
            for slot, pid in zip(slots, order):
                new_ring[slot] = pid
            log.info("group %d: ring ordered by bandwidth: %s", g, order)
        self.ring = new_ring

    # ------------------------------------------------------------------ shared-state sync
    def _sync_vote(self, peer: PeerRec, msg: m.SyncVote, now: float, out: list[Send]) -> None:
        def refuse(kind: str, why: str) -> None:
            self._send(out, peer.conn, m.OpFailed(tag=SYNC_TAG, kind=kind, message=why), now)

        why = self._cannot_start(peer)
        if why is not None:
            return refuse(*why)
        g = peer.group
        members = self.live_members(g)
        key = (g, SYNC_TAG)
        if peer.peer_id in self.announced.get(key, {}) or any(
                peer.peer_id in s.participants for s in self.syncs.values()):
            return refuse("invalid_usage", "a shared-state sync is already in flight on this peer")
        waiting = self.announced.setdefault(key, {})
        waiting[peer.peer_id] = msg
        if any(p.peer_id not in waiting for p in members):
            return
        del self.announced[key]
        votes: dict[int, sync_plan.Vote] = {}
        for pid, v in waiting.items():
            error = v.error
            if not error:
                try:
                    strategy = SyncStrategy(v.strategy)
                except ValueError:
                    error = f"unknown sync strategy {v.strategy!r}"
            if error:
                self._send(out, self.peers[pid].conn, m.OpFailed(tag=SYNC_TAG, kind="invalid_usage", message=error),
                           now)
                continue
            votes[pid] = sync_plan.Vote(strategy, v.revision, tuple(
                sync_plan.KeyVote(k.name, k.dtype, k.shape, k.nbytes, k.digest, k.allow_inequality) for k in v.keys))
        if not votes:
            return
        plan = sync_plan.elect(votes)
        seq = self.next_seq
        self.next_seq += 1
        ok = {pid for pid, o in plan.outcomes.items() if not o.error}
        receivers = {pid for pid in ok if plan.outcomes[pid].fetch}
        if receivers:
            self.syncs[seq] = SyncRec(seq, set(ok), set(receivers), plan.revision)
        for pid, o in plan.outcomes.items():
            p = self.peers[pid]
            if o.error:
                self._send(out, p.conn, m.OpFailed(tag=SYNC_TAG, kind="invalid_usage", message=o.error), now)
                continue
            if pid not in receivers:
                p.state_revision = plan.revision
            fetch = tuple(m.FetchRec(key=f.key, holders=f.holders, digest=f.digest) for f in o.fetch)
            self._send(out, p.conn, m.SyncPlan(seq=seq, revision=plan.revision, fetch=fetch, final=not receivers),
                       now)
        log.debug("sync %d: revision %d, receivers %s", seq, plan.revision, sorted(receivers))

    def _sync_report(self, peer: PeerRec, msg: m.SyncReport, now: float, out: list[Send]) -> None:
        sync = self.syncs.get(msg.seq)
        if sync is None or peer.peer_id not in sync.receivers:
            return
        sync.receivers.discard(peer.peer_id)
        if msg.ok:
            peer.state_revision = sync.revision
        else:
            log.info("sync %d: peer %d failed to receive: %s", sync.seq, peer.peer_id, msg.message)
        self._maybe_finish_sync(sync, now, out)

    def _maybe_finish_sync(self, sync: SyncRec, now: float, out: list[Send]) -> None:
        if sync.receivers:
            return
        del self.syncs[sync.seq]
        for pid in sync.participants:
            p = self.peers.get(pid)
            if p is not None and p.alive:
                self._send(out, p.conn, m.SyncDone(seq=sync.seq), now)

    def _announce(self, peer: PeerRec, msg: m.Announce, now: float, out: list[Send]) -> None:
        def refuse(kind: str, why: str) -> None:
            self._send(out, peer.conn, m.OpFailed(tag=msg.tag, kind=kind, message=why), now)

        why = self._cannot_start(peer)
        if why is not None:
            return refuse(*why)
        g = peer.group
        members = self.live_members(g)
        key = (g, msg.tag)
        busy = any(op.tag == msg.tag and peer.peer_id in op.participants for op in self.ops.values())
        if peer.peer_id in self.announced.get(key, {}) or busy:
            return refuse("invalid_usage", f"tag {msg.tag} is already in flight on this peer")
        in_flight = sum(peer.peer_id in a for a in self.announced.values()) + sum(
            peer.peer_id in op.participants for op in self.ops.values())
        if in_flight >= self.config.max_in_flight:
            return refuse("invalid_usage", f"at most {self.config.max_in_flight} collectives may be in flight")
        waiting = self.announced.setdefault(key, {})
        waiting[peer.peer_id] = msg
        if any(p.peer_id not in waiting for p in members):
            return
        del self.announced[key]
        first = waiting[members[0].peer_id]
        bad = "; ".join(f"peer {pid}: {a.error}" for pid, a in sorted(waiting.items()) if a.error)
        if bad:
            for pid in waiting:
                self._send(out, self.peers[pid].conn, m.OpFailed(tag=msg.tag, kind="invalid_usage",
                                                                 message=f"collective tag {msg.tag} refused: {bad}"), now)
            return
        for name in _AGREE:
            values = {pid: getattr(a, name) for pid, a in waiting.items()}
            if len(set(values.values())) > 1:
                shown = ", ".join(f"peer {pid}: {v}" for pid, v in sorted(values.items()))
                why = f"peers disagree on {name} for tag {msg.tag} ({shown})"
                for pid in waiting:
                    self._send(out, self.peers[pid].conn, m.OpFailed(tag=msg.tag, kind="invalid_usage", message=why), now)
                return
        seq = self.next_seq
        self.next_seq += 1
        parts = tuple(p.peer_id for p in members)
        self.ops[seq] = OpRec(seq, g, msg.tag, parts)
        log.debug("op %d (tag %d, %s of %d %s) commences on %s", seq, msg.tag, first.kind, first.count, first.dtype, parts)
        cm = m.Commence(tag=msg.tag, seq=seq, revision=self.revision, participants=parts)
        for pid in parts:
            self._send(out, self.peers[pid].conn, cm, now)

    def _withdraw(self, peer: PeerRec, msg: m.Withdraw, now: float, out: list[Send]) -> None:
        waiting = self.announced.get((peer.group, msg.tag))
        if waiting is not None and waiting.pop(peer.peer_id, None) is not None:
            if not waiting:
                del self.announced[(peer.group, msg.tag)]
            return
        for op in list(self.ops.values()):
            if op.tag == msg.tag and peer.peer_id in op.participants:
                self._decide(op, False, "aborted",
                             f"op {op.seq} aborted: peer {peer.peer_id} gave up waiting (deadline passed)", now, out)

    def _report(self, peer: PeerRec, msg: m.OpReport, now: float, out: list[Send]) -> None:
        op = self.ops.get(msg.seq)
        if op is None or peer.peer_id not in op.participants:
            return  # stale report of an op already decided
        if not msg.ok:
            kind = "peer_failure" if msg.kind == "peer_failure" else "aborted"
            self._decide(op, False, kind, f"op {op.seq} aborted: peer {peer.peer_id} failed: {msg.message}", now, out)
            return
        op.reported_ok.add(peer.peer_id)
        if op.reported_ok.issuperset(op.participants):
            self._decide(op, True, "", "", now, out)

    def _decide(self, op: OpRec, ok: bool, kind: str, why: str, now: float, out: list[Send]) -> None:
        """Issue the single verdict of ``op`` to every live participant."""
        del self.ops[op.seq]
        self.decided += 1
        if not ok:
            log.info("%s", why)
            self._dirty(op.group, why + "; call update_topology and retry", "aborted", now, out)
        v = m.Verdict(seq=op.seq, ok=ok, kind=kind, message=why)
        for pid in op.participants:
            p = self.peers.get(pid)
            if p is not None and p.alive:
                self._send(out, p.conn, v, now)

    # ------------------------------------------------------------------ introspection
    def status_text(self) -> str:
        lines = [f"revision {self.revision}; {len(self.ops)} collectives open; {self.decided} decided; "
                 f"{len(self.syncs)} syncs open" + ("; measuring bandwidth" if self.measuring else "")]
        groups = sorted({p.group for p in self.peers.values()})
        for g in groups:
            ring = [str(p.peer_id) for p in self.live_members(g)]
            lines.append(f"group {g}: ring {' -> '.join(ring) if ring else '(empty)'}"
                         + (f" [needs update_topology: {self.dirty[g]}]" if g in self.dirty else ""))
        lines.append("peer  group  state     state-rev  address              locality  name")
        for p in sorted(self.peers.values(), key=lambda p: p.peer_id):
            state = ("dead" if not p.alive else "accepted" if p.accepted else "pending") + ("*" if p.voted else "")
            srev = "-" if p.state_revision is None else str(p.state_revision)
            lines.append(f"{p.peer_id:<5} {p.group:<6} {state:<9} {srev:<10} {p.host + ':' + str(p.port):<20} "
                         f"{p.locality:<9} {p.name}")
        for g in groups:
            ids = [p.peer_id for p in self.live_members(g)]
            if len(ids) < 2 or not any((a, b) in self.bandwidth for a in ids for b in ids):
                continue
            lines.append(f"bandwidth of group {g} in MB/s (row: from, column: to; - not measured)")
            lines.append("from\\to " + "".join(f"{b:>9}" for b in ids))
            for a in ids:
                cells = "".join(f"{'':>9}" if a == b else
                                f"{self.bandwidth[(a, b)] / 1e6:>9.1f}" if (a, b) in self.bandwidth else f"{'-':>9}"
                                for b in ids)
                lines.append(f"{a:<8} {cells}")
        return "\n".join(lines)

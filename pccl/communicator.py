"""The peer: :class:`Communicator`.

How it works
1. ``connect()`` opens the data listener and the control channel, registers, and waits until a
   topology that includes this peer arrives (the first peer is admitted at once; later ones when
   the accepted peers call ``update_topology``). Then it opens the data links of that revision.
2. The control thread delivers master messages to ``_on_message``; it never blocks. A
   ``Commence`` starts the op's ring job right there, so every peer queues lane programs in the
   master's commence order.
3. A collective's driver (the caller's thread, or one thread per async op) announces the op,
   waits for commence, waits for its local part, reports it, and waits for the master's single
   verdict: commit writes the result, abort restores the caller's input and raises.
4. Fatal failures (kicked, master unreachable) fail every waiting call and every later call.
   A lost master connection is not fatal (``_on_lost``): calls in flight fail with MasterLost
   (retryable, inputs restored), the control channel re-registers in the background, and the
   next ``update_topology`` / ``are_peers_pending`` re-forms the group (``_reform``): wait to be
   admitted by the restarted master, then vote until every former group member is back or
   ``master_regroup_timeout`` passes. Collectives and syncs started meanwhile raise MasterLost.
5. ``sync_shared_state`` hashes the state, offers its bytes to the data listener and votes; the
   master's plan says which keys to download from which holders (``transports.state_transfer``);
   every participant serves until the master's ``SyncDone``.
6. ``optimize_topology`` is a topology vote; while it waits, the master asks this peer to probe
   the bandwidth to others (``transports.probe``, on an owned thread per probe).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pccl import coalesce, tensors
from pccl.buffers import BufferPool
from pccl.config import Config, resolve
from pccl.enums import Algorithm, Quantization, ReduceOp, SyncStrategy
from pccl.errors import (
    Aborted, AuthenticationFailed, InvalidUsage, Kicked, MasterLost, PcclError, PcclTimeout, PeerFailure,
    error_from_kind,
)
from pccl.master_core import SYNC_TAG
from pccl.shared_state import SharedState, SyncInfo, digest
from pccl.algorithms import backup as backup_mod
from pccl.algorithms import codecs, groups, kernels, ring, select
from pccl.algorithms.executor import RingJob
from pccl.algorithms.group_exec import GroupJob
from pccl.transports import messages as m
from pccl.transports import framing, probe, state_transfer
from pccl.transports.control import ControlChannel
from pccl.transports.links import LinkSet, Listener, Mesh, build_links

log = logging.getLogger(__name__)

_NAMES = itertools.count()


@dataclass(frozen=True)
class ReduceInfo:
    """What one collective did: participants, payload bytes sent and received, wall time."""

    world_size: int
    tx_bytes: int
    rx_bytes: int
    seconds: float
    #: the algorithm that ran ("ring", "star", "hierarchical"; AUTO resolved)
    algorithm: str = "ring"


class _Op:
    """Book-keeping of one collective on this peer (guarded by the communicator's lock)."""

    def __init__(self, tag: int, announce: m.Announce, op: ReduceOp, inp: np.ndarray, out: np.ndarray,
                 deadline: float) -> None:
        self.tag = tag
        self.announce = announce
        self.op = op
        self.inp = inp
        self.out = out
        self.deadline = deadline
        self.commence: m.Commence | None = None
        self.refused: PcclError | None = None
        self.start_error: PcclError | None = None
        self.job: RingJob | GroupJob | None = None
        self.verdict: m.Verdict | None = None
        self.commit: Callable[[], None] | None = None  # writes a staged result into the user's dst
        self.backup: backup_mod.Backup | None = None  # copy of the input of an in-place op
        self.revision = 0  # world revision when announced
        self.plan: ring.RingPlan | groups.GroupPlan | None = None
        self.quantization = Quantization.NONE
        self.algorithm = Algorithm.AUTO  # as requested; resolved when the op is planned


class _SyncWait:
    """Book-keeping of the one shared-state sync in progress (guarded by the communicator's lock)."""

    def __init__(self) -> None:
        self.plan: m.SyncPlan | None = None
        self.refused: PcclError | None = None
        self.done = False


def _resolve_master(master: str | None) -> str:
    addr = master or os.environ.get("PCCL_MASTER")
    if not addr:
        raise InvalidUsage("no master address: pass master='host:port' or set PCCL_MASTER")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidUsage(f"master address {addr!r} must look like host:port")
    return addr


def _local_address_towards(host: str) -> str:
    """The local IP that routes to ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Communicator:
    """A peer of a pccl run.

    ``Communicator(master="host:port", peer_group=0, connections=2, advertise_host=None,
    locality=None, timeouts=None, secret=None)``. ``timeouts`` is a :class:`pccl.Config` (None:
    defaults with ``PCCL_*`` environment overrides). ``secret`` (str or bytes; default:
    ``timeouts.secret``, else ``PCCL_SECRET``) must match the master's: every control and data
    connection proves it by HMAC challenge-response (authentication only, no encryption).
    ``advertise_host`` is the address other peers use to reach this peer's data port (default: the
    local address that routes to the master).
    """

    def __init__(self, master: str | None = None, peer_group: int = 0, connections: int = 2,
                 advertise_host: str | None = None, locality: str | None = None,
                 timeouts: Config | None = None, listen_host: str | None = None,
                 name: str | None = None, secret: str | bytes | None = None) -> None:
        """Raises InvalidUsage for bad arguments (an empty secret included)."""
        self.master = _resolve_master(master)
        if not isinstance(peer_group, int) or peer_group < 0:
            raise InvalidUsage("peer_group must be a non-negative int")
        if not isinstance(connections, int) or not 1 <= connections <= 16:
            raise InvalidUsage("connections must be an int in 1..16")
        self.config = resolve(timeouts, secret)
        self.peer_group = peer_group
        self.connections = connections
        self.advertise_host = advertise_host
        self.listen_host = listen_host
        self.locality = locality if locality is not None else socket.gethostname()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{next(_NAMES)}"
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._failure: PcclError | None = None
        self._closed = False
        self._peer_id: int | None = None
        self._revision = 0
        self._ring: tuple[int, ...] = ()
        self._new_topology: m.Topology | None = None
        self._links = LinkSet.empty(0)
        self._mesh: Mesh | None = None  # direct connections for star / hierarchical ops
        self._links_ok = False
        self._dead: set[int] = set()  # peers the master reported dead (ids are never reused)
        self._replies: dict[int, bool] = {}
        self._reqs = itertools.count(1)
        self._ops: dict[int, _Op] = {}  # by tag
        self._by_seq: dict[int, _Op] = {}
        self._pool = BufferPool()
        self._listener: Listener | None = None
        self._control: ControlChannel | None = None
        self._members: dict[int, m.Member] = {}
        # AUTO's (inside, between) locality bandwidths: measured ones from the topology, else configured
        self._link_rates = (self.config.link_bytes_per_second, self.config.wan_bytes_per_second)
        self._one_host = False  # every member of the group advertises the same data address (AUTO)
        self._sync: _SyncWait | None = None
        self._server = state_transfer.StateServer()
        self._probes: list[threading.Thread] = []
        self._data_host = ""
        # Riding through a master restart (see ``_on_lost`` and ``_reform``).
        self._lost: MasterLost | None = None  # set from a lost master connection until re-admitted
        self._epoch = 0  # master connections lost so far
        self._registered_epoch = -1  # epoch of the last Registered
        self._admitted = False  # was in a topology once: re-registrations say rejoin
        self._master_id = 0  # Registered.master of the current (or the lost) master
        self._former: set[tuple[str, int]] = set()  # data addresses of the group to re-form

    # ------------------------------------------------------------------ properties
    @property
    def peer_id(self) -> int:
        if self._peer_id is None:
            raise InvalidUsage("not connected: call connect() first")
        return self._peer_id

    @property
    def world_size(self) -> int:
        """Peers of this peer's group in the current topology."""
        return len(self._ring)

    @property
    def rank(self) -> int:
        """Position of this peer in its group's ring."""
        return self._ring.index(self.peer_id)

    @property
    def topology(self) -> tuple[int, ...]:
        """Peer ids of this peer's group in ring order."""
        return self._ring

    @property
    def revision(self) -> int:
        return self._revision

    # ------------------------------------------------------------------ control-thread callbacks
    def _on_message(self, msg: object) -> None:
        with self._cond:
            if isinstance(msg, m.Heartbeat):
                return
            if isinstance(msg, m.Registered):
                self._peer_id = msg.peer_id
                self._master_id = msg.master
                self._registered_epoch = self._epoch
                if self._listener is not None:
                    self._listener.assign(msg.peer_id)
            elif isinstance(msg, m.Topology):
                self._new_topology = msg
            elif isinstance(msg, m.PendingReply):
                self._replies[msg.req] = (msg.pending, msg.rejoin)
            elif isinstance(msg, m.Commence):
                self._commence(msg)
            elif isinstance(msg, m.OpFailed) and msg.tag == SYNC_TAG:
                if self._sync is not None and self._sync.plan is None:
                    self._sync.refused = error_from_kind(msg.kind, msg.message)
            elif isinstance(msg, m.OpFailed):
                op = self._ops.get(msg.tag)
                if op is not None and op.commence is None:
                    op.refused = error_from_kind(msg.kind, msg.message)
            elif isinstance(msg, m.SyncPlan):
                if self._sync is not None and self._sync.plan is None and self._sync.refused is None:
                    self._sync.plan = msg
                    self._server.bind(msg.seq)
            elif isinstance(msg, m.SyncDone):
                if self._sync is not None and self._sync.plan is not None and self._sync.plan.seq == msg.seq:
                    self._sync.done = True
            elif isinstance(msg, m.Probe):
                t = threading.Thread(target=self._probe, args=(msg,), name="pccl-probe", daemon=True)
                self._probes = [p for p in self._probes if p.is_alive()] + [t]
                t.start()
            elif isinstance(msg, m.Verdict):
                op = self._by_seq.get(msg.seq)
                if op is not None:
                    op.verdict = msg
                    if not msg.ok and op.job is not None:
                        op.job.abort(error_from_kind(msg.kind, msg.message))
            elif isinstance(msg, m.PeerDown):
                self._dead.add(msg.peer_id)
                if self._listener is not None:
                    self._listener.wake()
            elif isinstance(msg, m.Kicked):
                self._fail(Kicked(f"the master removed this peer: {msg.reason}"))
            else:
                self._fail(PcclError(f"unexpected message from the master: {type(msg).__name__}"))
            self._cond.notify_all()

    def _on_failure(self, err: PcclError) -> None:
        with self._cond:
            self._fail(err)
            self._cond.notify_all()

    def _fail(self, err: PcclError) -> None:
        if self._failure is None:
            self._failure = err
        for op in self._ops.values():
            if op.job is not None:
                op.job.abort(err)

    def _on_lost(self, err: MasterLost) -> None:
        """The control channel lost the master and re-registers in the background (control thread)."""
        with self._cond:
            if self._closed or self._failure is not None:
                return
            if self._peer_id is not None and self._peer_id in self._ring:
                # Remember who to wait for when the group re-forms (data addresses survive a
                # restart, peer ids do not); a second loss before re-forming keeps the first list.
                me = self._peer_id
                self._former |= {(mb.host, mb.port) for mb in self._members.values()
                                 if mb.group == self.peer_group and mb.peer_id != me and mb.peer_id not in self._dead}
            self._epoch += 1
            self._lost = err
            self._new_topology = None
            self._dead.clear()  # the next master numbers peers afresh
            self._replies.clear()
            for op in self._ops.values():
                if op.commence is None and op.refused is None:
                    op.refused = err
                if op.job is not None:
                    op.job.abort(err)
            self._by_seq.clear()
            if self._sync is not None and self._sync.plan is None and self._sync.refused is None:
                self._sync.refused = err
            self._cond.notify_all()
        if self._listener is not None:
            self._listener.drop_older(1 << 62)  # parked links of the old world: ids and revisions restart
            self._listener.wake()

    def _hello(self) -> m.Register:
        """The registration sent on every new master connection (built by the control thread)."""
        assert self._listener is not None
        return m.Register(group=self.peer_group, data_host=self._data_host, data_port=self._listener.port,
                          locality=self.locality, name=self.name, rejoin=self._admitted,
                          former_master=self._master_id if self._admitted else 0)

    def _commence(self, msg: m.Commence) -> None:
        op = self._ops.get(msg.tag)
        if op is None or op.commence is not None or op.refused is not None:
            return  # we withdrew; our Withdraw makes the master abort it
        op.commence = msg
        self._by_seq[msg.seq] = op
        try:
            if msg.revision != op.revision or msg.revision != self._revision or \
                    tuple(msg.participants) != self._ring:
                raise PeerFailure(f"op {msg.seq} commenced for revision {msg.revision} {msg.participants}; "
                                  f"it was announced at {op.revision}, this peer is at {self._revision} {self._ring}")
            if not self._links_ok:
                raise PeerFailure("this peer's data links are down; call update_topology and retry")
            if op.plan is None:
                raise PeerFailure(f"op {msg.seq} commenced although this peer was alone when it announced it")
            if isinstance(op.plan, ring.RingPlan):
                op.job = RingJob(op.plan, msg.seq, op.op, op.inp, op.out, self._links, self.config.max_frame_bytes,
                                 op.backup, op.quantization, pool=self._pool)
            else:
                if self._mesh is None:
                    raise PeerFailure("this peer's data links are down; call update_topology and retry")
                op.job = GroupJob(op.plan, msg.seq, op.op, op.inp, op.out, self._mesh, self._ring,
                                  self.config.max_frame_bytes, op.deadline, op.backup, op.quantization,
                                  self.config.pipeline_bytes, self._pool)
            op.job.start()
        except PcclError as exc:
            op.start_error = exc

    # ------------------------------------------------------------------ waiting helpers
    def _check(self) -> None:
        self._check_fatal()
        if self._lost is not None:
            raise self._lost

    def _check_fatal(self) -> None:
        if self._closed:
            raise InvalidUsage("the communicator is closed")
        if self._failure is not None:
            raise self._failure

    def _wait(self, pred, deadline: float, what: str, ride: bool = False) -> None:
        """Wait on the condition (lock held) until ``pred()``; fatal failures and the deadline raise,
        and a lost master connection too unless ``ride``."""
        while not pred():
            self._check_fatal() if ride else self._check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PcclTimeout(f"{what} did not happen within the deadline")
            self._cond.wait(min(left, 0.5))

    def _send(self, msg: object) -> None:
        if self._control is None:
            raise InvalidUsage("not connected: call connect() first")
        self._control.send(msg)

    # ------------------------------------------------------------------ membership
    def connect(self, timeout: float | None = None) -> "Communicator":
        """Register with the master and wait until admitted.

        Raises PcclTimeout (not admitted in time: the accepted peers must call update_topology),
        MasterUnreachable, Kicked, AuthenticationFailed (this peer's secret, or lack of one, does
        not match the master's), PeerFailure (links to the neighbours could not be opened; call
        update_topology to retry), InvalidUsage (already connected).
        """
        with self._cond:
            if self._control is not None:
                raise InvalidUsage("connect() was already called")
            if self._closed:
                raise InvalidUsage("the communicator is closed")
        deadline = time.monotonic() + (self.config.join_timeout if timeout is None else timeout)
        host = self.advertise_host or _local_address_towards(self.master.rpartition(":")[0])
        try:
            self._listener = Listener(self.listen_host or host, 0, self.config)
        except OSError as exc:
            raise InvalidUsage(f"cannot listen for data connections on {host}: {exc}") from exc
        self._listener.handle(framing.KIND_STATE, lambda s, hs: self._server.serve(s, hs, self.config))
        self._listener.handle(framing.KIND_PROBE, lambda s, hs: probe.sink(s, hs, self.config))
        self._data_host = host
        self._control = ControlChannel(self.master, self.config, self._hello, self._on_message, self._on_failure,
                                       self._on_lost)
        try:
            with self._cond:
                # A master restart while pending only means registering again: keep waiting.
                self._wait(lambda: self._registered_epoch == self._epoch and self._new_topology is not None,
                           deadline, "admission by the master", ride=True)
                topo = self._new_topology
                self._lost = None
            self._apply(topo, deadline)
        except PcclTimeout:
            self.close()
            raise PcclTimeout("not admitted in time: the accepted peers must call update_topology()") from None
        except AuthenticationFailed:
            self.close()  # nothing was admitted: free the listener and the channel at once
            raise
        return self

    def _apply(self, topo: m.Topology, deadline: float) -> None:
        """Adopt a topology: close the old links, open the new ones."""
        with self._cond:
            self._new_topology = None
            me = self.peer_id
            if all(mb.peer_id != me for mb in topo.members):
                self._fail(Kicked("the new topology does not include this peer"))
                self._check()
            old, old_mesh = self._links, self._mesh
            self._links = LinkSet.empty(topo.revision)
            self._links_ok = False
            self._revision = topo.revision
            self._admitted = True
            self._ring = tuple(mb.peer_id for mb in topo.members if mb.group == self.peer_group)
            self._members = {mb.peer_id: mb for mb in topo.members}
            mine = next(((r.inside, r.between) for r in topo.rates if r.group == self.peer_group), None)
            self._link_rates = select.link_rates(mine, self.config.link_bytes_per_second,
                                                 self.config.wan_bytes_per_second)
            self._one_host = len({self._members[pid].host for pid in self._ring}) == 1  # one loopback
            assert self._listener is not None
            self._mesh = Mesh(self._listener, topo.revision, me,
                              {pid: (mb.host, mb.port) for pid, mb in self._members.items()},
                              self.connections, self.config, abandoned=lambda pid: pid in self._dead)
        old.close()
        if old_mesh is not None:
            old_mesh.close()
        self._listener.drop_older(topo.revision)
        n = len(self._ring)
        log.info("peer %d: revision %d, ring %s", me, topo.revision, self._ring)
        if n == 1:
            with self._cond:
                self._links_ok = True
            return
        r = self._ring.index(me)
        right = next(mb for mb in topo.members if mb.peer_id == self._ring[(r + 1) % n])
        left = self._ring[(r - 1) % n]
        links = build_links(self._listener, topo.revision, me, (right.peer_id, right.host, right.port), left,
                            self.connections, self.config,
                            min(deadline, time.monotonic() + self.config.topology_timeout),
                            abandoned=lambda: left in self._dead)
        with self._cond:
            if self._revision == topo.revision and self._failure is None:
                self._links = links
                self._links_ok = True
                return
        links.close()
        self._check()

    def update_topology(self, timeout: float | None = None, admit: bool = True) -> None:
        """Vote for a topology update and adopt the result: pending peers are admitted, dead ones
        dropped, links rebuilt. Blocks until every live accepted peer has voted. With
        ``admit=False`` (used by retries in the middle of a training step) pending peers stay
        pending if any voter says so; the next ordinary update admits them.

        After a master restart (a call failed with MasterLost) it waits until this peer is
        registered with the new master and re-forms the group: former members that re-register
        within ``master_regroup_timeout`` are admitted (new peer ids), newcomers stay pending.

        Raises InvalidUsage (async collectives still in flight), PcclTimeout, MasterLost (still
        reconnecting at the deadline: call it again), MasterUnreachable (no master within
        ``master_reconnect_timeout``), Kicked, PeerFailure (a neighbour died while links were
        opened: call it again).
        """
        self._vote_topology(False, timeout, admit)

    def optimize_topology(self, timeout: float | None = None) -> None:
        """Like :meth:`update_topology`, and first measure the bandwidth of every directed pair of
        the group not measured before (disjoint pairs in parallel, ``Config.probe_seconds`` each);
        the master then orders the ring to maximise its slowest link. Every accepted peer must
        call update_topology or optimize_topology; one optimize vote makes it an optimization.
        Raises what update_topology raises.
        """
        self._vote_topology(True, timeout, True)

    def _vote_topology(self, optimize: bool, timeout: float | None, admit: bool) -> None:
        deadline = time.monotonic() + (self.config.topology_timeout if timeout is None else timeout)
        with self._cond:
            self._check_fatal()
            if self._ops or self._sync is not None:
                raise InvalidUsage("update_topology() while collectives are in flight; wait for them first")
        if self._lost is None:
            try:
                self._vote_once(optimize, admit, deadline)
                return
            except MasterLost:
                pass
        self._reform(deadline)  # re-forming the group after a master restart is this topology update

    def _vote_once(self, optimize: bool, admit: bool, deadline: float) -> None:
        with self._cond:
            self._check()
            start = self._revision
            self._send(m.VoteTopology(optimize=optimize, admit=admit))
            self._wait(lambda: self._new_topology is not None and self._new_topology.revision > start,
                       deadline, "the topology update (every accepted peer must call update_topology)")
            topo = self._new_topology
        self._apply(topo, deadline)

    # ------------------------------------------------------------------ riding through a master restart
    def _reform(self, deadline: float) -> None:
        """Wait until the control channel re-registered and this peer is admitted again, adopt that
        topology, then vote until every former member of the group is back (``_regroup``).

        Raises MasterLost (``deadline`` passed while still reconnecting), MasterUnreachable (the
        channel's reconnect window passed), Kicked, PeerFailure (links could not be opened).
        """
        while True:
            with self._cond:
                try:
                    self._wait(lambda: self._lost is None or (
                        self._registered_epoch == self._epoch and self._new_topology is not None
                        and not self._ops and self._sync is None),
                        deadline, "re-admission by the restarted master", ride=True)
                except PcclTimeout:
                    raise MasterLost(f"the connection to the master at {self.master} is not re-established yet "
                                     "(the call's deadline passed); retry") from None
                topo = self._new_topology if self._lost is not None else None
                self._lost = None
            try:
                if topo is not None:
                    log.info("peer %d: re-admitted by the master at %s (revision %d, %d members)",
                             self.peer_id, self.master, topo.revision, len(topo.members))
                    self._apply(topo, deadline)
                self._regroup(deadline)
                return
            except MasterLost:
                continue  # lost again while re-forming: wait for the next registration
            except PcclError:
                with self._cond:
                    self._former = set()  # the caller's retry does an ordinary update
                raise

    def _regroup(self, deadline: float) -> None:
        """Vote (admit=False: only re-joining peers get in) while former members of this peer's
        group are missing and some re-joining peer is pending, for at most master_regroup_timeout."""
        end = min(deadline, time.monotonic() + self.config.master_regroup_timeout)
        while True:
            with self._cond:
                self._check()
                present = {(mb.host, mb.port) for mb in self._members.values() if mb.group == self.peer_group}
                missing = self._former - present
                if not missing or time.monotonic() >= end:
                    if missing:
                        log.warning("peer %d: %d former member(s) of group %d did not re-register within %gs; "
                                    "going on without them", self.peer_id, len(missing), self.peer_group,
                                    self.config.master_regroup_timeout)
                    elif self._former:
                        log.info("peer %d: group %d re-formed after a master restart (revision %d)",
                                 self.peer_id, self.peer_group, self._revision)
                    self._former = set()
                    return
            _pending, rejoin = self._query_pending(min(end, time.monotonic() + self.config.request_timeout))
            if rejoin:
                self._vote_once(False, False, deadline)
            else:
                with self._cond:
                    self._cond.wait(min(0.1, max(end - time.monotonic(), 0.0)))

    def _query_pending(self, deadline: float) -> tuple[bool, bool]:
        """(any peer pending, any pending peer re-joining after a master restart)."""
        with self._cond:
            self._check()
            req = next(self._reqs)
            self._send(m.PendingQuery(req=req))
            self._wait(lambda: req in self._replies, deadline, "the master's answer")
            return self._replies.pop(req)

    def _probe(self, msg: m.Probe) -> None:
        try:
            bps = probe.measure(msg.host, msg.port, self.peer_id, msg.target, msg.seconds, self.connections,
                                self.config)
        except PcclError as exc:
            log.info("peer %s: %s", self._peer_id, exc)
            bps = 0.0
        self._send_quietly(m.ProbeResult(round=msg.round, target=msg.target, bytes_per_second=bps))

    def are_peers_pending(self, timeout: float | None = None) -> bool:
        """Whether peers wait to be admitted (then every accepted peer should call update_topology).

        While the connection to the master is being re-established (it restarted), it first waits
        for the reconnection and re-forms the group like update_topology (up to
        ``topology_timeout`` when ``timeout`` is None). Raises PcclTimeout, MasterLost (still
        reconnecting at the deadline), MasterUnreachable, Kicked, PeerFailure.
        """
        start = time.monotonic()
        deadline = start + (self.config.request_timeout if timeout is None else timeout)
        reform_by = start + (self.config.topology_timeout if timeout is None else timeout)
        while True:
            if self._lost is not None:
                self._reform(reform_by)
                if timeout is None:
                    deadline = time.monotonic() + self.config.request_timeout
            try:
                return self._query_pending(deadline)[0]
            except MasterLost:
                if time.monotonic() >= reform_by:
                    raise
                with self._cond:
                    self._cond.wait(0.05)  # the control thread is reporting the loss

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, src: Any, dst: Any = None, op: ReduceOp = ReduceOp.SUM,
                   quantization: Quantization = Quantization.NONE, algorithm: Algorithm = Algorithm.AUTO,
                   tag: int = 0, timeout: float | None = None) -> ReduceInfo:
        """All-reduce ``src`` into ``dst`` (``None``: in place) over this peer's group.

        Every participant ends with bit-identical results. Raises PeerFailure or Aborted (a
        participant died or failed: call update_topology and retry), PcclTimeout,
        InvalidUsage (bad arguments, or arguments that differ across peers), MasterUnreachable,
        Kicked. On any error ``src`` is unchanged byte for byte.
        """
        return self._run(self._prepare(src, dst, op, quantization, algorithm, tag, timeout))

    def all_reduce_async(self, src: Any, dst: Any = None, op: ReduceOp = ReduceOp.SUM,
                         quantization: Quantization = Quantization.NONE, algorithm: Algorithm = Algorithm.AUTO,
                         tag: int = 0, timeout: float | None = None) -> "AllReduceHandle":
        """Start an all-reduce and return a handle; ``handle.wait()`` returns its ReduceInfo or raises
        what ``all_reduce`` would. Ops in flight at once need distinct tags."""
        prepared = self._prepare(src, dst, op, quantization, algorithm, tag, timeout)
        return AllReduceHandle(self, prepared)

    def all_reduce_many(self, tensors: list, op: ReduceOp = ReduceOp.SUM,
                        quantization: Quantization = Quantization.NONE, algorithm: Algorithm = Algorithm.AUTO,
                        max_in_flight: int = 16, tag_base: int = 0, retries: int = 5,
                        timeout: float | None = None, bucket_bytes: int | None = None) -> list[ReduceInfo]:
        """All-reduce every tensor of ``tensors`` in place, up to ``max_in_flight`` collectives at
        once (tags ``tag_base .. tag_base + max_in_flight - 1``), in list order on every peer.

        Unquantized, tensors under ``bucket_bytes`` (None: ``Config.bucket_bytes``; 0: never) are
        coalesced per dtype into buckets of up to that size, one collective each
        (:mod:`pccl.coalesce`): a small op costs about as much as a 1 MiB one. Tensors of one
        bucket share its ReduceInfo. Quantized ops stay one per tensor (codec scales are per
        chunk, so a bucket would let one tensor's range set another's precision). Bucketed, the
        first collective carries a digest of the whole list's sizes and dtypes and nothing else
        starts before it commenced, so lists that differ across peers raise InvalidUsage on every
        peer at once. A tensor may appear only once in the list.

        Tensors whose collective fails with PeerFailure or Aborted are retried after
        ``update_topology(admit=False)`` (dead peers dropped, newcomers kept waiting), up to
        ``retries`` times: so, like PCCL, tensors reduced before a death count the old world and
        retried ones the survivors (``ReduceInfo.world_size`` says which). Returns one ReduceInfo
        per tensor. Raises what all_reduce raises once the retries are spent, and InvalidUsage,
        MasterUnreachable, Kicked at once; every tensor not reduced is then unchanged.
        """
        if not isinstance(max_in_flight, int) or not 1 <= max_in_flight <= self.config.max_in_flight:
            raise InvalidUsage(f"max_in_flight must be an int in 1..{self.config.max_in_flight}")
        if type(tag_base) is not int or tag_base < 0 or tag_base + max_in_flight > SYNC_TAG:
            raise InvalidUsage("tag_base must be a non-negative int")
        cap = self.config.bucket_bytes if bucket_bytes is None else bucket_bytes
        if type(cap) is not int or cap < 0:
            raise InvalidUsage("bucket_bytes must be a non-negative int")
        try:
            if Quantization(quantization) is not Quantization.NONE:
                cap = 0
        except ValueError:
            cap = 0  # all_reduce_async raises InvalidUsage for it
        shapes = [coalesce.describe(t) for t in tensors]
        starts = [a for size, _, a in shapes if size]
        if len(set(starts)) != len(starts):
            raise InvalidUsage("all_reduce_many: a tensor appears twice in the list (tensors must not share memory)")
        results: list[ReduceInfo | None] = [None] * len(tensors)
        todo = list(range(len(tensors)))
        retry = (PeerFailure, Aborted)
        for attempt in range(retries + 1):
            failed: list[int] = []
            error: BaseException | None = None
            window: list[tuple[list[int], coalesce.Bucket | None, AllReduceHandle]] = []

            def note(idx: list[int], exc: BaseException) -> None:
                nonlocal error
                failed.extend(idx)
                if error is None or (isinstance(error, retry) and not isinstance(exc, retry)):
                    error = exc

            def reap(idx: list[int], bucket: coalesce.Bucket | None, h: AllReduceHandle) -> None:
                try:
                    info = h.wait()
                    if bucket is not None:
                        bucket.scatter()
                except Exception as exc:  # noqa: BLE001 - raised once every started op has ended
                    note(idx, exc)
                    return
                for i in idx:
                    results[i] = info

            layout = [shapes[i][:2] for i in todo]
            # Bucketed, every collective names the whole list's layout, so the master refuses the
            # first one if peers passed different lists (InvalidUsage), before plans diverge.
            kind = f"all_reduce_many {coalesce.layout_digest(layout, cap)}" if cap else ""
            plan = coalesce.plan([size for size, _ in layout], [k or None for _, k in layout], cap)
            for n, members in enumerate(plan):
                idx = [todo[j] for j in members]
                if len(window) == max_in_flight:
                    reap(*window.pop(0))
                if error is not None:  # the group needs a topology update: stop starting ops
                    failed.extend(idx)
                    continue
                try:
                    bucket = (coalesce.Bucket([tensors[i] for i in idx], [f"tensors[{i}]" for i in idx])
                              if len(idx) > 1 else None)
                    src, dst = (bucket.src, bucket.dst) if bucket is not None else (tensors[idx[0]], None)
                    rec = self._prepare(src, dst, op, quantization, algorithm, tag_base + n % max_in_flight, timeout)
                    if kind:
                        rec.announce = dataclasses.replace(rec.announce, kind=kind)
                    window.append((idx, bucket, AllReduceHandle(self, rec)))
                except Exception as exc:  # noqa: BLE001 - as in reap
                    note(idx, exc)
                    continue
                if kind and n == 0 and not self._commenced(rec):
                    reap(*window.pop())  # refused (or a world of one): it ends at once
            for item in window:
                reap(*item)
            if not failed:
                return [r for r in results if r is not None]
            assert error is not None
            if not isinstance(error, retry) or attempt == retries:
                raise error
            log.info("peer %s: %d of %d all-reduces failed (%s); retrying after a topology update",
                     self._peer_id, len(failed), len(tensors), error)
            self.update_topology(admit=False)
            todo = sorted(failed)
        raise AssertionError("unreachable")  # pragma: no cover

    def _commenced(self, rec: _Op) -> bool:
        """Wait until the master commenced ``rec`` (True) or it ended without (refused, failed,
        or a world of one: False)."""
        with self._cond:
            try:
                self._wait(lambda: rec.commence is not None or rec.refused is not None
                           or self._ops.get(rec.tag) is not rec, rec.deadline, f"commencement of tag {rec.tag}")
            except PcclError:
                return False  # the op's own thread raises the same
            return rec.commence is not None

    def _prepare(self, src: Any, dst: Any, op: Any, quantization: Any, algorithm: Any, tag: Any,
                 timeout: float | None) -> _Op:
        try:
            op = ReduceOp(op)
            quantization = Quantization(quantization)
            algorithm = Algorithm(algorithm)
        except ValueError as exc:
            raise InvalidUsage(str(exc)) from exc
        if type(tag) is not int or tag < 0 or tag >= SYNC_TAG:
            raise InvalidUsage(f"tag must be an int in 0..{SYNC_TAG - 1}")
        sb = tensors.wrap(src, "src")
        db = sb if dst is None else tensors.wrap(dst, "dst")
        if db.dtype != sb.dtype or db.array.size != sb.array.size:
            raise InvalidUsage(f"src ({sb.dtype}, {sb.array.size} elements) and dst ({db.dtype}, "
                               f"{db.array.size} elements) must match")
        in_place = db.identity == sb.identity
        if in_place and db.writeback is None and not db.array.flags.writeable:
            raise InvalidUsage("src: the array is read-only (an in-place all-reduce writes into it)")
        if not in_place and db.writeback is None and sb.writeback is None and np.shares_memory(sb.array, db.array):
            raise InvalidUsage("src and dst overlap partially; pass the same buffer or disjoint ones")
        commit = None
        if sb.dtype in tensors.WIDENED or sb.writeback is not None or db.writeback is not None:
            # Staged: reduce into a private buffer, write the user's dst only on commit.
            inp = sb.array.astype(np.float32) if sb.dtype in tensors.WIDENED else sb.array
            out = np.empty_like(inp)
            if db.writeback is not None:
                commit = lambda: db.writeback(out)  # noqa: E731
            else:
                commit = lambda: np.copyto(db.array, out, casting="unsafe")  # noqa: E731
        else:
            inp = sb.array
            out = inp if in_place else db.array
        error = ""
        if quantization is not Quantization.NONE:
            if inp.dtype != np.float32 or op not in (ReduceOp.SUM, ReduceOp.AVG):
                raise InvalidUsage(f"quantization {quantization.name} applies to float32, float16 and bfloat16 "
                                   f"tensors with op SUM or AVG (got {sb.dtype}, {op.name})")
            bad = codecs.first_nonfinite(inp)
            if bad is not None:
                error = f"quantized all-reduce input contains NaN/inf (first at index {bad})"
        deadline = time.monotonic() + (self.config.op_timeout if timeout is None else timeout)
        ann = m.Announce(tag=tag, kind="all_reduce", count=int(inp.size), dtype=sb.dtype, op=op.value,
                         algorithm=algorithm.value, quantization=quantization.value, error=error)
        rec = _Op(tag, ann, op, inp, out, deadline)
        rec.commit = commit
        rec.quantization = quantization
        rec.algorithm = algorithm
        with self._cond:
            self._check()
            if self._sync is not None:
                raise InvalidUsage("a collective was started while sync_shared_state runs")
            if tag in self._ops:
                raise InvalidUsage(f"tag {tag} is already in flight on this peer")
            if len(self._ops) >= self.config.max_in_flight:
                raise InvalidUsage(f"at most {self.config.max_in_flight} collectives may be in flight")
            self._ops[tag] = rec
        return rec

    def _run(self, rec: _Op) -> ReduceInfo:
        t0 = time.monotonic()
        try:
            world = self._collective(rec)
        finally:
            with self._cond:
                self._ops.pop(rec.tag, None)
                if rec.commence is not None:
                    self._by_seq.pop(rec.commence.seq, None)
                else:
                    # Ended without commencing (a world of one, or refused): all_reduce_many's
                    # _commenced may be waiting for that. Commenced ops end without waking anyone.
                    self._cond.notify_all()
            if rec.job is None or rec.job.join(0.0):  # no lane can still write into these buffers
                if rec.backup is not None:
                    self._pool.give(rec.backup.store.view(np.uint8))
                for buf in rec.job.pooled if rec.job is not None else ():
                    self._pool.give(buf)
        if rec.commit is not None:
            rec.commit()
        job = rec.job
        return ReduceInfo(world, job.tx_bytes if job else 0, job.rx_bytes if job else 0, time.monotonic() - t0,
                          rec.announce.algorithm if world > 1 else Algorithm.RING.value)

    def _collective(self, rec: _Op) -> int:
        """Run one collective to its verdict; returns the world size or raises (input restored)."""
        with self._cond:
            self._check()
            world = len(self._ring)
            rec.revision = self._revision
            if world > 1:
                self._plan(rec)
        if world == 1:
            if rec.announce.error:
                raise InvalidUsage(rec.announce.error)
            if rec.out is not rec.inp:
                np.copyto(rec.out, rec.inp)
            kernels.finalize(rec.op, rec.out, 1)
            return 1
        self._send(rec.announce)
        if rec.backup is not None:
            rec.backup.run()  # overlaps the master round trip and the first ring steps
        with self._cond:
            try:
                self._wait(lambda: rec.commence is not None or rec.refused is not None, rec.deadline,
                           f"commencement of collective tag {rec.tag} (every peer of the group must call it)")
            except PcclError as exc:
                rec.refused = exc  # under the lock: a late Commence now ignores this op
                self._send_quietly(m.Withdraw(tag=rec.tag))
            if rec.commence is None:
                assert rec.refused is not None
                if rec.backup is not None:
                    rec.backup.cancel()
                raise rec.refused
            seq = rec.commence.seq
        local: PcclError | None = rec.start_error
        if local is None:
            assert rec.job is not None
            try:
                rec.job.wait(rec.deadline)
            except PcclError as exc:
                local = exc
        if local is None:
            self._send_quietly(m.OpReport(seq=seq, ok=True, kind="", message=""))
        else:
            kind = ("peer_failure" if isinstance(local, PeerFailure)
                    else "timeout" if isinstance(local, PcclTimeout) else "aborted")
            self._send_quietly(m.OpReport(seq=seq, ok=False, kind=kind, message=str(local)))
            if rec.job is not None:
                rec.job.abort(local)
        # The master decides once every participant reported or died; it stays alive (heartbeats)
        # or the control channel fails with MasterUnreachable, so this wait is bounded.
        verdict_deadline = max(rec.deadline, time.monotonic()) + self.config.op_timeout + self.config.peer_timeout
        failure: PcclError | None = None
        with self._cond:
            try:
                self._wait(lambda: rec.verdict is not None, verdict_deadline, f"the verdict on op {seq}")
            except PcclError as exc:
                failure = local or exc
            verdict = rec.verdict
        if failure is not None or verdict is None:
            self._abort_restore(rec)  # outside the lock: joining lanes may take a moment
            raise failure or PcclTimeout(f"no verdict on op {seq}")
        if verdict.ok and local is None:
            return len(rec.commence.participants)
        self._abort_restore(rec)
        if local is not None:
            raise local
        raise error_from_kind(verdict.kind, verdict.message)

    def _plan(self, rec: _Op) -> None:
        """Resolve AUTO, build the schedule and the backup of an in-place op (lock held). The
        resolved algorithm goes into the announcement, so the master checks that all agree."""
        c = self.config
        localities = [self._members[pid].locality for pid in self._ring]
        itemsize = rec.inp.dtype.itemsize
        nbytes = rec.inp.size * itemsize
        if rec.quantization is not Quantization.NONE:
            nbytes = codecs.encoded_size(rec.quantization, rec.inp.size)
        link_bps, wan_bps = self._link_rates
        segments = groups.segment_count(rec.inp.size, localities, itemsize, c.pipeline_bytes, self.connections)
        algo = select.choose(rec.algorithm, nbytes, localities, c.alpha_seconds, link_bps, wan_bps,
                             c.reduce_bytes_per_second, segments, self._one_host)
        rec.announce = dataclasses.replace(rec.announce, algorithm=algo.value)
        world, rank = len(self._ring), self.rank
        if algo is Algorithm.RING:
            rec.plan = ring.plan(rec.inp.size, world, rank, itemsize, c.pipeline_bytes, self.connections)
            order = backup_mod.overwrite_order(rec.plan, skip_reduced=rec.quantization is Quantization.NONE)
        else:
            rec.plan = groups.plan(rec.inp.size, localities, rank, itemsize, c.pipeline_bytes, self.connections,
                                   star=algo is Algorithm.STAR)
            order = groups.overwrite_order(rec.plan)
        if rec.out is rec.inp:
            store = self._pool.take(rec.inp.nbytes).view(rec.inp.dtype)
            rec.backup = backup_mod.Backup(rec.inp, store, order)

    def _abort_restore(self, rec: _Op) -> None:
        job = rec.job
        if job is None:
            return
        job.abort(PeerFailure("op aborted"))
        if not job.join(self.config.connect_timeout + 5.0):
            # Should never happen (shut-down sockets end every lane); if it does, this peer's
            # buffers can no longer be trusted, so every later call fails loudly.
            with self._cond:
                self._fail(PcclError(f"op {job.seq}: data lanes did not stop after an abort, so its input "
                                     "may not be restored; create a new Communicator"))
                self._cond.notify_all()
            return
        job.restore()

    def _send_quietly(self, msg: object) -> None:
        try:
            self._send(msg)
        except PcclError:
            pass  # the fatal failure is raised by the next wait

    # ------------------------------------------------------------------ shared state
    def sync_shared_state(self, state: SharedState, strategy: SyncStrategy = SyncStrategy.ENFORCE_POPULAR,
                          timeout: float | None = None) -> SyncInfo:
        """Make ``state`` identical on every peer of the group; returns SyncInfo(tx, rx, revision).

        Every peer of the group must call it. ``state.revision`` must be exactly one above the
        revision of this object's previous sync (the first sync may start anywhere). The group
        adopts the highest revision among the peers that may send and, per key, the content most
        of them hold (ties: the smallest hash); outdated peers download only the keys that differ,
        from all holders in parallel, verify each key's hash and adopt the group's revision.
        ENFORCE_POPULAR peers vote, send and receive. If any peer uses SEND_ONLY, only SEND_ONLY
        peers vote; a SEND_ONLY peer that would have to receive gets InvalidUsage. RECEIVE_ONLY
        peers never vote; they receive (and serve keys they already hold).

        Raises InvalidUsage (revision not advanced by one, key set/shape/dtype different from the
        group's, strategy rules, collectives in flight: only this peer fails, the others go on),
        PeerFailure (every holder of a key died: the state is lost on this peer, call
        update_topology and sync again), Aborted, PcclTimeout, MasterUnreachable, Kicked. Keys
        this peer was downloading may be partly overwritten when it fails; its revision then stays
        unchanged, so the next sync repairs them.
        """
        if not isinstance(state, SharedState):
            raise InvalidUsage(f"sync_shared_state takes a pccl.SharedState, got {type(state).__name__}")
        try:
            strategy = SyncStrategy(strategy)
        except ValueError as exc:
            raise InvalidUsage(str(exc)) from exc
        deadline = time.monotonic() + (self.config.op_timeout if timeout is None else timeout)
        views = state.views()
        error = ""
        if state.synced_revision is not None and state.revision != state.synced_revision + 1:
            error = (f"the shared state revision must advance by exactly one per sync: it was "
                     f"{state.synced_revision} at the last sync and is {state.revision} now")
        keys = tuple(m.KeyRec(name=v.name, dtype=v.dtype, shape=v.shape, nbytes=v.nbytes,
                              digest=b"" if error else digest(v.data), allow_inequality=v.allow_inequality)
                     for v in views)
        wait = _SyncWait()
        with self._cond:
            self._check()
            if self._ops or self._sync is not None:
                raise InvalidUsage("sync_shared_state() while collectives or another sync are in flight")
            if len(self._ring) == 1:
                if error:
                    raise InvalidUsage(error)
                state.synced_revision = state.revision
                return SyncInfo(0, 0, state.revision)
            self._sync = wait
            if not error:
                self._server.offer([v.data for v in views])
            self._send(m.SyncVote(revision=state.revision, strategy=strategy.value, keys=keys, error=error))
        try:
            return self._finish_sync(state, views, wait, deadline)
        finally:
            self._server.withdraw()
            with self._cond:
                self._sync = None

    def _finish_sync(self, state: SharedState, views: list, wait: _SyncWait, deadline: float) -> SyncInfo:
        with self._cond:
            try:
                self._wait(lambda: wait.plan is not None or wait.refused is not None, deadline,
                           "the shared-state election (every peer of the group must call sync_shared_state)")
            except PcclError:
                if wait.plan is None and wait.refused is None:
                    self._send_quietly(m.Withdraw(tag=SYNC_TAG))
                raise
            if wait.refused is not None:
                raise wait.refused
            plan = wait.plan
            addresses = {pid: (mb.host, mb.port) for pid, mb in self._members.items()}
        assert plan is not None
        rx, failure = 0, None
        if plan.fetch:
            items = [state_transfer.Item(views[f.key].name, f.key, views[f.key].data, f.digest, tuple(f.holders))
                     for f in plan.fetch if f.key < len(views)]
            try:
                if len(items) != len(plan.fetch) or any(h not in addresses for f in plan.fetch for h in f.holders):
                    raise PeerFailure("the master's sync plan names keys or peers this peer does not know")
                rx = state_transfer.fetch(plan.seq, self.peer_id, items, addresses, self.connections, self.config,
                                          deadline, lambda pid: pid in self._dead)
            except PcclError as exc:
                failure = exc
            self._send_quietly(m.SyncReport(seq=plan.seq, ok=failure is None,
                                            message="" if failure is None else str(failure)))
        if not plan.final:
            done_by = max(deadline, time.monotonic()) + self.config.op_timeout + self.config.peer_timeout
            with self._cond:
                self._wait(lambda: wait.done, done_by, f"the end of shared-state sync {plan.seq}")
        if failure is not None:
            raise failure
        for f in plan.fetch:
            if views[f.key].writeback is not None:
                views[f.key].writeback()
        state.revision = plan.revision
        state.synced_revision = plan.revision
        return SyncInfo(self._server.tx_bytes, rx, plan.revision)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Leave gracefully (the master drops this peer) and free every socket and thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._fail(InvalidUsage("the communicator is closed"))
            self._cond.notify_all()
        if self._control is not None:
            self._control.close(final=m.Leave())
        self._links.close()
        if self._mesh is not None:
            self._mesh.close()
        if self._listener is not None:
            self._listener.close()
        for t in self._probes:
            t.join(self.config.connect_timeout)

    def __enter__(self) -> "Communicator":
        if self._control is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Communicator(peer {self._peer_id}, group {self.peer_group}, revision {self._revision}, "
                f"ring {list(self._ring)})")


class AllReduceHandle:
    """A collective running in its own thread. ``wait()`` may be called again after it finished."""

    def __init__(self, comm: Communicator, prepared: _Op) -> None:
        self._result: ReduceInfo | None = None
        self._error: BaseException | None = None
        self._deadline = prepared.deadline
        self._comm = comm
        self._thread = threading.Thread(target=self._main, args=(prepared,), name="pccl-async-op", daemon=True)
        self._thread.start()

    def _main(self, prepared: _Op) -> None:
        try:
            self._result = self._comm._run(prepared)
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        """Return the op's ReduceInfo or raise its error; PcclTimeout if ``timeout`` passes first
        (the op keeps running; call wait again)."""
        if timeout is None:
            c = self._comm.config
            timeout = max(self._deadline - time.monotonic(), 0.0) + c.op_timeout + c.peer_timeout + 10.0
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PcclTimeout("the collective is still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

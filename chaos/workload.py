"""One chaos peer: a real workload that reports JSON records on stdout for the invariant checker.

How it works
1. ``allreduce``: each iteration admits pending peers, syncs a :class:`pccl.SharedState`
   (``acc`` int64, ``iter``), then runs ``--ops-per-sync`` float32 all-reduces whose inputs are
   integers derived from the peer id and the shared ``iter`` (``pccl.demo``'s pattern), so the
   exact sum is known: each result is compared with it and hashed. The first elements of every
   result are added to ``acc``, so a peer whose result differed would hold a different state at
   the next sync (it would have to download: a drift). Records: ``op`` keyed by (epoch, world
   revision, op index in that revision), ``sync`` keyed by (epoch, shared-state revision).
2. ``diloco``: :class:`pccl.optim.DiLoCo` on ``pccl.demo_train``'s tiny transformer; torch is
   imported before ``connect()`` (a first import holds the GIL for seconds and would starve the
   heartbeat). Records per outer step: ``step`` (inner steps since the last record, mean loss),
   ``outer`` (θᵍ digest keyed by (epoch, world revision, outer step)) and ``sync``.
3. Failures: ``pccl.RETRYABLE`` and ``PcclTimeout`` → ``fail`` record, ``update_topology`` and go
   on (DiLoCo retries inside; if it gives up, the peer rejoins with a new Communicator).
   ``Kicked`` / ``MasterUnreachable`` → ``lost`` record, then a new Communicator rejoins the group
   (the revived SIGSTOPped peer's path), unless ``--exit-on-lost``.
4. Deadlines: every blocking call runs under a watchdog that knows its deadline (from
   ``pccl.Config``); records carry ``seconds`` and ``deadline``; a call still running after its
   deadline plus ``--slack`` makes the watchdog print a ``hang`` record at once.
5. The epoch (master incarnation, or a new lineage after a cell lost every peer) is read from
   ``$CHAOS_EPOCH_FILE`` right after each ``connect()``: keys of different epochs never meet.
6. SIGTERM: stop after the current call, leave gracefully (``close()``), print ``exit``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

STATE_ELEMS = 4096


class Out:
    """JSON lines on stdout from several threads."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.pid = os.getpid()  # routes the records of peers forked by chaos.zygote (one shared pipe)
        self.lock = threading.Lock()

    def __call__(self, ev: str, **fields) -> None:
        fields.update(ev=ev, slot=self.slot, t=time.time(), pid=self.pid)
        line = json.dumps(fields) + "\n"
        with self.lock:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass


class Watchdog:
    """Times the main loop's blocking calls; reports a call that outlives deadline + slack."""

    def __init__(self, out: Out, slack: float) -> None:
        self.out, self.slack = out, slack
        self.peer: int | None = None
        self._cur: tuple[str, float, float] | None = None
        self._reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-watchdog", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        last_tick = 0.0
        while not self._stop.wait(0.5):
            now = time.monotonic()
            cur = self._cur
            if cur is not None and not self._reported and now - cur[1] > cur[2] + self.slack:
                self._reported = True
                self.out("hang", peer=self.peer, what=cur[0], seconds=now - cur[1], deadline=cur[2])
            if now - last_tick >= 2.0:
                last_tick = now
                self.out("tick", peer=self.peer)

    @contextmanager
    def call(self, what: str, deadline: float):
        self._cur, self._reported = (what, time.monotonic(), deadline), False
        try:
            yield
        finally:
            self._cur = None

    def elapsed(self) -> float:
        cur = self._cur
        return time.monotonic() - cur[1] if cur else 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _epoch() -> int:
    path = os.environ.get("CHAOS_EPOCH_FILE")
    if not path:
        return 0
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        import pccl

        self.args = args
        self.pccl = pccl
        self.cfg = pccl.Config.from_env()
        self.out = Out(args.slot)
        self.watch = Watchdog(self.out, args.slack)
        self.stop = threading.Event()
        self.phase = "start"
        self.comm = None
        self.epoch = 0
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_: object) -> None:
        self.stop.set()
        if self.phase in ("connect", "spare"):  # nothing to leave yet; connect() waits for admission
            self.out("exit", peer=None, reason="terminated while joining")
            os._exit(0)

    def wait_for_slot(self) -> None:
        """A warm spare: everything is set up; block until the controller names our slot."""
        if not self.args.spare:
            return
        self.phase = "spare"
        self.out("spare_ready", peer=None)
        line = sys.stdin.readline()
        if not line.strip().isdigit():
            self.out("exit", peer=None, reason="spare released")
            os._exit(0)
        self.out.slot = int(line)
        self.phase = "run"

    # ------------------------------------------------------------------ membership
    def connect(self):
        """A new Communicator admitted to the group, or None when told to stop."""
        pccl, cfg = self.pccl, self.cfg
        self.phase = "connect"
        try:
            while not self.stop.is_set():
                comm = pccl.Communicator(connections=1)
                t0 = time.monotonic()
                deadline = cfg.join_timeout + cfg.topology_timeout
                try:
                    with self.watch.call("connect", deadline):
                        comm.connect()
                except pccl.PcclError as exc:
                    self.out("call", peer=None, what="connect", error=type(exc).__name__, message=str(exc)[:200],
                             seconds=time.monotonic() - t0, deadline=deadline)
                    comm.close()
                    self.stop.wait(1.0)
                    continue
                self.epoch = _epoch()
                self.watch.peer = comm.peer_id
                self.comm = comm
                self.out("joined", peer=comm.peer_id, world=comm.world_size, revision=comm.revision,
                         epoch=self.epoch, seconds=time.monotonic() - t0, deadline=deadline, what="connect")
                return comm
            return None
        finally:
            self.phase = "run"

    def timed(self, what: str, deadline: float, fn, *a, **kw):
        t0 = time.monotonic()
        with self.watch.call(what, deadline):
            res = fn(*a, **kw)
        dt = time.monotonic() - t0
        if dt > 1.0:
            self.out("call", peer=self.comm.peer_id, what=what, seconds=dt, deadline=deadline)
        return res, dt

    def recover(self, comm, what: str, exc: Exception, seconds: float, deadline: float) -> None:
        """After a failed call: report it, then update_topology until it works (or stop)."""
        pccl, cfg = self.pccl, self.cfg
        self.out("fail", peer=comm.peer_id, what=what, error=type(exc).__name__, message=str(exc)[:200],
                 seconds=seconds, deadline=deadline)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.timed("update_topology", cfg.topology_timeout + cfg.connect_timeout, comm.update_topology)
                return
            except (*pccl.RETRYABLE, pccl.PcclTimeout) as exc2:
                self.out("fail", peer=comm.peer_id, what="update_topology", error=type(exc2).__name__,
                         message=str(exc2)[:200], seconds=time.monotonic() - t0,
                         deadline=cfg.topology_timeout + cfg.connect_timeout)

    def lost(self, comm, exc: BaseException) -> bool:
        """Report a lost communicator; True when the peer should rejoin."""
        self.out("lost", peer=comm.peer_id if comm is not None else None, error=type(exc).__name__,
                 message=str(exc)[:300])
        if comm is not None:
            comm.close()
        self.comm = None
        return not self.args.exit_on_lost

    def finish(self, reason: str) -> int:
        if self.comm is not None:
            self.comm.close()
        self.out("exit", peer=None if self.comm is None else self.comm.peer_id, reason=reason)
        self.watch.close()
        return 0

    # ------------------------------------------------------------------ raw all-reduces
    def run_allreduce(self) -> int:
        from pccl.demo import _equal, _peer_value

        pccl, cfg, a = self.pccl, self.cfg, self.args
        count = max(a.elems, STATE_ELEMS)
        pattern = (np.arange(count, dtype=np.int64) % 7).astype(np.float32)
        buf = np.empty(count, dtype=np.float32)
        expect = np.empty(count, dtype=np.float32)
        acc = np.zeros(STATE_ELEMS, dtype=np.int64)
        it = np.zeros(1, dtype=np.int64)
        revision = 0  # a rejoining peer keeps its (stale) state and revision: it must lose the election
        op_deadline = cfg.op_timeout + cfg.peer_timeout
        sync_deadline = 2 * cfg.op_timeout + cfg.peer_timeout
        self.wait_for_slot()
        while not self.stop.is_set():
            comm = self.connect()
            if comm is None:
                break
            state = pccl.SharedState({"acc": acc, "iter": it}, revision=revision)
            fresh = True
            world_rev, index = comm.revision, 0
            try:
                while not self.stop.is_set():
                    what, deadline, t0 = "are_peers_pending", cfg.request_timeout, time.monotonic()
                    try:
                        pending, _ = self.timed(what, deadline, comm.are_peers_pending)
                        if pending:
                            what, deadline, t0 = "update_topology", cfg.topology_timeout + cfg.connect_timeout, \
                                time.monotonic()
                            self.timed(what, deadline, comm.update_topology)
                        if comm.world_size < 2:
                            self.stop.wait(0.05)  # alone: wait for peers to join
                            continue
                        if state.synced_revision is not None:
                            state.revision = state.synced_revision + 1
                        what, deadline, t0 = "sync", sync_deadline, time.monotonic()
                        info, dt = self.timed(what, deadline, comm.sync_shared_state, state)
                        self.out("sync", peer=comm.peer_id, key=[self.epoch, info.revision],
                                 hash=_state_hash(state), rx=info.rx_bytes, fresh=fresh, world=comm.world_size,
                                 seconds=dt, deadline=deadline)
                        fresh = False
                        revision = info.revision
                        for _ in range(a.ops_per_sync):
                            if self.stop.is_set():
                                break
                            if comm.revision != world_rev:
                                world_rev, index = comm.revision, 0
                            ring = comm.topology
                            off = np.float32(int(it[0]) % 5)
                            np.add(pattern, np.float32(_peer_value(comm.peer_id)) + off, out=buf)
                            what, deadline, t0 = "all_reduce", op_deadline, time.monotonic()
                            rinfo, dt = self.timed(what, deadline, comm.all_reduce, buf)
                            np.add(pattern, off, out=expect)
                            np.multiply(expect, np.float32(len(ring)), out=expect)
                            np.add(expect, np.float32(sum(_peer_value(p) for p in ring)), out=expect)
                            self.out("op", peer=comm.peer_id, key=[self.epoch, world_rev, index],
                                     exact=bool(_equal(buf, expect)), digest=_digest(buf), world=rinfo.world_size,
                                     seconds=dt, deadline=deadline, bytes=buf.nbytes)
                            index += 1
                            acc += buf[:STATE_ELEMS].astype(np.int64)
                            it += 1
                    except (*pccl.RETRYABLE, pccl.PcclTimeout) as exc:
                        self.recover(comm, what, exc, time.monotonic() - t0, deadline)
            except (pccl.Kicked, pccl.MasterUnreachable) as exc:
                revision = state.synced_revision if state.synced_revision is not None else revision
                if not self.lost(comm, exc):
                    return 3
                continue
            break
        return self.finish("stopped")

    # ------------------------------------------------------------------ DiLoCo
    def run_diloco(self) -> int:
        import torch  # before connect(): the first import holds the GIL for seconds

        from pccl.demo_train import batch, encode_text, generate_text, loss_of, make_model
        from pccl.optim import DiLoCo
        from pccl.optim._resilient import RetryPolicy

        pccl, cfg, a = self.pccl, self.cfg, self.args
        torch.set_num_threads(1)
        data = encode_text(generate_text(1000 + a.slot, 100_000))
        model = make_model(a.context)
        inner = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
        rng = np.random.default_rng(a.seed * 1000 + a.slot)
        retry = RetryPolicy(attempts=30, seconds=a.retry_seconds)
        step_deadline = retry.seconds + 2 * cfg.op_timeout + cfg.topology_timeout + cfg.peer_timeout
        opt = None
        self.wait_for_slot()
        while not self.stop.is_set():
            if opt is not None:  # rejoining: start from the last global parameters this peer agreed on
                with torch.no_grad():
                    for p, t in zip(opt.params, opt.theta):
                        p.copy_(t)
                opt = None
            comm = self.connect()
            if comm is None:
                break
            t0 = time.monotonic()
            try:
                with self.watch.call("DiLoCo()", step_deadline):
                    opt = DiLoCo(model, inner, comm, sync_every=a.sync_every, outer_lr=0.7, outer_momentum=0.9,
                                 nesterov=True, retry=retry)
                self._diloco_records(opt, comm, fresh=True, seconds=time.monotonic() - t0, deadline=step_deadline)
                losses: list[float] = []
                while not self.stop.is_set():
                    x, y = batch(data, rng, a.batch, a.context)
                    loss = loss_of(model, x, y)
                    loss.backward()
                    before = opt.outer_step
                    t0 = time.monotonic()
                    with self.watch.call("DiLoCo.step", step_deadline):
                        opt.step()
                    dt = time.monotonic() - t0
                    opt.zero_grad()
                    losses.append(float(loss.item()))
                    if opt.outer_step != before:
                        s = opt.last_outer_step
                        extra = s.attempts - 1 if s is not None else 0
                        self.out("step", peer=comm.peer_id, n=len(losses), loss=float(np.mean(losses)),
                                 gstep=opt.global_step, world=comm.world_size, seconds=dt, deadline=step_deadline,
                                 what="DiLoCo.step", extra_attempts=extra)
                        losses = []
                        self._diloco_records(opt, comm, fresh=False, seconds=dt, deadline=step_deadline)
            except (pccl.Kicked, pccl.MasterUnreachable) as exc:
                if not self.lost(comm, exc):
                    return 3
                continue
            except (*pccl.RETRYABLE, pccl.PcclTimeout) as exc:
                # DiLoCo spent its retry budget (or a sync deadline passed): rejoin with a new
                # Communicator rather than continue from a half-done outer step
                self.out("fail", peer=comm.peer_id, what="DiLoCo", error=type(exc).__name__,
                         message=str(exc)[:200], seconds=time.monotonic() - t0, deadline=step_deadline)
                self.out("rejoin", peer=comm.peer_id, reason=type(exc).__name__)
                comm.close()
                self.comm = None
                continue
            break
        return self.finish("stopped")

    def _diloco_records(self, opt, comm, fresh: bool, seconds: float, deadline: float) -> None:
        if comm.world_size < 2:
            return  # alone: trivially consistent, and its keys would only clutter the tables
        self.out("outer", peer=comm.peer_id, key=[self.epoch, comm.revision, opt.outer_step],
                 digest=opt.theta_digest(), world=comm.world_size)
        info = opt.last_sync
        self.out("sync", peer=comm.peer_id, key=[self.epoch, opt.state.synced_revision], hash=_state_hash(opt.state),
                 rx=getattr(info, "rx_bytes", 0), fresh=fresh, world=comm.world_size, seconds=seconds,
                 deadline=deadline, what="DiLoCo sync")


def _digest(buf: np.ndarray) -> str:
    return hashlib.sha256(buf.view(np.uint8)).hexdigest()[:16]


def _state_hash(state) -> str:
    from pccl.shared_state import digest

    h = hashlib.sha256()
    for v in state.views():
        h.update(v.name.encode())
        h.update(digest(v.data))
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.workload", description="one chaos peer (started by the campaign)")
    p.add_argument("--workload", choices=("allreduce", "diloco"), required=True)
    p.add_argument("--slot", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slack", type=float, default=10.0)
    p.add_argument("--elems", type=int, default=1 << 18, help="float32 elements per all-reduce")
    p.add_argument("--ops-per-sync", type=int, default=4)
    p.add_argument("--sync-every", type=int, default=10, help="DiLoCo inner steps per outer step")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--retry-seconds", type=float, default=60.0)
    p.add_argument("--spare", action="store_true", help="set up, then wait for a slot number on stdin")
    p.add_argument("--exit-on-lost", action="store_true", help="exit after Kicked/MasterUnreachable instead of rejoining")
    args = p.parse_args(argv)
    if args.workload == "diloco":
        import torch  # noqa: F401  - before pccl opens any socket (see the module docstring)
    peer = Peer(args)
    out = peer.out
    out("start", peer=None, workload=args.workload)
    try:
        return peer.run_allreduce() if args.workload == "allreduce" else peer.run_diloco()
    except peer.pccl.PcclError as exc:
        out("lost", peer=None, error=type(exc).__name__, message=str(exc)[:300], fatal=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

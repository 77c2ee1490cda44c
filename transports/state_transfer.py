"""Peer-to-peer shared-state transfer: holders serve byte ranges, receivers fetch from all at once.

How it works
1. A holder registers the byte views of its keys with its :class:`StateServer` before it votes
   (the sync's sequence number is not known yet) and binds them to the sequence number when the
   master's plan arrives. A request that arrives before the plan waits for it, briefly.
2. A receiver splits every key it must download into pieces and opens K connections (handshake
   kind STATE, the sync sequence number in the revision field) to every holder. Each connection
   has a worker that repeatedly takes the next piece its holder can serve, requests it and
   receives it straight into the user's memory: faster holders serve more pieces.
3. A holder that fails (connection error, or the master reports it dead) is dropped; its piece in
   flight goes back to the queue for the other holders. A key whose holders are all gone fails
   the transfer ("state lost"). Every complete key is re-hashed; on a mismatch the key is fetched
   again from one holder at a time until one delivers the elected content.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pccl.config import Config
from pccl.errors import PcclError, PcclTimeout, PeerFailure, ProtocolError
from pccl.shared_state import digest
from pccl.transports import framing
from pccl.transports.links import connect, recv_exact

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- holder side
class StateServer:
    """The byte views this peer serves, by sync sequence number (one sync at a time)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._offered: list[np.ndarray] | None = None
        self._seq: int | None = None
        self.tx_bytes = 0

    def offer(self, views: list[np.ndarray]) -> None:
        with self._cond:
            self._offered, self._seq, self.tx_bytes = views, None, 0

    def bind(self, seq: int) -> None:
        with self._cond:
            self._seq = seq
            self._cond.notify_all()

    def withdraw(self) -> int:
        """Stop serving; returns the payload bytes served."""
        with self._cond:
            self._offered, self._seq = None, None
            self._cond.notify_all()
            return self.tx_bytes

    def lookup(self, seq: int, deadline: float) -> list[np.ndarray] | None:
        with self._cond:
            while self._offered is not None and self._seq is None and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(deadline - time.monotonic(), 0.2)))
            return self._offered if self._seq == seq else None

    def count(self, n: int) -> None:
        with self._cond:
            self.tx_bytes += n

    def serve(self, sock: socket.socket, hs: framing.Handshake, config: Config) -> None:
        """Answer one receiver's requests until it closes the connection (listener handler)."""
        try:
            sock.settimeout(config.op_timeout)
            head = bytearray(framing.STATE_REQ_SIZE)
            while True:
                try:
                    recv_exact(sock, memoryview(head))
                except PeerFailure:
                    return  # the receiver is done
                req = framing.decode_state_request(head, config.max_frame_bytes)
                views = self.lookup(req.seq, time.monotonic() + config.request_timeout)
                if views is None or req.seq != hs.revision:
                    sock.sendall(framing.encode_state_reply(framing.StateReply(framing.STATE_NOT_SERVING, req.seq, 0)))
                    return
                if req.key >= len(views) or req.offset + req.nbytes > views[req.key].nbytes:
                    sock.sendall(framing.encode_state_reply(framing.StateReply(framing.STATE_BAD_REQUEST, req.seq, 0)))
                    return
                sock.sendall(framing.encode_state_reply(framing.StateReply(framing.STATE_OK, req.seq, req.nbytes)))
                sock.sendall(memoryview(views[req.key])[req.offset:req.offset + req.nbytes])
                self.count(req.nbytes)
        except (OSError, PcclError) as exc:
            log.info("state transfer to peer %d ended: %s", hs.peer_id, exc)


# ----------------------------------------------------------------------------------- receiver side
@dataclass
class Item:
    """One key to download into ``view``; ``allowed`` narrows the holders after a bad hash."""

    name: str
    key: int
    view: np.ndarray
    digest: bytes
    holders: tuple[int, ...]
    allowed: tuple[int, ...] = ()
    missing: int = 0  # pieces not received yet
    tries: int = 0  # single-holder refetches after a hash mismatch


@dataclass
class _Shared:
    cond: threading.Condition = field(default_factory=threading.Condition)
    todo: deque = field(default_factory=deque)  # (item, offset, nbytes)
    dead: set[int] = field(default_factory=set)
    complete: list[Item] = field(default_factory=list)
    socks: dict[int, list[socket.socket]] = field(default_factory=dict)
    error: PcclError | None = None
    stop: bool = False
    rx_bytes: int = 0


def _pieces(item: Item, piece: int) -> list[tuple[Item, int, int]]:
    n = item.view.nbytes
    return [(item, off, min(piece, n - off)) for off in range(0, n, piece)]


def fetch(seq: int, my_id: int, items: list[Item], addresses: dict[int, tuple[str, int]], connections: int,
          config: Config, deadline: float, is_dead: Callable[[int], bool]) -> int:
    """Download every item from its holders in parallel; returns the payload bytes received.

    Raises PeerFailure when every holder of a key is gone ("state lost") or no holder delivers
    the elected content, PcclTimeout at the deadline. Keys may be partly written on failure.
    """
    sh = _Shared()
    for it in items:
        it.allowed = it.holders
        parts = _pieces(it, config.pipeline_bytes)
        it.missing = len(parts)
        sh.todo.extend(parts)
        if not parts:
            sh.complete.append(it)
    holders = sorted({h for it in items for h in it.holders})
    threads = [threading.Thread(target=_worker, args=(sh, h, i, seq, my_id, addresses[h], config),
                                name=f"pccl-fetch-{h}-{i}", daemon=True)
               for h in holders for i in range(connections)]
    for t in threads:
        t.start()
    remaining = {id(it) for it in items}
    try:
        while remaining:
            with sh.cond:
                for h in holders:
                    if h not in sh.dead and is_dead(h):
                        _drop(sh, h)
                _check_orphans(sh, items)
                if sh.error is not None:
                    raise sh.error
                done, sh.complete = sh.complete, []
                if not done:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PcclTimeout("the shared-state transfer did not finish within the deadline")
                    sh.cond.wait(min(left, 0.1))
                    continue
            for it in done:  # hash outside the lock: the workers keep receiving
                if digest(it.view) == it.digest:
                    remaining.discard(id(it))
                    continue
                with sh.cond:
                    _retry_single(sh, it, config.pipeline_bytes)
        return sh.rx_bytes
    finally:
        with sh.cond:
            sh.stop = True
            for h in list(sh.socks):
                for s in sh.socks[h]:
                    _shutdown(s)
            sh.cond.notify_all()
        for t in threads:
            t.join(config.connect_timeout)


def _retry_single(sh: _Shared, it: Item, piece: int) -> None:
    """The key's hash is wrong: fetch it again from its holders one at a time."""
    if it.tries >= len(it.holders):
        sh.error = PeerFailure(f"shared state key {it.name!r}: no holder delivered content matching the "
                               "elected hash")
        sh.cond.notify_all()
        return
    log.warning("shared state key %r arrived with a wrong hash; refetching from peer %d", it.name,
                it.holders[it.tries])
    it.allowed = (it.holders[it.tries],)
    it.tries += 1
    parts = _pieces(it, piece)
    it.missing = len(parts)
    sh.todo.extend(parts)
    sh.cond.notify_all()


def _check_orphans(sh: _Shared, items: list[Item]) -> None:
    for item, _, _ in sh.todo:
        if all(h in sh.dead for h in item.allowed):
            sh.error = PeerFailure(f"shared state lost: every peer holding key {item.name!r} "
                                   f"(peers {list(item.allowed)}) is gone; call update_topology and sync again")
            return


def _drop(sh: _Shared, holder: int) -> None:
    sh.dead.add(holder)
    for s in sh.socks.get(holder, []):
        _shutdown(s)
    sh.cond.notify_all()


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _take(sh: _Shared, holder: int) -> tuple[Item, int, int] | None:
    """Next piece this holder may serve; waits while other pieces are in flight (lock held)."""
    while not sh.stop and sh.error is None and holder not in sh.dead:
        for i, part in enumerate(sh.todo):
            if holder in part[0].allowed:
                del sh.todo[i]
                return part
        sh.cond.wait(0.2)
    return None


def _worker(sh: _Shared, holder: int, index: int, seq: int, my_id: int, addr: tuple[str, int],
            config: Config) -> None:
    part = None
    sock = None
    try:
        sock = connect(addr[0], addr[1], my_id, holder, seq, index, config, kind=framing.KIND_STATE)
        sock.settimeout(config.op_timeout)
        with sh.cond:
            sh.socks.setdefault(holder, []).append(sock)
        head = bytearray(framing.STATE_REP_SIZE)
        while True:
            with sh.cond:
                part = _take(sh, holder)
                if part is None:
                    return
            item, off, n = part
            sock.sendall(framing.encode_state_request(framing.StateRequest(seq, item.key, off, n)))
            recv_exact(sock, memoryview(head))
            rep = framing.decode_state_reply(head, config.max_frame_bytes)
            if rep.status != framing.STATE_OK or rep.seq != seq or rep.nbytes != n:
                raise ProtocolError(f"peer {holder} refused piece {off} of key {item.name!r} (status {rep.status})")
            recv_exact(sock, memoryview(item.view)[off:off + n])
            with sh.cond:
                part = None
                sh.rx_bytes += n
                item.missing -= 1
                if item.missing == 0:
                    sh.complete.append(item)
                sh.cond.notify_all()
    except (OSError, PcclError) as exc:
        with sh.cond:
            if not sh.stop:
                log.info("shared-state transfer from peer %d failed: %s", holder, exc)
            if part is not None:
                sh.todo.appendleft(part)
            _drop(sh, holder)
    finally:
        if sock is not None:
            sock.close()
